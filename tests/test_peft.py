"""LoRA (config.peft): the adapter's function, merge, what trains and holds optimizer state, and runs."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from jaxclf import config as config_lib, export, models, train
from jaxclf.models import peft, tree_paths
from jaxclf.runs import inference
from jaxclf.training import optim, sharding, steps
from jaxclf.models import resnet, vit


def _lora(targets, rank=4, alpha=8.0, dropout=0.0):
    config = config_lib.base_config()
    config.peft.update(dict(method="lora", rank=rank, alpha=alpha, dropout=dropout, targets=targets))
    return config


def _randomise_adapters(model, seed=1):
    """Non-zero B (it starts at zero), so an adapter changes its layer's output."""
    for i, (_, module) in enumerate(nnx.iter_modules(model)):
        if isinstance(module, peft.LoRAAdapter):
            module.lora_b[...] = 0.1 * jax.random.normal(jax.random.key(seed + i), module.lora_b.shape)


def _small_vit():
    return vit.VisionTransformer(num_classes=5, patch_size=8, width=64, depth=2, num_heads=2, img_size=32,
                                 rngs=nnx.Rngs(0))


def _small_resnet():
    """A one-block-per-stage ResNet-50: 7x7 stem, 1x1 and 3x3 convs, strided 1x1 shortcuts."""
    return resnet.ResNet(num_classes=5, block=resnet.Bottleneck, depths=(1, 1, 1, 1), rngs=nnx.Rngs(0))


def test_adapted_linear_is_base_plus_scaled_low_rank_product():
    """Against numpy: x W + b + alpha / rank * x A B."""
    linear = nnx.Linear(6, 5, rngs=nnx.Rngs(0))
    linear.bias[...] = jnp.arange(5.0)
    adapter = peft.LoRAAdapter(linear, rank=3, alpha=12.0, dropout=0.0, rngs=nnx.Rngs(1))
    adapter.lora_b[...] = jax.random.normal(jax.random.key(2), (3, 5))
    x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    w, b = np.asarray(linear.kernel[...]), np.asarray(linear.bias[...])
    a, bb = np.asarray(adapter.lora_a[...]), np.asarray(adapter.lora_b[...])
    np.testing.assert_allclose(adapter(jnp.asarray(x)), x @ w + b + 4.0 * (x @ a @ bb), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make_model, targets", [
    (_small_vit, ("qkv", "proj", "fc1", "fc2")),
    (_small_resnet, ("conv", "downsample")),
])
def test_merge_gives_the_plain_model_with_the_same_logits(make_model, targets):
    """Fresh adapters (B = 0) leave the model's logits as they were; trained ones merge into the same logits."""
    model = make_model()
    model.eval()
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    plain = np.asarray(model(x))
    plain_shapes = tree_paths.shapes(nnx.state(model, nnx.Param))
    adapted = peft.from_config(model, _lora(targets))
    assert adapted and all(not models.matches(p, model.head_paths()) for p in adapted)
    model.eval()
    np.testing.assert_array_equal(model(x), plain)
    _randomise_adapters(model)
    unmerged = np.asarray(model(x))
    assert peft.merge(model) == adapted
    merged = np.asarray(model(x))
    assert not nnx.state(model, nnx.LoRAParam)
    assert tree_paths.shapes(nnx.state(model, nnx.Param)) == plain_shapes
    scale = max(1.0, np.abs(unmerged).max())
    np.testing.assert_allclose(merged, unmerged, atol=1e-5 * scale, rtol=0)
    assert np.abs(plain - unmerged).max() > 100 * 1e-5 * scale  # the adapters did matter


def test_a_target_matching_nothing_is_named():
    model = _small_resnet()
    with pytest.raises(peft.PeftConfigError, match=r"\['qkv'\].*layer1/0/conv1"):
        peft.from_config(model, _lora(("conv", "qkv")))
    with pytest.raises(peft.PeftConfigError, match="config.peft.rank"):
        peft.from_config(model, _lora(("conv",), rank=0))
    config = _lora(("conv",))
    config.peft.method = "qlora"
    with pytest.raises(peft.PeftConfigError, match="config.peft.method"):
        peft.from_config(model, config)


class _ConvNet(models.Classifier):
    """Two convs and a head."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(8, 8, (3, 3), rngs=rngs)
        self.head = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.conv2(nnx.relu(self.conv1(x)))).mean(axis=(1, 2)))


def _train(model, config, num_steps=2):
    config.data.mean, config.data.std = (0.5,) * 3, (0.25,) * 3
    config.optim.update(dict(name="adamw", lr=0.05, schedule="constant", weight_decay=0.0))
    mesh = sharding.make_mesh(jax.devices()[:1])
    tx, _ = optim.make_optimizer(config.optim, model, 100, 10)
    graphdef, _, state = steps.create_train_state(model, tx)
    state_sharding = sharding.state_sharding(state, mesh, config.param_sharding)
    frozen = optim.frozen_mask(config.optim, model)
    step = steps.make_train_step(graphdef, tx, mesh, config, 4, state_sharding, steps.cross_entropy_loss(),
                                 frozen_params=frozen)
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8), "label": rng.integers(0, 4, 8).astype(np.int32)}
    start = tree_paths.flatten(jax.tree.map(np.array, state.params))
    state = jax.device_put(state, state_sharding)
    convolutions = step.lower(state, batch).as_text().count("stablehlo.convolution")
    for _ in range(num_steps):
        state, _ = step(state, batch)
    return start, tree_paths.flatten(state.params), state.opt_state, convolutions


def test_lora_trains_only_adapters_and_head_and_keeps_state_for_them_only():
    model = _ConvNet(nnx.Rngs(0))
    config = _lora(("conv2",))
    peft.from_config(model, config)
    start, end, opt_state, _ = _train(model, config)
    trained = {"conv2/lora_a", "conv2/lora_b", "head/kernel", "head/bias"}
    for name in start:
        changed = not np.array_equal(start[name], end[name])
        assert changed == (name in trained), name
    # AdamW's two moments, for the adapters and the head only.
    state_size = sum(leaf.size for leaf in jax.tree.leaves(opt_state) if np.ndim(leaf) > 0)
    assert state_size == 2 * sum(start[name].size for name in trained)


def test_frozen_params_get_no_gradient_computation():
    """Convolutions in the compiled step. Full fine-tuning: 2 forward, 2 weight gradients, conv2's input
    gradient. Linear probe: the 2 forward only. LoRA on conv2: 2 forward, the adapter's down-projection
    and its weight gradient; no weight gradient of a base kernel, no input gradient below the adapter."""
    full = _train(_ConvNet(nnx.Rngs(0)), config_lib.base_config(), num_steps=0)[3]
    probe_config = config_lib.base_config()
    probe_config.optim.freeze = "^(?!head/)"
    probe = _train(_ConvNet(nnx.Rngs(0)), probe_config, num_steps=0)[3]
    model = _ConvNet(nnx.Rngs(0))
    config = _lora(("conv2",))
    peft.from_config(model, config)
    lora = _train(model, config, num_steps=0)[3]
    assert (full, probe, lora) == (2 + 3, 2, 2 + 2)


def test_lora_run_resumes_exactly_and_loads_as_a_plain_model(digits_root, tmp_path):
    config = config_lib.load_config(f"tests/tiny_config.py:{digits_root}",
                                    ["total_steps=8", "peft.method=lora", "peft.targets=('conv',)",
                                     "peft.dropout=0.1", "optim.name=adamw", "optim.lr=0.01"])
    train.train_and_evaluate(config, str(tmp_path / "straight"), devices=jax.devices()[:1])
    train.train_and_evaluate(config, str(tmp_path / "resumed"), devices=jax.devices()[:1], stop_at_step=4)
    train.train_and_evaluate(config, str(tmp_path / "resumed"), devices=jax.devices()[:1])
    restore = lambda d: ocp.StandardCheckpointer().restore(str(tmp_path / d / "checkpoints" / "8" / "state"))
    straight, resumed = (tree_paths.flatten(restore(d)["params"]) for d in ("straight", "resumed"))
    assert "conv/lora_a" in straight and straight.keys() == resumed.keys()
    for name in straight:
        np.testing.assert_array_equal(straight[name], resumed[name], err_msg=name)
    loaded = inference.load_trained(str(tmp_path / "straight"), "last")
    plain = models.create("tiny_cnn", num_classes=10)
    assert tree_paths.shapes(nnx.state(loaded.model, nnx.Param)) == tree_paths.shapes(nnx.state(plain, nnx.Param))
    # Export takes the merged model (and checks its program against it).
    out = str(tmp_path / "model.stablehlo")
    assert export.main(["--workdir", str(tmp_path / "straight"), "--format", "stablehlo", "--out", out,
                        "--image_size", "16"]) == 0
