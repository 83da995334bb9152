"""Class imbalance: per-class loss weights (`config.data.class_weights`) and per-example sampling
weights for class-balanced sampling (`config.data.sampling`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxclf.config import ConfigError
from jaxclf.data.sources import LabelledSource

SAMPLING_MODES = ("uniform", "balanced")


def class_weights(spec: str, counts: Sequence[int]) -> np.ndarray | None:
    """The loss weight of each class, float32[C], from `spec`; None for "none" (an unweighted mean).

    "balanced": n / (C * count) for each of the C classes with training examples (scikit-learn's
    heuristic; 0 for a class with none). Otherwise comma-separated weights, one per class in class
    order, e.g. "1,2.5,1". The loss is the weighted mean over the batch (torch's CrossEntropyLoss(weight=)).
    """
    counts = np.asarray(counts, np.float64)
    if spec == "none":
        return None
    if spec == "balanced":
        present = counts > 0
        return np.where(present, counts.sum() / (present.sum() * np.maximum(counts, 1)), 0.0).astype(np.float32)
    try:
        weights = np.asarray([float(w) for w in spec.split(",")], np.float32)
    except ValueError:
        weights = None
    if weights is None or len(weights) != len(counts) or (weights < 0).any() or not (weights > 0).any():
        raise ConfigError(
            f"config.data.class_weights={spec!r}: use 'none', 'balanced', or {len(counts)} comma-separated "
            "weights >= 0 (one per class, in the order of classes.json), e.g. '1,2.5,1'"
        )
    return weights


def sampling_weights(mode: str, source: LabelledSource) -> np.ndarray | None:
    """Per-example draw weights, float64[N]: None for "uniform" (each epoch a permutation), else
    1 / count of the example's class, so every class is drawn equally often (with replacement)."""
    if mode not in SAMPLING_MODES:
        raise ConfigError(f"config.data.sampling={mode!r}: use one of {SAMPLING_MODES}")
    if mode == "uniform":
        return None  # without reading the labels (a TFDS source decodes every record for them)
    counts = np.bincount(source.labels, minlength=len(source.class_names))
    return 1.0 / counts[source.labels]
