"""Random initializers equal to `jax.nn.initializers`' bit for bit, compiled per chunk size, not per shape.

jax compiles `jax.random.normal(key, shape)`, and the scaling after it, once for every new shape, and one
model meets dozens of shapes: those compilations were most of `models.create`'s time. With jax's
partitionable threefry (its default), element i of a draw is `threefry(key, counter=i)`, whatever the shape.
So a tensor of n elements is drawn here in chunks: elements [offset, offset + chunk) come from a key that
carries `offset` (`_OFFSET_THREEFRY`, a PRNG implementation whose counters start there), through
`jax.random`'s own samplers, and the chunks are joined and scaled on the host. A few programs (two chunk
sizes per distribution) then serve every shape of every model in the process. The values are the ones
`jax.nn.initializers` gives for the same key (tests/test_models.py compares them); a traced key
(`nnx.eval_shape`, a jitted construction), another PRNG or non-partitionable threefry takes jax's own.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import random as jax_random

Initializer = Callable[..., jax.Array]  # (key, shape, dtype=float32) -> Array, as jax.nn.initializers
CHUNK_SIZES = (2**12, 2**18)  # compiled draw sizes: a tensor takes the smallest that holds it, or chunks of the last
_TRUNCATED_STD = 0.87962566103423978  # std of a standard normal truncated to (-2, 2), as jax's variance_scaling


def _offset_random_bits(key_data: jax.Array, bit_width: int, shape: tuple[int, ...]) -> jax.Array:
    """jax's partitionable threefry bits for flat indices `offset + i`; key_data: uint32[3] (key, offset)."""
    size = math.prod(shape)
    low = key_data[2] + jax.lax.iota(jnp.uint32, size)
    bits1, bits2 = jax_random.threefry2x32_p.bind(key_data[0], key_data[1], jnp.zeros_like(low), low)
    if bit_width == 64:
        bits = jax.lax.shift_left(bits1.astype(jnp.uint64), jnp.uint64(32)) | bits2.astype(jnp.uint64)
    else:
        bits = (bits1 ^ bits2).astype(jnp.dtype(f"uint{bit_width}"))
    return bits.reshape(shape)


def _draws_only(*args: Any) -> jax.Array:
    raise NotImplementedError("jaxclf's offset threefry only draws chunks of a parameter; split and fold_in "
                              "belong to the model's own key")


_OFFSET_THREEFRY = jax_random.define_prng_impl(
    key_shape=(3,), seed=_draws_only, split=_draws_only, fold_in=_draws_only, random_bits=_offset_random_bits,
    name="jaxclf_offset_threefry2x32")


@functools.partial(jax.jit, static_argnames=("size", "dtype", "distribution"))
def _draw_chunk(key_data: jax.Array, offset: jax.Array, *, size: int, dtype: Any, distribution: str) -> jax.Array:
    """Elements [offset, offset + size) of the flat draw `distribution` makes from the threefry key `key_data`."""
    key = jax.random.wrap_key_data(jnp.append(key_data, offset), impl=_OFFSET_THREEFRY)
    if distribution == "normal":
        return jax.random.normal(key, (size,), dtype)
    if distribution == "truncated_normal":
        return jax.random.truncated_normal(key, -2.0, 2.0, (size,), dtype)
    return jax.random.uniform(key, (size,), dtype, -1.0)  # jax's variance_scaling "uniform": U[-1, 1)


def _fast_path(key: jax.Array) -> bool:
    """Whether `key` is a concrete threefry key drawn the partitionable way (the case chunks reproduce)."""
    return (jax.config.jax_threefry_partitionable and not isinstance(key, jax.core.Tracer)
            and jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and str(jax.random.key_impl(key)) == "threefry2x32")


def _draw(key: jax.Array, shape: Sequence[int], dtype: Any, distribution: str, multiplier: np.ndarray,
          reference: Initializer) -> jax.Array:
    """`reference(key, shape, dtype)`: the draw of `distribution` times `multiplier`, computed in chunks."""
    shape, dtype = tuple(int(d) for d in shape), np.dtype(dtype)
    size = math.prod(shape)
    if not _fast_path(key) or size >= 2**32:
        return reference(key, shape, dtype)
    chunk = next((c for c in CHUNK_SIZES if c >= size), CHUNK_SIZES[-1])
    key_data = jax.random.key_data(key)
    chunks = [np.asarray(_draw_chunk(key_data, np.uint32(offset), size=chunk, dtype=dtype, distribution=distribution))
              for offset in range(0, size, chunk)]
    values = np.concatenate(chunks)[:size].reshape(shape) * multiplier
    return jax.device_put(values)


def normal(stddev: float = 1e-2) -> Initializer:
    """`jax.nn.initializers.normal(stddev)`: N(0, stddev^2)."""
    reference = jax.nn.initializers.normal(stddev)

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        return _draw(key, shape, dtype, "normal", np.asarray(stddev, dtype), reference)

    return init


def truncated_normal(stddev: float = 1e-2) -> Initializer:
    """`jax.nn.initializers.truncated_normal(stddev)`: N(0, 1) truncated to (-2, 2), times `stddev`."""
    reference = jax.nn.initializers.truncated_normal(stddev)

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        return _draw(key, shape, dtype, "truncated_normal", np.asarray(stddev, dtype), reference)

    return init


def variance_scaling(scale: float, mode: str, distribution: str) -> Initializer:
    """`jax.nn.initializers.variance_scaling(scale, mode, distribution)` with its default axes (inputs -2, outputs
    -1, the rest the receptive field): variance `scale / fan`, fan from `mode` ("fan_in", "fan_out", "fan_avg")."""
    if mode not in ("fan_in", "fan_out", "fan_avg"):
        raise ValueError(f"variance_scaling mode={mode!r}: use 'fan_in', 'fan_out' or 'fan_avg'")
    if distribution not in ("normal", "truncated_normal", "uniform"):
        raise ValueError(f"variance_scaling distribution={distribution!r}: use normal, truncated_normal or uniform")
    reference = jax.nn.initializers.variance_scaling(scale, mode, distribution)

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        if len(shape) < 2:
            raise ValueError(f"variance_scaling needs a weight of rank >= 2 for its fans, got shape {tuple(shape)}")
        receptive_field = math.prod(shape) / shape[-2] / shape[-1]
        fan_in, fan_out = shape[-2] * receptive_field, shape[-1] * receptive_field
        fan = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]
        # jax's float32 arithmetic, so the multiplier is the same float.
        variance = np.asarray(scale / fan, dtype)
        if distribution == "truncated_normal":
            multiplier = np.sqrt(variance) / np.asarray(_TRUNCATED_STD, dtype)
        elif distribution == "uniform":
            multiplier = np.sqrt(np.asarray(3, dtype) * variance)
        else:
            multiplier = np.sqrt(variance)
        return _draw(key, shape, dtype, distribution, multiplier, reference)

    return init
