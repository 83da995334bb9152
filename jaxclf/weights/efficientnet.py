"""EfficientNet and MobileNetV3 weights: timm state dicts (its names are jaxclf's) and torchvision's
`efficientnet_b*` / `mobilenet_v3_large` / `mobilenet_v3_small` files (renamed to timm's)."""

from __future__ import annotations

import re
from collections import defaultdict

import numpy as np

from jaxclf.weights import torch_names

# timm's EfficientNet / MobileNetV3 names are jaxclf's: only layouts change.
TABLE = torch_names.NameTable("EfficientNet")

# timm's block group sizes of MobileNetV3 large / small, by the count of torchvision's (flat) `features.*`.
_TV_MOBILENETV3_GROUP_SIZES = {17: (1, 2, 3, 4, 2, 3, 1), 13: (1, 2, 3, 2, 3, 1)}


def is_timm(tensors: dict) -> bool:
    return "conv_stem.weight" in tensors and "blocks.0.0.conv_dw.weight" in tensors


def is_torchvision_efficientnet(tensors: dict) -> bool:
    return "features.1.0.block.0.0.weight" in tensors and "classifier.1.weight" in tensors


def is_torchvision_mobilenetv3(tensors: dict) -> bool:
    return "features.1.block.0.0.weight" in tensors and "classifier.3.weight" in tensors


def from_timm(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """timm EfficientNet / MobileNetV3 state dict -> jaxclf params, through `TABLE`."""
    return torch_names.to_jaxclf(tensors, TABLE)


def from_torchvision_efficientnet(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """torchvision EfficientNet: `features.{s}.{j}.block.*` is timm's `blocks.{s-1}.{j}.*`; `features.0`
    the stem, the last `features` the head conv, `classifier.1` the classifier."""
    last = max(int(m[1]) for m in map(re.compile(r"^features\.(\d+)\.").match, tensors) if m)
    blocks = {f"features.{s}.{j}": f"blocks.{s - 1}.{j}"
              for s, j in {(int(m[1]), int(m[2])) for m in map(re.compile(r"^features\.(\d+)\.(\d+)\.block\.").match,
                                                                     tensors) if m}}
    renamed = _rename_blocks(tensors, blocks)
    top = {"features.0.0": "conv_stem", "features.0.1": "bn1", f"features.{last}.0": "conv_head",
           f"features.{last}.1": "bn2", "classifier.1": "classifier"}
    return torch_names.to_jaxclf(_rename_modules(renamed, top), TABLE)


def from_torchvision_mobilenetv3(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """torchvision MobileNetV3: flat `features.{i}.block.*` grouped as timm's `blocks.{g}.{j}`, the last
    `features` as timm's final ConvBnAct, `classifier.0` (a Linear after pooling) as timm's 1x1 `conv_head`."""
    count = 1 + max(int(m[1]) for m in map(re.compile(r"^features\.(\d+)\.").match, tensors) if m)
    sizes = _TV_MOBILENETV3_GROUP_SIZES.get(count)
    if sizes is None:
        raise ValueError(f"a torchvision MobileNetV3 has 17 (large) or 13 (small) features, this one {count}")
    names = [f"blocks.{g}.{j}" for g, size in enumerate(sizes) for j in range(size)]
    blocks = {f"features.{i + 1}": name for i, name in enumerate(names[:-1])}
    renamed = _rename_blocks(tensors, blocks)
    tensors = dict(renamed)
    tensors["classifier.0.weight"] = tensors["classifier.0.weight"][:, :, None, None]  # Linear -> 1x1 conv
    top = {"features.0.0": "conv_stem", "features.0.1": "bn1", f"features.{count - 1}.0": f"{names[-1]}.conv",
           f"features.{count - 1}.1": f"{names[-1]}.bn1", "classifier.0": "conv_head", "classifier.3": "classifier"}
    return torch_names.to_jaxclf(_rename_modules(tensors, top), TABLE)


def _rename_modules(tensors: dict[str, np.ndarray], modules: dict[str, str]) -> dict[str, np.ndarray]:
    """Leaves of module `old` (a key of `modules`) moved to module `modules[old]`."""
    out = {}
    for name, value in tensors.items():
        module, _, leaf = name.rpartition(".")
        out[f"{modules.get(module, module)}.{leaf}"] = value
    return out


def _rename_blocks(tensors: dict[str, np.ndarray], blocks: dict[str, str]) -> dict[str, np.ndarray]:
    """torchvision's MBConv / InvertedResidual blocks (`{prefix}.block.{k}.{0: conv, 1: bn}` in order, and an
    SE with `fc1`/`fc2`) renamed to timm's: three convs are conv_pw/bn1, conv_dw/bn2, conv_pwl/bn3 (an
    inverted residual), two are conv_dw/bn1, conv_pw/bn2 (depthwise-separable)."""
    layers = defaultdict(set)
    for name in tensors:
        for prefix in blocks:
            if (m := re.match(re.escape(prefix) + r"\.block\.(\d+)\.", name)):
                layers[prefix].add(int(m[1]))
    modules = {}
    for prefix, indices in layers.items():
        se = {i for i in indices if f"{prefix}.block.{i}.fc1.weight" in tensors}
        convs = sorted(indices - se)
        names = (("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3")) if len(convs) == 3 else (
            ("conv_dw", "bn1"), ("conv_pw", "bn2"))
        target = blocks[prefix]
        for index, (conv, bn) in zip(convs, names):
            modules[f"{prefix}.block.{index}.0"] = f"{target}.{conv}"
            modules[f"{prefix}.block.{index}.1"] = f"{target}.{bn}"
        for index in se:
            modules[f"{prefix}.block.{index}.fc1"] = f"{target}.se.conv_reduce"
            modules[f"{prefix}.block.{index}.fc2"] = f"{target}.se.conv_expand"
    return _rename_modules(tensors, modules)
