"""Stochastic depth for convnets: dropping a whole residual branch per example (timm's `DropPath`)."""

from __future__ import annotations

from flax import nnx


def drop_path(rate: float, *, rngs: nnx.Rngs) -> nnx.Dropout:
    """Dropout of a residual branch x [B, H, W, C] with one mask value per example, kept branches scaled by
    1/(1 - rate) as timm; it holds an RNG stream only when it can drop anything (rate > 0)."""
    return nnx.Dropout(rate, broadcast_dims=(1, 2, 3), rngs=rngs if rate > 0 else None)
