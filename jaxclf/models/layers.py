"""The layer API models are written in: plain JAX by default, a faster kernel set by context.

Each op here computes with the kernel set active when it runs (`jaxclf.kernels.active()`: "plain",
"cpu" or "gpu"; see `jaxclf/kernels`): the same function computed by another formulation. No
constructor takes a kernel argument: a `Classifier` runs its forward passes under its own set, so a
block added anywhere in a model computes with that set without any plumbing, and `kernels="plain"`
switches the whole model to plain JAX, the check to run after an edit: tests/test_kernels.py compares
loss and gradients of every family under every set. An op a model writes with plain `nnx`/`jax`
calls stays correct; it only misses the faster kernels.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxclf import kernels as kernels_lib
from jaxclf.kernels import plain


def dot_general(*args: Any, **kwargs: Any) -> jax.Array:
    """`jax.lax.dot_general` as the active kernel set computes it."""
    return kernels_lib.active().dot_general(*args, **kwargs)


def conv_general_dilated(*args: Any, **kwargs: Any) -> jax.Array:
    """`jax.lax.conv_general_dilated` as the active kernel set computes it."""
    return kernels_lib.active().conv_general_dilated(*args, **kwargs)


class Linear(nnx.Linear):
    """`nnx.Linear` (params `kernel` [in, out], `bias` [out]) computed by the active kernel set."""

    def __init__(self, in_features: int, out_features: int, **kwargs: Any):
        super().__init__(in_features, out_features, dot_general=dot_general, **kwargs)


class Conv(nnx.Conv):
    """`nnx.Conv` (NHWC, params `kernel` [h, w, in, out], `bias`) computed by the active kernel set."""

    def __init__(self, in_features: int, out_features: int, kernel_size, **kwargs: Any):
        super().__init__(in_features, out_features, kernel_size, conv_general_dilated=conv_general_dilated, **kwargs)


def conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding) -> jax.Array:
    """NHWC x [B, H, W, C] with an HWIO `kernel` and explicit `padding` ((top, bottom), (left, right))."""
    dims = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, ("NHWC", "HWIO", "NHWC"))
    return conv_general_dilated(x, kernel, strides, padding, dimension_numbers=dims)


def max_pool_3x3_s2(x: jax.Array, pad_value: float = -jnp.inf) -> jax.Array:
    """Max-pool like torch `MaxPool2d(3, 2, padding=1)`: one pixel of `pad_value` on every side (-inf as
    torch; 0 gives timm's BiT stem). x: [B, H, W, C] -> [B, ceil(H/2), ceil(W/2), C]."""
    return kernels_lib.active().max_pool_3x3_s2(x, pad_value)


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU, x * Phi(x), through erf as torch's `nn.GELU()` (jax.nn.gelu's erfc form is slow on XLA:CPU)."""
    return x * 0.5 * (1.0 + jax.lax.erf(x * 2.0**-0.5))


def attention(qkv: jax.Array) -> jax.Array:
    """Softmax attention, scale head_dim**-0.5, of a fused qkv [B, N, 3, heads, head_dim] (timm's
    layout) -> [B, N, heads, head_dim]; logits and softmax in float32.

    The fused input lets the fast kernels return d(qkv) as one array."""
    return kernels_lib.active().attention(qkv)


def attention_weights(qkv: jax.Array) -> jax.Array:
    """The weights `attention` applies to v: [B, heads, N, N] (for explanations)."""
    return plain.attention_weights(qkv)
