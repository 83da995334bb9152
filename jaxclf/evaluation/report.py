"""Classification metrics from a model's predictions, in numpy: what `jaxclf.evaluate` reports.

Inputs are `labels: int[N]` in 0..C-1 and `log_probs: float[N, C]` (log-softmax of the logits, or
of averaged test-time-augmentation probabilities). Where scikit-learn has a metric the conventions
are its own, and tests/test_evaluate.py checks each value against it:
- precision (recall) of a class nobody predicted (that has no examples) is 0;
- macro-F1 averages over the classes that occur in the labels or the predictions;
- balanced accuracy is the mean recall over the classes that occur in the labels.
Expected calibration error (Guo et al., 2017) uses 15 equal-width bins of the top-1 confidence:
bin b holds confidences in (b/15, (b+1)/15] (the first also 0), and
ECE = sum over bins of (examples in bin / N) * |accuracy in bin - mean confidence in bin|.
"""

from __future__ import annotations

import numpy as np

ECE_BINS = 15


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """int64[C, C]: entry [i, j] counts examples of class i predicted as j."""
    flat = np.asarray(labels, np.int64) * num_classes + np.asarray(predictions, np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_scores(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Per class: precision, recall, f1 (float64[C], 0 where undefined) and support (int64[C])."""
    true_positives = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0)
    support = confusion.sum(axis=1)
    precision = np.divide(true_positives, predicted, out=np.zeros_like(true_positives), where=predicted > 0)
    recall = np.divide(true_positives, support, out=np.zeros_like(true_positives), where=support > 0)
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(total), where=total > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def macro_f1(confusion: np.ndarray) -> float:
    """Mean F1 over the classes that occur in the labels or the predictions."""
    present = (confusion.sum(axis=0) + confusion.sum(axis=1)) > 0
    return float(per_class_scores(confusion)["f1"][present].mean())


def balanced_accuracy(confusion: np.ndarray) -> float:
    """Mean recall over the classes that occur in the labels."""
    scores = per_class_scores(confusion)
    return float(scores["recall"][scores["support"] > 0].mean())


def top_k_accuracy(log_probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of examples whose label is among the k highest scores."""
    top = np.argsort(-log_probs, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(top == np.asarray(labels)[:, None], axis=1)))


def mean_loss(log_probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the labels (the cross-entropy)."""
    return float(-np.mean(log_probs[np.arange(len(labels)), labels]))


def calibration(log_probs: np.ndarray, labels: np.ndarray, num_bins: int = ECE_BINS) -> dict:
    """Expected calibration error and its reliability bins (see the module docstring).

    Returns {"ece": float, "bins": [{"lower", "upper", "count", "accuracy", "confidence"}, ...]},
    with accuracy and confidence None for an empty bin.
    """
    confidence = np.exp(log_probs.max(axis=1))
    correct = log_probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    # (lower, upper] bins: the index of the first edge >= confidence, minus one; 0 joins the first bin.
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, num_bins - 1)
    bins, ece = [], 0.0
    for b in range(num_bins):
        members = index == b
        count = int(members.sum())
        accuracy = float(correct[members].mean()) if count else None
        mean_confidence = float(confidence[members].mean()) if count else None
        if count:
            ece += count / len(labels) * abs(accuracy - mean_confidence)
        bins.append({"lower": float(edges[b]), "upper": float(edges[b + 1]), "count": count,
                     "accuracy": accuracy, "confidence": mean_confidence})
    return {"ece": float(ece), "bins": bins}


def classification_report(log_probs: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict:
    """Every metric of the module for one set of predictions, as a JSON-ready dict."""
    log_probs = np.asarray(log_probs, np.float64)
    labels = np.asarray(labels, np.int64)
    num_classes = len(class_names)
    if log_probs.shape != (len(labels), num_classes):
        raise ValueError(f"log_probs has shape {log_probs.shape}; expected ({len(labels)}, {num_classes})")
    confusion = confusion_matrix(labels, log_probs.argmax(axis=1), num_classes)
    scores = per_class_scores(confusion)
    k = min(5, num_classes)
    calib = calibration(log_probs, labels)
    return {
        "num_examples": int(len(labels)),
        "accuracy": top_k_accuracy(log_probs, labels, 1),  # top-1; the name training logs use
        "top5": top_k_accuracy(log_probs, labels, k),  # top-C with fewer than 5 classes, as in training
        "loss": mean_loss(log_probs, labels),
        "macro_f1": macro_f1(confusion),
        "balanced_accuracy": balanced_accuracy(confusion),
        "ece": calib["ece"],
        "per_class": [
            {"class": name, "precision": float(scores["precision"][i]), "recall": float(scores["recall"][i]),
             "f1": float(scores["f1"][i]), "support": int(scores["support"][i])}
            for i, name in enumerate(class_names)
        ],
        "class_names": list(class_names),
        "confusion_matrix": confusion.tolist(),
        "calibration_bins": calib["bins"],
    }


def most_confused(confusion: np.ndarray, class_names: list[str], limit: int = 10) -> list[tuple[str, str, int]]:
    """The `limit` largest off-diagonal counts as (true class, predicted class, count), largest first."""
    off = np.array(confusion, copy=True)
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:limit]
    pairs = [np.unravel_index(i, off.shape) for i in order]
    return [(class_names[t], class_names[p], int(off[t, p])) for t, p in pairs if off[t, p] > 0]


def markdown_report(report: dict, title: str, sections: dict[str, str] | None = None) -> str:
    """A readable summary of `classification_report`'s output (plus any run facts it was given), with
    `sections` ({heading: text}, e.g. the run's tasks' summary lines) after the per-class table."""
    lines = [f"# {title}", ""]
    facts = [(key, report[key]) for key in ("workdir", "split", "data", "checkpoint_step", "weights", "tta")
             if key in report]
    lines += [f"- {key}: `{value}`" for key, value in facts]
    lines += ["", "| metric | value |", "| --- | --- |"]
    lines += [f"| examples | {report['num_examples']} |"]
    for key, name in (("accuracy", "accuracy (top-1)"), ("top5", "top-5 accuracy"),
                      ("balanced_accuracy", "balanced accuracy"), ("macro_f1", "macro-F1")):
        lines.append(f"| {name} | {report[key]:.2%} |")
    lines += [f"| loss (cross-entropy) | {report['loss']:.4f} |",
              f"| expected calibration error ({ECE_BINS} bins) | {report['ece']:.4f} |", ""]
    lines += ["## Per class", "", "| class | precision | recall | F1 | support |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {c['class']} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | {c['support']} |"
              for c in report["per_class"]]
    for heading, text in (sections or {}).items():
        lines += ["", f"## {heading}", "", text]
    confused = most_confused(np.asarray(report["confusion_matrix"]), report["class_names"])
    if confused:
        lines += ["", "## Most confused (true -> predicted)", "", "| true | predicted | count |", "| --- | --- | --- |"]
        lines += [f"| {t} | {p} | {n} |" for t, p, n in confused]
    return "\n".join(lines) + "\n"
