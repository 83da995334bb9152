"""Back to PyTorch: `export --format timm` writes a state dict that the printed `timm.create_model(...)`
call loads, computing jaxclf's logits; the name tables read and write timm's names alike."""

import numpy as np
import pytest

from jaxclf import config as config_lib, export, models
from jaxclf.runs import inference
from jaxclf.weights import bit, convnext, efficientnet, resnet, torch_names, vit
from tests.model_helpers import with_random_values

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")


def _in_memory(name: str, size: int, **options) -> inference.TrainedModel:
    model = with_random_values(lambda: models.create(name, num_classes=5, **options))
    model.eval()
    config = config_lib.base_config()
    config.model_name = name
    config.data.pp_eval = f"decode|resize_small({size})|central_crop({size})"
    config.data.mean, config.data.std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    return inference.TrainedModel("", config, tuple("abcde"), model, 7, "params")


@pytest.mark.parametrize("name, options", [
    ("resnet18", {}),
    pytest.param("resnet50", {}, marks=pytest.mark.slow),
    ("vit_small_patch16_224", {"img_size": 32}),
    pytest.param("resnetv2_50x1_bit", {}, marks=pytest.mark.slow),  # 55 s under load: make test-all
    ("tf_efficientnet_b0", {}),  # TF padding and BN eps: timm kwargs in the printed call
    ("mobilenetv3_small_100", {}),
    ("convnext_atto", {}),
    # Today's backbones, two blocks deep: layer scale and registers, attention pooling with the tanh GELU
    # (what a transformers SigLIP converts to), norm_pre with QuickGELU, rotary attention with SwiGLU.
    ("vit_small_patch14_reg4_dinov2", {"img_size": 28, "depth": 2}),
    ("vit_base_patch16_siglip_224", {"img_size": 32, "depth": 2, "act": "gelu_tanh"}),
    ("vit_base_patch16_clip_quickgelu_224", {"img_size": 32, "depth": 2}),
    ("eva02_tiny_patch14_224", {"img_size": 28, "depth": 2}),
])
def test_the_printed_create_model_call_reproduces_the_logits(name, options, tmp_path):
    size = options.get("img_size", 32)
    trained = _in_memory(name, size, **options)
    out = str(tmp_path / f"{name}.safetensors")
    record = export.export(trained, "timm", out)
    assert record["checked_max_logit_difference"] < 1e-4 and record["input"]["shape"] == ["B", 3, size, size]
    model = eval(record["timm"]["create_model"], {"timm": timm}).eval()  # the call the user is told to run
    assert timm.data.resolve_data_config(model=model)["mean"] == (0.5, 0.4, 0.3)
    images = np.random.default_rng(1).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    normalised = (images / 255.0 - np.array(trained.mean)) / np.array(trained.std)
    with torch.no_grad():
        theirs = model(torch.from_numpy(normalised.transpose(0, 3, 1, 2).astype(np.float32))).numpy()
    ours = trained.logits(images)
    assert np.abs(ours).max() > 0.2  # random weights that reach the logits (deep SE nets at 32 px: ~0.3)
    np.testing.assert_allclose(theirs, ours, atol=1e-4 * np.abs(ours).max())


@pytest.mark.parametrize("table, make", [
    (resnet.TABLE, lambda: timm.create_model("resnet18", num_classes=3)),
    (vit.TABLE, lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=3, reg_tokens=2)),
    (bit.TABLE, lambda: timm.create_model("resnetv2_50x1_bit", num_classes=3)),
    (efficientnet.TABLE, lambda: timm.create_model("mobilenetv3_large_100", num_classes=3)),
    (convnext.TABLE, lambda: timm.create_model("convnext_atto", num_classes=3)),
    # Bare parameters (layer scale, attention-pool latent, EVA's q/v biases) keep their names both ways.
    (vit.TABLE, lambda: timm.create_model("vit_small_patch14_reg4_dinov2", img_size=28, depth=1, num_classes=3)),
    (vit.TABLE, lambda: timm.create_model("vit_base_patch16_siglip_224", img_size=32, depth=1, num_classes=3)),
    (vit.TABLE, lambda: timm.create_model("eva02_tiny_patch14_224", img_size=28, depth=1, num_classes=3)),
    (vit.TABLE, lambda: timm.create_model("eva02_base_patch14_224", img_size=28, depth=1, num_classes=3)),
])
def test_a_name_table_read_then_written_gives_timms_state_dict_back(table, make):
    state = {k: v.numpy() for k, v in make().state_dict().items()}
    back = torch_names.to_torch(torch_names.to_jaxclf(state, table), table)
    assert sorted(back) == sorted(state)
    for key, value in state.items():
        np.testing.assert_array_equal(back[key], value if not key.endswith("num_batches_tracked") else 0, err_msg=key)


def test_what_timm_cannot_hold_is_named(trained_workdir, tmp_path, capsys):
    vit_with_pre_logits = _in_memory("vit_tiny_patch16_224", 32, img_size=32, pre_logits_size=8)
    with pytest.raises(export.ExportError, match="no pre-logits"):
        export.export(vit_with_pre_logits, "timm", str(tmp_path / "v.safetensors"))
    out = tmp_path / "tiny.safetensors"
    assert export.main(["--workdir", trained_workdir, "--format", "timm", "--out", str(out), "--image_size", "16"]) == 1
    assert "tiny_cnn (TinyCNN) has no timm counterpart" in capsys.readouterr().err and not out.exists()
