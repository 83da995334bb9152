"""Fine-tuning knobs: each test shows the knob's effect, not only that the code runs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxclf.tasks import registry as task_registry
from jaxclf.training import augment, optim, resolve, sharding, steps
from jaxclf.runs import checkpoint
from jaxclf import config as config_lib, models, train
from jaxclf.models import tree_paths
from jaxclf.config import base_config
from jaxclf.tracking.metrics import read_metrics

NORM = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


class ConvNet(models.Classifier):
    """Conv + optional BatchNorm + head; without BatchNorm, examples do not interact."""

    def __init__(self, rngs: nnx.Rngs, batch_norm: bool = False, num_classes: int = 4):
        self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.use_bn = batch_norm
        self.bn = nnx.BatchNorm(8, rngs=rngs) if batch_norm else None
        self.head = nnx.Linear(8, num_classes, rngs=rngs)

    def __call__(self, x):
        x = self.conv(x)
        if self.use_bn:
            x = self.bn(x)
        return self.head(nnx.relu(x).mean(axis=(1, 2)))


def _config(**fields):
    config = base_config()
    config.data.mean, config.data.std = NORM["mean"], NORM["std"]
    config.optim.update(dict(name="sgd", lr=0.1, momentum=0.0, weight_decay=0.0, schedule="constant"))
    for key, value in fields.items():
        node, *path = key.split("__")
        target = config
        for part in [node, *path][:-1]:
            target = target[part]
        target[[node, *path][-1]] = value
    return config


def _batch(seed: int, size: int = 16):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (size, 8, 8, 3), dtype=np.uint8),
        "label": rng.integers(0, 4, size).astype(np.int32),
    }


def _run(config, model, batches, mesh=None, class_weights=None):
    mesh = mesh or sharding.make_mesh(jax.devices()[:1])
    step, state = _make_step(config, model, mesh, class_weights)
    initial = jax.device_get(state)
    metrics = []
    for batch in batches:
        state, m = step(state, sharding.shard_batch(batch, mesh))
        metrics.append(m)
    return initial, jax.device_get(state), jax.device_get(metrics)


def _make_step(config, model, mesh, class_weights=None):
    """(jitted train step, state on `mesh`) for `model` under `config`."""
    tx, _ = optim.make_optimizer(config.optim, model, 100, 10)
    graphdef, _, state = steps.create_train_state(
        model, tx, ema=config.ema_decay > 0, freeze_bn_stats=config.freeze_bn_stats
    )
    state_sharding = sharding.state_sharding(state, mesh, config.param_sharding)
    state = jax.device_put(state, state_sharding)
    step = steps.make_train_step(graphdef, tx, mesh, config, 4, state_sharding, steps.cross_entropy_loss(class_weights),
                                 frozen_params=optim.frozen_mask(config.optim, model))
    return step, state


def _leaves_by_name(tree):
    return {tree_paths.path_name(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


# --- optimisation --------------------------------------------------------------------------------


@pytest.mark.parametrize("class_weights", [None, (1.0, 10.0, 1.0, 5.0)])
def test_gradient_accumulation_equals_the_larger_batch(class_weights):
    batch = _batch(0, size=32)
    weights = None if class_weights is None else jnp.asarray(class_weights)
    _, whole, whole_metrics = _run(_config(), ConvNet(nnx.Rngs(0)), [batch], class_weights=weights)
    _, accumulated, metrics = _run(_config(optim__accumulate_steps=4), ConvNet(nnx.Rngs(0)), [batch],
                                   class_weights=weights)
    # Class-weighted: the micro-batches' losses are normalised by the whole batch's weight sum.
    assert float(metrics[0]["loss"]) == pytest.approx(float(whole_metrics[0]["loss"]), rel=1e-5)
    for name, value in _leaves_by_name(whole.params).items():
        np.testing.assert_allclose(_leaves_by_name(accumulated.params)[name], value, rtol=2e-5, atol=1e-6)
    # ... on 8 devices too, where each micro-batch is still split over the whole mesh.
    _, sharded, _ = _run(_config(optim__accumulate_steps=4), ConvNet(nnx.Rngs(0)), [batch], sharding.make_mesh(),
                         class_weights=weights)
    for name, value in _leaves_by_name(whole.params).items():
        np.testing.assert_allclose(_leaves_by_name(sharded.params)[name], value, rtol=2e-5, atol=1e-6)


def test_batch_of_only_zero_weight_classes_is_a_zero_loss_step_not_nan():
    batch = {**_batch(0), "label": np.full(16, 2, np.int32)}
    initial, final, metrics = _run(_config(), ConvNet(nnx.Rngs(0)), [batch], class_weights=jnp.asarray([1.0, 1.0, 0.0, 1.0]))
    assert float(metrics[0]["loss"]) == 0.0
    for before, after in zip(jax.tree.leaves(initial.params), jax.tree.leaves(final.params)):
        np.testing.assert_array_equal(before, after)


def test_warmup_in_steps_epochs_or_fraction_agree_and_only_one_may_be_set():
    by_steps = optim.make_schedule(_config(optim__warmup_steps=20, optim__schedule="cosine").optim, 200, 10)
    by_epochs = optim.make_schedule(_config(optim__warmup_epochs=2.0, optim__schedule="cosine").optim, 200, 10)
    by_fraction = optim.make_schedule(_config(optim__warmup_fraction=0.1, optim__schedule="cosine").optim, 200, 10)
    for step in (0, 10, 20, 100, 199):
        assert float(by_steps(step)) == pytest.approx(float(by_epochs(step))) == pytest.approx(float(by_fraction(step)))
    assert float(by_steps(10)) == pytest.approx(0.05)
    with pytest.raises(optim.OptimConfigError, match="set only one of config.optim.warmup_steps, config.optim.warmup_epochs"):
        optim.make_schedule(_config(optim__warmup_steps=5, optim__warmup_epochs=1.0).optim, 200, 10)


def test_step_schedule_drops_at_the_given_epochs():
    schedule = optim.make_schedule(_config(optim__schedule="step", optim__step_epochs=(3.0, 6.0)).optim, 100, 10)
    assert [round(float(schedule(s)), 6) for s in (0, 29, 30, 59, 60, 99)] == [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    # BiT-HyperRule's form: drops at fractions of the run, after a warmup.
    by_fraction = optim.make_schedule(_config(optim__schedule="step", optim__step_fractions=(0.3, 0.6, 0.9),
                                              optim__warmup_steps=10).optim, 100, 10)
    assert [round(float(by_fraction(s)), 6) for s in (5, 10, 29, 30, 60, 90, 99)] == [
        0.05, 0.1, 0.1, 0.01, 0.001, 0.0001, 0.0001]


def test_gradient_clipping_bounds_the_update():
    config = _config(optim__clip_grad_norm=1e-3, optim__lr=1.0)
    initial, final, metrics = _run(config, ConvNet(nnx.Rngs(0)), [_batch(0)])
    assert metrics[0]["grad_norm"] > 1e-2  # the raw gradient is far above the clip
    delta = optax.tree.norm(jax.tree.map(jnp.subtract, final.params, initial.params))
    assert float(delta) == pytest.approx(1e-3, rel=1e-3)


@pytest.mark.parametrize("name", ["lamb", "lion", "adamw"])
def test_other_optimizers_reduce_the_loss(name):
    config = _config(optim__name=name, optim__lr=1e-2)
    batches = [_batch(0)] * 8
    _, _, metrics = _run(config, ConvNet(nnx.Rngs(0)), batches)
    assert metrics[-1]["loss"] < metrics[0]["loss"]


# --- what trains ---------------------------------------------------------------------------------


def test_layer_decay_multipliers_for_vit_and_resnet():
    config = _config(optim__layer_decay=0.5, optim__head_lr_mult=10.0)
    vit = nnx.eval_shape(lambda: models.create("vit_tiny_patch16_224", num_classes=4))
    mult = _leaves_by_name(optim.lr_multipliers(config.optim, vit))
    assert mult["head/kernel"] == 10.0  # top of the stack (decay ** 0), times the head multiplier
    assert mult["norm/scale"] == 1.0
    assert mult["blocks/11/attn/qkv/kernel"] == 0.5
    assert mult["blocks/0/attn/qkv/kernel"] == 0.5**12
    assert mult["pos_embed"] == mult["patch_embed/kernel"] == 0.5**13
    resnet = nnx.eval_shape(lambda: models.create("resnet18", num_classes=4))
    mult = _leaves_by_name(optim.lr_multipliers(config.optim, resnet))
    assert mult["fc/kernel"] == 10.0
    assert mult["layer4/1/conv2/kernel"] == 0.5 and mult["layer1/0/conv1/kernel"] == 0.5**4
    assert mult["conv1/kernel"] == 0.5**5


def test_head_lr_multiplier_scales_only_the_head_update():
    initial, plain, _ = _run(_config(), ConvNet(nnx.Rngs(0)), [_batch(0)])
    _, boosted, _ = _run(_config(optim__head_lr_mult=3.0), ConvNet(nnx.Rngs(0)), [_batch(0)])
    start, a, b = (_leaves_by_name(t.params) for t in (initial, plain, boosted))
    np.testing.assert_allclose(b["head/kernel"] - start["head/kernel"], 3 * (a["head/kernel"] - start["head/kernel"]), atol=1e-7)
    np.testing.assert_allclose(b["conv/kernel"], a["conv/kernel"], rtol=1e-6)


def test_linear_probe_freezes_the_backbone_without_optimizer_state():
    config = _config(optim__freeze="^(?!head/)", optim__momentum=0.9)
    initial, final, _ = _run(config, ConvNet(nnx.Rngs(0), batch_norm=True), [_batch(0), _batch(1)])
    start, end = _leaves_by_name(initial.params), _leaves_by_name(final.params)
    for name in start:
        if name.startswith("head/"):
            assert not np.array_equal(start[name], end[name])
        else:
            np.testing.assert_array_equal(start[name], end[name])
    # Momentum buffers exist for the head only.
    state_sizes = sum(leaf.size for leaf in jax.tree.leaves(final.opt_state) if np.ndim(leaf) > 0)
    assert state_sizes == start["head/kernel"].size + start["head/bias"].size


def test_linear_probe_runs_no_backward_pass_through_the_frozen_backbone():
    """The frozen conv's kernel gradient is never computed: the probe's step holds the forward conv only,
    full fine-tuning's one more (the kernel gradient)."""
    mesh = sharding.make_mesh(jax.devices()[:1])
    batch = sharding.shard_batch(_batch(0), mesh)
    convolutions = {}
    for freeze in ("", "^(?!head/)"):
        step, state = _make_step(_config(optim__freeze=freeze), ConvNet(nnx.Rngs(0)), mesh)
        convolutions[freeze] = step.lower(state, batch).as_text().count("stablehlo.convolution")
    assert convolutions == {"": 2, "^(?!head/)": 1}


def test_frozen_batchnorm_statistics_do_not_move():
    initial, final, _ = _run(_config(freeze_bn_stats=True), ConvNet(nnx.Rngs(0), batch_norm=True), [_batch(0)])
    for a, b in zip(jax.tree.leaves(initial.model_state), jax.tree.leaves(final.model_state)):
        np.testing.assert_array_equal(a, b)
    _, trained, _ = _run(_config(), ConvNet(nnx.Rngs(0), batch_norm=True), [_batch(0)])
    assert not np.array_equal(jax.tree.leaves(trained.model_state)[0], jax.tree.leaves(initial.model_state)[0])


# --- regularisation ------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [8, 7])
def test_mixup_is_a_convex_combination_with_the_mirrored_batch(batch):
    key = jax.random.key(0)
    images = jax.random.normal(jax.random.key(1), (batch, 4, 4, 3))
    targets = jax.nn.one_hot(jnp.arange(batch) % 3, 3)
    mixed, mixed_targets = augment.mixup_cutmix(key, images, targets, mixup_alpha=0.4, cutmix_alpha=0.0)
    lam = float((mixed[0] - images[-1]).sum() / (images[0] - images[-1]).sum())
    np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[::-1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mixed_targets, lam * targets + (1 - lam) * targets[::-1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mixed_targets.sum(-1), 1.0, rtol=1e-6)
    assert 0.0 < lam < 1.0


def test_cutmix_target_weight_equals_the_pasted_area():
    images = jnp.zeros((6, 16, 16, 1)).at[3:].set(1.0)  # rows 3..5 are ones, their mirrors 0..2 zeros
    targets = jax.nn.one_hot(jnp.arange(6) % 2, 2)
    for seed in range(5):
        mixed, mixed_targets = augment.mixup_cutmix(
            jax.random.key(seed), images, targets, mixup_alpha=0.0, cutmix_alpha=1.0
        )
        pasted = float(mixed[0].mean())  # fraction of row 0 that came from row 5 (ones)
        lam = 1.0 - pasted
        np.testing.assert_allclose(mixed_targets, lam * targets + (1 - lam) * targets[::-1], atol=1e-6)


def test_mix_prob_zero_leaves_the_batch_alone():
    images = jax.random.normal(jax.random.key(1), (4, 4, 4, 3))
    targets = jax.nn.one_hot(jnp.arange(4), 4)
    out, out_targets = augment.mixup_cutmix(jax.random.key(0), images, targets, mixup_alpha=1.0, cutmix_alpha=1.0, mix_prob=0.0)
    np.testing.assert_array_equal(out, images)
    np.testing.assert_array_equal(out_targets, targets)


def test_mixup_in_the_train_step_changes_the_gradient_deterministically():
    _, plain, _ = _run(_config(), ConvNet(nnx.Rngs(0)), [_batch(0, size=9)])
    _, mixed, _ = _run(_config(mixup_alpha=0.8, cutmix_alpha=1.0), ConvNet(nnx.Rngs(0)), [_batch(0, size=9)])
    _, again, _ = _run(_config(mixup_alpha=0.8, cutmix_alpha=1.0), ConvNet(nnx.Rngs(0)), [_batch(0, size=9)])
    assert not np.allclose(jax.tree.leaves(plain.params)[0], jax.tree.leaves(mixed.params)[0])
    for a, b in zip(jax.tree.leaves(mixed.params), jax.tree.leaves(again.params)):
        np.testing.assert_array_equal(a, b)


def test_ema_follows_the_closed_form():
    initial, final, _ = _run(_config(ema_decay=0.9), ConvNet(nnx.Rngs(0)), [_batch(0)])
    for p0, p1, e in zip(jax.tree.leaves(initial.params), jax.tree.leaves(final.params), jax.tree.leaves(final.ema_params)):
        np.testing.assert_allclose(e, 0.9 * p0 + 0.1 * p1, rtol=1e-6, atol=1e-7)


@pytest.mark.slow  # make test-all; bf16 forward: test_models.py, bf16 resolution: the next test
def test_bfloat16_compute_keeps_float32_params_and_tracks_float32_loss():
    f32 = _run(_config(), models.create("resnet18", num_classes=4, rngs=nnx.Rngs(0)), [_batch(0)])
    bf16_model = models.create("resnet18", num_classes=4, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    bf16 = _run(_config(), bf16_model, [_batch(0)])
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(bf16[1].params))
    assert float(bf16[2][0]["loss"]) == pytest.approx(float(f32[2][0]["loss"]), rel=0.05)


def test_dtype_and_kernels_auto_resolve_for_the_platform():
    config = base_config()
    assert config.dtype == "auto" and "kernels" not in config.model
    on_cpu = resolve.resolve(config, "cpu", task_registry.check_config).config
    on_gpu = resolve.resolve(config, "gpu", task_registry.check_config).config
    assert (on_cpu.dtype, on_cpu.model.kernels) == ("float32", "cpu")
    assert (on_gpu.dtype, on_gpu.model.kernels) == ("bfloat16", "gpu")
    assert models.create_model(on_cpu, 3).conv1.dtype == jnp.float32
    assert models.create_model(on_gpu, 3).conv1.dtype == jnp.bfloat16
    assert config.dtype == "auto"  # resolving copies; the config given is left as it was
    config.dtype = "float16"
    with pytest.raises(config_lib.ConfigError, match="config.dtype='float16'"):
        resolve.resolve(config, "cpu", task_registry.check_config)


# --- stopping ------------------------------------------------------------------------------------


def test_early_stopping_keeps_best_and_last_checkpoints(digits_root, tmp_path):
    # A negative lr climbs the loss, so val/loss is best at the first evaluation and patience 2
    # stops the run at the third.
    config = config_lib.load_config(f"tests/tiny_config.py:{digits_root}", [
        "optim.lr=-0.5", "total_steps=40", "eval_every_epochs=0.1", "early_stopping_patience=2",
        "best_metric=val/loss", "best_mode=min", "keep_checkpoints=1", "ema_decay=0.5"])
    train.train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1])
    evals = [r for r in read_metrics(str(tmp_path / "run")) if "val/loss" in r]
    assert len(evals) == 3 and "val_ema/accuracy" in evals[0]
    assert evals[0]["val/loss"] < evals[1]["val/loss"] < evals[2]["val/loss"]
    steps_kept = checkpoint.Checkpointer(str(tmp_path / "run"), keep=1).all_steps()
    assert steps_kept == [evals[0]["step"], evals[-1]["step"]]  # the best (first) and the last


def test_best_checkpoint_prefers_the_earliest_of_equal_scores(tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=1, best_metric="val/accuracy", best_mode="max")
    state = {"w": jnp.zeros(2)}
    for step in (1, 2, 3):
        ckpt.save(step, state, checkpoint.IteratorState(b"{}"), {}, {"val/accuracy": 0.5})
    ckpt.close()
    assert checkpoint.Checkpointer(str(tmp_path), keep=1).all_steps() == [1, 3]
