"""Weighted k-nearest-neighbour classification on frozen features, as DINO's `eval_knn.py` (Caron et al., 2021).

Features are L2-normalised; each evaluation example takes its `k` most cosine-similar train examples,
each voting for its class with weight exp(similarity / temperature); the class scores are the vote
sums, and top-1 / top-5 are read from them (ties go to the lower class id).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxclf.evaluation import base, features as features_lib, representation

QUERY_CHUNK = 1024  # evaluation examples scored at once: a [chunk, train] similarity matrix


def l2_normalize(x: jax.Array) -> jax.Array:
    """Rows scaled to unit L2 norm (a zero row stays zero)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def knn_scores(train: jax.Array, train_labels: jax.Array, queries: jax.Array, *, k: int, temperature: float,
               num_classes: int) -> jax.Array:
    """train: float[N, D], train_labels: int[N], queries: float[Q, D] -> class scores float32[Q, C]: the sum
    of exp(cosine / temperature) over each query's k most similar train rows, per their class."""
    similarity = l2_normalize(queries.astype(jnp.float32)) @ l2_normalize(train.astype(jnp.float32)).T
    top_similarity, neighbours = jax.lax.top_k(similarity, k)
    votes = jax.nn.one_hot(train_labels[neighbours], num_classes, dtype=jnp.float32)
    return jnp.einsum("qk,qkc->qc", jnp.exp(top_similarity / temperature), votes)


def predict_scores(train: features_lib.SplitFeatures, queries: np.ndarray, *, k: int,
                   temperature: float) -> np.ndarray:
    """`knn_scores` of every row of `queries` against `train`, in chunks of QUERY_CHUNK (one compile)."""
    chunk = min(QUERY_CHUNK, len(queries))
    padded = np.concatenate([queries, np.zeros((-len(queries) % chunk, queries.shape[1]), queries.dtype)])
    bank, labels = jnp.asarray(train.features), jnp.asarray(train.labels)
    scores = [knn_scores(bank, labels, padded[start:start + chunk], k=k, temperature=temperature,
                         num_classes=train.num_classes) for start in range(0, len(padded), chunk)]
    return np.concatenate([np.asarray(s) for s in scores])[:len(queries)]


class KNN(representation.RepresentationEvaluator):
    """Options: `k` neighbours (20) and the votes' `temperature` (0.07), besides the splits.
    Metrics: accuracy (top-1), top5, examples."""

    type = "knn"
    options = {**representation.RepresentationEvaluator.options, "k": 20, "temperature": 0.07}

    def __init__(self, name: str, spec: dict, context: base.EvalContext):
        super().__init__(name, spec, context)
        if not isinstance(self.spec["k"], int) or not 1 <= self.spec["k"] <= len(self.train_labels):
            raise self.option_error("k", f"give a whole number from 1 to the {len(self.train_labels)} examples "
                                         f"of the train split {self.spec['train_split']!r}")
        if not float(self.spec["temperature"]) > 0:
            raise self.option_error("temperature", "must be > 0")

    def score(self, train: features_lib.SplitFeatures, test: features_lib.SplitFeatures) -> dict[str, float]:
        scores = predict_scores(train, test.features, k=self.spec["k"], temperature=float(self.spec["temperature"]))
        return {**representation.top1_top5(scores, test.labels), "examples": len(test.labels)}
