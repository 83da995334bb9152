"""Few-shot linear regression on frozen features, as big_vision's `fewshot_lsr` evaluator.

For each seed, each class's train examples are shuffled (numpy `default_rng(seed)`) and the first
`shots` of every class are kept. On them: features standardised per dimension (mean, std + 1e-5 of
the kept examples), a constant feature of 100 appended (a bias that is almost unregularised),
targets one-hot in {-1, +1}, and the ridge solution W = (X^T X + l2_reg I)^-1 X^T Y in closed form
(through an eigendecomposition of X^T X, or of X X^T when there are fewer examples than features).
The evaluation split is classified by argmax(x W). Metrics per shot count: mean accuracy over seeds
(`<shots>shot`) and its standard deviation (`<shots>shot_std`).
"""

from __future__ import annotations

import numpy as np

from jaxclf.evaluation import base, features as features_lib, representation

BIAS_CONSTANT = 100.0


def standardize(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(x - mean) / std with the bias feature appended: float64[N, D + 1]."""
    x = (np.asarray(x, np.float64) - mean) / std
    return np.pad(x, ((0, 0), (0, 1)), constant_values=BIAS_CONSTANT)


def fit_lsr(x: np.ndarray, labels: np.ndarray, num_classes: int, l2_reg: float) -> tuple[np.ndarray, ...]:
    """The regularised least-squares classifier of (x: float[N, D], labels: int[N]): (weights float64[D + 1, C],
    mean float64[1, D], std float64[1, D]) as `standardize` and `predict` use them."""
    x = np.asarray(x, np.float64)
    mean, std = x.mean(axis=0, keepdims=True), x.std(axis=0, keepdims=True) + 1e-5
    x = standardize(x, mean, std)
    y = 2.0 * np.eye(num_classes)[labels] - 1.0
    num_points, dim = x.shape
    if num_points >= dim:  # (x^T x + l2 I)^-1 x^T y
        eigs, q = np.linalg.eigh(x.T @ x)
        rhs, lhs = q.T @ (x.T @ y), q
    else:  # x^T (x x^T + l2 I)^-1 y: the same solution from the smaller N x N matrix
        eigs, q = np.linalg.eigh(x @ x.T)
        rhs, lhs = q.T @ y, x.T @ q
    return (lhs / (eigs + l2_reg)) @ rhs, mean, std


def predict(fitted: tuple[np.ndarray, ...], x: np.ndarray) -> np.ndarray:
    """int[Q]: the class `fit_lsr`'s classifier gives each row of x."""
    weights, mean, std = fitted
    return np.argmax(standardize(x, mean, std) @ weights, axis=1)


def sample_shots(labels: np.ndarray, num_classes: int, shots: int, seed: int) -> np.ndarray:
    """Indices of `shots` examples of every class: the first of a per-class permutation by `seed` (big_vision's)."""
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    return np.concatenate([indices[:shots] for indices in per_class])


class FewShot(representation.RepresentationEvaluator):
    """Options: `shots` per class ((1, 5, 10, 25)), `seeds` (3: seeds 0..seeds-1) and `l2_reg` (2**10, big_vision's),
    besides the splits. Metrics: <shots>shot (mean accuracy over seeds), <shots>shot_std, examples."""

    type = "fewshot"
    options = {**representation.RepresentationEvaluator.options, "shots": (1, 5, 10, 25), "seeds": 3,
               "l2_reg": 2.0 ** 10}

    def __init__(self, name: str, spec: dict, context: base.EvalContext):
        super().__init__(name, spec, context)
        shots = self.spec["shots"]
        if not shots or not all(isinstance(s, int) and s >= 1 for s in shots):
            raise self.option_error("shots", "give a tuple of whole numbers >= 1 (examples per class)")
        source = context.splits[self.spec["train_split"]]
        counts = np.bincount(source.labels, minlength=len(source.class_names))
        smallest = int(np.argmin(counts))
        if max(shots) > counts[smallest]:
            raise self.option_error(
                "shots", f"the train split {self.spec['train_split']!r} has only {counts[smallest]} examples of class "
                         f"{source.class_names[smallest]!r}; give shots of at most {counts[smallest]}")
        if not isinstance(self.spec["seeds"], int) or self.spec["seeds"] < 1:
            raise self.option_error("seeds", "give a whole number >= 1")
        if not float(self.spec["l2_reg"]) > 0:
            raise self.option_error("l2_reg", "must be > 0")

    def score(self, train: features_lib.SplitFeatures, test: features_lib.SplitFeatures) -> dict[str, float]:
        metrics = {}
        for shots in self.spec["shots"]:
            accuracies = []
            for seed in range(self.spec["seeds"]):
                kept = sample_shots(train.labels, train.num_classes, shots, seed)
                fitted = fit_lsr(train.features[kept], train.labels[kept], train.num_classes,
                                 float(self.spec["l2_reg"]))
                accuracies.append(np.mean(predict(fitted, test.features) == test.labels))
            metrics[f"{shots}shot"] = float(np.mean(accuracies))
            metrics[f"{shots}shot_std"] = float(np.std(accuracies))
        metrics["examples"] = len(test.labels)
        return metrics
