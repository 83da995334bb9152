"""Evaluation: metrics against scikit-learn and hand-computed values; the command against training's own evaluation."""

import csv
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from scipy.special import log_softmax, logsumexp
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

from jaxclf import evaluate
from jaxclf.runs import inference
from jaxclf.evaluation import report, splits
from jaxclf.runs import predictions
from jaxclf.data import sources
from jaxclf.tracking.metrics import read_metrics


def _predictions(num_examples=300, num_classes=7, seed=0):
    """Random predictions where class 6 never occurs as a label and class 5 is never predicted."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes - 1, num_examples)
    logits = rng.normal(size=(num_examples, num_classes)) * 2
    logits[np.arange(num_examples), labels] += 2.5  # better than chance
    logits[:, 5] -= 12  # never the top score, yet a probability far above log_loss's clipping
    return log_softmax(logits, axis=1), labels


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")  # class 6, on purpose
def test_metrics_equal_scikit_learns():
    log_probs, labels = _predictions()
    num_classes = log_probs.shape[1]
    predicted = log_probs.argmax(axis=1)
    probs = np.exp(log_probs)
    result = report.classification_report(log_probs, labels, [f"c{i}" for i in range(num_classes)])
    classes = list(range(num_classes))

    np.testing.assert_array_equal(result["confusion_matrix"], skm.confusion_matrix(labels, predicted, labels=classes))
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        labels, predicted, labels=classes, zero_division=0
    )
    np.testing.assert_allclose([c["precision"] for c in result["per_class"]], precision)
    np.testing.assert_allclose([c["recall"] for c in result["per_class"]], recall)
    np.testing.assert_allclose([c["f1"] for c in result["per_class"]], f1)
    np.testing.assert_array_equal([c["support"] for c in result["per_class"]], support)
    assert result["macro_f1"] == pytest.approx(skm.f1_score(labels, predicted, average="macro", zero_division=0))
    assert result["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(labels, predicted))
    assert result["accuracy"] == pytest.approx(skm.accuracy_score(labels, predicted))
    assert result["top5"] == pytest.approx(skm.top_k_accuracy_score(labels, probs, k=5, labels=classes))
    assert result["loss"] == pytest.approx(skm.log_loss(labels, probs, labels=classes), rel=1e-6)
    # The test is only as good as its data: some errors, an absent label, an unpredicted class.
    assert 0.3 < result["accuracy"] < 0.9 and support[6] == 0 and (predicted != 5).all()


def test_calibration_bins_equal_scikit_learns_and_a_hand_computed_ece():
    log_probs, labels = _predictions(seed=1)
    confidence = np.exp(log_probs.max(axis=1))
    correct = (log_probs.argmax(axis=1) == labels).astype(int)
    bins = [b for b in report.calibration(log_probs, labels)["bins"] if b["count"]]
    accuracy, mean_confidence = calibration_curve(correct, confidence, n_bins=report.ECE_BINS, strategy="uniform")
    np.testing.assert_allclose([b["accuracy"] for b in bins], accuracy)
    np.testing.assert_allclose([b["confidence"] for b in bins], mean_confidence)

    # Confidences 0.9 (right), 0.75 (wrong), 0.62 (right), 0.55 (right) fall in four different bins:
    # ECE = (0.1 + 0.75 + 0.38 + 0.45) / 4.
    probs = np.array([[0.9, 0.1], [0.75, 0.25], [0.38, 0.62], [0.55, 0.45]])
    result = report.calibration(np.log(probs), np.array([0, 1, 1, 0]))
    assert result["ece"] == pytest.approx(0.42)
    assert [b["count"] for b in result["bins"]].count(1) == 4


def test_evaluate_reproduces_the_runs_own_evaluation(trained_workdir):
    """The command's numbers equal those the training loop logged (another code path), EMA and not."""
    assert evaluate.main(["--workdir", trained_workdir]) == 0
    out = os.path.join(trained_workdir, "eval", "val")
    with open(os.path.join(out, "report.json")) as f:
        result = json.load(f)
    logged = [r for r in read_metrics(trained_workdir) if "val/accuracy" in r][-1]
    assert result["weights"] == "ema" and result["checkpoint_step"] == 60
    assert result["num_examples"] == logged["val_ema/examples"] == 360  # every image exactly once
    assert result["accuracy"] == pytest.approx(logged["val_ema/accuracy"], abs=1e-6)
    assert result["top5"] == pytest.approx(logged["val_ema/top5"], abs=1e-6)
    assert result["loss"] == pytest.approx(logged["val_ema/loss"], rel=1e-4)
    # The run's configured evaluators (the default: classification on val), run again on the checkpoint.
    assert result["evaluators"]["val_ema/accuracy"] == pytest.approx(logged["val_ema/accuracy"], abs=1e-6)
    assert result["evaluators"]["val_ema/examples"] == 360

    with open(os.path.join(out, "predictions.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len({row["file"] for row in rows}) == 360
    assert all(row["true_class"] == os.path.basename(os.path.dirname(row["file"])) for row in rows)
    confusion = skm.confusion_matrix([r["true_class"] for r in rows], [r["predicted_class"] for r in rows],
                                     labels=result["class_names"])
    np.testing.assert_array_equal(result["confusion_matrix"], confusion)
    with open(os.path.join(out, "report.md")) as f:
        assert "| macro-F1 |" in f.read()
    for name in ("confusion_matrix.png", "reliability.png"):
        with Image.open(os.path.join(out, name)) as image:
            assert image.size[0] > 300 and np.asarray(image.convert("L")).std() > 5
    assert sorted(os.listdir(os.path.join(trained_workdir, "plots"))) == ["accuracy.png", "loss.png", "lr.png"]

    assert evaluate.main(["--workdir", trained_workdir, "--checkpoint", "last", "--no_ema"]) == 0
    with open(os.path.join(out, "report.json")) as f:
        result = json.load(f)
    assert result["weights"] == "params"
    assert result["accuracy"] == pytest.approx(logged["val/accuracy"], abs=1e-6)
    assert result["loss"] == pytest.approx(logged["val/loss"], rel=1e-4)


def test_a_folder_split_with_flip_tta(trained_workdir, digits_root, tmp_path):
    """A folder with two of the run's classes: labels follow the run's order; TTA averages probabilities."""
    folder = tmp_path / "held_out"
    for digit in ("3", "7"):
        (folder / digit).mkdir(parents=True)
        for name in sorted(os.listdir(os.path.join(digits_root, "val", digit)))[:4]:
            shutil.copy(os.path.join(digits_root, "val", digit, name), folder / digit / name)
    assert evaluate.main(["--workdir", trained_workdir, "--split", str(folder), "--tta", "flip"]) == 0
    out = os.path.join(trained_workdir, "eval", "held_out")
    with open(os.path.join(out, "report.json")) as f:
        result = json.load(f)
    assert result["num_examples"] == 8 and result["tta"] == "flip"
    assert [c["support"] for c in result["per_class"]] == [0, 0, 0, 4, 0, 0, 0, 4, 0, 0]

    trained = inference.load_trained(trained_workdir)
    with open(os.path.join(out, "predictions.csv")) as f:
        row = next(csv.DictReader(f))
    image = trained.load_image(row["file"])[None]
    both = [log_softmax(trained.logits(x).astype(np.float64), axis=1) for x in (image, image[:, :, ::-1])]
    averaged = logsumexp(np.stack(both), axis=0)[0] - np.log(2)
    assert float(row["confidence"]) == pytest.approx(np.exp(averaged.max()), rel=1e-5)
    assert row["predicted_class"] == trained.class_names[int(averaged.argmax())]


def test_mistakes_are_named(trained_workdir, tmp_path, capsys):
    (tmp_path / "pets" / "cat").mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(tmp_path / "pets" / "cat" / "a.png")
    assert evaluate.main(["--workdir", trained_workdir, "--split", str(tmp_path / "pets")]) == 2
    assert "class folders ['cat'] are not classes of this run" in capsys.readouterr().err
    assert evaluate.main(["--workdir", trained_workdir, "--checkpoint", "7"]) == 2
    assert "one of the saved steps [60]" in capsys.readouterr().err
    assert evaluate.main(["--workdir", str(tmp_path / "nothing")]) == 2
    assert "config.json does not exist" in capsys.readouterr().err


def test_predictions_pair_each_file_with_its_own_image_with_several_workers(trained_workdir):
    # grain's workers each batch every other record: rows must be matched by their carried index.
    trained = inference.load_trained(trained_workdir)
    _, val = splits.load_split(trained, "val")
    subset = sources.LabelledFiles(val.paths[::15], val.labels[::15], val.class_names)  # 24 files
    by_workers = {}
    for workers in (0, 2):
        trained.config.data.num_workers = workers
        log_probs, labels, indices = predictions.predict_source(trained, subset, batch_size=10)
        assert sorted(indices) == list(range(len(subset)))
        order = np.argsort(indices)
        by_workers[workers] = log_probs[order], labels[order]
    np.testing.assert_allclose(by_workers[2][0], by_workers[0][0], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(by_workers[2][1], subset.labels)
    direct = log_softmax(trained.logits(trained.load_image(subset.paths[7])[None]).astype(np.float64), axis=1)[0]
    np.testing.assert_allclose(by_workers[2][0][7], direct, rtol=1e-5, atol=1e-6)
