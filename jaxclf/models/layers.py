"""Building blocks shared by model families."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

# Convolutions whose output has at most this many pixels run as im2col + matmul (see below).
SMALL_MAP_PIXELS = 4
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides, padding, **kwargs: Any) -> jax.Array:
    """`jax.lax.conv_general_dilated`, but NHWC convs with tiny outputs (<= 2x2) run as im2col + matmul.

    XLA:CPU runs convolutions onto maps of 2x2 or 1x1 pixels 8-16x slower than the FLOPs warrant,
    forwards and backwards (a ResNet's last stages at CIFAR-sized 32 px inputs: they took most of
    the step; see bench/README.md). Slicing the padded input into kernel-sized patches and doing
    one matmul is exact and fast. Pass as `nnx.Conv(..., conv_general_dilated=...)`.
    """
    batch, height, width, channels = lhs.shape
    kh, kw, _, out_channels = rhs.shape
    plain = (
        kwargs.get("feature_group_count", 1) == 1
        and all(d == 1 for d in kwargs.get("lhs_dilation") or (1, 1))
        and all(d == 1 for d in kwargs.get("rhs_dilation") or (1, 1))
        and not isinstance(padding, str)
        and kwargs.get("dimension_numbers") == jax.lax.conv_dimension_numbers(
            lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC")
        )
    )
    if not plain:
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)
    (top, bottom), (left, right) = padding
    sh, sw = window_strides
    out_h = (height + top + bottom - kh) // sh + 1
    out_w = (width + left + right - kw) // sw + 1
    if out_h * out_w > SMALL_MAP_PIXELS:
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)
    padded = jnp.pad(lhs, ((0, 0), (top, bottom), (left, right), (0, 0)))
    patches = jnp.concatenate(
        [
            padded[:, i : i + sh * (out_h - 1) + 1 : sh, j : j + sw * (out_w - 1) + 1 : sw, :]
            for i in range(kh)
            for j in range(kw)
        ],
        axis=-1,
    )  # [B, out_h, out_w, kh * kw * C], ordered like rhs.reshape(kh * kw * C, O)
    return jnp.dot(patches, rhs.reshape(kh * kw * channels, out_channels), precision=kwargs.get("precision"))


def pointwise_conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides, padding, **kwargs: Any) -> jax.Array:
    """`conv_general_dilated`, but unpadded 1x1 NHWC convs run as `pointwise_conv` on CPU.

    Pass as `nnx.Conv(..., conv_general_dilated=...)` (the 1x1 convs of ResNet bottlenecks).
    """
    pointwise = (
        rhs.shape[:2] == (1, 1)
        and all(tuple(p) == (0, 0) for p in padding)
        and kwargs.get("feature_group_count", 1) == 1
        and all(d == 1 for d in kwargs.get("lhs_dilation") or (1, 1))
        and kwargs.get("dimension_numbers") == jax.lax.conv_dimension_numbers(
            lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC")
        )
    )
    if not (pointwise and compiles_for_cpu()):
        return conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)
    return pointwise_conv(lhs, rhs, tuple(window_strides), kwargs.get("precision"))


def compiles_for_cpu() -> bool:
    """Whether the code being traced will run on XLA:CPU (the default backend), for CPU-only formulations.

    Decided at trace time: `jax.lax.platform_dependent` wraps both formulations in a conditional,
    and that made the bf16 ViT-S train step on an H100 11-20% slower (bench/README.md).
    """
    return jax.default_backend() == "cpu"


def pointwise_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int] = (1, 1), precision=None) -> jax.Array:
    """Unpadded 1x1 conv as a matmul: x [B, H, W, C], kernel [1, 1, C, O] -> [B, H/s, W/s, O].

    The kernel gradient transposes the output gradient, never x. XLA:CPU transposes one operand
    of each weight-gradient matmul or convolution, and when that operand is a block's input it
    recomputes the BatchNorm/add/ReLU chain of all earlier blocks inside the transposed copy (on
    ResNet-50 such copies took ~40% of the step). With YNNPACK matmuls (`xla_cpu.py`) the
    ResNet-50 CPU train step is ~13% faster than with convolutions (bench/README.md).
    """
    sh, sw = strides
    if (sh, sw) != (1, 1):
        x = x[:, ::sh, ::sw, :]
    return _matmul(x, kernel.reshape(kernel.shape[2:]), precision, False)


def linear_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None, **kwargs: Any) -> jax.Array:
    """`jax.lax.dot_general` for `nnx.Linear(..., dot_general=)`: on CPU, x [..., C] @ kernel [C, O]
    whose kernel gradient transposes the narrower of x and the output gradient.

    XLA:CPU transposes one operand of each weight-gradient matmul and, left to autodiff, picks the
    output gradient: for ViT-S's qkv and fc1 layers a copy of [3152 x 1152] or [3152 x 1536]
    where x is [3152 x 384] (bench/README.md). Other platforms and calls get `jax.lax.dot_general`.
    """
    contracts_last_axis = dimension_numbers == (((lhs.ndim - 1,), (0,)), ((), ())) and rhs.ndim == 2
    if not (contracts_last_axis and compiles_for_cpu()) or any(value is not None for value in kwargs.values()):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, **kwargs)
    return _matmul(lhs, rhs, precision, rhs.shape[0] < rhs.shape[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul(x: jax.Array, kernel: jax.Array, precision, transpose_input: bool) -> jax.Array:
    """x [..., C] @ kernel [C, O]; the kernel gradient transposes x if `transpose_input`, else the output gradient."""
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


def _matmul_fwd(x: jax.Array, kernel: jax.Array, precision, transpose_input: bool):
    return _matmul(x, kernel, precision, transpose_input), (x, kernel)


def _matmul_grad(precision, transpose_input: bool, residuals, grad_out: jax.Array):
    x, kernel = residuals
    grad_x = jax.lax.dot_general(grad_out, kernel, (((grad_out.ndim - 1,), (1,)), ((), ())), precision=precision)
    # XLA:CPU transposes the operand whose contracted (leading) axes come first: that is the lhs.
    leading = tuple(range(x.ndim - 1))
    if transpose_input:
        grad_kernel = jax.lax.dot_general(x, grad_out, ((leading, leading), ((), ())), precision=precision)
    else:  # [O, C], then the small [O, C] -> [C, O] transpose
        grad_kernel = jax.lax.dot_general(grad_out, x, ((leading, leading), ((), ())), precision=precision).T
    return grad_x, grad_kernel.astype(kernel.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_grad)


def max_pool_3x3_s2(x: jax.Array, pad_value: float = -jnp.inf) -> jax.Array:
    """Max-pool like torch `MaxPool2d(3, 2, padding=1)`: one pixel of `pad_value` on every side
    (-inf as torch; 0 gives timm's BiT stem, `ConstantPad2d(1, 0)` then `MaxPool2d(3, 2)`).

    x: [B, H, W, C] -> [B, ceil(H/2), ceil(W/2), C]. The maximum of 9 strided slices, not
    `reduce_window`, whose XLA:CPU gradient (select-and-scatter) is 4-5x slower; values are
    identical. The gradient goes to the first maximum of each window in row-major order, as
    torch's (autodiff of a maximum splits ties, and ReLU outputs tie often); written by hand
    (`_max_pool_grad`), the ResNet-18 step on CPU is also ~4% faster than with autodiff's.
    """
    return _max_pool(x, pad_value, x.shape[1:3])


def _pool_taps(x: jax.Array, pad_value: float) -> list[jax.Array]:
    """The 9 window taps of the 3x3/2 pool, row-major: each [B, ceil(H/2), ceil(W/2), C]."""
    _, height, width, _ = x.shape
    out_h, out_w = (height - 1) // 2 + 1, (width - 1) // 2 + 1
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=pad_value)
    return [padded[:, i : i + 2 * out_h - 1 : 2, j : j + 2 * out_w - 1 : 2, :] for i in range(3) for j in range(3)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _max_pool(x: jax.Array, pad_value: float, image_size: tuple[int, int]) -> jax.Array:
    return functools.reduce(jnp.maximum, _pool_taps(x, pad_value))


def _max_pool_fwd(x: jax.Array, pad_value: float, image_size: tuple[int, int]):
    taps = _pool_taps(x, pad_value)
    out = functools.reduce(jnp.maximum, taps)
    # Index (0..8, row-major) of each window's first maximum, kept as int8 for the gradient; the
    # barrier asks XLA to store it rather than recompute the taps inside the gradient's loop.
    first_max = jnp.full(out.shape, len(taps) - 1, jnp.int8)
    for index in reversed(range(len(taps) - 1)):
        first_max = jnp.where(taps[index] == out, jnp.int8(index), first_max)
    return out, jax.lax.optimization_barrier(first_max)


def _max_pool_grad(pad_value: float, image_size: tuple[int, int], first_max: jax.Array, grad_out: jax.Array):
    """Route each window's gradient to its first maximum, then add the 9 taps back in place.

    Tap (i, j) of output (r, c) reads padded pixel (2r + i, 2c + j), so along each axis even
    positions collect taps 0 and 2 (shifted by one output) and odd positions tap 1: three dense
    adds and an interleave per axis, where autodiff pads each tap with holes."""
    height, width = image_size
    zeros = jnp.zeros_like(grad_out)
    tap_grads = [jnp.where(first_max == index, grad_out, zeros) for index in range(9)]
    rows = [_interleave_taps(*tap_grads[j::3], axis=1) for j in range(3)]  # taps (0..2, j) -> rows
    full = _interleave_taps(*rows, axis=2)  # [B, 2 * out_h + 2, 2 * out_w + 2, C] over the padded input
    return (full[:, 1 : height + 1, 1 : width + 1],)


def _interleave_taps(tap0: jax.Array, tap1: jax.Array, tap2: jax.Array, axis: int) -> jax.Array:
    """Gradients of the three stride-2 taps along `axis` (n each) -> gradient at positions 0..2n+1."""
    def pad(a, before, after):
        return jnp.pad(a, [(before, after) if d == axis else (0, 0) for d in range(a.ndim)])

    even = pad(tap0, 0, 1) + pad(tap2, 1, 0)  # position 2m: tap 0 of output m, tap 2 of output m-1
    odd = pad(tap1, 0, 1)  # position 2m+1: tap 1 of output m
    shape = list(even.shape)
    shape[axis] *= 2
    return jnp.stack([even, odd], axis=axis + 1).reshape(shape)


_max_pool.defvjp(_max_pool_fwd, _max_pool_grad)


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU, x * Phi(x), written through erf as torch's `nn.GELU()` is.

    `jax.nn.gelu(approximate=False)` goes through erfc, which XLA:CPU expands into a two-branch
    series: forward + gradient of a [16, 197, 1536] ViT-S activation took 25-29 ms against 6-20 ms
    this way (torch 4-5 ms); ViT-S train step ~3% faster (bench/README.md).
    """
    return x * 0.5 * (1.0 + jax.lax.erf(x * 2.0**-0.5))


def qkv_attention(qkv: jax.Array, implementation: str = "auto") -> jax.Array:
    """Softmax attention, scale head_dim**-0.5, of timm's fused qkv: [B, N, 3, heads, head_dim] -> [B, N, heads, head_dim].

    "xla": `softmax_attention`, any backend; it materialises the [B, heads, N, N] scores.
    "cudnn": cuDNN's fused (flash) attention, NVIDIA GPUs and 16-bit inputs only. Its training
    kernels take only even sequence lengths (ViT's 197 tokens fail), so the tokens are padded to
    a multiple of 8 and the padding is masked out as keys and dropped as queries. "auto": "cudnn"
    where it can run (an NVIDIA GPU, 16-bit inputs; on an H100 it made the bf16 ViT-B/16 train
    step 1.39x faster, bench/README.md), else "xla".
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention={implementation!r}: use one of {ATTENTION_IMPLEMENTATIONS}")
    if implementation == "auto":
        implementation = "cudnn" if _cudnn_attention_available(qkv.dtype) else "xla"
    if implementation == "xla":
        return softmax_attention(qkv)
    if not _cudnn_attention_available(jnp.bfloat16):
        raise ValueError(f"attention='cudnn' needs an NVIDIA GPU (this is {jax.default_backend()}); use 'xla'")
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    return padded_attention(q, k, v, multiple=8, implementation=implementation)


@jax.custom_vjp
def softmax_attention(qkv: jax.Array) -> jax.Array:
    """Plain softmax attention of a fused qkv [B, N, 3, heads, head_dim] -> [B, N, heads, head_dim],
    logits and softmax in float32, as `jax.nn.dot_product_attention`'s XLA version.

    Its gradient is written out: the softmax's backward uses rowsum(dO * O) (a [B, N, heads] sum,
    as flash attention does) instead of autodiff's sum over the [B, heads, N, N] scores, and
    d(qkv) comes back as one array instead of three padded slices added up. ViT-S/16 CPU train
    step faster in 6 of 6 alternated pairs, median ~8% (bench/README.md).
    """
    return softmax_attention_and_weights(qkv)[0]


def softmax_attention_and_weights(qkv: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`softmax_attention`'s output and its weights [B, heads, N, N] (in qkv's dtype), by autodiff."""
    out, probs, _ = _attention_forward(qkv)
    return out, probs


def _attention_forward(qkv: jax.Array):
    """Output [B, N, heads, head_dim], weights, and q, k, v as [B, heads, N, head_dim]."""
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    logits = _head_dot(q * q.shape[-1] ** -0.5, k, 3, 3)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return _head_dot(probs, v, 3, 2).transpose(0, 2, 1, 3), probs, (q, k, v)


def _head_dot(a: jax.Array, b: jax.Array, a_contracting: int, b_contracting: int) -> jax.Array:
    """Matmul batched over the leading [B, heads], contracting one axis of each.

    Written as `dot_general` rather than einsum so that each product's output is [B, heads, rows,
    cols] with the first operand's rows: through einsum XLA:CPU computed out^T, [B, heads,
    head_dim, N], and Eigen runs that form at ~50 against ~80-100 GFLOP/s (bench/README.md).
    """
    return jax.lax.dot_general(a, b, (((a_contracting,), (b_contracting,)), ((0, 1), (0, 1))))


def _softmax_attention_fwd(qkv: jax.Array):
    out, probs, heads = _attention_forward(qkv)
    return out, (heads, probs, out)


def _softmax_attention_grad(residuals, grad_out: jax.Array):
    (q, k, v), probs, out = residuals
    scale = q.shape[-1] ** -0.5
    # d logits = P * (dP - rowsum(dP * P)), and rowsum(dP * P) = rowsum(dO * O) since dP = dO V^T.
    # An elementwise product and a sum: as an einsum XLA:CPU ran it as [B*N*heads] 1x1 dots (10 ms a block).
    row_dot = jnp.sum(grad_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1).transpose(0, 2, 1)[..., None]
    grad_out = grad_out.transpose(0, 2, 1, 3)
    grad_probs = _head_dot(grad_out, v, 3, 3).astype(jnp.float32)
    grad_logits = (probs.astype(jnp.float32) * (grad_probs - row_dot)).astype(q.dtype)
    grad_q = _head_dot(grad_logits, k, 3, 2) * scale
    grad_k = _head_dot(grad_logits, q, 2, 2) * scale
    grad_v = _head_dot(probs, grad_out, 2, 2)
    return (jnp.stack([grad_q, grad_k, grad_v], axis=1).transpose(0, 3, 1, 2, 4).astype(q.dtype),)


softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_grad)


def _cudnn_attention_available(dtype) -> bool:
    """Whether cuDNN's fused attention runs here: the default backend is an NVIDIA GPU and `dtype` is 16-bit."""
    nvidia = jax.default_backend() == "gpu" and "nvidia" in jax.devices()[0].device_kind.lower()
    return nvidia and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def padded_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, multiple: int, implementation: str) -> jax.Array:
    """Attention over tokens padded to a length divisible by `multiple`; the result equals unpadded attention."""
    batch, length = q.shape[:2]
    padded = -(-length // multiple) * multiple
    widths = ((0, 0), (0, padded - length), (0, 0), (0, 0))
    lengths = jnp.full((batch,), length, jnp.int32)
    out = jax.nn.dot_product_attention(
        jnp.pad(q, widths), jnp.pad(k, widths), jnp.pad(v, widths),
        query_seq_lengths=lengths, key_value_seq_lengths=lengths, implementation=implementation,
    )
    return out[:, :length]
