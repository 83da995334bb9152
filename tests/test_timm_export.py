"""Back to PyTorch: `export --format timm` writes a state dict that the printed `timm.create_model(...)`
call loads, computing jaxclf's logits; the name tables read and write timm's names alike."""

import numpy as np
import pytest

from jaxclf import config as config_lib, export, models
from jaxclf.runs import inference
from jaxclf.weights import bit, resnet, torch_names, vit
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
])
def test_the_printed_create_model_call_reproduces_the_logits(name, options, tmp_path):
    trained = _in_memory(name, 32, **options)
    out = str(tmp_path / f"{name}.safetensors")
    record = export.export(trained, "timm", out)
    assert record["checked_max_logit_difference"] < 1e-4 and record["input"]["shape"] == ["B", 3, 32, 32]
    model = eval(record["timm"]["create_model"], {"timm": timm}).eval()  # the call the user is told to run
    assert timm.data.resolve_data_config(model=model)["mean"] == (0.5, 0.4, 0.3)
    images = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    normalised = (images / 255.0 - np.array(trained.mean)) / np.array(trained.std)
    with torch.no_grad():
        theirs = model(torch.from_numpy(normalised.transpose(0, 3, 1, 2).astype(np.float32))).numpy()
    ours = trained.logits(images)
    assert np.abs(ours).max() > 0.5
    np.testing.assert_allclose(theirs, ours, atol=1e-4 * np.abs(ours).max())


@pytest.mark.parametrize("table, make", [
    (resnet.TABLE, lambda: timm.create_model("resnet18", num_classes=3)),
    (vit.TABLE, lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=3, reg_tokens=2)),
    (bit.TABLE, lambda: timm.create_model("resnetv2_50x1_bit", num_classes=3)),
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
