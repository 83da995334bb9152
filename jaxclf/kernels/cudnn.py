"""cuDNN's fused (flash) attention, for NVIDIA GPUs in 16-bit: the "gpu" kernel set's attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxclf.kernels import plain

# cuDNN's training kernels take only sequence lengths divisible by this (ViT's 197 tokens fail).
CUDNN_LENGTH_MULTIPLE = 8


def available(dtype) -> bool:
    """Whether cuDNN's fused attention runs here: the default backend is an NVIDIA GPU and `dtype` is 16-bit."""
    nvidia = jax.default_backend() == "gpu" and "nvidia" in jax.devices()[0].device_kind.lower()
    return nvidia and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def attention(qkv: jax.Array) -> jax.Array:
    """`plain.attention` through cuDNN where it runs (an NVIDIA GPU, 16-bit qkv), else plain JAX's."""
    if not available(qkv.dtype):
        return plain.attention(qkv)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    return padded_attention(q, k, v, multiple=CUDNN_LENGTH_MULTIPLE, implementation="cudnn")


def padded_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, multiple: int, implementation: str) -> jax.Array:
    """`jax.nn.dot_product_attention` over tokens padded to a multiple of `multiple`, the padding
    masked out as keys and dropped as queries: equal to unpadded attention."""
    batch, length = q.shape[:2]
    padded = -(-length // multiple) * multiple
    widths = ((0, 0), (0, padded - length), (0, 0), (0, 0))
    lengths = jnp.full((batch,), length, jnp.int32)
    out = jax.nn.dot_product_attention(
        jnp.pad(q, widths), jnp.pad(k, widths), jnp.pad(v, widths),
        query_seq_lengths=lengths, key_value_seq_lengths=lengths, implementation=implementation,
    )
    return out[:, :length]
