"""EfficientNet, MobileNetV3 and ConvNeXt after training, as a ResNet is: static and dynamic int8 ONNX with
the accuracy report `export --quantize int8` writes, serving a request as `predict` answers it, and a continual
update that adds classes. Each family in a small form (a few narrow blocks) on the digits 0-4 at 32 px:

- every family, untrained (seconds): its int8 graphs track its float32 logits and carry the report, the
  server answers as `predict`, and the update's fitted head gives the old model's logits on the old classes;
- trained to >= 90% (make test-all): int8 keeps the top-1 and agrees with float32 as tests/test_quantize.py
  asks of its model, and a real continual update learns the new classes while rehearsing the old.
"""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from starlette.testclient import TestClient

from jaxclf import config as config_lib, export, models, predict, train, weights
from jaxclf.models import tree_paths
from jaxclf.runs import artefact, inference
from jaxclf.serve import ServeSettings, create_app, from_loaded
from jaxclf.tasks import continual
from model_helpers import SMALL_FORMS, with_random_values
from test_quantize import MAX_TOP1_DROP, MIN_AGREEMENT, _val_logits

OLD, NEW = tuple("01234"), tuple("56789")
MIN_LEARNED = 0.9  # val top-1 on 0-4 of the trained small form: predictions with margins for int8 to keep


def _config(digits_root: str, name: str, classes: tuple[str, ...], steps: int, **overrides):
    """tests/small_cnn_config.py's recipe with family `name`'s small form, at 32 px (ConvNeXt's stride is 32)."""
    config = config_lib.load_config(f"tests/small_cnn_config.py:{digits_root}",
                                    [f"model_name={name}", f"total_steps={steps}",
                                     *[f"{k}={v}" for k, v in overrides.items()]])
    config.model.update(SMALL_FORMS[name])
    config.data.pp_train = "decode|inception_crop(32, scale=(0.7, 1.0), ratio=(0.9, 1.1))"
    config.data.pp_eval = "decode|resize(32)"
    config.data.classes = classes
    return config


def _val_paths(digits_root: str, per_class: int) -> list[str]:
    val = os.path.join(digits_root, "val")
    return [os.path.join(val, c, f) for c in OLD for f in sorted(os.listdir(os.path.join(val, c)))[:per_class]]


def _serve_one_request(trained: inference.LoadedModel, paths: list[str]) -> None:
    """One request of `paths` to the server, answered with `predict`'s classes and probabilities."""
    expected, skipped = predict.Predictor(trained, batch_size=len(paths)).predict_files(paths, top_k=3)
    assert not skipped
    with TestClient(create_app(from_loaded(trained), ServeSettings(max_batch=len(paths), max_wait_ms=50.0))) as client:
        while client.get("/readyz").status_code != 200:  # compiling its batch shapes
            pass
        response = client.post("/v1/classify", params={"top_k": 3},
                               files=[("images", (os.path.basename(p), open(p, "rb").read(), "image/png"))
                                      for p in paths])
    assert response.status_code == 200, response.text
    served = response.json()["predictions"]
    assert [tuple(p["classes"]) for p in served] == [e.classes for e in expected]
    for got, want in zip(served, expected):
        np.testing.assert_allclose(got["probabilities"], want.probabilities, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(SMALL_FORMS))
def test_every_family_quantizes_serves_and_continues(name, digits_root, tmp_path):
    """An untrained small form (random weights and norms) of each family, as an in-memory run on the digits."""
    model = with_random_values(lambda: models.create(name, num_classes=len(OLD), **SMALL_FORMS[name]), spread=0.5)
    model.eval()
    trained = inference.TrainedModel("", _config(digits_root, name, OLD, 1), OLD, model, 0, "params")
    # Three images: the batch size export's own check compiles (as does one, the request below).
    images = np.stack([trained.load_image(p) for p in _val_paths(digits_root, 1)[:3]])
    float32 = trained.logits(images)
    for calibration in (0, 16):
        out = str(tmp_path / f"int8_{calibration}.onnx")
        record = export.export(trained, "onnx", out, quantize="int8", calibration=calibration)["quantization"]
        assert set(record["val_accuracy"]) == {"float32", "int8"}
        assert all(0 <= a <= 1 for a in record["val_accuracy"].values())
        # int8 follows the float32 logits (a broken graph or range would not): within a tenth of their spread.
        error = np.abs(artefact.load_artefact(out).logits(images) - float32).max()
        print(f"\n{name} {record['mode']}: int8 logit error {error:.4f}, float32 spread {np.ptp(float32):.4f}")
        assert error <= 0.1 * (float32.max() - float32.min()), (record["mode"], error)

    _serve_one_request(trained, _val_paths(digits_root, 1)[:1])

    # A continual update's start: the old head's rows by class name, zero rows for 5-9, the rest as it was;
    # so the ten-way model gives the old logits on 0-4.
    plan, _ = continual.plan_classes(OLD, NEW, OLD, lwf=False, drop_classes=False, old_run="old")  # OLD replayed
    assert plan.names == OLD + NEW
    update = continual.Update(None, None, plan, {}, None, 0, trained, None)
    params = tree_paths.flatten(nnx.state(model, nnx.Not(nnx.RngState)))
    fitted = update.fit_head({k: np.asarray(v) for k, v in params.items()}, model.head_paths())
    grown = with_random_values(lambda: models.create(name, num_classes=len(OLD + NEW), **SMALL_FORMS[name]), seed=1)
    weights.apply(grown, fitted)
    grown.eval()
    logits = inference.TrainedModel("", trained.config, OLD + NEW, grown, 0, "params").logits(images)
    np.testing.assert_allclose(logits[:, :len(OLD)], float32, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(logits[:, len(OLD):], 0)


# Two trainings and four exports a family (about a minute of CPU each): make test-all.
@pytest.fixture(scope="module", params=[pytest.param(name, marks=pytest.mark.slow) for name in SMALL_FORMS])
def learned(request, digits_root, tmp_path_factory) -> tuple[str, str, dict]:
    """(family, workdir, final val metrics) of the family's small form trained on the digits 0-4."""
    workdir = str(tmp_path_factory.mktemp(request.param) / "run")
    val = train.train_and_evaluate(_config(digits_root, request.param, OLD, 150), workdir, devices=jax.devices()[:1])
    assert val["val/accuracy"] >= MIN_LEARNED, val
    return request.param, workdir, val


def test_int8_onnx_static_and_dynamic_keep_the_accuracy(learned, tmp_path):
    name, workdir, val = learned
    trained = inference.load_trained(workdir)
    float32_predictions = _val_logits(trained)[0].argmax(1)
    for calibration in (0, 64):
        out = str(tmp_path / f"{name}_int8_{calibration}.onnx")
        assert export.main(["--workdir", workdir, "--format", "onnx", "--out", out, "--quantize", "int8",
                            "--calibration", str(calibration)]) == 0
        with open(out + ".json") as f:
            record = json.load(f)["quantization"]
        assert record["mode"] == ("static" if calibration else "dynamic")
        assert os.path.getsize(out) == record["size_bytes"]["int8"] < record["size_bytes"]["float32"]
        top1 = record["val_accuracy"]
        assert top1["float32"] == pytest.approx(val["val/accuracy"], abs=1e-6)  # the report measures the run's model
        agreement = float(np.mean(_val_logits(artefact.load_artefact(out))[0].argmax(1) == float32_predictions))
        print(f"\n{name} {record['mode']}: top-1 float32 {top1['float32']:.4f} int8 {top1['int8']:.4f}, "
              f"agreement {agreement:.4f}")
        assert top1["int8"] >= top1["float32"] - MAX_TOP1_DROP and agreement >= MIN_AGREEMENT


def test_serving_answers_a_request_as_predict_does(learned, digits_root):
    _, workdir, _ = learned
    _serve_one_request(inference.load_trained(workdir), _val_paths(digits_root, 1)[:2])


def test_a_continual_update_adds_classes(learned, digits_root, tmp_path):
    """5-9 added to the 0-4 model with rehearsal: the old model is measured on 0-4 before the update, as the
    run itself measured it, and after a few steps the ten-way model tells the new classes apart."""
    name, workdir, val = learned
    config = _config(digits_root, name, NEW, 60, model_init=workdir,
                     **{"continual.replay_fraction": 0.25, "continual.replay_per_class": 20})
    metrics = train.train_and_evaluate(config, str(tmp_path / "update"), devices=jax.devices()[:1])
    with open(tmp_path / "update" / "classes.json") as f:
        assert json.load(f)["class_names"] == [*OLD, *NEW]
    assert metrics["val/old_accuracy_before"] == pytest.approx(val["val/accuracy"], abs=1e-6)
    print(f"\n{name} update: old {metrics['val/old_accuracy']:.3f} (before {metrics['val/old_accuracy_before']:.3f}), "
          f"new {metrics['val/new_accuracy']:.3f}")
    assert metrics["val/new_accuracy"] >= 0.6 and metrics["val/old_accuracy"] >= 0.5
