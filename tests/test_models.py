"""Models: timm's parameter counts, torch-style padding, independent reference forwards, modes."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from jaxclf import kernels as kernels_lib, models
from jaxclf.models import initializers, layers, resnet
from model_helpers import with_random_values

RESNETS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
BIT_RESNETV2S = [f"resnetv2_{size}_bit" for size in ("50x1", "50x3", "101x1", "101x3", "152x2", "152x4")]
VITS = [
    f"vit_{size}_patch{patch}_{img}"
    for size in ("tiny", "small", "base", "large") for patch in (16, 32) for img in (224, 384)
]
EFFICIENTNETS = [f"{prefix}efficientnet_b{i}" for prefix in ("", "tf_") for i in range(8)]
MOBILENETV3S = ["mobilenetv3_large_100", "mobilenetv3_small_100"]
CONVNEXTS = [f"convnext_{size}" for size in ("atto", "femto", "pico", "nano", "tiny", "small", "base", "large")]
DINOV2S = [f"vit_{size}_patch14_{reg}dinov2" for size in ("small", "base", "large") for reg in ("", "reg4_")]
SIGLIPS = [f"vit_base_patch16_siglip_{img}" for img in (224, 256, 384)] + ["vit_so400m_patch14_siglip_224"]
CLIPS = [f"vit_{size}_{act}_224" for size in ("base_patch16", "large_patch14") for act in ("clip", "clip_quickgelu")]
EVA02S = [f"eva02_{size}_patch14_224" for size in ("tiny", "small", "base")]


def _params(model: nnx.Module) -> list[jax.Array]:
    return jax.tree.leaves(nnx.state(model, nnx.Param))


def _images(seed: int, size: int, batch: int = 2) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, size, size, 3)), jnp.float32)


def _np(x) -> np.ndarray:
    return np.asarray(x[...], np.float64)


def _random_model(name: str, seed: int, num_classes: int = 10, **kwargs) -> nnx.Module:
    """Model `name` with random values (`with_random_values`), norms spread wide so a reference forward checks them."""
    return with_random_values(lambda: models.create(name, num_classes=num_classes, **kwargs), seed, spread=0.5)


def test_list_models_names_every_family():
    # In a fresh interpreter: other tests register their own small models in this one.
    listed = subprocess.run([sys.executable, "-c", "from jaxclf import models; print(*models.list_models())"],
                            capture_output=True, text=True, check=True).stdout.split()
    assert listed == sorted(RESNETS + BIT_RESNETV2S + VITS + EFFICIENTNETS + MOBILENETV3S + CONVNEXTS + DINOV2S + SIGLIPS
                            + CLIPS + EVA02S)


@pytest.mark.parametrize("name,expected", [
    ("resnet18", 11_689_512),
    ("resnet34", 21_797_672),
    ("resnet50", 25_557_032),
    ("resnet101", 44_549_160),
    ("resnet152", 60_192_808),
    ("vit_tiny_patch16_224", 5_717_416),
    ("vit_small_patch16_224", 22_050_664),
    ("vit_small_patch32_224", 22_878_952),
    ("vit_base_patch16_224", 86_567_656),
    ("vit_base_patch32_384", 88_297_192),
    ("vit_large_patch16_224", 304_326_632),
    ("resnetv2_50x1_bit", 25_549_352),
    ("resnetv2_101x3_bit", 387_934_888),
    # timm 1.0.31, counted by `sum(p.numel() for p in timm.create_model(name, num_classes=1000).parameters())`
    # on torch's meta device.
    ("vit_small_patch14_dinov2", 22_441_192),
    ("vit_base_patch14_dinov2", 87_348_712),
    ("vit_large_patch14_dinov2", 305_392_616),
    ("vit_small_patch14_reg4_dinov2", 22_442_344),
    ("vit_base_patch14_reg4_dinov2", 87_351_016),
    ("vit_large_patch14_reg4_dinov2", 305_395_688),
    ("vit_base_patch16_siglip_224", 93_653_224),
    ("vit_base_patch16_siglip_256", 93_699_304),
    ("vit_base_patch16_siglip_384", 93_945_064),
    ("vit_so400m_patch14_siglip_224", 428_833_704),
    ("vit_base_patch16_clip_224", 86_568_424),
    ("vit_large_patch14_clip_224", 304_204_776),
    ("vit_base_patch16_clip_quickgelu_224", 86_568_424),
    ("vit_large_patch14_clip_quickgelu_224", 304_204_776),
    ("eva02_tiny_patch14_224", 5_695_144),
    ("eva02_small_patch14_224", 22_006_120),
    ("eva02_base_patch14_224", 86_527_720),
])
def test_param_count_equals_timm(name, expected):
    model = nnx.eval_shape(lambda: models.create(name, num_classes=1000))
    assert sum(p.size for p in _params(model)) == expected


def test_vit_avg_pool_without_class_token_uses_fc_norm_and_shorter_pos_embed():
    model = nnx.eval_shape(lambda: models.create(
        "vit_tiny_patch16_224", num_classes=1000, class_token=False, global_pool="avg"))
    assert model.pos_embed.shape == (1, 196, 192)
    assert not hasattr(model, "cls_token") and not hasattr(model, "norm")
    assert model.fc_norm.scale.shape == (192,)


def _apply(graphdef, params, rest, x):
    """The training code's pattern: a pure function of split state, merged inside jit."""
    model = nnx.merge(graphdef, params, rest)
    logits = model(x)
    return logits, nnx.state(model, nnx.Not(nnx.Param))


@pytest.mark.parametrize("name,kwargs", [
    ("resnet18", {}),
    ("vit_tiny_patch16_224", {"img_size": 32, "drop_rate": 0.1, "drop_path_rate": 0.1}),
    ("vit_base_patch16_siglip_224", {"img_size": 32, "depth": 2, "drop_path_rate": 0.1}),
    ("eva02_tiny_patch14_224", {"img_size": 32, "patch_size": 8, "drop_rate": 0.1, "drop_path_rate": 0.1}),
])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_shape_and_dtype_in_both_modes(name, kwargs, dtype):
    # Abstract evaluation traces the real forward pass; values are checked by the reference tests.
    model = nnx.eval_shape(lambda: models.create(name, num_classes=7, dtype=dtype, **kwargs))
    assert all(p.dtype == jnp.float32 for p in _params(model))
    for set_mode in (model.train, model.eval):
        set_mode()
        logits = nnx.eval_shape(lambda m, x: m(x), model, _images(0, 32))
        assert logits.shape == (2, 7) and logits.dtype == jnp.float32


@pytest.mark.parametrize("name,kwargs,set_mode,batch,size", [
    # Train mode: batch statistics from bfloat16 activations. A batch of 8 at 64x64 leaves 32
    # values per channel at layer4; with fewer, BatchNorm amplifies rounding chaotically.
    ("resnet18", {}, nnx.Module.train, 8, 64),
    ("vit_tiny_patch16_224", {"img_size": 32}, nnx.Module.eval, 2, 32),
    pytest.param("vit_small_patch14_reg4_dinov2", {"img_size": 28, "depth": 4}, nnx.Module.eval, 2, 28,
                 marks=pytest.mark.slow),
    pytest.param("eva02_tiny_patch14_224", {"img_size": 28, "depth": 4}, nnx.Module.eval, 2, 28, marks=pytest.mark.slow),
])
def test_bfloat16_logits_track_float32(name, kwargs, set_mode, batch, size):
    images = _images(8, size, batch)
    logits = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        model = _random_model(name, 8, dtype=dtype, **kwargs)
        set_mode(model)
        split = nnx.split(model, nnx.Param, ...)
        logits[dtype] = np.asarray(jax.jit(_apply, static_argnums=0)(*split, images)[0])
    assert logits[jnp.bfloat16].dtype == np.float32
    scale = np.abs(logits[jnp.float32]).max()
    np.testing.assert_allclose(logits[jnp.bfloat16], logits[jnp.float32], atol=0.05 * scale)
    assert not np.array_equal(logits[jnp.bfloat16], logits[jnp.float32])  # bfloat16 really ran


def test_resnet_conv1_pads_symmetrically_not_same():
    model = _random_model("resnet18", 1)
    x = _images(1, 32)
    kernel = model.conv1.kernel[...]
    dims = ("NHWC", "HWIO", "NHWC")
    torch_like = jax.lax.conv_general_dilated(x, kernel, (2, 2), ((3, 3), (3, 3)), dimension_numbers=dims)
    same = jax.lax.conv_general_dilated(x, kernel, (2, 2), "SAME", dimension_numbers=dims)
    out = model.conv1(x)
    np.testing.assert_allclose(out, torch_like, rtol=1e-5, atol=1e-5)
    assert not np.allclose(out, same, atol=1e-3)  # 'SAME' pads (2, 3) here: the check can tell


def _max_pool_reference(x: np.ndarray) -> np.ndarray:
    """torch MaxPool2d(3, 2, padding=1) by hand: window rows/cols 2i-1..2i+1 clipped to the image."""
    b, h, w, c = x.shape
    oh, ow = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    out = np.empty((b, oh, ow, c), x.dtype)
    for i in range(oh):
        for j in range(ow):
            window = x[:, max(2 * i - 1, 0):2 * i + 2, max(2 * j - 1, 0):2 * j + 2]
            out[:, i, j] = window.max(axis=(1, 2))
    return out


@pytest.mark.parametrize("kernels", ["plain", "cpu"])
@pytest.mark.parametrize("size", [8, 7])
def test_stem_max_pool_matches_torch_padding(size, kernels):
    # All-negative inputs: zero padding would leak zeros into border windows; -inf padding cannot.
    x = -np.random.default_rng(2).uniform(1, 2, (2, size, size, 3)).astype(np.float32)
    with kernels_lib.use(kernels):
        out = np.asarray(layers.max_pool_3x3_s2(jnp.asarray(x)))
    np.testing.assert_array_equal(out, _max_pool_reference(x))
    if size % 2 == 0:  # where 'SAME' pads (0, 1) instead of (1, 1) it gives other values
        same = jax.lax.reduce_window(x, -np.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "SAME")
        assert out.shape == same.shape and not np.array_equal(out, same)



def test_resnet50_puts_stride_on_3x3_conv():
    model = nnx.eval_shape(lambda: models.create("resnet50", num_classes=10))
    first = model.layer2[0]
    assert first.conv1.strides == (1, 1) and first.conv2.strides == (2, 2)
    assert first.downsample[0].strides == (2, 2) and first.downsample[0].padding == ((0, 0), (0, 0))
    assert model.layer1[1].downsample is None


def _resnet18_reference(model, x: np.ndarray) -> np.ndarray:
    """torchvision resnet18 eval forward written with lax convs (explicit pads) and numpy."""
    def conv(m, x, stride, pad):
        return np.asarray(jax.lax.conv_general_dilated(
            x, _np(m.kernel), (stride, stride), ((pad, pad), (pad, pad)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest"))

    def bn(m, x):
        return (x - _np(m.mean)) / np.sqrt(_np(m.var) + 1e-5) * _np(m.scale) + _np(m.bias)

    relu = lambda v: np.maximum(v, 0)
    x = _max_pool_reference(relu(bn(model.bn1, conv(model.conv1, x, 2, 3))))
    for i, layer in enumerate([model.layer1, model.layer2, model.layer3, model.layer4]):
        for j, blk in enumerate(layer):
            stride = 2 if i > 0 and j == 0 else 1
            y = relu(bn(blk.bn1, conv(blk.conv1, x, stride, 1)))
            y = bn(blk.bn2, conv(blk.conv2, y, 1, 1))
            short = x if blk.downsample is None else bn(blk.downsample[1], conv(blk.downsample[0], x, stride, 0))
            x = relu(y + short)
    return x.mean(axis=(1, 2)) @ _np(model.fc.kernel) + _np(model.fc.bias)


def test_resnet18_eval_matches_reference_forward():
    model = _random_model("resnet18", 3)
    model.eval()
    x = np.asarray(_images(3, 32), np.float64)
    with jax.default_matmul_precision("highest"):
        out = model(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(out, _resnet18_reference(model, x), rtol=1e-4, atol=1e-4)


def _layer_norm(m, x):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-6) * _np(m.scale) + _np(m.bias)


def _vit_reference(model, x: np.ndarray, patch: int, heads: int) -> np.ndarray:
    """timm VisionTransformer eval forward in numpy, torch layouts (qkv permute(2, 0, 3, 1, 4))."""
    b, h, w, _ = x.shape
    gh, gw = h // patch, w // patch
    patches = x.reshape(b, gh, patch, gw, patch, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, -1)
    kernel = _np(model.patch_embed.kernel)
    t = patches @ kernel.reshape(-1, kernel.shape[-1]) + _np(model.patch_embed.bias)
    d = t.shape[-1]
    t = np.concatenate([np.broadcast_to(_np(model.cls_token), (b, 1, d)), t], 1) + _np(model.pos_embed)
    n = t.shape[1]
    linear = lambda m, v: v @ _np(m.kernel) + _np(m.bias)
    for blk in model.blocks:
        qkv = linear(blk.attn.qkv, _layer_norm(blk.norm1, t))
        q, k, v = qkv.reshape(b, n, 3, heads, d // heads).transpose(2, 0, 3, 1, 4)
        logits = q @ k.transpose(0, 1, 3, 2) * (d // heads) ** -0.5
        attn = np.exp(logits - logits.max(-1, keepdims=True))
        attn /= attn.sum(-1, keepdims=True)
        t = t + linear(blk.attn.proj, (attn @ v).transpose(0, 2, 1, 3).reshape(b, n, d))
        hidden = linear(blk.mlp.fc1, _layer_norm(blk.norm2, t))
        t = t + linear(blk.mlp.fc2, 0.5 * hidden * (1 + erf(hidden / np.sqrt(2))))
    return linear(model.head, _layer_norm(model.norm, t)[:, 0])


def test_vit_eval_matches_reference_forward():
    model = _random_model("vit_tiny_patch16_224", 4, img_size=48, drop_rate=0.5, drop_path_rate=0.5)
    model.eval()
    x = np.asarray(_images(4, 48), np.float64)
    with jax.default_matmul_precision("highest"):
        out = model(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(out, _vit_reference(model, x, patch=16, heads=3), rtol=1e-4, atol=1e-4)


def test_vit_wrong_image_size_says_what_to_do():
    model = _random_model("vit_tiny_patch16_224", 0, img_size=32)
    with pytest.raises(ValueError, match="img_size=48"):
        model(_images(0, 48))


def test_vit_dropout_and_drop_path_random_in_train_only():
    model = _random_model("vit_tiny_patch16_224", 5, img_size=32, drop_rate=0.3, drop_path_rate=0.3)
    x = _images(5, 32)
    model.train()
    assert not np.allclose(model(x), model(x))
    model.eval()
    np.testing.assert_array_equal(model(x), model(x))


def test_drop_path_drops_whole_branches_with_linear_rates():
    model = _random_model("vit_tiny_patch16_224", 0, img_size=32, drop_path_rate=0.5)
    assert model.blocks[0].drop_path1.rate == 0
    assert model.blocks[6].drop_path1.rate == pytest.approx(0.5 * 6 / 11)
    last = model.blocks[-1].drop_path2
    assert last.rate == pytest.approx(0.5)
    model.train()
    out = np.asarray(last(jnp.ones((32, 5, 8))))
    # Each example's branch is either dropped whole or kept whole and scaled by 1 / (1 - rate).
    per_example = out.reshape(32, -1)
    assert (per_example == per_example[:, :1]).all()
    assert set(np.unique(per_example)) == {0.0, 2.0}


def test_batchnorm_updates_stats_in_train_mode_only():
    model = _random_model("resnet18", 6)
    x = _images(6, 32, batch=4)
    model.train()
    train_def, params, rest = nnx.split(model, nnx.Param, ...)
    model.eval()
    eval_def, _, _ = nnx.split(model, nnx.Param, ...)
    assert train_def != eval_def  # mode is static: each mode has its own graphdef
    apply = jax.jit(_apply, static_argnums=0)

    _, after_train = apply(train_def, params, rest, x)
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), rest, after_train)
    assert all(jax.tree.leaves(changed))  # every running mean and var moved
    # torch's momentum 0.1: the running mean moves a tenth of the way to the batch mean.
    batch_mean = np.asarray(model.conv1(x)).mean(axis=(0, 1, 2))
    expected = 0.9 * rest["bn1"]["mean"][...] + 0.1 * batch_mean
    np.testing.assert_allclose(after_train["bn1"]["mean"][...], expected, rtol=1e-4, atol=1e-6)

    logits, after_eval = apply(eval_def, params, rest, x)
    jax.tree.map(np.testing.assert_array_equal, rest, after_eval)
    np.testing.assert_array_equal(logits, apply(eval_def, params, rest, x)[0])
    # Running statistics make each example's logits independent of the rest of the batch.
    np.testing.assert_allclose(logits[:1], apply(eval_def, params, rest, x[:1])[0], rtol=1e-5, atol=1e-5)


def test_block_init_is_kaiming_fan_out_and_zero_init_last_bn_gives_identity():
    block = resnet.BasicBlock(64, 64, 1, zero_init_last_bn=True, rngs=nnx.Rngs(0), dtype=jnp.float32)
    # torchvision's kaiming_normal_(mode="fan_out"): std sqrt(2 / (3 * 3 * 64)) = 0.0589.
    assert np.std(block.conv1.kernel[...]) == pytest.approx(np.sqrt(2 / (9 * 64)), rel=0.03)
    assert (block.bn1.scale[...] == 1).all() and (block.bn2.scale[...] == 0).all()
    block.eval()
    x = jnp.asarray(np.random.default_rng(7).uniform(0, 1, (2, 8, 8, 64)), jnp.float32)  # post-ReLU
    np.testing.assert_array_equal(block(x), x)


def test_initializers_equal_jax_bit_for_bit_and_compile_per_chunk_not_per_shape():
    key = nnx.Rngs(5).params()
    small, large = (3, 3, 3, 16), (3, 3, 114, 256)  # within the small chunk; over two large ones, the second partly
    cases = [(initializers.normal(0.01), jax.nn.initializers.normal(0.01), large),
             (initializers.variance_scaling(2.0, "fan_out", "normal"),
              jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal"), large),
             (initializers.truncated_normal(0.02), jax.nn.initializers.truncated_normal(0.02), small),
             (initializers.variance_scaling(1.0, "fan_avg", "truncated_normal"),
              jax.nn.initializers.variance_scaling(1.0, "fan_avg", "truncated_normal"), small),
             (initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
              jax.nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"), small)]
    for fast, reference, shape in cases:
        np.testing.assert_array_equal(fast(key, shape, jnp.float32), reference(key, shape, jnp.float32))
    # Other shapes of the same chunk sizes reuse the compiled draws: no new program.
    compiled = initializers._draw_chunk._cache_size()
    for fast, _, shape in cases:
        assert fast(key, (1, *shape[1:]), jnp.float32).shape == (1, *shape[1:])
    assert initializers._draw_chunk._cache_size() == compiled
    # Traced (nnx.eval_shape, a jitted construction): jax's own initializer, same shape and dtype.
    assert jax.eval_shape(lambda k: cases[0][0](k, small), key) == jax.ShapeDtypeStruct(small, jnp.float32)


def test_unknown_model_suggests_nearest():
    with pytest.raises(ValueError, match=r"unknown model 'resnt18': did you mean 'resnet18'"):
        models.create("resnt18", num_classes=10)


def test_unknown_kwarg_names_kwarg_and_model():
    with pytest.raises(TypeError, match=r"'resnet18'.*drop_rate"):
        models.create("resnet18", num_classes=10, drop_rate=0.1)
    with pytest.raises(TypeError, match=r"'vit_tiny_patch16_224'.*img_sz"):
        models.create("vit_tiny_patch16_224", num_classes=10, img_sz=32)


@pytest.mark.parametrize("kwargs,match", [
    ({"img_size": 40}, "multiple of the patch size"),
    ({"class_token": False}, "needs class_token=True"),
    ({"global_pool": "max"}, "use 'token', 'avg' or 'map'"),
    ({"act": "relu"}, "act='relu': use one of gelu, gelu_tanh, quick_gelu"),
])
def test_vit_rejects_inconsistent_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        models.create("vit_tiny_patch16_224", num_classes=10, **kwargs)


def test_gelu_is_exact_erf_gelu_in_value_and_gradient():
    # layers.gelu (through XLA's float32 erf) against float64 erf, where GELU's curve bends and in
    # its tails: x * Phi(x) and its slope Phi(x) + x * phi(x), as torch's nn.GELU().
    x = np.concatenate([np.linspace(-12, 12, 200_001), [0.0, -0.0, 1e-30, -1e-30, 40.0, -40.0]]).astype(np.float32)
    x64 = x.astype(np.float64)
    cdf = 0.5 * (1 + erf(x64 / np.sqrt(2)))
    values = np.asarray(jax.jit(layers.gelu)(x), np.float64)
    slopes = np.asarray(jax.jit(jax.vmap(jax.grad(layers.gelu)))(x), np.float64)
    np.testing.assert_allclose(values, x64 * cdf, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(slopes, cdf + x64 * np.exp(-x64**2 / 2) / np.sqrt(2 * np.pi), rtol=0, atol=1e-6)
    np.testing.assert_allclose(values, jax.nn.gelu(x, approximate=False), rtol=1e-6, atol=1e-6)
    half = jnp.asarray(x[::1000], jnp.bfloat16)
    assert layers.gelu(half).dtype == jax.grad(lambda x: layers.gelu(x).sum())(half).dtype == jnp.bfloat16


