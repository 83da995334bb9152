"""BiT ResNetV2 weights, timm state dicts or the original BiT `.npz` files, as jaxclf params.

Both functions return arrays keyed by our NNX param paths (`stages/0/blocks/0/conv1/kernel`),
for `jaxclf.models.resnetv2`. Pure name and layout mapping: shapes are checked by the loader.
"""

from __future__ import annotations

import re

import numpy as np

from jaxclf.weights import torch_names

# What each format's files always hold (timm's own npz loader requires the same BiT key).
_TIMM_ANCHOR = "stem.conv.weight"
_NPZ_ANCHOR = "resnet/root_block/standardized_conv2d/kernel"

_BLOCK = "stages.{}.blocks.{}."
# timm's module names are jaxclf's; its 1x1-conv head is a Linear here. Every module is listed: a
# name outside the table is not a BiT parameter.
TABLE = torch_names.NameTable(
    "timm BiT ResNetV2",
    (torch_names.Module("stem.conv", "stem.conv"), torch_names.Module("norm", "norm"),
     *(torch_names.Module(_BLOCK + layer, _BLOCK + layer)
       for layer in ("conv1", "conv2", "conv3", "downsample.conv", "norm1", "norm2", "norm3")),
     torch_names.Module("head.fc", "head.fc", conv_as_linear=True)),
    strict=True, expected="stem.conv, stages.*, norm, head.fc",
)

_NPZ_UNIT = re.compile(r"resnet/block(\d+)/unit(\d+)/(.+)")
# BiT unit sub-layer -> ours. Pre-activation: unit `a`'s group_norm is norm1, which feeds conv1.
_NPZ_UNIT_LAYERS = {
    "a/standardized_conv2d/kernel": "conv1/kernel",
    "b/standardized_conv2d/kernel": "conv2/kernel",
    "c/standardized_conv2d/kernel": "conv3/kernel",
    "a/proj/standardized_conv2d/kernel": "downsample/conv/kernel",
    "a/group_norm/gamma": "norm1/scale",
    "a/group_norm/beta": "norm1/bias",
    "b/group_norm/gamma": "norm2/scale",
    "b/group_norm/beta": "norm2/bias",
    "c/group_norm/gamma": "norm3/scale",
    "c/group_norm/beta": "norm3/bias",
}
_NPZ_TOP_LAYERS = {
    _NPZ_ANCHOR: "stem/conv/kernel",
    "resnet/group_norm/gamma": "norm/scale",
    "resnet/group_norm/beta": "norm/bias",
    "resnet/head/conv2d/kernel": "head/fc/kernel",
    "resnet/head/conv2d/bias": "head/fc/bias",
}


def is_timm(tensors: dict[str, np.ndarray]) -> bool:
    """Whether `tensors` uses timm's ResNetV2 names (`stem.conv.weight`, `stages.0.blocks.0...`)."""
    return _TIMM_ANCHOR in tensors


def is_npz(tensors: dict[str, np.ndarray]) -> bool:
    """Whether `tensors` uses the original BiT npz names (`resnet/root_block/...`)."""
    return _NPZ_ANCHOR in tensors


def from_timm(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """timm `resnetv2_*_bit` state dict -> our params through `TABLE`: OIHW convs as HWIO, the 1x1-conv head as a Linear.

    Raises KeyError naming any key that is not a BiT ResNetV2 parameter, ValueError for a head
    that is not a 1x1 conv.
    """
    return torch_names.to_jaxclf(tensors, TABLE)


def from_npz(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Original BiT `.npz` (`resnet/block{s}/unit{NN}/{a,b,c}/...`) -> our params.

    BiT's convs are HWIO already; its 1x1-conv head [1, 1, features, classes] becomes a Linear.
    Raises KeyError naming any key that is not a BiT ResNetV2 weight.
    """
    params = {}
    for name, value in tensors.items():
        value = np.asarray(value)
        if name in _NPZ_TOP_LAYERS:
            path = _NPZ_TOP_LAYERS[name]
        elif (match := _NPZ_UNIT.fullmatch(name)) and match[3] in _NPZ_UNIT_LAYERS:
            stage, unit = int(match[1]) - 1, int(match[2]) - 1
            path = f"stages/{stage}/blocks/{unit}/{_NPZ_UNIT_LAYERS[match[3]]}"
        else:
            raise KeyError(f"{name}: not a BiT ResNetV2 weight (expected resnet/root_block, resnet/block*/unit*, "
                           "resnet/group_norm or resnet/head)")
        if path == "head/fc/kernel":
            if value.ndim != 4 or value.shape[:2] != (1, 1):
                raise ValueError(f"{name}: expected a 1x1 conv [1, 1, features, classes], got {value.shape}")
            value = value[0, 0]
        params[path] = value
    return params
