"""Export: stablehlo and ONNX artefacts reproduce the JAX model's logits at several batch sizes."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxclf import config as config_lib, export, inference, models
from jaxclf.models import vit
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


def test_onnx_export_of_a_small_vit(tmp_path):
    model = with_random_values(lambda: vit.VisionTransformer(
        num_classes=5, img_size=32, patch_size=8, width=32, depth=2, num_heads=2, drop_rate=0.0,
        drop_path_rate=0.0, class_token=True, global_pool="token", norm_eps=1e-6, pre_logits_size=0,
        rngs=nnx.Rngs(0), dtype=jnp.float32,
    ))
    trained = _in_memory(model, 5)
    out = str(tmp_path / "vit.onnx")
    sidecar = export.export(trained, "onnx", out)  # the size, 32, comes from pp_eval's central_crop
    assert sidecar["input"]["shape"] == ["B", 32, 32, 3] and sidecar["checked_max_logit_difference"] < 1e-4
    for batch in (1, 3):
        images = _images(batch, 32, seed=batch)
        np.testing.assert_allclose(_onnx_logits(out, images), trained.logits(images), atol=1e-4)


@pytest.mark.xfail(raises=export.ExportError, strict=True,
                   reason="jax2onnx 0.13's nnx.Conv converter passes explicit padding to JAX as an unhashable "
                          "list; with that patched, ResNets with 2+ blocks per stage become graphs onnxruntime "
                          "rejects (incompatible Add shapes). The stablehlo export works.")
def test_onnx_export_of_resnet18(tmp_path):
    trained = _in_memory(with_random_values(lambda: models.create("resnet18", num_classes=3)), 3)
    export.export(trained, "onnx", str(tmp_path / "resnet18.onnx"))
