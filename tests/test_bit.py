"""BiT ResNetV2: stem padding, compute dtype, and converted weights computing timm's logits (counts: test_models).

The reference for the timm names is timm's own model; for the BiT `.npz` names it is timm's
`_load_weights` fed the same file. Both timm models get random GroupNorm affines and head
biases, so a swapped norm or a dropped bias changes the logits.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxclf import kernels as kernels_lib, models
from jaxclf.models import tree_paths
from jaxclf.models import layers, resnetv2
from jaxclf.weights import bit

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
from timm.models.resnetv2 import _load_weights  # noqa: E402

NAME = "resnetv2_50x1_bit"
NUM_CLASSES = 10
# Even height: XLA 'SAME' would pad the stride-2 convs and pool (0, 1), not (1, 1) like torch.
# Odd width: the last stem-pool window covers the right zero pad, where -inf padding differs.
HEIGHT, WIDTH = 64, 65


def _timm_model(seed: int):
    """timm's BiT model with random weights, random GroupNorm affines and head bias, in eval mode."""
    torch.manual_seed(seed)
    model = timm.create_model(NAME, pretrained=False, num_classes=NUM_CLASSES).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if re.search(r"norm\d?\.weight$", name):
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.2)
    return model


def _timm_logits(model, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()


def _state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in model.state_dict().items()}


def _ours(params: dict[str, np.ndarray]) -> nnx.Module:
    """Our model holding `params` (keyed by param path); stands in for the real loader."""
    model = nnx.eval_shape(lambda: models.create(NAME, num_classes=NUM_CLASSES))
    variables = {"/".join(map(str, path)): var for path, var in nnx.iter_graph(model) if isinstance(var, nnx.Param)}
    assert sorted(variables) == sorted(params)
    for name, var in variables.items():
        assert var.shape == params[name].shape, name
        var.set_value(jnp.asarray(params[name], jnp.float32))
    return model


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, images):
    return nnx.merge(graphdef, state)(images)


def _our_logits(params: dict[str, np.ndarray], images: np.ndarray) -> np.ndarray:
    return np.asarray(_apply(*nnx.split(_ours(params)), images))


def _assert_logits_close(ours: np.ndarray, reference: np.ndarray) -> None:
    rel = np.abs(ours - reference).max() / np.abs(reference).max()
    assert rel < 1e-4, f"max |diff| / max |logit| = {rel:.2e}"


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(2, HEIGHT, WIDTH, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def reference(images):
    """A random timm model's numpy state dict and its logits on `images`."""
    model = _timm_model(0)
    return _state_dict(model), _timm_logits(model, images)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_params_and_logits_float32_features_in_compute_dtype(dtype):
    model = nnx.eval_shape(lambda: models.create(NAME, num_classes=7, dtype=dtype))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    logits = nnx.eval_shape(lambda m, x: m(x), model, jnp.zeros((2, 32, 32, 3)))
    assert logits.shape == (2, 7) and logits.dtype == jnp.float32
    features = nnx.eval_shape(lambda m, x: m.forward_features(x), model, jnp.zeros((2, 64, 32, 3)))
    assert features.shape == (2, 2, 1, 2048) and features.dtype == dtype


@pytest.mark.parametrize("kernels", ["plain", "cpu"])
@pytest.mark.parametrize("size", [8, 7])
def test_stem_pool_matches_timm_fixed_padding(size, kernels):
    # All-negative inputs: the zero padding of timm's 'fixed' stem (the BiT stem's pad_value) wins at the border.
    x = -np.random.default_rng(1).uniform(1, 2, (2, size, size, 3)).astype(np.float32)
    pool = torch.nn.Sequential(torch.nn.ConstantPad2d(1, 0.0), torch.nn.MaxPool2d(3, 2))
    expected = pool(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    with kernels_lib.use(kernels):
        out = np.asarray(layers.max_pool_3x3_s2(jnp.asarray(x), pad_value=0.0))
    np.testing.assert_array_equal(out, expected)
    assert not np.array_equal(out, layers.max_pool_3x3_s2(jnp.asarray(x)))  # -inf padding differs


def test_from_timm_keys_are_the_state_paths(reference):
    model = nnx.eval_shape(lambda: models.create(NAME, num_classes=NUM_CLASSES))
    params = bit.from_timm(reference[0])
    assert {k: v.shape for k, v in params.items()} == tree_paths.shapes(nnx.state(model, nnx.Param))


def test_from_timm_logits_match_timm(reference, images):
    state_dict, expected = reference
    _assert_logits_close(_our_logits(bit.from_timm(state_dict), images), expected)


def _to_bit_npz(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """timm names -> original BiT npz names, the inverse of timm's `_load_weights` (OIHW -> HWIO)."""
    unit_layers = {"conv1": "a/standardized_conv2d", "conv2": "b/standardized_conv2d",
                   "conv3": "c/standardized_conv2d", "downsample.conv": "a/proj/standardized_conv2d",
                   "norm1": "a/group_norm", "norm2": "b/group_norm", "norm3": "c/group_norm"}
    out = {}
    for name, value in state_dict.items():
        module, leaf = name.rsplit(".", 1)
        if module == "head.fc":
            key = f"resnet/head/conv2d/{'kernel' if leaf == 'weight' else 'bias'}"
        else:
            leaf = "kernel" if value.ndim == 4 else {"weight": "gamma", "bias": "beta"}[leaf]
            if module == "stem.conv":
                key = f"resnet/root_block/standardized_conv2d/{leaf}"
            elif module == "norm":
                key = f"resnet/group_norm/{leaf}"
            else:
                stage, block, layer = re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)\.(.+)", module).groups()
                key = f"resnet/block{int(stage) + 1}/unit{int(block) + 1:02d}/{unit_layers[layer]}/{leaf}"
        out[key] = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
    return out


def test_from_npz_logits_match_timm_npz_loader(reference, images, tmp_path):
    state_dict, expected = reference
    path = tmp_path / "BiT-M-R50x1.npz"
    np.savez(path, **_to_bit_npz(state_dict))
    timm_from_npz = _timm_model(1)  # other random weights: all must be overwritten by the file
    _load_weights(timm_from_npz, str(path))
    npz_logits = _timm_logits(timm_from_npz, images)
    np.testing.assert_allclose(npz_logits, expected, rtol=1e-6, atol=1e-6)  # the npz holds the model
    with np.load(path) as npz:
        params = bit.from_npz(dict(npz))
    _assert_logits_close(_our_logits(params, images), npz_logits)


def test_format_predicates_recognise_each_naming(reference):
    state_dict = reference[0]
    npz = _to_bit_npz(state_dict)
    assert bit.is_timm(state_dict) and not bit.is_npz(state_dict)
    assert bit.is_npz(npz) and not bit.is_timm(npz)


def test_unknown_keys_are_named():
    with pytest.raises(KeyError, match=r"stages\.0\.blocks\.0\.bn1\.weight"):
        bit.from_timm({"stages.0.blocks.0.bn1.weight": np.ones(4)})
    with pytest.raises(KeyError, match="resnet/block1/unit01/d/group_norm/gamma"):
        bit.from_npz({"resnet/block1/unit01/d/group_norm/gamma": np.ones(4)})
    with pytest.raises(ValueError, match=r"head\.fc\.weight"):
        bit.from_timm({"head.fc.weight": np.ones((10, 2048, 3, 3))})
