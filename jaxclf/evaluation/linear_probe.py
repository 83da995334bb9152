"""A linear probe: multinomial logistic regression on frozen features, its L2 strength chosen on held-out train.

Features are standardised per dimension (mean and std of the examples fitted on). The objective is
scikit-learn's `LogisticRegression(C=c)`: c * (summed cross-entropy) + ||W||^2 / 2, the bias
unpenalised, here divided by c * N (the same minimiser) and minimised with optax's L-BFGS until the
gradient norm is below `tol` or `max_iter` steps. Each c of `c_grid` is fitted on the train split
less a held-out `holdout_fraction` of every class; the c with the best held-out accuracy (the
smaller one on a tie) is refitted on the whole train split and scored on the evaluation split.
Every fit reads the whole train split with a 0/1 weight per row, so the solver compiles once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxclf.evaluation import base, features as features_lib, representation


@functools.partial(jax.jit, static_argnames=("num_classes", "max_iter"))
def fit_logistic(x: jax.Array, labels: jax.Array, rows: jax.Array, c: float, *, num_classes: int,
                 max_iter: int = 1000, tol: float = 1e-6) -> dict[str, jax.Array]:
    """Multinomial logistic regression of the rows of (x: float32[N, D], labels: int[N]) where `rows`
    (float32[N], 0 or 1) is 1, with scikit-learn's C = c: {"w": float32[D, C], "b": float32[C]}, by L-BFGS."""
    count = jnp.sum(rows)
    l2 = 1.0 / (c * count)

    def objective(params):
        logits = x @ params["w"] + params["b"]
        loss = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels) * rows) / count
        return loss + 0.5 * l2 * jnp.sum(params["w"] ** 2)

    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def step(carry):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=objective)
        return optax.apply_updates(params, updates), state

    def not_done(carry):
        _, state = carry
        count = optax.tree_utils.tree_get(state, "count")
        grad_norm = optax.tree_utils.tree_norm(optax.tree_utils.tree_get(state, "grad"))
        return (count == 0) | ((count < max_iter) & (grad_norm >= tol))

    params = {"w": jnp.zeros((x.shape[1], num_classes), jnp.float32), "b": jnp.zeros((num_classes,), jnp.float32)}
    params, _ = jax.lax.while_loop(not_done, step, (params, solver.init(params)))
    return params


def fit_standardised(x: np.ndarray, labels: np.ndarray, c: float, num_classes: int, max_iter: int,
                     rows: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """(fit_logistic's params, mean, std) on the `rows` of x (indices; default all) standardised by their own
    mean and std."""
    rows = np.arange(len(x)) if rows is None else rows
    mean, std = x[rows].mean(axis=0), x[rows].std(axis=0) + 1e-6
    weights = np.zeros(len(x), np.float32)
    weights[rows] = 1.0
    params = fit_logistic(jnp.asarray((x - mean) / std, jnp.float32), jnp.asarray(labels), jnp.asarray(weights), c,
                          num_classes=num_classes, max_iter=max_iter)
    return jax.device_get(params), mean, std


def scores(fitted: tuple[dict[str, np.ndarray], np.ndarray, np.ndarray], x: np.ndarray) -> np.ndarray:
    """float[Q, C] logits of `fit_standardised`'s classifier."""
    params, mean, std = fitted
    return ((x - mean) / std) @ params["w"] + params["b"]


def holdout_split(labels: np.ndarray, num_classes: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit indices, held-out indices): round(fraction * count) random examples of every class held out."""
    rng = np.random.default_rng(seed)
    held = []
    for c in range(num_classes):
        members = rng.permutation(np.flatnonzero(labels == c))
        held.append(members[:round(fraction * len(members))])
    held = np.sort(np.concatenate(held))
    return np.setdiff1d(np.arange(len(labels)), held), held


class LinearProbe(representation.RepresentationEvaluator):
    """Options: `c_grid` (scikit-learn's C values tried: (1e-3, 1e-2, 0.1, 1, 10, 100)), `holdout_fraction` (0.2)
    and `seed` (0) of the held-out part of train, `max_iter` (1000 L-BFGS steps), besides the splits.
    Metrics: accuracy, top5, c (the chosen C), holdout_accuracy (its held-out accuracy), examples."""

    type = "linear_probe"
    options = {**representation.RepresentationEvaluator.options, "c_grid": (1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0),
               "holdout_fraction": 0.2, "seed": 0, "max_iter": 1000}

    def __init__(self, name: str, spec: dict, context: base.EvalContext):
        super().__init__(name, spec, context)
        if not self.spec["c_grid"] or not all(float(c) > 0 for c in self.spec["c_grid"]):
            raise self.option_error("c_grid", "give a tuple of values > 0 (scikit-learn's C: inverse L2 strength)")
        if not 0 < float(self.spec["holdout_fraction"]) < 1:
            raise self.option_error("holdout_fraction", "must lie between 0 and 1")
        if not isinstance(self.spec["max_iter"], int) or self.spec["max_iter"] < 1:
            raise self.option_error("max_iter", "give a whole number >= 1")

    def score(self, train: features_lib.SplitFeatures, test: features_lib.SplitFeatures) -> dict[str, float]:
        num_classes, max_iter = train.num_classes, self.spec["max_iter"]
        fit, held = holdout_split(train.labels, num_classes, float(self.spec["holdout_fraction"]), self.spec["seed"])
        if not len(held) or not len(fit):
            raise self.option_error("holdout_fraction", f"leaves {len(fit)} examples to fit and {len(held)} to hold out")
        held_accuracy = {}
        for c in sorted(float(c) for c in self.spec["c_grid"]):
            fitted = fit_standardised(train.features, train.labels, c, num_classes, max_iter, rows=fit)
            held_accuracy[c] = float(np.mean(scores(fitted, train.features[held]).argmax(axis=1) == train.labels[held]))
        best = max(held_accuracy, key=lambda c: (held_accuracy[c], -c))
        logits = scores(fit_standardised(train.features, train.labels, best, num_classes, max_iter), test.features)
        return {**representation.top1_top5(logits, test.labels), "c": best, "holdout_accuracy": held_accuracy[best], "examples": len(test.labels)}
