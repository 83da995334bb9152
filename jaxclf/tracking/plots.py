"""PNG plots of a run: training curves from metrics.jsonl, the confusion matrix and the reliability diagram.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no display needed).
"""

from __future__ import annotations

import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jaxclf.tracking.metrics import read_metrics

# Each curves panel and the metrics.jsonl keys it draws (those a run did not log are left out).
CURVE_PANELS = {
    "loss": ("train/loss", "val/loss", "val_ema/loss"),
    "accuracy": ("train/accuracy", "val/accuracy", "val/top5", "val_ema/accuracy"),
    "lr": ("train/lr",),
}
# Above this many classes the confusion matrix cells are not annotated with numbers.
MAX_ANNOTATED_CLASSES = 25


def training_curves(records: list[dict]) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """{panel: {metric: (steps, values)}} of CURVE_PANELS from metrics.jsonl records, in step order.

    A resumed run may log a step twice (the steps after its last checkpoint); the later value wins.
    """
    curves = {}
    for panel, keys in CURVE_PANELS.items():
        series = {}
        for key in keys:
            by_step = {r["step"]: r[key] for r in records if key in r}
            if by_step:
                steps = sorted(by_step)
                series[key] = (steps, [by_step[s] for s in steps])
        if series:
            curves[panel] = series
    return curves


def plot_training_curves(workdir: str) -> list[str]:
    """Write `workdir/plots/{loss,accuracy,lr}.png` from metrics.jsonl; return the paths written."""
    if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
        return []
    out_dir = os.path.join(workdir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for panel, series in training_curves(read_metrics(workdir)).items():
        fig = Figure(figsize=(7, 4.5))
        ax = fig.add_subplot()
        for key, (steps, values) in series.items():
            ax.plot(steps, values, label=key, marker="o" if len(steps) < 30 else None, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel(panel)
        if panel == "loss" and all(v > 0 for _, values in series.values() for v in values):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title(f"{panel}: {os.path.basename(os.path.abspath(workdir))}")
        paths.append(_save(fig, os.path.join(out_dir, f"{panel}.png")))
    return paths


def plot_confusion_matrix(confusion: np.ndarray, class_names: list[str], path: str, title: str = "") -> str:
    """Two panels, counts and row-normalised (each true class sums to 1), class names on both axes."""
    confusion = np.asarray(confusion)
    n = len(class_names)
    side = min(max(4.0, 0.35 * n + 2.5), 40.0)
    fig = Figure(figsize=(2 * side + 1, side + 0.8))
    support = confusion.sum(axis=1, keepdims=True)
    normalised = np.divide(confusion, support, out=np.zeros(confusion.shape), where=support > 0)
    for i, (values, name, fmt) in enumerate(((confusion, "counts", "d"), (normalised, "normalised by true class", ".2f"))):
        ax = fig.add_subplot(1, 2, i + 1)
        image = ax.imshow(values, cmap="Blues", vmin=0)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        fontsize = max(4, min(10, 200 // max(n, 1)))
        ax.set_xticks(range(n), class_names, rotation=90, fontsize=fontsize)
        ax.set_yticks(range(n), class_names, fontsize=fontsize)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(name)
        if n <= MAX_ANNOTATED_CLASSES:
            threshold = values.max() / 2 if values.size else 0
            for (row, col), value in np.ndenumerate(values):
                ax.text(col, row, format(value, fmt), ha="center", va="center", fontsize=fontsize,
                        color="white" if value > threshold else "black")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_reliability(bins: list[dict], path: str, title: str = "") -> str:
    """Reliability diagram: accuracy against mean confidence per bin (report.calibration), with counts."""
    fig = Figure(figsize=(5.5, 5.5))
    ax = fig.add_subplot()
    filled = [b for b in bins if b["count"]]
    width = bins[0]["upper"] - bins[0]["lower"]
    ax.bar([b["lower"] for b in filled], [b["accuracy"] for b in filled], width=width, align="edge",
           edgecolor="black", alpha=0.7, label="accuracy in bin")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.plot([b["confidence"] for b in filled], [b["accuracy"] for b in filled], "o", color="C3",
            label="(mean confidence, accuracy)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left")
    if title:
        ax.set_title(title)
    return _save(fig, path)


def _save(fig: Figure, path: str) -> str:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
