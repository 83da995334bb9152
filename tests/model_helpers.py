"""Models for tests that need values, not training: built abstractly, then filled from a seeded generator."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxclf import tree_paths


def with_random_values(make_model: Callable[[], nnx.Module], seed: int = 0, scale: float = 0.2) -> nnx.Module:
    """`make_model()` without running its initialisers (seconds of per-shape compiles on CPU): float
    arrays get uniform values in [1 - scale, 1 + scale] for norm scales and variances, N(0, scale) otherwise."""
    graphdef, state = nnx.split(nnx.eval_shape(make_model))
    rng = np.random.default_rng(seed)

    def fill(path, x):
        if tree_paths.path_name(path).rsplit("/", 1)[-1] in ("scale", "var"):
            return jnp.asarray(rng.uniform(1 - scale, 1 + scale, x.shape), x.dtype)
        return jnp.asarray(rng.normal(0, scale, x.shape), x.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))
