"""Exported artefacts loaded back (jaxclf.runs.artefact): they stand in for the trained run, and
`evaluate --artefact` reports what `evaluate --workdir` reports."""

import json
import os

import numpy as np
import pytest

from jaxclf.runs import artefact, inference
from jaxclf import evaluate, export


@pytest.fixture(scope="module")
def stablehlo_artefact(trained_workdir, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("artefacts") / "digits.stablehlo")
    assert export.main(["--workdir", trained_workdir, "--format", "stablehlo", "--out", out, "--image_size", "16"]) == 0
    return out


def test_an_artefact_stands_in_for_the_trained_run(trained_workdir, digits_root, stablehlo_artefact):
    trained = inference.load_trained(trained_workdir)
    loaded = artefact.load_artefact(stablehlo_artefact)
    assert loaded.class_names == trained.class_names and loaded.step == trained.step == 60
    assert (loaded.model_name, loaded.format, loaded.weights) == ("tiny_cnn", "stablehlo", "ema")
    assert loaded.input_size() == (16, 16)
    assert loaded.provenance["workdir"] == os.path.abspath(trained_workdir)
    image_path = os.path.join(digits_root, "val", "3", sorted(os.listdir(os.path.join(digits_root, "val", "3")))[0])
    np.testing.assert_array_equal(loaded.load_image(image_path), trained.load_image(image_path))
    images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    np.testing.assert_allclose(loaded.logits(images), trained.logits(images), rtol=1e-5, atol=1e-5)
    with pytest.raises(inference.WorkdirError, match=r"takes uint8\[B, 16, 16, 3\] images; got uint8\[2, 8, 8, 3\]"):
        loaded.logits(images[:2, :8, :8])


def test_evaluate_artefact_equals_evaluate_workdir(trained_workdir, stablehlo_artefact, capsys):
    assert evaluate.main(["--workdir", trained_workdir, "--split", "val"]) == 0
    with open(os.path.join(trained_workdir, "eval", "val", "report.json")) as f:
        from_workdir = json.load(f)
    assert evaluate.main(["--artefact", stablehlo_artefact, "--split", "val"]) == 0
    assert "stablehlo" in capsys.readouterr().out
    with open(os.path.join(stablehlo_artefact + ".eval", "val", "report.json")) as f:
        from_artefact = json.load(f)
    assert from_artefact["artefact"] == os.path.abspath(stablehlo_artefact) and from_artefact["format"] == "stablehlo"
    assert from_artefact["num_examples"] == from_workdir["num_examples"] > 100
    assert from_artefact["confusion_matrix"] == from_workdir["confusion_matrix"]
    for metric in ("accuracy", "top5", "macro_f1", "balanced_accuracy"):
        assert from_artefact[metric] == from_workdir[metric], metric
    for metric in ("loss", "ece"):
        assert from_artefact[metric] == pytest.approx(from_workdir[metric], abs=1e-5), metric


def test_artefact_mistakes_are_named(trained_workdir, stablehlo_artefact, tmp_path, capsys):
    assert evaluate.main(["--artefact", stablehlo_artefact, "--workdir", trained_workdir]) == 2
    assert "either --workdir" in capsys.readouterr().err
    lonely = tmp_path / "lonely.stablehlo"
    lonely.write_bytes(open(stablehlo_artefact, "rb").read())
    assert evaluate.main(["--artefact", str(lonely)]) == 2
    assert f"{lonely}.json does not exist" in capsys.readouterr().err
    assert evaluate.main(["--artefact", str(tmp_path / "nothing.onnx")]) == 2
    assert "no such file" in capsys.readouterr().err
