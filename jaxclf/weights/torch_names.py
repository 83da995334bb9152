"""PyTorch state-dict names and layouts to jaxclf's and back: `a.b.weight` <-> `a/b/kernel` (or `scale`).

Each family has one `NameTable`: the modules whose PyTorch (timm / torchvision) path differs from
jaxclf's, or whose layout does, with `{}` standing for an index. `to_jaxclf` reads a state dict
through it, `to_torch` writes one (jaxclf.export --format timm), so the two directions cannot
drift apart. Leaves follow one rule: `weight` is a `kernel` (OIHW convs as HWIO, [out, in]
linears as [in, out]) or a norm's `scale`; `running_mean`/`running_var` are BatchNorm's
`mean`/`var`; `num_batches_tracked` has no counterpart (written as 0); a bare parameter of a module
(layer scale's `gamma`, EVA's `q_bias`/`v_bias`, attention pooling's `latent`) keeps its name and layout.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from jaxclf.weights import layout
from jaxclf.weights.files import WeightsError

# Buffers PyTorch keeps that have no counterpart in jaxclf.
_SKIPPED = ("num_batches_tracked",)
_LEAVES = {"bias": "bias", "running_mean": "mean", "running_var": "var"}
_TORCH_LEAVES = {"bias": "bias", "mean": "running_mean", "var": "running_var", "scale": "weight", "kernel": "weight"}
# Parameters held directly by a module (nn.Parameter attributes), the same on both sides.
_BARE = ("gamma", "q_bias", "v_bias", "latent")


@dataclasses.dataclass(frozen=True)
class Module:
    """One module's dotted path in PyTorch and in jaxclf (`{}`: an index, the same on both sides).

    `conv_as_linear`: PyTorch holds a 1x1 conv [out, in, 1, 1] where jaxclf has a Linear [in, out].
    """

    torch: str
    jaxclf: str
    conv_as_linear: bool = False

    @staticmethod
    def _pattern(template: str) -> re.Pattern:
        return re.compile(r"(\d+)".join(re.escape(part) for part in template.split("{}")))

    def match(self, path: str, side: str) -> str | None:
        """`path` (a dotted module path on `side`, "torch" or "jaxclf") on the other side, or None."""
        source, target = (self.torch, self.jaxclf) if side == "torch" else (self.jaxclf, self.torch)
        found = self._pattern(source).fullmatch(path)
        return None if found is None else target.format(*found.groups())


@dataclasses.dataclass(frozen=True)
class NameTable:
    """A family's modules whose names or layouts differ between PyTorch and jaxclf.

    With `strict`, `modules` lists every module the family has and any other name is an error
    (`expected` says what was expected); otherwise an unlisted module has the same path on both sides.
    """

    family: str
    modules: tuple[Module, ...] = ()
    strict: bool = False
    expected: str = ""

    def find(self, path: str, side: str, key: str = "") -> tuple[str, bool]:
        """(the other side's dotted path, conv_as_linear) of module `path` on `side`; `key` (default `path`)
        names it in the error of a strict table."""
        for module in self.modules:
            other = module.match(path, side)
            if other is not None:
                return other, module.conv_as_linear
        if self.strict:
            raise KeyError(f"{key or path}: not a {self.family} parameter (expected {self.expected})")
        return path, False


def to_jaxclf(tensors: dict[str, np.ndarray], table: NameTable, renames: dict | None = None) -> dict[str, np.ndarray]:
    """{"layer1/0/conv1/kernel": HWIO array, "bn1/mean": ..., ...} from a state dict named as `table`'s PyTorch side;
    `renames` first maps regexes of module paths to those names (strings or functions of the match)."""
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
        path, conv_as_linear = table.find(module, "torch", name)
        out[f"{path.replace('.', '/')}/{_leaf_name(name, leaf, value)}"] = _to_jaxclf_layout(name, value, leaf,
                                                                                              conv_as_linear)
    return out


def to_torch(params: dict[str, np.ndarray], table: NameTable) -> dict[str, np.ndarray]:
    """The inverse of `to_jaxclf`: a PyTorch state dict (with BatchNorm's `num_batches_tracked`) from jaxclf params."""
    out = {}
    for path, value in params.items():
        value = np.asarray(value)
        if "/" not in path:
            out[path] = value
            continue
        module, _, leaf = path.rpartition("/")
        if leaf in _BARE:
            torch_module, _ = table.find(module.replace("/", "."), "jaxclf", path)
            out[f"{torch_module}.{leaf}"] = value
            continue
        if leaf not in _TORCH_LEAVES:
            raise WeightsError(f"jaxclf param {path!r}: no PyTorch counterpart for a {leaf!r}")
        torch_module, conv_as_linear = table.find(module.replace("/", "."), "jaxclf", path)
        out[f"{torch_module}.{_TORCH_LEAVES[leaf]}"] = _to_torch_layout(value, leaf, conv_as_linear)
        if leaf == "mean":
            out[f"{torch_module}.num_batches_tracked"] = np.zeros((), np.int64)
    return out


def _leaf_name(name: str, leaf: str, value: np.ndarray) -> str:
    if leaf == "weight":
        return "scale" if value.ndim == 1 else "kernel"
    if leaf in _LEAVES:
        return _LEAVES[leaf]
    if leaf in _BARE:
        return leaf
    raise WeightsError(f"source key {name!r}: unknown parameter kind {leaf!r}")


def _to_jaxclf_layout(name: str, value: np.ndarray, leaf: str, conv_as_linear: bool) -> np.ndarray:
    if leaf != "weight":
        return value
    if conv_as_linear:
        if value.ndim != 4 or value.shape[2:] != (1, 1):
            raise ValueError(f"{name}: expected a 1x1 conv [out, in, 1, 1], got {value.shape}")
        return layout.linear_kernel(value[:, :, 0, 0])
    if value.ndim == 4:
        return layout.conv_kernel(value)
    if value.ndim == 2:
        return layout.linear_kernel(value)
    return value


def _to_torch_layout(value: np.ndarray, leaf: str, conv_as_linear: bool) -> np.ndarray:
    if leaf != "kernel":
        return value
    if conv_as_linear:
        return layout.linear_weight(value)[:, :, None, None]
    if value.ndim == 4:
        return layout.conv_weight(value)
    if value.ndim == 2:
        return layout.linear_weight(value)
    return value
