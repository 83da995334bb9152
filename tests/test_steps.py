"""Train and eval steps: 8 devices compute what 1 device computes; eval sums honour the mask."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from jaxclf.data.normalize import normalize_images
from jaxclf import models
from jaxclf.training import optim, sharding, steps
from jaxclf.kernels import xla_cpu
from jaxclf.config import base_config

NORM = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


class TinyNet(models.Classifier):
    """Conv + BatchNorm + Linear: BatchNorm makes the step depend on the whole (sharded) batch."""

    def __init__(self, num_classes: int, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.head = nnx.Linear(8, num_classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.conv(x)))
        return self.head(x.mean(axis=(1, 2)))


def _batch(seed: int, size: int = 16, num_classes: int = 4) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (size, 8, 8, 3), dtype=np.uint8),
        "label": rng.integers(0, num_classes, size).astype(np.int32),
    }


def _config(**fields):
    config = base_config()
    config.data.mean, config.data.std = NORM["mean"], NORM["std"]
    config.update(fields)
    return config


def _setup(model, mesh, config, total_steps=10):
    """(graphdef, eval graphdef, replicated state, jitted train step) for `model` under `config`."""
    tx, _ = optim.make_optimizer(config.optim, model, total_steps, total_steps)
    graphdef, eval_graphdef, state = steps.create_train_state(
        model, tx, ema=config.ema_decay > 0, freeze_bn_stats=config.freeze_bn_stats
    )
    state_sharding = sharding.state_sharding(state, mesh, config.param_sharding)
    state = jax.device_put(state, state_sharding)
    num_classes = model.head.out_features
    step = steps.make_train_step(graphdef, tx, mesh, config, num_classes, state_sharding, steps.cross_entropy_loss())
    return graphdef, eval_graphdef, state, step


class WideNet(TinyNet):
    """TinyNet with a 64x256 hidden layer: large enough for FSDP to split (fsdp_spec's min_size)."""

    def __init__(self, num_classes: int, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, 64, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(64, rngs=rngs)
        self.hidden = nnx.Linear(64, 256, rngs=rngs)
        self.head = nnx.Linear(256, num_classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.conv(x))).mean(axis=(1, 2))
        return self.head(nnx.relu(self.hidden(x)))


def _train(devices, num_steps: int = 3, param_sharding: str = "replicate", model_cls=TinyNet):
    mesh = sharding.make_mesh(devices)
    config = _config(label_smoothing=0.1, param_sharding=param_sharding)
    config.optim.update(dict(name="sgd", lr=0.1, weight_decay=1e-4))
    _, _, state, train_step = _setup(model_cls(4, nnx.Rngs(0)), mesh, config, num_steps)
    if param_sharding == "fsdp" and model_cls is WideNet:
        assert state.params["hidden"]["kernel"][...].sharding.spec == PartitionSpec(None, "data")  # 256 columns
    losses = []
    for i in range(num_steps):
        state, metrics = train_step(state, sharding.shard_batch(_batch(i), mesh))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state)


def test_eight_devices_match_one_device():
    assert len(jax.devices()) == 8, "tests/conftest.py should simulate 8 CPU devices"
    losses_1, state_1 = _train(jax.devices()[:1])
    losses_8, state_8 = _train(jax.devices())
    np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state_1), jax.tree.leaves(state_8)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert int(state_8.step) == 3
    assert losses_1[-1] != losses_1[0]  # the parameters did change


def test_fsdp_on_eight_devices_matches_one_device():
    losses_1, state_1 = _train(jax.devices()[:1], model_cls=WideNet)
    losses_8, state_8 = _train(jax.devices(), param_sharding="fsdp", model_cls=WideNet)
    np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state_1), jax.tree.leaves(state_8)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _small_backbone(name: str, **options):
    """Registered model `name`, shrunk to 8 px images, 2 blocks of width 64 (FSDP splits its matrices)."""
    return lambda num_classes, rngs: models.create(name, num_classes=num_classes, rngs=rngs, img_size=8, patch_size=4,
                                                   depth=2, width=64, num_heads=4, **options)


# make test-all: the default run checks FSDP = one device for the ViT and ResNet it shares every layer with.
@pytest.mark.slow
@pytest.mark.parametrize("name", ["eva02_tiny_patch14_224", "vit_base_patch16_siglip_224"])
def test_fsdp_on_eight_devices_matches_one_device_for_todays_backbones(name):
    """Rotary attention and SwiGLU (EVA-02), attention pooling (SigLIP): sharded params give one device's steps."""
    model_cls = _small_backbone(name)
    losses_1, state_1 = _train(jax.devices()[:1], model_cls=model_cls)
    losses_8, state_8 = _train(jax.devices(), param_sharding="fsdp", model_cls=model_cls)
    np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state_1), jax.tree.leaves(state_8)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert losses_1[-1] != losses_1[0]


def test_fsdp_spec_splits_the_largest_divisible_dimension():
    assert sharding.fsdp_spec((3, 3, 64, 256), 8) == PartitionSpec(None, None, None, "data")
    assert sharding.fsdp_spec((1000, 768), 8) == PartitionSpec("data", None)
    assert sharding.fsdp_spec((1001, 7), 8, min_size=1) == PartitionSpec()  # nothing divides
    assert sharding.fsdp_spec((10,), 8) == PartitionSpec()  # too small to bother


def test_train_step_updates_batch_statistics_and_donates():
    mesh = sharding.make_mesh(jax.devices()[:1])
    _, _, state, train_step = _setup(TinyNet(4, nnx.Rngs(0)), mesh, _config())
    before = np.asarray(state.model_state["bn"]["mean"][...])
    old_params = state.params
    state, _ = train_step(state, sharding.shard_batch(_batch(0), mesh))
    assert not np.allclose(before, state.model_state["bn"]["mean"][...])
    assert jax.tree.leaves(old_params)[0].is_deleted()  # buffers were donated to the new state


def test_eval_step_sums_only_unmasked_rows():
    mesh = sharding.make_mesh(jax.devices())
    model = TinyNet(4, nnx.Rngs(0))
    config = _config()
    _, graphdef, state, _ = _setup(model, mesh, config)
    eval_step = steps.make_eval_step(graphdef, mesh, sharding.state_sharding(state, mesh, "replicate"), **NORM)
    batch = _batch(1)
    mask = np.arange(16) < 11
    sharded = sharding.shard_batch({**batch, "mask": mask}, mesh)
    totals = eval_step(state.params, state.model_state, sharded, steps.zero_eval_totals(mesh))
    totals = jax.device_get(totals)

    model.eval()
    logits = np.asarray(model(normalize_images(jnp.asarray(batch["image"]), **NORM)))[mask]
    labels = batch["label"][mask]
    expected_loss = np.sum(np.asarray(steps.cross_entropy(jnp.asarray(logits), jnp.asarray(labels))))
    assert totals["count"] == 11
    assert totals["top1"] == np.sum(logits.argmax(-1) == labels)
    assert totals["top5"] == 11  # 4 classes: the true one is always among the top 4
    np.testing.assert_allclose(totals["loss"], expected_loss, rtol=1e-5)


def test_normalize_images_and_label_smoothing():
    images = jnp.asarray([[[[0, 255, 128]]]], jnp.uint8)
    out = normalize_images(images, mean=(0.0, 0.5, 0.5), std=(1.0, 0.5, 0.25))
    np.testing.assert_allclose(out[0, 0, 0], [0.0, 1.0, (128 / 255 - 0.5) / 0.25], rtol=1e-4)
    logits = jnp.asarray([[0.0, 0.0]])
    assert float(steps.cross_entropy(logits, jnp.asarray([0]), 0.0)[0]) == pytest.approx(np.log(2))
    # With smoothing 1.0 the target is uniform: loss is log(2) whatever the logits.
    assert float(steps.cross_entropy(jnp.asarray([[5.0, -5.0]]), jnp.asarray([0]), 1.0)[0]) == pytest.approx(
        5.0 + np.log(1 + np.exp(-10.0)), rel=1e-5
    )


def _libraries_running(op: str, hlo: str) -> set[str]:
    """Kernel libraries (fusion kinds such as "__ynn_fusion") whose fused computations contain `op`;
    "xla" where `op` also runs outside any library fusion."""
    bodies = dict(re.findall(r"\n%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.S))
    libraries = set()
    for callee, kind in re.findall(r'calls=%?([\w.\-]+)[^\n]*"kind":"(__\w+)"', hlo):
        if re.search(rf"\b{op}\(", bodies.get(callee, "")):
            libraries.add(kind)
    entry = hlo[hlo.index("\nENTRY"):]
    if re.search(rf"= \S+ {op}\(", entry):
        libraries.add("xla")
    return libraries


def test_train_step_on_cpu_compiles_with_the_tuned_kernel_libraries():
    # xla_cpu.CPU_OPTIONS: convolutions on XLA's own kernels (YNNPACK's were 1.8x slower for a
    # ResNet-18 step), matmuls on XNNPACK, reductions on YNNPACK.
    mesh = sharding.make_mesh(jax.devices()[:1])
    _, _, state, train_step = _setup(WideNet(4, nnx.Rngs(0)), mesh, _config())
    hlo = train_step.lower(state, sharding.shard_batch(_batch(0), mesh)).compile().as_text()
    assert _libraries_running("convolution", hlo) == {"xla"}
    assert "__ynn_fusion" in _libraries_running("reduce", hlo)
    assert xla_cpu.compiler_options("cpu") == xla_cpu.CPU_OPTIONS
    assert xla_cpu.compiler_options("gpu", xla_cpu.VIT_TRAIN_OPTIONS) is None


@pytest.mark.parametrize("name, options", [
    ("resnet18", {}),
    ("resnet50", xla_cpu.BOTTLENECK_TRAIN_OPTIONS),
    ("resnetv2_50x1_bit", {}),
    ("vit_small_patch16_224", xla_cpu.VIT_TRAIN_OPTIONS),
])
def test_train_step_options_come_from_the_model(name, options):
    # A model says which XLA:CPU options its train step wants (not its name): a new family
    # subclassing ResNet with bottlenecks gets them too.
    model = nnx.eval_shape(lambda: models.create(name, num_classes=2))
    assert model.xla_cpu_train_options() == options


def test_xla_flags_from_the_user_replace_the_tuned_options(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
    assert xla_cpu.compiler_options("cpu") is None
