"""Models for tests: each new family's small form, and models built abstractly, then filled from a seeded generator."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxclf import models
from jaxclf.models import tree_paths


# Each family's small form (a few narrow blocks), for the tests that compile a train step or train a run
# (tests/test_families.py, tests/test_families_downstream.py); each has a param of >= 2**14 values for FSDP
# to split (the head conv, the last MLP).
SMALL_FORMS = {
    "efficientnet_b0": dict(arch=(("ds_r1_k3_s1_e1_c16_se0.25",), ("ir_r1_k5_s2_e6_c24_se0.25",)), num_features=1024),
    "mobilenetv3_small_100": dict(arch=(("ds_r1_k3_s2_e1_c16_se0.25_nre",), ("ir_r1_k5_s2_e4_c24_se0.25",),
                                        ("cn_r1_k1_s1_c48",)), num_features=512),
    "convnext_atto": dict(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64)),
}


def with_random_values(make_model: Callable[[], nnx.Module], seed: int = 0, spread: float = 0.2) -> nnx.Module:
    """`make_model()` without running its initialisers (seconds of per-shape compiles on CPU), filled
    from a seeded generator: kernels N(0, 1/fan_in) for unit-scale activations, norm scales and
    variances U(1 - spread, 1 + spread), every other float (biases, means, tokens, position
    embeddings) N(0, 0.2); RNG keys from the seed, RNG counts 0. Unlike init's ones and zeros,
    random norms, biases and statistics let a reference forward check each of them."""
    graphdef, state = nnx.split(nnx.eval_shape(make_model))
    rng = np.random.default_rng(seed)

    def fill(path, x):
        name = tree_paths.path_name(path).rsplit("/", 1)[-1]
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.key(int(rng.integers(2**31)))
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return jnp.zeros(x.shape, x.dtype)
        if name == "kernel":
            return jnp.asarray(rng.normal(0, np.prod(x.shape[:-1]) ** -0.5, x.shape), x.dtype)
        if name in ("scale", "var"):
            return jnp.asarray(rng.uniform(1 - spread, 1 + spread, x.shape), x.dtype)
        return jnp.asarray(rng.normal(0, 0.2, x.shape), x.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


class CamNet(models.Classifier):
    """Two convs, global average pool, linear head: the ResNet layout Grad-CAM explains (forward_features/forward_head), tiny."""

    def __init__(self, num_classes: int, rngs: nnx.Rngs, widths: tuple[int, int] = (8, 16),
                 strides: tuple[int, int] = (2, 1)):
        self.conv1 = nnx.Conv(3, widths[0], (3, 3), strides=strides[0], rngs=rngs)
        self.conv2 = nnx.Conv(widths[0], widths[1], (3, 3), strides=strides[1], rngs=rngs)
        self.head = nnx.Linear(widths[1], num_classes, rngs=rngs)

    def forward_features(self, images):
        return nnx.relu(self.conv2(nnx.relu(self.conv1(images))))

    def forward_head(self, features):
        return self.head(features.mean(axis=(1, 2)))


def explainable_trained_model(workdir: str, class_names: tuple[str, ...]):
    """An inference.TrainedModel of a random CamNet taking images as they are decoded (no training run needed)."""
    from jaxclf import config as config_lib
    from jaxclf.runs import inference

    config = config_lib.base_config()
    config.model_name, config.data.pp_eval = "cam_net", "decode"
    config.data.mean, config.data.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    model = CamNet(len(class_names), nnx.Rngs(0))
    model.eval()
    return inference.TrainedModel(workdir, config, class_names, model, step=7, weights="params")
