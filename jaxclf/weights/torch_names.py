"""PyTorch state-dict names and layouts to jaxclf's: `a.b.weight` -> `a/b/kernel` (or `scale`).

jaxclf's ResNet and ViT keep torchvision's and timm's module names, so once a source's names are
renamed to those (Hugging Face checkpoints need that), one generic rule converts every tensor.
"""

from __future__ import annotations

import re

import numpy as np

from jaxclf.weights import layout
from jaxclf.weights.files import WeightsError

# Buffers PyTorch keeps that have no counterpart in jaxclf.
_SKIPPED = ("num_batches_tracked",)
_LEAVES = {"bias": "bias", "running_mean": "mean", "running_var": "var"}


def convert(tensors: dict[str, np.ndarray], renames: dict | None = None) -> dict[str, np.ndarray]:
    """{"layer1/0/conv1/kernel": HWIO array, "bn1/mean": ..., ...} from a torchvision/timm-named state dict;
    `renames` maps regexes of module paths to replacements (strings or functions of the match)."""
    out = {}
    for name, value in tensors.items():
        if name.endswith(_SKIPPED):
            continue
        if "." not in name:  # a bare parameter such as timm's cls_token / pos_embed
            out[name] = value
            continue
        module, _, leaf = name.rpartition(".")
        for pattern, replacement in (renames or {}).items():
            module = re.sub(pattern, replacement, module)
        path = module.replace(".", "/")
        out[f"{path}/{_leaf_name(name, leaf, value)}"] = _layout(value, leaf)
    return out


def _leaf_name(name: str, leaf: str, value: np.ndarray) -> str:
    if leaf == "weight":
        return "scale" if value.ndim == 1 else "kernel"
    if leaf in _LEAVES:
        return _LEAVES[leaf]
    raise WeightsError(f"source key {name!r}: unknown parameter kind {leaf!r}")


def _layout(value: np.ndarray, leaf: str) -> np.ndarray:
    if leaf != "weight":
        return value
    if value.ndim == 4:
        return layout.conv_kernel(value)
    if value.ndim == 2:
        return layout.linear_kernel(value)
    return value
