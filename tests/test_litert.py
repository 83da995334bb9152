"""TFLite export (jaxclf.deploy.litert): the flatbuffer, run by the LiteRT interpreter itself, gives the JAX model's
logits for every family that exports to ONNX, and `evaluate --artefact` reports what `evaluate --workdir` does.
Needs .venv-litert (`make litert-venv`): the converter's own environment."""

import json
import os

import jax
import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from jaxclf import evaluate, export
from jaxclf.deploy import jaxprs, litert
from jaxclf.runs import artefact, inference
from tests.model_helpers import with_random_values
from tests.test_export import ONNX_MODELS, _images, _in_memory

# The default run converts one small family (depthwise convolutions, hard-swish, squeeze-excitation); every other family of the ONNX list is `slow` (make test-all).
FAST_TFLITE_MODELS = ("mobilenetv3",)


def _interpreter_logits(path: str, images: np.ndarray) -> np.ndarray:
    """Logits from ai-edge-litert's interpreter used directly (not jaxclf's runner), one image per call."""
    interpreter = Interpreter(model_path=path)
    interpreter.allocate_tensors()
    model_input, output = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    logits = []
    for image in images:
        interpreter.set_tensor(model_input["index"], image[None])
        interpreter.invoke()
        logits.append(interpreter.get_tensor(output["index"])[0])
    return np.stack(logits)


@pytest.fixture(scope="module")
def tflite_artefact(trained_workdir, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("tflite") / "digits.tflite")
    assert export.main(["--workdir", trained_workdir, "--format", "tflite", "--out", out, "--image_size", "16"]) == 0
    return out


def test_tflite_export_of_the_runs_model(trained_workdir, tflite_artefact, capsys):
    with open(tflite_artefact, "rb") as f:
        assert f.read(8)[4:8] == b"TFL3"  # the flatbuffer's file identifier
    with open(tflite_artefact + ".json") as f:
        sidecar = json.load(f)
    assert sidecar["format"] == "tflite" and sidecar["checked_max_logit_difference"] < 1e-4
    assert sidecar["input"] == {"name": "images", "shape": [1, 16, 16, 3], "dtype": "uint8", "layout": "NHWC, RGB"}
    interpreter = Interpreter(model_path=tflite_artefact)
    (model_input,), (output,) = interpreter.get_input_details(), interpreter.get_output_details()
    assert (model_input["dtype"], list(model_input["shape"])) == (np.uint8, [1, 16, 16, 3])
    assert (output["dtype"], list(output["shape"])) == (np.float32, [1, 10])
    assert interpreter.get_signature_list() == {"serving_default": {"inputs": ["images"], "outputs": ["logits"]}}
    trained = inference.load_trained(trained_workdir)
    images = _images(4, 16, seed=4)
    expected = trained.logits(images)
    np.testing.assert_allclose(_interpreter_logits(tflite_artefact, images), expected, atol=1e-4 * np.abs(expected).max())
    loaded = artefact.load_artefact(tflite_artefact)
    assert loaded.format == "tflite" and loaded.input_size() == (16, 16)
    np.testing.assert_allclose(loaded.logits(images), expected, atol=1e-4 * np.abs(expected).max())


@pytest.mark.slow  # the default run evaluates a TFLite artefact in tests/test_quantize.py (int8)
def test_evaluate_tflite_artefact_equals_evaluate_workdir(trained_workdir, tflite_artefact, capsys):
    assert evaluate.main(["--workdir", trained_workdir, "--split", "val"]) == 0
    with open(os.path.join(trained_workdir, "eval", "val", "report.json")) as f:
        from_workdir = json.load(f)
    assert evaluate.main(["--artefact", tflite_artefact, "--split", "val"]) == 0
    with open(os.path.join(tflite_artefact + ".eval", "val", "report.json")) as f:
        from_artefact = json.load(f)
    assert from_artefact["format"] == "tflite" and from_artefact["num_examples"] == from_workdir["num_examples"] > 100
    assert from_artefact["confusion_matrix"] == from_workdir["confusion_matrix"]
    assert from_artefact["accuracy"] == from_workdir["accuracy"]
    assert from_artefact["loss"] == pytest.approx(from_workdir["loss"], abs=1e-5)


@pytest.mark.parametrize("name", [n if n in FAST_TFLITE_MODELS else pytest.param(n, marks=pytest.mark.slow)
                                  for n in ONNX_MODELS])
def test_tflite_export_of_every_family(name, tmp_path):
    """Checked by export itself (batches 1 and 3, 1e-4), and here again with the interpreter on other images."""
    trained = _in_memory(with_random_values(lambda: ONNX_MODELS[name]("plain")), 5)
    out = str(tmp_path / f"{name}.tflite")
    sidecar = export.export(trained, "tflite", out)  # the size, 32, comes from pp_eval's central_crop
    assert sidecar["input"]["shape"] == [1, 32, 32, 3] and sidecar["checked_max_logit_difference"] < 1e-4
    images = _images(6, 32, seed=6)
    expected = trained.logits(images)
    np.testing.assert_allclose(_interpreter_logits(out, images), expected, atol=1e-4 * max(1.0, np.abs(expected).max()))


def test_a_missing_converter_is_named_and_nothing_is_written(trained_workdir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(litert.PYTHON_VARIABLE, str(tmp_path / "no-python"))
    out = tmp_path / "m.tflite"
    assert export.main(["--workdir", trained_workdir, "--format", "tflite", "--out", str(out), "--image_size", "16"]) == 1
    assert f"{litert.PYTHON_VARIABLE}={tmp_path / 'no-python'} is not an executable Python" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "m.tflite.json").exists()


def test_a_linear_on_feature_maps_is_rewritten_as_a_1x1_convolution():
    """What lets ConvNeXt convert: the NHWC x [C, O] product, inside nested jit and custom_jvp (relu), becomes a
    convolution with the same values; a rank-3 product (a ViT's tokens) is left as it is."""
    kernel = np.random.default_rng(0).normal(size=(8, 5)).astype(np.float32)

    @jax.jit
    def block(x):
        return jax.nn.relu(x) @ kernel

    def model(x):
        return block(x), block(x[:, 0])

    x = np.random.default_rng(1).normal(size=(2, 3, 4, 8)).astype(np.float32)
    traced = jax.make_jaxpr(model)(x)

    def rewritten(images):
        return jaxprs.evaluate(traced.jaxpr, traced.consts, [images], litert._linear_as_conv)

    primitives = [eqn.primitive.name for eqn in jax.make_jaxpr(rewritten)(x).jaxpr.eqns]
    assert primitives.count("conv_general_dilated") == 1 and primitives.count("dot_general") == 1
    for got, expected in zip(jax.jit(rewritten)(x), model(x)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
