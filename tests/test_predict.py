"""Prediction: files, folders and globs in; top-k classes out (console, CSV, JSON); unreadable files skipped."""

import csv
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from jaxclf.runs import inference
from jaxclf import predict


def _reference_probabilities(trained, path):
    """Class probabilities computed without the tool: PIL decode, numpy normalisation, the model itself."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), np.float32) / 255.0
    normalised = (pixels - np.asarray(trained.mean)) / np.asarray(trained.std)
    return np.asarray(jax.nn.softmax(trained.model(normalised[None].astype(np.float32))[0]))


def test_predict_files_folders_and_globs(trained_workdir, digits_root, tmp_path, capsys):
    val = os.path.join(digits_root, "val")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    single = os.path.join(val, "0", sorted(os.listdir(os.path.join(val, "0")))[0])
    inputs = [os.path.join(val, "3"), os.path.join(val, "7", "1*.png"), single, str(tmp_path / "broken.png"),
              str(tmp_path / "missing.jpg")]
    expected_files = (len(os.listdir(os.path.join(val, "3")))
                      + len([n for n in os.listdir(os.path.join(val, "7")) if n.startswith("1")]) + 1)
    out_json, out_csv = str(tmp_path / "p.json"), str(tmp_path / "p.csv")
    assert predict.main(["--workdir", trained_workdir, *inputs, "--top_k", "3", "--batch_size", "16",
                         "--output", out_json]) == 0
    console = capsys.readouterr()
    assert single in console.out
    assert "skipped " + str(tmp_path / "broken.png") + ": cannot decode the image" in console.err
    assert "skipped " + str(tmp_path / "missing.jpg") in console.err

    with open(out_json) as f:
        result = json.load(f)
    assert len(result["predictions"]) == expected_files
    assert {s["path"] for s in result["skipped"]} == {str(tmp_path / "broken.png"), str(tmp_path / "missing.jpg")}
    trained = inference.load_trained(trained_workdir)
    by_path = {p["path"]: p["top_k"] for p in result["predictions"]}
    reference = _reference_probabilities(trained, single)
    top = np.argsort(-reference)[:3]
    assert [c["class"] for c in by_path[single]] == [trained.class_names[i] for i in top]
    np.testing.assert_allclose([c["probability"] for c in by_path[single]], reference[top], rtol=1e-5)

    assert predict.main(["--workdir", trained_workdir, *inputs[:3], "--top_k", "3", "--output", out_csv]) == 0
    with open(out_csv) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "class_1", "probability_1", "class_2", "probability_2", "class_3", "probability_3"]
    assert {row[0]: row[1] for row in rows[1:]} == {path: top_k[0]["class"] for path, top_k in by_path.items()}


def test_batches_give_the_same_probabilities_as_single_images(trained_workdir, digits_root):
    trained = inference.load_trained(trained_workdir)
    folder = os.path.join(digits_root, "val", "5")
    images = np.stack([trained.load_image(os.path.join(folder, n)) for n in sorted(os.listdir(folder))[:6]])
    batched = predict.Predictor(trained, batch_size=4).predict_arrays(images)  # one full batch, one padded
    single = predict.Predictor(trained, batch_size=1).predict_arrays(images)
    np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(batched.sum(axis=1), 1.0, rtol=1e-5)


def test_nothing_readable_is_an_error(trained_workdir, tmp_path, capsys):
    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8 truncated")
    assert predict.main(["--workdir", trained_workdir, str(tmp_path / "a.jpg"), str(tmp_path / "*.webp")]) == 2
    err = capsys.readouterr().err
    assert "a.jpg: cannot decode the image" in err and "*.webp: no such file" in err
    with pytest.raises(SystemExit):
        predict.main(["--workdir", trained_workdir, str(tmp_path / "a.jpg"), "--output", "x.txt"])
