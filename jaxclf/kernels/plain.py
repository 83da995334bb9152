"""Plain-JAX formulations of the ops that have faster kernels elsewhere: the reference for every kernel set."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def max_pool_3x3_s2(x: jax.Array, pad_value: float = -jnp.inf) -> jax.Array:
    """Max-pool like torch `MaxPool2d(3, 2, padding=1)`: one pixel of `pad_value` on every side.

    x: [B, H, W, C] -> [B, ceil(H/2), ceil(W/2), C]. Its gradient goes to one maximum per window.
    """
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=jnp.asarray(pad_value, x.dtype))
    return jax.lax.reduce_window(padded, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                 "VALID")


def attention_weights(qkv: jax.Array) -> jax.Array:
    """softmax(q k^T * head_dim**-0.5) of a fused qkv [B, N, 3, heads, head_dim]: [B, heads, N, N] in qkv's
    dtype, logits and softmax in float32."""
    q, k = qkv[:, :, 0], qkv[:, :, 1]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * q.shape[-1] ** -0.5, k)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(qkv.dtype)


def attention(qkv: jax.Array) -> jax.Array:
    """Softmax attention of a fused qkv [B, N, 3, heads, head_dim] -> [B, N, heads, head_dim]."""
    return jnp.einsum("bhqk,bkhd->bqhd", attention_weights(qkv), qkv[:, :, 2])
