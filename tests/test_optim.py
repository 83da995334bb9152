"""Optimizer: the schedule's shape and which parameters get weight decay."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxclf import optim
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


def test_weight_decay_mask_skips_biases_norms_posemb():
    params = {
        "conv": {"kernel": jnp.ones((3, 3, 3, 8)), "bias": jnp.ones(8)},
        "norm": {"scale": jnp.ones(8)},
        "pos_embed": jnp.ones((1, 5, 8)),
        "cls_token": jnp.ones((1, 1, 8)),
    }
    mask = optim.weight_decay_mask(params)
    assert mask == {
        "conv": {"kernel": True, "bias": False},
        "norm": {"scale": False},
        "pos_embed": False,
        "cls_token": False,
    }


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_weight_decay_shrinks_only_masked_params(name):
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    tx, _ = optim.make_optimizer(_optim(name=name, lr=0.1, weight_decay=0.5, schedule="constant"), params, 10, 1)
    zero_grads = {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["b"], 1.0)
    np.testing.assert_allclose(new["w"], 1.0 - 0.1 * 0.5, rtol=1e-6)
