"""Export: stablehlo and ONNX artefacts reproduce the JAX model's logits at several batch sizes."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxclf import config as config_lib, export, models
from jaxclf.runs import inference
from jaxclf.models import eva, resnet, resnetv2, vit
from tests.model_helpers import with_random_values


def _images(batch, size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)


def _in_memory(model: nnx.Module, num_classes: int) -> inference.TrainedModel:
    """A TrainedModel around a freshly initialised model (no workdir): what export needs, minus training."""
    config = config_lib.base_config()
    config.data.pp_eval = "decode|resize_small(40)|central_crop(32)"
    config.data.mean, config.data.std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    model.eval()
    return inference.TrainedModel("", config, tuple(f"c{i}" for i in range(num_classes)), model, 0, "params")


def test_stablehlo_export_runs_at_any_batch_size(trained_workdir, tmp_path, capsys):
    out = str(tmp_path / "model.stablehlo")
    # The run's pp_eval is only "decode": the input size must be given.
    assert export.main(["--workdir", trained_workdir, "--format", "stablehlo", "--out", out]) == 2
    assert "pass --image_size" in capsys.readouterr().err
    assert export.main(["--workdir", trained_workdir, "--format", "stablehlo", "--out", out, "--image_size", "16"]) == 0
    with open(out, "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    trained = inference.load_trained(trained_workdir)
    for batch in (2, 5):
        images = _images(batch, 16, seed=batch)
        np.testing.assert_allclose(np.asarray(exported.call(images)), trained.logits(images), rtol=1e-5, atol=1e-5)
    with open(out + ".json") as f:
        sidecar = json.load(f)
    assert sidecar["class_names"] == [str(d) for d in range(10)]
    assert sidecar["input"] == {"name": "images", "shape": ["B", 16, 16, 3], "dtype": "uint8", "layout": "NHWC, RGB"}
    assert sidecar["preprocessing"]["mean"] == [0.5, 0.5, 0.5] and sidecar["checkpoint_step"] == 60


def _onnx_logits(path, images):
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images})[0]


def test_onnx_export_of_the_runs_model(trained_workdir, tmp_path):
    out = str(tmp_path / "model.onnx")
    assert export.main(["--workdir", trained_workdir, "--format", "onnx", "--out", out, "--image_size", "16"]) == 0
    trained = inference.load_trained(trained_workdir)
    for batch in (1, 4):
        images = _images(batch, 16, seed=batch)
        np.testing.assert_allclose(_onnx_logits(out, images), trained.logits(images), atol=1e-4)


def _small(factory, **options):
    def build(kernels):
        model = factory(num_classes=5, rngs=nnx.Rngs(0), dtype=jnp.float32, **options)
        model.kernels = kernels
        return model

    return build


def _registered(name, **options):
    return lambda kernels: models.create(name, num_classes=5, kernels=kernels, **options)


# One model of each family, small enough for the default run; the registered sizes are `slow`.
ONNX_MODELS = {
    "resnet18": _registered("resnet18"),  # 2 blocks a stage: what jax2onnx's graph got wrong
    "resnet_bottleneck": _small(resnet.ResNet, block=resnet.Bottleneck, depths=(1, 1, 1, 1)),
    "vit_registers_avg": _small(vit.VisionTransformer, img_size=32, patch_size=8, width=32, depth=2, num_heads=2,
                                reg_tokens=2, global_pool="avg", no_embed_class=True),
    "vit_token_pre_logits": _small(vit.VisionTransformer, img_size=32, patch_size=8, width=32, depth=2, num_heads=2,
                                   pre_logits_size=16),
    "bit": _small(resnetv2.ResNetV2, depths=(1, 1, 1, 1), width_factor=1),
    # Today's backbones: DINOv2's layer scale, SigLIP's attention pooling (tanh GELU), CLIP's norm_pre
    # (QuickGELU), EVA-02's rotary attention and SwiGLU, fused and with sub-LayerNorm.
    "dinov2_layer_scale": _small(vit.VisionTransformer, img_size=32, patch_size=8, width=32, depth=2, num_heads=2,
                                 init_values=0.5, reg_tokens=4, no_embed_class=True),
    "siglip_map": _small(vit.VisionTransformer, img_size=32, patch_size=8, width=32, depth=2, num_heads=2,
                         class_token=False, global_pool="map", act="gelu_tanh"),
    "clip_quickgelu": _small(vit.VisionTransformer, img_size=32, patch_size=8, width=32, depth=2, num_heads=2,
                             pre_norm=True, act="quick_gelu"),
    "eva02": _small(eva.Eva, img_size=32, patch_size=8, width=32, depth=2, num_heads=2),
    "eva02_sub_ln": _small(eva.Eva, img_size=32, patch_size=8, width=32, depth=2, num_heads=2, qkv_fused=False,
                           sub_ln=True),
    "resnet50": _registered("resnet50"),
    "vit_small_patch16_224": _registered("vit_small_patch16_224", img_size=32),
    "resnetv2_50x1_bit": _registered("resnetv2_50x1_bit"),
    # Depthwise (grouped) convs, SiLU, squeeze-excitation; TF "same" padding; hard-swish and hard-sigmoid;
    # LayerNorm over channels, 1x1-conv MLP, layer scale.
    "efficientnet": _registered("efficientnet_b0", arch=(("ds_r1_k3_s1_e1_c16_se0.25",), ("ir_r1_k5_s2_e6_c24_se0.25",)),
                                num_features=64),
    "tf_efficientnet": _registered("tf_efficientnet_b0", arch=(("ir_r1_k3_s2_e6_c24_se0.25",),), num_features=64),
    "mobilenetv3": _registered("mobilenetv3_small_100", arch=(("ds_r1_k3_s2_e1_c16_se0.25_nre",),
                                                                ("ir_r1_k5_s2_e4_c24_se0.25",), ("cn_r1_k1_s1_c48",)),
                               num_features=64),
    "convnext": _registered("convnext_atto", depths=(1, 1, 1, 1), dims=(8, 16, 24, 32)),
    "efficientnet_b0": _registered("efficientnet_b0"),
    "mobilenetv3_large_100": _registered("mobilenetv3_large_100"),
    "convnext_tiny": _registered("convnext_tiny"),
}
SLOW_ONNX_MODELS = ("resnet50", "vit_small_patch16_224", "resnetv2_50x1_bit", "efficientnet_b0",
                    "mobilenetv3_large_100", "convnext_tiny")


# (cpu kernels in the default run: test_a_runs_cpu_kernels_are_exported_in_their_plain_form; every family: make test-all)
@pytest.mark.parametrize("kernels", ["plain", pytest.param("cpu", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_ONNX_MODELS else n
                                  for n in ONNX_MODELS])
def test_onnx_export_of_every_family(name, kernels, tmp_path):
    """Checked by export itself (batches 1 and 3, 1e-4), and here again at another batch size."""
    trained = _in_memory(with_random_values(lambda: ONNX_MODELS[name](kernels)), 5)
    out = str(tmp_path / f"{name}.onnx")
    sidecar = export.export(trained, "onnx", out)  # the size, 32, comes from pp_eval's central_crop
    assert sidecar["input"]["shape"] == ["B", 32, 32, 3] and sidecar["checked_max_logit_difference"] < 1e-4
    images = _images(6, 32, seed=6)
    expected = trained.logits(images)
    assert np.abs(expected).max() > 0.5  # random weights that reach the logits
    np.testing.assert_allclose(_onnx_logits(out, images), expected, atol=1e-4 * max(1.0, np.abs(expected).max()))


def test_an_unsupported_primitive_is_named(tmp_path):
    class Sorts(models.Classifier):
        def __call__(self, x):
            return jnp.sort(x.reshape(x.shape[0], -1), axis=-1)[:, :3]

    with pytest.raises(export.ExportError, match="JAX primitive 'sort' has no ONNX translation"):
        export.export(_in_memory(Sorts(), 3), "onnx", str(tmp_path / "sorts.onnx"))
    assert not (tmp_path / "sorts.onnx").exists()


def test_a_runs_cpu_kernels_are_exported_in_their_plain_form(tmp_path):
    """A run's config names its model and kernels: ONNX gets the plain formulation (one MaxPool, BatchNorm and
    ReLU for onnxruntime to fuse into 20 convolutions), checked against the cpu-kernel model it came from."""
    import onnx

    config = config_lib.base_config()
    config.model_name, config.dtype, config.model.kernels = "resnet18", "float32", "cpu"
    config.data.pp_eval = "decode|resize_small(40)|central_crop(32)"
    config.data.mean, config.data.std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    model = with_random_values(lambda: models.create_model(config, 5))
    model.eval()
    trained = inference.TrainedModel("", config, tuple("abcde"), model, 0, "params")
    out = str(tmp_path / "resnet18.onnx")
    assert export.export(trained, "onnx", out)["checked_max_logit_difference"] < 1e-4
    ops = [node.op_type for node in onnx.load(out).graph.node]
    assert ops.count("MaxPool") == 1 and "Slice" not in ops and ops.count("Conv") == 20 and ops.count("Relu") == 17
