"""The one-flag check after a model edit: every kernel set computes the model's plain-JAX loss and gradients.

Each family is built once with random values, then run with kernels="plain" and with each fast
set on the same params (kernels change formulations, never params). float32 on CPU: losses agree
to 1e-5 relative, each gradient leaf to 1e-4 of its norm, or of 1e-3 of the whole gradient's norm
where the leaf's is smaller (summation order differs between the formulations; a wrong formula is
off by far more).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxclf import kernels, models
from jaxclf.kernels import cpu, cudnn, plain
from jaxclf.models import layers
from model_helpers import with_random_values

# Small variants of each family (depth and size are options), with what makes each path run:
# ResNets at 32 px reach 1x1 maps (im2col convs), bottlenecks have 1x1 convs (matmuls), the ViT
# has register tokens and an odd token count; DINOv2 adds layer scale, SigLIP attention pooling and
# EVA-02 rotary attention with a SwiGLU MLP.
FAMILIES = {
    "resnet18": dict(depths=(1, 1, 1, 1)),
    "resnet50": dict(depths=(1, 1, 1, 1)),
    "resnetv2_50x1_bit": dict(depths=(1, 1, 1, 1)),
    "vit_tiny_patch16_224": dict(img_size=32, patch_size=8, depth=2, reg_tokens=2),
    # One block per stage, narrow: depthwise (grouped) convs, SE, and 1x1 maps at 32 px.
    "efficientnet_b0": dict(arch=(("ds_r1_k3_s1_e1_c16_se0.25",), ("ir_r1_k3_s2_e6_c24_se0.25",),
                                  ("ir_r1_k5_s2_e6_c40_se0.25",)), channel_multiplier=0.5, num_features=64),
    "mobilenetv3_small_100": dict(arch=(("ds_r1_k3_s2_e1_c16_se0.25_nre",), ("ir_r1_k5_s2_e4_c24_se0.25",),
                                        ("cn_r1_k1_s1_c48",)), num_features=64),
    "convnext_atto": dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32)),
    "vit_small_patch14_reg4_dinov2": dict(img_size=32, patch_size=8, depth=2),
    "vit_base_patch16_siglip_224": dict(img_size=32, patch_size=8, depth=2, width=192, num_heads=3),
    "eva02_tiny_patch14_224": dict(img_size=32, patch_size=8, depth=2),
}


def _under(kernel_set, fn):
    """`fn` computing with `kernel_set` (entered inside, so that jit traces it with that set)."""

    def run(*args):
        with kernels.use(kernel_set):
            return fn(*args)

    return run


FAST_SETS = [name for name in kernels.KERNEL_SETS if name != "plain"]


def _loss_and_grads(model: nnx.Module, images: jax.Array, labels: jax.Array):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params):
        logits = nnx.merge(graphdef, params, rest, copy=True)(images)
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()

    return jax.jit(jax.value_and_grad(loss_fn))(params)


# Longer variants under make test-all: bottleneck ResNets and BiT (resnet18 checks the family), EfficientNet
# (MobileNetV3 checks depthwise, SE and 1x1 matmul convs), ConvNeXt (its 7x7 depthwise taps are checked alone
# below, its LayerNorm/Linear/GELU by the ViTs) and DINOv2 (the ViT with registers and layer scale).
SLOW_FAMILIES = ("resnet50", "resnetv2_50x1_bit", "efficientnet_b0", "convnext_atto", "vit_small_patch14_reg4_dinov2")


@pytest.mark.parametrize("name", [n if n not in SLOW_FAMILIES else pytest.param(n, marks=pytest.mark.slow)
                                  for n in FAMILIES])
def test_fast_kernels_compute_the_plain_loss_and_gradients(name):
    options = FAMILIES[name]
    plain = with_random_values(lambda: models.create(name, num_classes=5, kernels="plain", **options), spread=0.1)
    plain.train()
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(4, 32, 32, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 5, 4))
    reference_loss, reference_grads = _loss_and_grads(plain, images, labels)
    reference = {k: np.asarray(v) for k, v in nnx.to_flat_state(reference_grads)}
    # A leaf whose gradient is zero in exact arithmetic (a bias before a conv and a batch-normalising
    # BatchNorm, as in EfficientNet's blocks) holds rounding noise: compare it to the whole gradient.
    floor = 1e-3 * np.sqrt(sum(np.sum(g**2) for g in reference.values()))
    for kernel_set in FAST_SETS:
        fast = nnx.eval_shape(lambda: models.create(name, num_classes=5, kernels=kernel_set, **options))
        fast.train()
        nnx.update(fast, nnx.state(plain))
        loss, grads = _loss_and_grads(fast, images, labels)
        np.testing.assert_allclose(loss, reference_loss, rtol=1e-5, err_msg=f"{name} kernels={kernel_set}")
        for path, grad in nnx.to_flat_state(grads):
            expected = reference[path]
            error = np.linalg.norm(np.asarray(grad) - expected) / max(np.linalg.norm(expected), floor)
            assert error < 1e-4, f"{name} kernels={kernel_set}: gradient of {'/'.join(map(str, path))} off by {error:.2g}"


def test_every_registered_family_is_compared():
    shipped = {models.family(name) for name in models.list_models()}
    shipped = {family for family in shipped if family.startswith("jaxclf.models.")}  # not the tests' own models
    assert shipped == {models.family(name) for name in FAMILIES}, "add the family's smallest form to FAMILIES"


def test_a_block_written_without_plumbing_computes_with_the_models_kernel_set():
    """A block nested anywhere, built with no kernel argument, computes with the set its model was given."""

    class Inner(nnx.Module):
        def __init__(self, rngs):
            self.conv = layers.Conv(8, 6, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)

        def __call__(self, x):
            return self.conv(x)

    class Net(models.Classifier):
        def __init__(self, rngs):
            self.blocks = nnx.List([Inner(rngs)])

        def forward_features(self, images):
            return self.blocks[0](images)

        def forward_head(self, features):
            return features.mean(axis=(1, 2))

    net = Net(nnx.Rngs(0))
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 2, 2, 8)), jnp.float32)  # a 2x2 map: im2col on "cpu"
    primitives = {}
    for kernel_set in ("plain", "cpu"):
        net.kernels = kernel_set
        graphdef, state = nnx.split(net)
        jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(images))(state)
        primitives[kernel_set] = {eqn.primitive.name for eqn in jaxpr.jaxpr.eqns}
        np.testing.assert_allclose(nnx.merge(graphdef, state)(images), Net(nnx.Rngs(0))(images), rtol=1e-5, atol=1e-5)
    assert "conv_general_dilated" in str(jax.make_jaxpr(lambda: Net(nnx.Rngs(0))(images))())
    assert primitives["plain"] != primitives["cpu"]  # the nested conv took the "cpu" formulation


def test_auto_resolves_by_platform():
    assert kernels.resolve("auto", "cpu") == "cpu"
    assert kernels.resolve("auto", "gpu") == "gpu"
    assert kernels.resolve("auto", "tpu") == "plain"
    assert kernels.resolve("plain", "cpu") == "plain"
    with pytest.raises(ValueError, match="kernels='fast': use one of auto, plain, cpu, gpu"):
        kernels.resolve("fast")
    assert models.create("resnet18", num_classes=2).kernels == kernels.resolve("auto")


@pytest.mark.parametrize("length", [5, pytest.param(197, marks=pytest.mark.slow)])  # 197: ViT-B/16's tokens
def test_padded_attention_equals_unpadded_forward_and_backward(length):
    # The padding and masking the "gpu" set wraps around cuDNN's kernel, run through XLA's.
    rng = np.random.default_rng(length)
    q, k, v, cotangent = (jnp.asarray(rng.normal(size=(2, length, 3, 8)), jnp.float32) for _ in range(4))
    unpadded = lambda q, k, v: jnp.sum(jax.nn.dot_product_attention(q, k, v) * cotangent)
    padded = lambda q, k, v: jnp.sum(cudnn.padded_attention(q, k, v, multiple=64, implementation="xla") * cotangent)
    np.testing.assert_allclose(padded(q, k, v), unpadded(q, k, v), rtol=1e-5)
    for got, want in zip(jax.grad(padded, (0, 1, 2))(q, k, v), jax.grad(unpadded, (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def _max_pool_grad_reference(x: np.ndarray, grad_out: np.ndarray, pad_value: float) -> np.ndarray:
    """Each window's gradient added at its first maximum in row-major order, as torch's MaxPool2d."""
    b, h, w, c = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=pad_value)
    grad = np.zeros_like(padded)
    for i in range(grad_out.shape[1]):
        for j in range(grad_out.shape[2]):
            first = padded[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3].reshape(b, 9, c).argmax(axis=1)
            for n in range(b):
                for ch in range(c):
                    k = first[n, ch]
                    grad[n, 2 * i + k // 3, 2 * j + k % 3, ch] += grad_out[n, i, j, ch]
    return grad[:, 1:h + 1, 1:w + 1]


@pytest.mark.parametrize("kernel_set", ["plain", "cpu"])
@pytest.mark.parametrize("pad_value", [-np.inf, 0.0])
@pytest.mark.parametrize("shape", [(2, 8, 9, 3), (1, 7, 6, 2)])
def test_max_pool_gradient_goes_to_first_maximum(shape, pad_value, kernel_set):
    # Small integers tie often (as ReLU zeros do): every window's gradient must go to one pixel, the
    # first maximum, as torch's (a maximum written as jnp.maximum would split ties).
    rng = np.random.default_rng(3)
    x = rng.integers(-2, 3, shape).astype(np.float32)
    with kernels.use(kernel_set):  # the set is chosen while jax traces
        out, vjp = jax.vjp(lambda v: layers.max_pool_3x3_s2(v, pad_value), jnp.asarray(x))
    grad_out = rng.standard_normal(out.shape).astype(np.float32)
    grad = np.asarray(jax.jit(vjp)(jnp.asarray(grad_out))[0])
    np.testing.assert_allclose(grad, _max_pool_grad_reference(x, grad_out, pad_value), rtol=1e-6, atol=1e-6)


def _assert_same_value_and_gradients(ours, reference, x, w, rng) -> None:
    """`ours(x, w)` equals `reference(x, w)`, and so do their gradients in x and w under a random probe."""
    np.testing.assert_allclose(ours(x, w), reference(x, w), rtol=1e-5, atol=1e-5)
    probe = jnp.asarray(rng.normal(size=reference(x, w).shape), jnp.float32)
    loss = lambda f: lambda x, w: jnp.sum(f(x, w) * probe)
    grads = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(x, w)
    for g, e in zip(grads, jax.grad(loss(reference), argnums=(0, 1))(x, w)):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "shape, kernel, stride, pad",
    [
        ((2, 2, 2, 8), 3, 1, 1),  # im2col: 2x2 output
        ((2, 1, 1, 8), 3, 1, 1),  # 1x1 map: only the centre tap sees data
        ((2, 4, 4, 8), 3, 2, 1),  # strided onto 2x2
        ((2, 3, 3, 8), 1, 2, 0),  # 1x1 downsample conv onto 2x2
        ((2, 5, 5, 8), 3, 1, 1),  # large output: XLA's convolution
        ((2, 5, 6, 8), 1, 1, 0),  # bottleneck 1x1: a matmul
        ((2, 7, 6, 8), 1, 2, 0),  # strided 1x1 downsample, odd height
    ],
)
def test_cpu_convolution_equals_lax_forward_and_backward(shape, kernel, stride, pad):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=(kernel, kernel, shape[-1], 6)), jnp.float32)
    padding = ((pad, pad), (pad, pad))
    ours = _under("cpu", lambda x, w: layers.conv(x, w, (stride, stride), padding))
    reference = _under("plain", lambda x, w: layers.conv(x, w, (stride, stride), padding))
    _assert_same_value_and_gradients(ours, reference, x, w, rng)


@pytest.mark.parametrize(
    "shape, kernel, stride, padding",
    [
        ((2, 6, 6, 8), 3, 1, ((1, 1), (1, 1))),  # MobileNet/EfficientNet 3x3
        ((2, 7, 5, 8), 5, 2, ((2, 2), (2, 2))),  # strided 5x5 on an odd, non-square map
        ((2, 8, 8, 8), 3, 2, "SAME"),  # the tf_ ports' "same" padding: more at the bottom/right
        ((2, 9, 9, 4), 7, 1, ((3, 3), (3, 3))),  # ConvNeXt's 7x7
        ((1, 2, 2, 4), 7, 1, ((3, 3), (3, 3))),  # a map smaller than the kernel
    ],
)
def test_cpu_depthwise_convolution_equals_lax_forward_and_backward(shape, kernel, stride, padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=(kernel, kernel, 1, shape[-1])), jnp.float32)

    def depthwise(x, w):
        dims = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
        return layers.conv_general_dilated(x, w, (stride, stride), padding, feature_group_count=shape[-1],
                                           dimension_numbers=dims)

    ours, reference = _under("cpu", depthwise), _under("plain", depthwise)
    assert "conv_general_dilated" not in str(jax.make_jaxpr(ours)(x, w))  # the taps, not XLA's grouped conv
    _assert_same_value_and_gradients(ours, reference, x, w, rng)


@pytest.mark.parametrize("features_in, features_out", [(8, 24), (24, 8)])
def test_cpu_linear_equals_lax_forward_and_backward(features_in, features_out):
    rng = np.random.default_rng(features_in)
    x = jnp.asarray(rng.normal(size=(2, 5, features_in)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(features_in, features_out)), jnp.float32)
    probe = jnp.asarray(rng.normal(size=(2, 5, features_out)), jnp.float32)
    numbers = (((2,), (0,)), ((), ()))
    loss = lambda dot: lambda x, kernel: jnp.sum(dot(x, kernel, numbers) * probe)
    np.testing.assert_allclose(cpu.linear_dot_general(x, kernel, numbers), jax.lax.dot_general(x, kernel, numbers),
                               rtol=1e-6, atol=1e-6)
    grad = jax.jit(jax.grad(loss(cpu.linear_dot_general), argnums=(0, 1)))
    for ours, expected in zip(grad(x, kernel), jax.grad(loss(jax.lax.dot_general), argnums=(0, 1))(x, kernel)):
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_cpu_attention_equals_autodiff_of_jax_attention(dtype, tolerance):
    # The hand-written backward against autodiff of jax.nn.dot_product_attention, on ViT-like shapes;
    # the plain formulation against the same reference.
    qkv_key, cotangent_key = jax.random.split(jax.random.key(0))
    qkv = jax.random.normal(qkv_key, (3, 197, 3, 4, 16)).astype(dtype)
    cotangent = jax.random.normal(cotangent_key, (3, 197, 4, 16)).astype(dtype)
    reference = lambda qkv: jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    loss = lambda f: lambda qkv: jnp.sum((f(qkv) * cotangent).astype(jnp.float32))
    expected_value, expected_grad = jax.value_and_grad(loss(reference))(qkv)
    for attention in (cpu.softmax_attention, plain.attention):
        value, grad = jax.jit(jax.value_and_grad(loss(attention)))(qkv)
        np.testing.assert_allclose(value, expected_value, rtol=tolerance, atol=tolerance)
        np.testing.assert_allclose(np.asarray(grad, np.float32), np.asarray(expected_grad, np.float32),
                                   rtol=tolerance, atol=tolerance)
    weights = np.asarray(plain.attention_weights(qkv), np.float32)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=tolerance)


@pytest.mark.skipif(not cudnn.available(jnp.bfloat16), reason="needs an NVIDIA GPU (cuDNN's fused attention)")
@pytest.mark.parametrize("length", [197, 50])
def test_cudnn_attention_matches_plain_on_nvidia_gpus(length):
    rng = np.random.default_rng(length)
    qkv = jnp.asarray(rng.normal(size=(2, length, 3, 4, 64)), jnp.bfloat16)
    cotangent = jnp.asarray(rng.normal(size=(2, length, 4, 64)), jnp.bfloat16)

    def loss(kernel_set):
        return _under(kernel_set, lambda qkv: jnp.sum((layers.attention(qkv) * cotangent).astype(jnp.float32)))

    fused = jax.jit(jax.value_and_grad(loss("gpu")))
    assert "cudnn" in fused.lower(qkv).compile().as_text().lower()  # the "gpu" set really runs cuDNN's kernel
    value, grad = fused(qkv)
    expected_value, expected_grad = jax.jit(jax.value_and_grad(loss("plain")))(qkv)
    np.testing.assert_allclose(value, expected_value, rtol=2e-2, atol=1.0)
    np.testing.assert_allclose(np.asarray(grad, np.float32), np.asarray(expected_grad, np.float32), rtol=5e-2, atol=5e-2)
