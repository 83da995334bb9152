"""Formulations XLA:CPU runs faster than plain JAX's; each computes the same function and gradient.

Why each exists, with the measurements, is in bench/README.md ("CPU train step"). Each one is
checked against `kernels/plain.py` by tests/test_kernels.py, model by model.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

# Convolutions whose output has at most this many pixels run as im2col + matmul.
SMALL_MAP_PIXELS = 4


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides, padding, **kwargs: Any) -> jax.Array:
    """`jax.lax.conv_general_dilated`; NHWC depthwise convs run as `depthwise_conv`, unpadded 1x1 convs as
    `pointwise_conv`, and those onto maps of <= 2x2 pixels as im2col + matmul (XLA:CPU runs such convs
    8-16x slower than their FLOPs warrant)."""
    simple = (
        all(d == 1 for d in kwargs.get("lhs_dilation") or (1, 1))
        and all(d == 1 for d in kwargs.get("rhs_dilation") or (1, 1))
        and kwargs.get("dimension_numbers") == jax.lax.conv_dimension_numbers(
            lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC")
        )
    )
    groups = kwargs.get("feature_group_count", 1)
    if simple and groups == lhs.shape[-1] == rhs.shape[-1] and rhs.shape[2] == 1:
        if isinstance(padding, str):
            padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
        return depthwise_conv(lhs, rhs, tuple(window_strides), tuple(map(tuple, padding)), kwargs.get("precision"))
    if not simple or groups != 1 or isinstance(padding, str):
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)
    if rhs.shape[:2] == (1, 1) and all(tuple(p) == (0, 0) for p in padding):
        return pointwise_conv(lhs, rhs, tuple(window_strides), kwargs.get("precision"))
    batch, height, width, channels = lhs.shape
    kh, kw, _, out_channels = rhs.shape
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


def depthwise_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding, precision=None) -> jax.Array:
    """Depthwise conv (one filter per channel) as a sum of the kernel's shifted taps: x [B, H, W, C], kernel
    [kh, kw, 1, C], explicit `padding` ((top, bottom), (left, right)) -> [B, H', W', C]. XLA:CPU's grouped
    convolution runs 10-20x slower forward and 3-6x slower with its gradient (bench/README.md, "Depthwise
    convolution"); this form's gradient is jax's own. 16-bit inputs accumulate in float32, as a convolution does."""
    del precision  # elementwise products: no reduced-precision matmul to select
    (top, bottom), (left, right) = padding
    kh, kw = kernel.shape[:2]
    sh, sw = strides
    out_h = (x.shape[1] + top + bottom - kh) // sh + 1
    out_w = (x.shape[2] + left + right - kw) // sw + 1
    accumulate = jnp.promote_types(x.dtype, jnp.float32)
    padded = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0))).astype(accumulate)
    weights = kernel.astype(accumulate)
    out = None
    for i in range(kh):
        for j in range(kw):
            tap = padded[:, i : i + sh * (out_h - 1) + 1 : sh, j : j + sw * (out_w - 1) + 1 : sw, :] * weights[i, j, 0]
            out = tap if out is None else out + tap
    return out.astype(jnp.result_type(x.dtype, kernel.dtype))


def pointwise_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int] = (1, 1), precision=None) -> jax.Array:
    """Unpadded 1x1 conv as a matmul: x [B, H, W, C], kernel [1, 1, C, O] -> [B, H/s, W/s, O].

    Its kernel gradient transposes the output gradient, never x: XLA:CPU recomputed the
    BatchNorm/add/ReLU chain of earlier blocks inside each transposed copy of a block input.
    """
    sh, sw = strides
    if (sh, sw) != (1, 1):
        x = x[:, ::sh, ::sw, :]
    return _matmul(x, kernel.reshape(kernel.shape[2:]), precision, False)


def linear_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None, **kwargs: Any) -> jax.Array:
    """`jax.lax.dot_general` for `nnx.Linear(..., dot_general=)`: x [..., C] @ kernel [C, O] whose
    kernel gradient transposes the narrower of x and the output gradient (XLA:CPU copies the
    operand it transposes). Other contractions go to `jax.lax.dot_general`."""
    contracts_last_axis = dimension_numbers == (((lhs.ndim - 1,), (0,)), ((), ())) and rhs.ndim == 2
    if not contracts_last_axis or any(value is not None for value in kwargs.values()):
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
    """`plain.max_pool_3x3_s2` as the maximum of 9 strided slices (reduce_window's XLA:CPU gradient,
    select-and-scatter, is 4-5x slower), its gradient routed by hand to each window's first
    maximum in row-major order, as torch's."""
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


@jax.custom_vjp
def softmax_attention(qkv: jax.Array) -> jax.Array:
    """`plain.attention` with the products as batched `dot_general`s laid out [B, heads, rows, cols]
    (XLA:CPU computed einsum's form transposed, and runs that ~40% slower) and a written-out
    gradient: the softmax backward from rowsum(dO * O) as flash attention does, d(qkv) as one array."""
    return _attention_forward(qkv)[0]


def _attention_forward(qkv: jax.Array):
    """Output [B, N, heads, head_dim], weights, and q, k, v as [B, heads, N, head_dim]."""
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    logits = _head_dot(q * q.shape[-1] ** -0.5, k, 3, 3)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return _head_dot(probs, v, 3, 2).transpose(0, 2, 1, 3), probs, (q, k, v)


def _head_dot(a: jax.Array, b: jax.Array, a_contracting: int, b_contracting: int) -> jax.Array:
    """Matmul batched over the leading [B, heads], contracting one axis of each; the output keeps `a`'s rows first."""
    return jax.lax.dot_general(a, b, (((a_contracting,), (b_contracting,)), ((0, 1), (0, 1))))


def _softmax_attention_fwd(qkv: jax.Array):
    out, probs, heads = _attention_forward(qkv)
    return out, (heads, probs, out)


def _softmax_attention_grad(residuals, grad_out: jax.Array):
    (q, k, v), probs, out = residuals
    scale = q.shape[-1] ** -0.5
    # d logits = P * (dP - rowsum(dP * P)), and rowsum(dP * P) = rowsum(dO * O) since dP = dO V^T.
    # An elementwise product and a sum: as an einsum XLA:CPU ran it as [B*N*heads] 1x1 dots.
    row_dot = jnp.sum(grad_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1).transpose(0, 2, 1)[..., None]
    grad_out = grad_out.transpose(0, 2, 1, 3)
    grad_probs = _head_dot(grad_out, v, 3, 3).astype(jnp.float32)
    grad_logits = (probs.astype(jnp.float32) * (grad_probs - row_dot)).astype(q.dtype)
    grad_q = _head_dot(grad_logits, k, 3, 2) * scale
    grad_k = _head_dot(grad_logits, q, 2, 2) * scale
    grad_v = _head_dot(probs, grad_out, 2, 2)
    return (jnp.stack([grad_q, grad_k, grad_v], axis=1).transpose(0, 3, 1, 2, 4).astype(q.dtype),)


softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_grad)
