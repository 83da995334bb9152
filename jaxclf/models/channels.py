"""Structured channel pruning: drop the least important inner channels of each block, giving a smaller model.

A model that supports it lists its prunable channel groups (`Classifier.channel_groups()`): the channels of one
block's inner width (a ResNet block's conv1/conv2 outputs, an inverted residual's expanded channels) that are
produced by some params (sliced on their last axis: conv kernels, BatchNorm scale/bias/statistics, depthwise
kernels, SE expand) and read by others (sliced on the input-channel axis, -2, of conv kernels). Channels are
ranked by the L1 norm of the producing conv's filters; the kept ones, in their order, make the pruned model,
built with the widths `block_widths()` gives (a model option, so a run's config.json rebuilds it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from flax import nnx

from jaxclf.models import tree_paths

BN_FIELDS = ("scale", "bias", "mean", "var")


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    """One block's inner channels. `block`: its index in the model's `block_widths`; `score`: the conv kernel whose
    output filters rank them; `outputs`: paths sliced on the last axis; `inputs`: conv kernels sliced on axis -2."""

    block: int
    score: str
    outputs: tuple[str, ...]
    inputs: tuple[str, ...]


def batch_norm(prefix: str) -> tuple[str, ...]:
    """The paths of a BatchNorm's per-channel arrays under `prefix`."""
    return tuple(f"{prefix}/{field}" for field in BN_FIELDS)


def kept_channels(state: dict[str, np.ndarray], groups: Sequence[ChannelGroup], fraction: float) -> list[np.ndarray]:
    """Per group, the sorted indices of the channels kept when `fraction` of them (rounded, at least one kept)
    with the smallest filter L1 norms are dropped. `state`: the model's arrays by path."""
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction={fraction}: use a share of channels to drop in [0, 1)")
    kept = []
    for group in groups:
        kernel = np.asarray(state[group.score])
        norms = np.abs(kernel).reshape(-1, kernel.shape[-1]).sum(axis=0)
        keep = max(1, kernel.shape[-1] - int(round(fraction * kernel.shape[-1])))
        kept.append(np.sort(np.argsort(-norms, kind="stable")[:keep]))
    return kept


def sliced(state: dict[str, np.ndarray], groups: Sequence[ChannelGroup], kept: Sequence[np.ndarray]
           ) -> dict[str, np.ndarray]:
    """`state` with every group's outputs and inputs cut to its kept channels (the other arrays as they are)."""
    out = dict(state)
    for group, indices in zip(groups, kept):
        for path in group.outputs:
            out[path] = np.take(np.asarray(out[path]), indices, axis=-1)
        for path in group.inputs:
            out[path] = np.take(np.asarray(out[path]), indices, axis=-2)
    return out


def block_widths(current: Sequence[int], groups: Sequence[ChannelGroup], kept: Sequence[np.ndarray]) -> tuple[int, ...]:
    """The `block_widths` option of the pruned model: `current` (the model's own) with each pruned block's width
    replaced by its kept count (a block with several groups keeps the same count in each)."""
    widths = list(current)
    for group, indices in zip(groups, kept):
        widths[group.block] = len(indices)
    return tuple(widths)


def plan(model, fraction: float) -> tuple[tuple[int, ...], dict[str, np.ndarray]]:
    """(block_widths, arrays by path) of `model` (a Classifier listing `channel_groups()`) with `fraction` of each
    group's channels dropped: build the model with those widths and load the arrays into it."""
    state = {name: np.asarray(leaf) for name, leaf in tree_paths.flatten(nnx.state(model, nnx.Not(nnx.RngState))).items()}
    groups = model.channel_groups()
    kept = kept_channels(state, groups, fraction)
    return block_widths(model.block_widths, groups, kept), sliced(state, groups, kept)
