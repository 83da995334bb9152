"""Model registry: `create(name, num_classes=...)` builds any registered image classifier.

A model file registers factories `fn(num_classes, rngs, dtype, **kwargs) -> nnx.Module` with
`@register(name)`, so adding a model family touches no other file. Every model maps
`images: float32[B, H, W, 3]` (normalised, NHWC) to `logits: float32[B, num_classes]`; `dtype` is
the compute dtype, params are always float32; `model.train()` / `model.eval()` set the mode.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
from flax import nnx

Factory = Callable[..., nnx.Module]

_REGISTRY: dict[str, Factory] = {}
# Arguments every factory takes from `create` itself; the rest are the model's own options.
_COMMON_ARGS = ("num_classes", "rngs", "dtype")


def register(name: str) -> Callable[[Factory], Factory]:
    """Decorator registering `factory(num_classes, rngs, dtype, **options)` under `name`."""

    def decorator(factory: Factory) -> Factory:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice; model names must be unique")
        _REGISTRY[name] = factory
        return factory

    return decorator


def list_models() -> list[str]:
    """Sorted names of all registered models."""
    return sorted(_REGISTRY)


def create(
    name: str,
    *,
    num_classes: int,
    rngs: nnx.Rngs | None = None,
    dtype: Any = jnp.float32,
    **kwargs: Any,
) -> nnx.Module:
    """Builds the registered model `name` with a `num_classes`-way head (`rngs` default `Rngs(0)`).

    Raises ValueError for an unknown name (suggesting the closest ones) and TypeError for an
    option the model does not accept.
    """
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        raise ValueError(
            f"unknown model {name!r}: {hint}available models: {', '.join(list_models())}"
        )
    factory = _REGISTRY[name]
    accepted = sorted(p for p in inspect.signature(factory).parameters if p not in _COMMON_ARGS)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(
            f"model {name!r} got unknown keyword argument(s) {', '.join(unknown)}; "
            f"it accepts: {', '.join(accepted) or 'no options'}"
        )
    return factory(num_classes, rngs if rngs is not None else nnx.Rngs(0), dtype, **kwargs)


# Imported last because the model files call `register` while being imported.
from jaxclf.models import resnet, resnetv2, vit  # noqa: E402,F401
