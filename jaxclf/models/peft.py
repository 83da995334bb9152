"""LoRA (`config.peft`): low-rank adapters beside a model's linear and conv layers, and `merge` to fold them away.

`apply_lora` replaces every `nnx.Linear` / `nnx.Conv` whose path matches `config.peft.targets` (regexes
searched in module paths such as `blocks/3/attn/qkv` or `layer2/0/conv1`; never the head) by a
`LoRAAdapter` around it: `base(x) + alpha / rank * dropout(x) @ A @ B`, with A [fan_in, rank] and
B [rank, out] as `nnx.LoRAParam` variables created by `nnx.LoRA` (A he-uniform, B zero, so the
adapted model starts equal to the base). A conv's A is a conv of the base's window and stride
into `rank` channels (as qwix and PEFT adapt convolutions). The optimizer sees the `LoRAParam`s
and trains only them and the head (`optim.frozen_mask`). `merge` gives back the plain model with
`W + alpha / rank * A @ B` in each base layer, for evaluate, predict, export and serve.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import ml_collections
from flax import nnx

from jaxclf import models
from jaxclf.config import ConfigError
from jaxclf.models import layers

METHODS = ("", "lora")


class PeftConfigError(ConfigError):
    """An unusable `config.peft`; the message names the field."""


class LoRAAdapter(nnx.LoRA):
    """`nnx.LoRA` around a Linear or Conv `base_module`, with LoRA's alpha/rank scale and dropout on its input.

    x: the base layer's input -> the base layer's output plus the low-rank update.
    """

    def __init__(self, base_module: nnx.Linear | nnx.Conv, *, rank: int, alpha: float, dropout: float,
                 rngs: nnx.Rngs):
        kernel_shape = base_module.kernel.shape  # Linear [in, out]; Conv [*window, in, out]
        if isinstance(base_module, nnx.Conv):
            _check_conv(base_module)
        super().__init__(math.prod(kernel_shape[:-1]), rank, kernel_shape[-1], base_module=base_module, dtype=base_module.dtype,
                         rngs=rngs)
        self.scale = alpha / rank
        self.dropout = nnx.Dropout(dropout, rngs=rngs if dropout > 0 else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        base = self.base_module
        dtype = self.dtype or x.dtype
        h = self.dropout(x).astype(dtype)
        down = self.lora_a[...].astype(dtype)
        if isinstance(base, nnx.Conv):
            window = base.kernel.shape[:-2]
            down = down.reshape(*base.kernel.shape[:-1], -1)
            padding = nnx.nn.linear.canonicalize_padding(base.padding, len(window))
            dims = jax.lax.conv_dimension_numbers(h.shape, down.shape, ("NHWC", "HWIO", "NHWC"))
            h = layers.conv_general_dilated(h, down, _per_axis(base.strides, len(window)), padding,
                                            rhs_dilation=_per_axis(base.kernel_dilation, len(window)),
                                            dimension_numbers=dims)
        else:
            h = h @ down
        return base(x) + self.scale * (h @ self.lora_b[...].astype(dtype))

    def merged(self) -> nnx.Linear | nnx.Conv:
        """The base layer with `kernel + scale * A @ B`: the same function without the adapter (dropout off)."""
        base = self.base_module
        delta = (self.lora_a[...] @ self.lora_b[...]).reshape(base.kernel.shape)
        base.kernel[...] = base.kernel[...] + self.scale * delta
        return base


def _per_axis(value, n: int) -> tuple[int, ...]:
    """nnx.Conv's strides / dilation (None, an int or one per axis) as one int per spatial axis."""
    if value is None:
        return (1,) * n
    return (value,) * n if isinstance(value, int) else tuple(value)


def _check_conv(conv: nnx.Conv) -> None:
    """The convolutions an adapter's down-projection can mirror: ungrouped, not input-dilated, padded
    SAME, VALID or explicitly."""
    padding = nnx.nn.linear.canonicalize_padding(conv.padding, len(conv.kernel.shape) - 2)
    if conv.feature_group_count != 1 or conv.input_dilation not in (1, None) or padding in ("CIRCULAR", "REFLECT", "CAUSAL"):
        raise PeftConfigError(f"config.peft.targets matched a convolution (groups {conv.feature_group_count}, "
                              f"padding {conv.padding!r}) that LoRA does not adapt: use a pattern that leaves it out")


def check(peft: ml_collections.ConfigDict) -> None:
    """Raise `PeftConfigError` naming the field for an unknown method, rank < 1, alpha <= 0 or dropout
    outside [0, 1)."""
    if peft.method not in METHODS:
        raise PeftConfigError(f"config.peft.method={peft.method!r}: use 'lora' or '' (full fine-tuning)")
    if not peft.method:
        return
    if int(peft.rank) < 1:
        raise PeftConfigError(f"config.peft.rank={peft.rank}: the adapters' rank must be at least 1")
    if peft.alpha <= 0:
        raise PeftConfigError(f"config.peft.alpha={peft.alpha}: the scale alpha / rank must be positive")
    if not 0 <= peft.dropout < 1:
        raise PeftConfigError(f"config.peft.dropout={peft.dropout}: use a rate in [0, 1)")
    if not peft.targets:
        raise PeftConfigError("config.peft.targets is empty: name the layers to adapt, e.g. ('qkv', 'proj')")


def apply_lora(model: models.Classifier, peft: ml_collections.ConfigDict, rngs: nnx.Rngs) -> list[str]:
    """Wrap the layers of `model` that `peft.targets` match in `LoRAAdapter`s (in place); return their paths.

    Raises `PeftConfigError` when a target matches nothing, so a mistyped pattern never trains the head alone.
    """
    check(peft)
    patterns = [re.compile(p) for p in peft.targets]
    head = model.head_paths()
    found = []
    for path, module in list(nnx.iter_modules(model)):
        name = "/".join(map(str, path))
        if not isinstance(module, (nnx.Linear, nnx.Conv)) or models.matches(name, head) or not name:
            continue
        if any(p.search(name) for p in patterns):
            found.append((path, module))
    unmatched = [p.pattern for p in patterns if not any(p.search("/".join(map(str, path))) for path, _ in found)]
    if unmatched:
        raise PeftConfigError(
            f"config.peft.targets {unmatched} match no Linear or Conv layer of {type(model).__name__} "
            f"outside the head; its layers are e.g. {', '.join(_layer_names(model)[:8])}")
    for path, module in found:
        _set(model, path, LoRAAdapter(module, rank=int(peft.rank), alpha=float(peft.alpha),
                                      dropout=float(peft.dropout), rngs=rngs))
    return ["/".join(map(str, path)) for path, _ in found]


def merge(model: models.Classifier) -> list[str]:
    """Fold every `LoRAAdapter` of `model` into its base layer (in place); return the merged paths.

    Afterwards the model has the parameter tree of the plain model, as evaluate, export and serve expect.
    """
    adapters = [(path, m) for path, m in nnx.iter_modules(model) if isinstance(m, LoRAAdapter)]
    for path, adapter in adapters:
        _set(model, path, adapter.merged())
    return ["/".join(map(str, path)) for path, _ in adapters]


def from_config(model: models.Classifier, config: ml_collections.ConfigDict) -> list[str]:
    """Apply `config.peft` to `model` (nothing for method ""), adapters seeded from `config.seed`."""
    check(config.peft)
    if not config.peft.method:
        return []
    return apply_lora(model, config.peft, nnx.Rngs(params=config.seed + 1, dropout=config.seed + 2))


def _set(model: nnx.Module, path: tuple, value: Any) -> None:
    parent = model
    for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    if isinstance(path[-1], int):
        parent[path[-1]] = value
    else:
        setattr(parent, path[-1], value)


def _layer_names(model: nnx.Module) -> list[str]:
    return ["/".join(map(str, p)) for p, m in nnx.iter_modules(model) if isinstance(m, (nnx.Linear, nnx.Conv))]
