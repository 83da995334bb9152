"""ConvNeXt weights: timm state dicts (its names are jaxclf's) and torchvision's `convnext_*` files."""

from __future__ import annotations

import re

import numpy as np

from jaxclf.weights import torch_names

# timm's ConvNeXt names are jaxclf's: only layouts change.
TABLE = torch_names.NameTable("ConvNeXt")

# torchvision module paths -> timm's: `features.{2i+1}` are stage i's blocks, `features.{2i}` (i >= 1) its
# downsample, `features.0` the stem, `classifier.{0,2}` the head's norm and fc.
_TV_RENAMES = {
    r"^features\.0\.(\d)$": r"stem.\1",
    r"^features\.(\d+)\.(\d+)\.block\.(\d)$": lambda m: f"stages.{(int(m[1]) - 1) // 2}.blocks.{m[2]}."
                                                        + {"0": "conv_dw", "2": "norm", "3": "mlp.fc1", "5": "mlp.fc2"}[m[3]],
    r"^features\.(\d+)\.(\d)$": lambda m: f"stages.{int(m[1]) // 2}.downsample.{m[2]}",
    r"^classifier\.0$": "head.norm",
    r"^classifier\.2$": "head.fc",
}


def is_timm(tensors: dict) -> bool:
    return "stem.0.weight" in tensors and "stages.0.blocks.0.conv_dw.weight" in tensors


def is_torchvision(tensors: dict) -> bool:
    return "features.1.0.layer_scale" in tensors


def from_timm(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """timm ConvNeXt state dict -> jaxclf params, through `TABLE` (layer scale `gamma` kept as is)."""
    return torch_names.to_jaxclf(tensors, TABLE)


def from_torchvision(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """torchvision ConvNeXt renamed to timm's; its layer scale [C, 1, 1] is timm's `gamma` [C]."""
    tensors = dict(tensors)
    for name in [n for n in tensors if n.endswith(".layer_scale")]:
        m = re.fullmatch(r"features\.(\d+)\.(\d+)\.layer_scale", name)
        tensors[f"stages.{(int(m[1]) - 1) // 2}.blocks.{m[2]}.gamma"] = tensors.pop(name).reshape(-1)
    return torch_names.to_jaxclf(tensors, TABLE, _TV_RENAMES)
