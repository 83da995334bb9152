"""The one on-device preprocessing step every model input takes: uint8 pixels to normalised float32.

Training, evaluation, inference and distillation's teacher all call it, inside their jitted programs,
so the host ships uint8 batches (a quarter of float32's bytes).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def normalize_images(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """uint8[B, H, W, 3] in 0..255 -> float32 (images / 255 - mean) / std, done on the device."""
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"normalisation needs 3 channel means and stds, got mean={mean!r} std={std!r} "
                         "(training/resolve.py fills an empty config.data.mean/std from the weights or ImageNet)")
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return (images.astype(jnp.float32) / 255.0 - mean) / std
