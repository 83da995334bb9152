"""Fitting in memory: `config.model.remat` rematerialises every family's blocks without changing a gradient,
and `python -m jaxclf.train --dry_run` reports what the step needs per device without training.

Gradients with remat are checked against the same model without it (the same params, XLA:CPU with the
option that keeps the recomputation, `xla_cpu.REMAT_TRAIN_OPTIONS`); parameter bytes against the
model's own parameter count; FSDP's per-device bytes against the shards of a real state on 8 devices.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxclf import config as config_lib, models, train
from jaxclf.kernels import xla_cpu
from jaxclf.training import memory, optim, sharding, steps
from model_helpers import with_random_values
from test_kernels import FAMILIES

# Blocks of each family's small form in test_kernels.FAMILIES: one `remat_block` unit each.
BLOCKS = {"resnet18": 4, "resnet50": 4, "resnetv2_50x1_bit": 4, "vit_tiny_patch16_224": 2, "efficientnet_b0": 3,
          "mobilenetv3_small_100": 3, "convnext_atto": 4, "vit_small_patch14_reg4_dinov2": 2,
          "vit_base_patch16_siglip_224": 2, "eva02_tiny_patch14_224": 2}


def _loss(graphdef, params, rest, images, labels):
    model = nnx.merge(graphdef, params, rest, copy=True)
    logits = model(images).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), nnx.state(model, nnx.Not(nnx.Param))


# What jax.checkpoint's primitive is called in this jax ("remat2" in jax 0.10).
REMAT_PRIMITIVE = jax.make_jaxpr(jax.checkpoint(jnp.sin))(1.0).eqns[0].primitive.name


def _count_remat(jaxpr) -> int:
    """jax.checkpoint equations in `jaxpr` and the jaxprs it calls."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == REMAT_PRIMITIVE
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            count += _count_remat(sub)
    return count


def test_every_family_rematerialises_each_block():
    assert set(BLOCKS) == set(FAMILIES)
    images, labels = jnp.zeros((2, 32, 32, 3)), jnp.zeros((2,), jnp.int32)
    cases = [(name, "dots_saveable", BLOCKS[name]) for name in FAMILIES] + [("vit_tiny_patch16_224", "", 0)]
    for name, policy, expected in cases:
        model = nnx.eval_shape(lambda: models.create(name, num_classes=5, kernels="plain", remat=policy, **FAMILIES[name]))
        model.train()
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        grad = jax.grad(lambda p, r: _loss(graphdef, p, r, images, labels)[0])
        assert _count_remat(jax.make_jaxpr(grad)(params, rest).jaxpr) == expected, f"{name} remat={policy!r}"


def _assert_remat_changes_nothing(make_model):
    """`make_model(remat)`'s loss, gradients and updated state (BatchNorm statistics, RNG counts) with
    remat="nothing_saveable" equal those without, on the same params (XLA:CPU keeping the recomputation)."""
    plain = with_random_values(lambda: make_model(""), spread=0.1)
    plain.train()
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(4, 32, 32, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 5, 4))
    results = []
    for policy in ("", "nothing_saveable"):
        model = nnx.eval_shape(lambda: make_model(policy))
        model.train()
        nnx.update(model, nnx.state(plain))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        step = jax.jit(jax.value_and_grad(lambda p, r: _loss(graphdef, p, r, images, labels), has_aux=True),
                       compiler_options=xla_cpu.compiler_options("cpu", xla_cpu.REMAT_TRAIN_OPTIONS))
        results.append(step(params, rest))
    ((loss, state), grads), ((remat_loss, remat_state), remat_grads) = results
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
    for expected, got in zip(jax.tree.leaves((grads, state)), jax.tree.leaves((remat_grads, remat_state))):
        if jax.dtypes.issubdtype(expected.dtype, jax.dtypes.prng_key):
            expected, got = jax.random.key_data(expected), jax.random.key_data(got)
        scale = float(jnp.max(jnp.abs(expected))) if expected.size else 0.0
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * scale + 1e-8)


# ViT-Ti with stochastic depth: dropout's RNG inside the rematerialised blocks. Every family under make test-all.
@pytest.mark.parametrize("name", [n if n == "vit_tiny_patch16_224" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in FAMILIES])
def test_remat_keeps_the_loss_gradients_and_state(name):
    options = dict(FAMILIES[name], **({"drop_path_rate": 0.5} if name.startswith("vit_") else {}))
    _assert_remat_changes_nothing(lambda policy: models.create(name, num_classes=5, kernels="plain", remat=policy,
                                                               **options))


class ConvBlock(nnx.Module):
    """A block written outside jaxclf: conv, BatchNorm (statistics updated inside the remat), ReLU, residual."""

    def __init__(self, width: int, rngs: nnx.Rngs):
        self.conv = nnx.Conv(width, width, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(width, rngs=rngs)

    @models.remat_block  # the one line that makes a block rematerialisable
    def __call__(self, x):
        return x + nnx.relu(self.bn(self.conv(x)))


class TwoBlockNet(models.Classifier):
    def __init__(self, rngs: nnx.Rngs, width: int = 8):
        self.stem = nnx.Conv(3, width, (3, 3), strides=2, rngs=rngs)
        self.blocks = nnx.List([ConvBlock(width, rngs), ConvBlock(width, rngs)])
        self.head = nnx.Linear(width, 5, rngs=rngs)

    def forward_features(self, images):
        x = self.stem(images)
        for block in self.blocks:
            x = block(x)
        return x

    def forward_head(self, features):
        return self.head(features.mean(axis=(1, 2)))


def test_a_block_marked_remat_block_keeps_batchnorm_statistics_and_gradients():
    def make(policy):
        model = TwoBlockNet(nnx.Rngs(0))
        model.remat = policy  # what models.create sets from its remat argument
        return model

    images = jnp.zeros((2, 32, 32, 3))
    model = make("nothing_saveable")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    grad = jax.grad(lambda p, r: _loss(graphdef, p, r, images, jnp.zeros((2,), jnp.int32))[0])
    assert _count_remat(jax.make_jaxpr(grad)(params, rest).jaxpr) == 2
    _assert_remat_changes_nothing(make)


def test_unknown_remat_policy_names_the_choices():
    with pytest.raises(ValueError, match="remat='dots'.*nothing_saveable"):
        models.create("resnet18", num_classes=2, remat="dots")


@pytest.fixture(scope="module")
def quickstart_dry_run(digits_root):
    config = config_lib.load_config("configs/quickstart.py")
    config.data.root = digits_root  # the 16 px digits: the spec crops them to 32 px as the quickstart's own
    config.data.prepare = ""
    return train.dry_run(config, devices=jax.devices()[:1])


def test_dry_run_of_the_quickstart_reports_parameter_bytes_flops_and_temporaries(quickstart_dry_run, capsys):
    step, fit = quickstart_dry_run
    count = sum(x.size for x in jax.tree.leaves(nnx.state(nnx.eval_shape(
        lambda: models.create("resnet18", num_classes=10)), nnx.Param)))
    assert step.params == 4 * count  # float32
    assert step.params <= step.optimizer <= step.params + 16  # SGD's momentum buffer per param and step counts
    assert step.batch == 64 * 32 * 32 * 3 + 64 * 4  # uint8 images at the spec's 32 px, int32 labels
    assert step.temporaries > 0 and step.flops > 0 and fit is None
    # ResNet-18's forward at 32 px is ~0.56 GMAC at 224 / 49; a train step is about 3 forwards.
    assert 0.5 < step.flops / (64 * 3 * 2 * 1.82e9 / 49) < 2


def test_dry_run_command_prints_the_table_and_writes_nothing(digits_root, tmp_path, capsys):
    workdir = tmp_path / "run"
    status = train.main(["--config", f"tests/tiny_config.py:{digits_root}", "--workdir", str(workdir), "--dry_run",
                         "--config.batch_size=16"])
    out = capsys.readouterr().out
    assert status == 0
    for row in ("parameters", "optimizer state", "temporaries (activations)", "FLOPs per step", "total (peak by XLA)"):
        assert row in out
    assert "over 8 device(s)" in out and not workdir.exists()


@pytest.mark.parametrize("value", ["0", "-2", "lots", "nan"])
def test_bad_memory_gb_is_an_error_naming_the_flag(value, capsys):
    with pytest.raises(SystemExit) as exit:
        train.main(["--config", "configs/quickstart.py", "--dry_run", "--memory_gb", value])
    assert exit.value.code == 2
    assert "--memory_gb" in capsys.readouterr().err


def test_memory_gb_without_dry_run_is_an_error(capsys):
    with pytest.raises(SystemExit):
        train.main(["--config", "configs/quickstart.py", "--memory_gb", "8"])
    assert "add --dry_run" in capsys.readouterr().err


def test_fsdp_dry_run_divides_the_state_over_eight_devices(digits_root):
    config = config_lib.load_config(f"tests/tiny_config.py:{digits_root}")
    config.model.width = 2048  # a conv kernel and a head big enough for fsdp_spec to split
    config.param_sharding = "fsdp"
    config.optim.name = "adamw"
    config.batch_size = 16
    step, _ = train.dry_run(config, devices=jax.devices()[:8])
    # Independently: the shards device 0 holds of a real state laid out the same way.
    model = models.create("tiny_cnn", num_classes=10, width=2048)
    tx, _ = optim.make_optimizer(config.optim, model, total_steps=100, steps_per_epoch=10)
    _, _, state = steps.create_train_state(model, tx)
    mesh = sharding.make_mesh(jax.devices()[:8])
    placed = jax.device_put(state, sharding.state_sharding(state, mesh, "fsdp"))
    device = jax.devices()[0]

    def on_device(tree):
        return sum(s.data.nbytes for leaf in jax.tree.leaves(tree) for s in leaf.addressable_shards if s.device == device)

    whole = sum(leaf.nbytes for leaf in jax.tree.leaves(state.params))
    assert step.params == on_device(placed.params) < whole / 4
    assert step.optimizer == on_device(placed.opt_state)


def test_largest_batch_follows_a_linear_fit_and_checks_it():
    def step_at(batch_size: int, fixed: int = 1000, per_example: int = 100, bump: int = 0) -> memory.StepMemory:
        total = fixed + per_example * batch_size + bump
        return memory.StepMemory(batch_size, 0, 0, 0, 0, 0, total, 0, 0, 0, 0.0)

    compiled = []

    def measure_at(b):
        compiled.append(b)
        return step_at(b)

    fit = memory.largest_batch(measure_at, step_at(8), budget=10_000, multiple=8)
    assert (fit.fixed, fit.per_example) == (1000, 100)
    assert fit.batch_size == 88 and fit.checked.total == 9800 and compiled == [16, 88]  # (10000 - 1000) / 100 = 90
    # A step that needs more at the predicted batch than the fit said: stepped down by the excess.
    fit = memory.largest_batch(lambda b: step_at(b, bump=500 if b > 16 else 0), step_at(8), 10_000, 8)
    assert fit.batch_size == 80 and fit.checked.total <= 10_000
    assert memory.largest_batch(measure_at, step_at(8), 1500, 8).batch_size == 0  # not even 8 fits


@pytest.mark.slow
def test_dry_run_largest_batch_fits_and_the_next_does_not(digits_root):
    config = config_lib.load_config(f"tests/tiny_config.py:{digits_root}")
    config.batch_size = 16
    step, _ = train.dry_run(config, devices=jax.devices()[:1])
    budget_gb = (step.total + 40 * (step.total - step.params - step.optimizer) / 16) / memory.GIB
    _, fit = train.dry_run(config, budget_gb, devices=jax.devices()[:1])
    assert fit.batch_size > 16 and fit.checked.total <= fit.budget
    config.batch_size = fit.batch_size + 1
    over, _ = train.dry_run(config, devices=jax.devices()[:1])
    assert over.total > fit.budget
