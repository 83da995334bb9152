"""ResNet weights: torchvision / timm state dicts and Hugging Face `ResNetForImageClassification`."""

from __future__ import annotations

import numpy as np

from jaxclf.weights import torch_names

# torchvision's and timm's ResNet names are jaxclf's: only layouts change.
TABLE = torch_names.NameTable("ResNet")

_HF_STAGE = r"^resnet\.encoder\.stages\.(\d+)\.layers\.(\d+)\."


def _block(m, suffix: str) -> str:
    """torchvision's 'layer{stage}.{block}.' from HF's 0-based stage index, then `suffix`."""
    return f"layer{int(m[1]) + 1}.{m[2]}.{suffix}"


# Hugging Face module names -> torchvision's (HF counts stages and convs from 0, torchvision from 1).
_HF_RENAMES = {
    r"^resnet\.embedder\.embedder\.convolution$": "conv1",
    r"^resnet\.embedder\.embedder\.normalization$": "bn1",
    _HF_STAGE + r"shortcut\.convolution$": lambda m: _block(m, "downsample.0"),
    _HF_STAGE + r"shortcut\.normalization$": lambda m: _block(m, "downsample.1"),
    _HF_STAGE + r"layer\.(\d+)\.convolution$": lambda m: _block(m, f"conv{int(m[3]) + 1}"),
    _HF_STAGE + r"layer\.(\d+)\.normalization$": lambda m: _block(m, f"bn{int(m[3]) + 1}"),
    r"^classifier\.1$": "fc",
}


def is_torchvision(tensors: dict) -> bool:
    return "conv1.weight" in tensors and "layer1.0.conv1.weight" in tensors


def is_hf(tensors: dict) -> bool:
    return "resnet.embedder.embedder.convolution.weight" in tensors


def from_torchvision(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """torchvision / timm ResNet state dict -> jaxclf params, through `TABLE`."""
    return torch_names.to_jaxclf(tensors, TABLE)


def from_hf(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Hugging Face names renamed to torchvision's, then `TABLE`."""
    return torch_names.to_jaxclf(tensors, TABLE, _HF_RENAMES)
