"""Structured channel pruning (jaxclf/models/channels.py, `python -m jaxclf.prune`): the sliced model computes what
the original computes with the dropped channels cut off, a zero fraction changes nothing, and the pruned run
exports to a smaller ONNX file."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxclf import config as config_lib, export, models, prune, weights
from jaxclf.models import channels, efficientnet, tree_paths
from jaxclf.runs import inference
from model_helpers import with_random_values  # tests/ is on sys.path


def _random(factory, **options):
    model = with_random_values(lambda: factory(**options))
    model.eval()
    return model


def _state(model):
    return {k: np.array(v) for k, v in tree_paths.flatten(nnx.state(model, nnx.Not(nnx.RngState))).items()}


def _cut_off(model, fraction):
    """`model` with the inputs of every channel pruning drops set to zero: the channels still computed, never read."""
    state, groups = _state(model), model.channel_groups()
    kept = channels.kept_channels(state, groups, fraction)
    for group, indices in zip(groups, kept):
        dropped = np.setdiff1d(np.arange(state[group.score].shape[-1]), indices)
        for path in group.inputs:
            state[path][..., dropped, :] = 0.0
    weights.apply(model, state)
    return model


@jax.jit
def _logits(graphdef, state, images):
    return nnx.merge(graphdef, state)(images)


def _apply(model, images):
    return np.asarray(_logits(*nnx.split(model), images))


# A MobileNetV3 of three blocks (depthwise-separable, inverted residual with SE, conv): every kind, seconds to run.
TINY_MOBILENET = (("ds_r1_k3_s1_e1_c16_nre",), ("ir_r1_k3_s2_e4_c24_se0.25",), ("cn_r1_k1_s1_c64",))
FACTORIES = {
    "resnet18": lambda **options: models.create("resnet18", num_classes=5, kernels="plain", **options),
    "tiny_mobilenetv3": lambda **options: efficientnet.MobileNetV3(arch=TINY_MOBILENET, num_classes=5,
                                                                   rngs=nnx.Rngs(0), **options),
    "resnet50": lambda **options: models.create("resnet50", num_classes=5, kernels="plain", **options),
    "mobilenetv3_large_100": lambda **options: models.create("mobilenetv3_large_100", num_classes=5,
                                                             kernels="plain", **options),
}


@pytest.mark.parametrize("name", [
    "resnet18", "tiny_mobilenetv3",
    pytest.param("resnet50", marks=pytest.mark.slow),  # make test-all: bottlenecks (two groups a block)
    pytest.param("mobilenetv3_large_100", marks=pytest.mark.slow),
])
def test_sliced_model_equals_the_original_with_dropped_channels_cut_off(name):
    images = jnp.asarray(np.random.default_rng(0).normal(0, 1, (2, 32, 32, 3)), jnp.float32)
    original = _random(FACTORIES[name])
    widths, values = channels.plan(original, 0.3)
    small = _random(FACTORIES[name], block_widths=widths)
    weights.apply(small, values)
    full_logits = _apply(original, images)
    masked_logits = _apply(_cut_off(original, 0.3), images)
    assert np.abs(full_logits - masked_logits).max() > 1e-3  # the dropped channels mattered
    np.testing.assert_allclose(_apply(small, images), masked_logits, rtol=1e-5, atol=1e-5)
    before, after = _state(original), _state(small)
    for group in original.channel_groups():  # 30% of each group's channels gone (rounded), and only those
        assert after[group.score].shape[-1] == before[group.score].shape[-1] - round(0.3 * before[group.score].shape[-1])
    assert {name for name in before if before[name].shape != after[name].shape} == {
        path for group in original.channel_groups() for path in (*group.outputs, *group.inputs)}


def test_fraction_zero_changes_nothing():
    model = _random(FACTORIES["tiny_mobilenetv3"])
    widths, values = channels.plan(model, 0.0)
    assert set(model.block_widths) == {0} and widths[0] == widths[-1] == 0  # ds and cn blocks have no inner width
    rebuilt = nnx.eval_shape(lambda: FACTORIES["tiny_mobilenetv3"](block_widths=widths))
    assert tree_paths.shapes(nnx.state(rebuilt)) == tree_paths.shapes(nnx.state(model))
    before = _state(model)
    assert values.keys() == before.keys()
    for name, value in values.items():
        np.testing.assert_array_equal(value, before[name])


def test_widths_that_do_not_fit_the_architecture_are_named():
    with pytest.raises(ValueError, match="block_widths has 3 entries; this ResNet has 8 blocks"):
        models.create("resnet18", num_classes=2, block_widths=(8, 8, 8))
    with pytest.raises(ValueError, match="'ds' block has no inner width"):
        nnx.eval_shape(lambda: models.create("mobilenetv3_large_100", num_classes=2, block_widths=(8,) + (0,) * 15))


@pytest.mark.slow  # make test-all (a minute: two ResNet-18 exports); the parameter count: the test above
def test_pruned_run_exports_a_smaller_onnx_file(tmp_path):
    """A run of random ResNet-18 weights, pruned by the command, evaluated from its own config.json, exported."""
    pytest.importorskip("onnxruntime")
    config = config_lib.base_config()
    config.model_name, config.data.pp_eval, config.dtype = "resnet18", "decode", "float32"  # as a run records it
    with config.unlocked():
        config.model.kernels = "plain"
    config.data.mean, config.data.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    source = str(tmp_path / "run")
    prune.write_run(source, config, [str(i) for i in range(5)], _random(FACTORIES["resnet18"]), 7,
                    {"status": "completed"})
    assert prune.main(["--workdir", source, "--fraction", "0.3", "--out", str(tmp_path / "pruned")]) == 0
    record = json.load(open(tmp_path / "pruned" / "result.json"))
    assert record["block_widths"] == [45, 45, 90, 90, 179, 179, 358, 358]
    assert prune.main(["--workdir", source, "--fraction", "0.3", "--out", str(tmp_path / "pruned")]) == 2  # no overwrite
    sizes = {}
    for run in ("run", "pruned"):
        trained = inference.load_trained(str(tmp_path / run))
        out = str(tmp_path / f"{run}.onnx")
        export.export(trained, "onnx", out, image_size=32)  # checks the file's logits against JAX's
        sizes[run] = os.path.getsize(out)
    expected = record["params_after"] / record["params_before"]
    assert 0.6 < expected < 0.8
    assert sizes["pruned"] / sizes["run"] == pytest.approx(expected, rel=0.02)
