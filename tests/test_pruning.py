"""Gradual magnitude pruning (config.prune): the schedule against numpy, exact sparsity, scopes, dense layers,
pruned weights staying zero, and a killed run resumed to the same masks and weights."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from jaxclf import config as config_lib, models, train
from jaxclf.models import tree_paths
from jaxclf.runs import checkpoint
from jaxclf.training import pruning
from tiny_config import TinyCNN  # tests/ is on sys.path


def reference_sparsity(t, s_i, s_f, start, end):
    """Zhu & Gupta (2017), eq. 1, written from the paper."""
    if t < start:
        return s_i
    if t >= end:
        return s_f
    return s_f + (s_i - s_f) * (1 - (t - start) / (end - start)) ** 3


def test_schedule_matches_the_paper():
    steps = np.arange(0, 40)
    ours = np.asarray(pruning.sparsity_at(jnp.asarray(steps), initial=0.1, final=0.8, start=5, end=30))
    np.testing.assert_allclose(ours, [reference_sparsity(t, 0.1, 0.8, 5, 30) for t in steps], rtol=1e-6)
    when = np.asarray(pruning.is_pruning_step(jnp.asarray(steps), start=5, end=30, every=4))
    assert list(steps[when]) == [5, 9, 13, 17, 21, 25, 29, 30]


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {"a": {"kernel": jnp.asarray(rng.normal(0, 1, (4, 4, 3, 8)), jnp.float32),
                  "bias": jnp.asarray(rng.normal(0, 1, (8,)), jnp.float32)},
            "b": {"kernel": jnp.asarray(rng.normal(0, 0.1, (32, 16)), jnp.float32)},  # smaller: global prunes it more
            "head": {"kernel": jnp.asarray(rng.normal(0, 1, (16, 10)), jnp.float32)}}


PRUNABLE = {"a": {"kernel": True, "bias": False}, "b": {"kernel": True}, "head": {"kernel": False}}


def _train(params, tx, steps, seed=1):
    state, rng = tx.init(params), np.random.default_rng(seed)
    update = jax.jit(tx.update)
    for _ in range(steps):
        grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.05, x.shape), jnp.float32), params)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def _kept_by_numpy(params, sparsity, scope):
    """The masks a one-shot magnitude prune gives: the floor(s * n) smallest |w| dropped (all prunable or per param)."""
    chosen = {"a": np.asarray(params["a"]["kernel"]), "b": np.asarray(params["b"]["kernel"])}
    if scope == "per_layer":
        return {k: np.abs(w) > np.sort(np.abs(w).ravel())[int(sparsity * w.size) - 1] for k, w in chosen.items()}
    every = np.concatenate([np.abs(w).ravel() for w in chosen.values()])
    threshold = np.sort(every)[int(sparsity * every.size) - 1]
    return {k: np.abs(w) > threshold for k, w in chosen.items()}


@pytest.mark.parametrize("scope", ["global", "per_layer"])
def test_one_shot_prune_drops_the_smallest_weights_exactly(scope):
    params = _params()
    tx = pruning.magnitude_pruning(PRUNABLE, sparsity=0.7, start=1, end=1, every=1, scope=scope)
    pruned, _ = _train(params, optax.chain(optax.sgd(0.0), tx), steps=1)
    expected = _kept_by_numpy(params, 0.7, scope)
    for name in ("a", "b"):
        np.testing.assert_array_equal(np.asarray(pruned[name]["kernel"]) != 0, expected[name])
        np.testing.assert_array_equal(np.asarray(pruned[name]["kernel"])[expected[name]],
                                      np.asarray(params[name]["kernel"])[expected[name]])
    zeros = {k: int(np.sum(np.asarray(pruned[k]["kernel"]) == 0)) for k in ("a", "b")}
    if scope == "per_layer":
        assert zeros == {"a": int(0.7 * 384), "b": int(0.7 * 512)}
    else:
        assert sum(zeros.values()) == int(0.7 * (384 + 512)) and zeros["b"] > 0.9 * 512  # the small layer goes first


def test_gradual_pruning_reaches_the_target_and_pruned_weights_stay_zero():
    params = _params()
    tx = optax.chain(optax.sgd(0.1, momentum=0.9),
                     pruning.magnitude_pruning(PRUNABLE, sparsity=0.8, start=2, end=9, every=3))
    plain, _ = _train(params, optax.sgd(0.1, momentum=0.9), steps=14)
    zero_patterns = []
    for steps in (9, 14):
        pruned, state = _train(params, tx, steps=steps)
        assert pruning.sparsity_of(pruned, PRUNABLE) == int(0.8 * 896) / 896
        zero_patterns.append({k: np.asarray(pruned[k]["kernel"]) == 0 for k in ("a", "b")})
        masks = state[1].masks
        for k in ("a", "b"):  # the weights are zero exactly where the mask in the optimizer state is
            np.testing.assert_array_equal(~np.asarray(masks[k]["kernel"]), zero_patterns[-1][k])
    for k in ("a", "b"):  # five more steps of momentum and gradients moved no pruned weight
        np.testing.assert_array_equal(zero_patterns[0][k], zero_patterns[1][k])
    # Params that are not prunable train exactly as without pruning.
    np.testing.assert_array_equal(pruned["head"]["kernel"], plain["head"]["kernel"])
    np.testing.assert_array_equal(pruned["a"]["bias"], plain["a"]["bias"])


def test_stem_head_norms_and_biases_stay_dense_in_a_resnet():
    model = nnx.eval_shape(lambda: models.create("resnet18", num_classes=10))
    prunable = pruning.prunable_params(model, ("<stem>", "<head>"))
    pruned_names = {tree_paths.path_name(path) for path, p in jax.tree_util.tree_leaves_with_path(prunable) if p}
    block_convs = {f"layer{s}/{b}/conv{c}/kernel" for s in range(1, 5) for b in (0, 1) for c in (1, 2)}
    assert pruned_names == block_convs | {f"layer{s}/0/downsample/0/kernel" for s in (2, 3, 4)}


def test_masks_saved_by_orbax_resume_the_same_steps(tmp_path):
    """The fast check of resume: the optimizer state (masks and step count inside) through an orbax save and
    restore, then the rest of the schedule, equals the uninterrupted run (the whole run: the slow test below)."""
    tx = optax.chain(optax.sgd(0.1, momentum=0.9),
                     pruning.magnitude_pruning(PRUNABLE, sparsity=0.8, start=2, end=9, every=3))
    straight, _ = _train(_params(), tx, steps=9)
    halfway, state = _train(_params(), tx, steps=5)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", {"params": halfway, "opt_state": state})
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(tmp_path / "ckpt", {"params": halfway, "opt_state": state})
    update, rng = jax.jit(tx.update), np.random.default_rng(1)
    params, state = restored["params"], restored["opt_state"]
    for step in range(9):
        grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.05, x.shape), jnp.float32), params)
        if step >= 5:  # the same gradients as the uninterrupted run's steps 6..9
            updates, state = update(grads, state, params)
            params = optax.apply_updates(params, updates)
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


def _config(digits_root, **prune):
    config = config_lib.load_config(f"tests/tiny_config.py:{digits_root}")
    config.total_steps = 12
    config.prune.update(dict(sparsity=0.6, start=2, end=10, every=2, keep_dense=("<head>",)), **prune)
    return config


@pytest.mark.slow  # make test-all; the fast check: test_masks_saved_by_orbax_resume_the_same_steps
def test_a_killed_pruning_run_resumes_to_the_same_masks_and_weights(digits_root, tmp_path):
    config = _config(digits_root)
    train.train_and_evaluate(config, str(tmp_path / "straight"))
    train.train_and_evaluate(config, str(tmp_path / "resumed"), stop_at_step=5)
    train.train_and_evaluate(config, str(tmp_path / "resumed"))

    def final_state(name):
        ckpt = checkpoint.Checkpointer(str(tmp_path / name), keep=2)
        assert ckpt.latest_step() == 12
        return ocp.StandardCheckpointer().restore(os.path.join(ckpt.directory, "12", "state"))

    straight, resumed = final_state("straight"), final_state("resumed")
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, b)
    kernel = np.asarray(straight["params"]["conv"]["kernel"])
    assert np.sum(kernel == 0) == int(0.6 * kernel.size)
    assert np.all(np.asarray(straight["params"]["head"]["kernel"]) != 0)


def test_bad_prune_settings_name_the_field():
    model = nnx.eval_shape(lambda: TinyCNN(10, nnx.Rngs(0)))
    config = config_lib.base_config()
    config.prune.sparsity = 0.5
    for field, value, message in (("scope", "layer", "config.prune.scope"), ("end", 5, r"start \(6\) <= end"),
                                  ("keep_dense", ("<stem>",), "defines no layer_id"),  # tiny_cnn cannot name it
                                  ("keep_dense", ("conv", "head"), "leaves no param to prune")):
        bad = config_lib.base_config()
        bad.prune.update(dict(sparsity=0.5, start=6, keep_dense=("<head>",)), **{field: value})
        with pytest.raises(pruning.PruneConfigError, match=message):
            pruning.with_pruning(optax.sgd(0.1), bad, model, total_steps=20)
    config.ema_decay = 0.9
    with pytest.raises(pruning.PruneConfigError, match="config.ema_decay=0"):
        pruning.with_pruning(optax.sgd(0.1), config, model, total_steps=20)
