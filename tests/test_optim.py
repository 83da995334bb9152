"""Optimizer: the schedule's shape and which parameters get weight decay."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxclf import models
from jaxclf.training import optim
from jaxclf.models import tree_paths
from jaxclf.config import base_config


def _optim(**fields):
    config = base_config().optim
    config.update(fields)
    return config


def test_warmup_then_cosine():
    schedule = optim.make_schedule(_optim(lr=1.0, warmup_epochs=1.0, schedule="cosine"), 110, 10)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(0.5)
    assert float(schedule(10)) == pytest.approx(1.0)
    assert float(schedule(60)) == pytest.approx(0.5, abs=1e-6)  # half-way through the cosine
    assert float(schedule(110)) == pytest.approx(0.0, abs=1e-6)


def test_linear_and_constant_and_end_fraction():
    linear = optim.make_schedule(_optim(lr=2.0, schedule="linear", end_lr_fraction=0.5), 100, 10)
    assert float(linear(50)) == pytest.approx(1.5)
    constant = optim.make_schedule(_optim(lr=2.0, schedule="constant"), 100, 10)
    assert float(constant(99)) == 2.0
    with pytest.raises(ValueError, match="config.optim.schedule"):
        optim.make_schedule(_optim(schedule="exp"), 100, 10)


class TwoLayer(models.Classifier):
    """A weight matrix and a bias in the body, a head, and a token the model exempts from decay."""

    def __init__(self):
        self.body = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
        self.token = nnx.Param(jnp.ones((1, 2)))
        self.head = nnx.Linear(2, 2, rngs=nnx.Rngs(1))

    def no_weight_decay(self):
        return ("token",)


def _names(tree) -> dict:
    return {tree_paths.path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_weight_decay_mask_skips_biases_norms_and_what_the_model_names():
    vit = nnx.eval_shape(lambda: models.create("vit_tiny_patch16_224", num_classes=4, reg_tokens=4))
    mask = _names(optim.weight_decay_mask(vit)(nnx.state(vit, nnx.Param)))
    assert mask["blocks/0/attn/qkv/kernel"] and mask["patch_embed/kernel"] and mask["head/kernel"]
    assert not any(mask[name] for name in ("pos_embed", "cls_token", "reg_token", "blocks/0/attn/qkv/bias",
                                            "blocks/0/norm1/scale", "norm/bias"))


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_weight_decay_shrinks_only_masked_params(name):
    model = TwoLayer()
    params = nnx.state(model, nnx.Param)
    tx, _ = optim.make_optimizer(_optim(name=name, lr=0.1, weight_decay=0.5, schedule="constant"), model, 10, 1)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    new = _names(optax.apply_updates(params, updates))
    old = _names(params)
    for unchanged in ("body/bias", "token", "head/bias"):
        np.testing.assert_allclose(new[unchanged], old[unchanged])
    np.testing.assert_allclose(new["body/kernel"], old["body/kernel"] * (1.0 - 0.1 * 0.5), rtol=1e-6)


@pytest.mark.parametrize("name, num_layer_ids", [
    ("resnet18", 6), ("resnet50", 6), ("resnetv2_50x1_bit", 6), ("vit_tiny_patch16_224", 14),
    # One id per block, as timm's fine-grained groups: 16 + stem + head; 12 + 2; 12 + 2.
    ("efficientnet_b0", 18), ("mobilenetv3_small_100", 14), ("convnext_atto", 14),
])
def test_layer_decay_gives_every_stage_its_own_rate(name, num_layer_ids):
    """Stem 0, one id per stage (ResNets, BiT's `stages/i`) or block (ViTs, EfficientNets, ConvNeXts), the head on top."""
    model = nnx.eval_shape(lambda: models.create(name, num_classes=4))
    multipliers = _names(optim.lr_multipliers(_optim(layer_decay=0.5), model))
    assert sorted(set(multipliers.values())) == [0.5**i for i in reversed(range(num_layer_ids))]
    head = [path for path in multipliers if models.matches(path, model.head_paths())]
    assert head and all(multipliers[path] == 1.0 for path in head)
