"""The op framework: a registry of named ops, the spec parser, argument checks and image conversions.

An image travels between ops as a `PIL.Image.Image` (mode "RGB") or a `uint8[H, W, 3]` numpy
array; each op takes either and returns the kind it computes in, so a chain of PIL ops
(decode -> crop -> flip) never converts the full-size image to numpy. The loader turns the last
op's output into a numpy array before batching (`to_array`).
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Callable

import grain
import numpy as np
from PIL import Image

Op = grain.transforms.Map | grain.transforms.RandomMap
ImageLike = Image.Image | np.ndarray

_OPS: dict[str, type] = {}

RESAMPLING = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def register_op(name: str) -> Callable[[type], type]:
    """Register a `Map`/`RandomMap` subclass so specs can name it `name(args...)`."""

    def register(cls: type) -> type:
        if not issubclass(cls, (grain.transforms.Map, grain.transforms.RandomMap)):
            raise TypeError(f"op {name!r}: {cls.__qualname__} must subclass grain.transforms.Map or RandomMap")
        known = _OPS.get(name)
        # Re-registering the same class (a reloaded module) is fine; shadowing another op is not.
        if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"op {name!r} is already registered by {known.__module__}.{known.__qualname__}")
        _OPS[name] = cls
        return cls

    return register


def parse_ops(spec: str) -> list[Op]:
    """Build the ops named in `spec` ("op1|op2(arg, key=value)|..."), in order."""
    ops = []
    for part in spec.split("|"):
        part = part.strip()
        try:
            node = ast.parse(part, mode="eval").body
        except SyntaxError:
            raise ValueError(f"cannot parse op {part!r} in {spec!r}; write ops as name or name(args)") from None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            name, arg_nodes, kwarg_nodes = node.func.id, node.args, node.keywords
        elif isinstance(node, ast.Name):
            name, arg_nodes, kwarg_nodes = node.id, [], []
        else:
            raise ValueError(f"cannot parse op {part!r} in {spec!r}; write ops as name or name(args)")
        if name not in _OPS:
            raise ValueError(f"unknown op {name!r} in {spec!r}; known ops: {', '.join(sorted(_OPS))}")
        cls = _OPS[name]
        try:
            args = [ast.literal_eval(a) for a in arg_nodes]
            kwargs = {k.arg: ast.literal_eval(k.value) for k in kwarg_nodes}
            ops.append(cls(*args, **kwargs))
        except (ValueError, TypeError, SyntaxError) as e:
            raise ValueError(
                f"bad arguments for op {name!r} in {spec!r}: {e}; signature: {name}{inspect.signature(cls)} "
                "(arguments must be Python literals)"
            ) from None
    return ops


def as_pil(image: ImageLike) -> Image.Image:
    """The image as a PIL image (no copy if it is one)."""
    return image if isinstance(image, Image.Image) else Image.fromarray(image)


def as_array(image: ImageLike) -> np.ndarray:
    """The image as a writable `uint8[H, W, 3]` array (no copy if it is one)."""
    return np.array(image) if isinstance(image, Image.Image) else image


def image_size(image: ImageLike) -> tuple[int, int]:
    """(height, width) of either kind of image."""
    return (image.height, image.width) if isinstance(image, Image.Image) else image.shape[:2]


def check_size(size: int) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ValueError(f"size must be a positive int, got {size!r}")


def check_method(method: str) -> None:
    if method not in RESAMPLING:
        raise ValueError(f"method must be one of {sorted(RESAMPLING)}, got {method!r}")


def check_range(name: str, value: tuple[float, float]) -> None:
    if not (isinstance(value, tuple) and len(value) == 2 and 0 < value[0] <= value[1]):
        raise ValueError(f"{name} must be a tuple (low, high) with 0 < low <= high, got {value!r}")


def check_probability(p: float) -> None:
    if not (isinstance(p, (int, float)) and 0 <= p <= 1):
        raise ValueError(f"p must be in [0, 1], got {p!r}")


def check_fill(fill: int | tuple[int, int, int]) -> None:
    values = fill if isinstance(fill, tuple) else (fill,)
    if len(values) not in (1, 3) or not all(isinstance(v, int) and 0 <= v <= 255 for v in values):
        raise ValueError(f"fill must be an int 0..255 or a tuple of 3 of them, got {fill!r}")


def pil_fill(fill: int | tuple[int, int, int]) -> tuple[int, int, int]:
    """`fill` as the RGB tuple PIL's `fillcolor` wants."""
    return fill if isinstance(fill, tuple) else (fill,) * 3
