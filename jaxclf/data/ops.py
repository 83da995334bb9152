"""Preprocessing ops, named in order by a config string: `"decode|inception_crop(224)|flip_lr"`.

Each op is a grain transform mapping an example dict to an example dict; images stay
`uint8[H, W, 3]` numpy arrays (normalisation to float happens on the device, in the jitted step,
so the workers do no float work and ship 4x fewer bytes). Random ops are `grain.transforms.RandomMap`
and draw only from the per-record `np.random.Generator` grain passes in, so a seed fixes every crop.

Adding an op: subclass `grain.transforms.Map` (or `RandomMap`) as a dataclass whose fields are the
op's arguments, and register it under the name configs use; import the module before parsing:

    @register_op("grayscale")
    @dataclasses.dataclass(frozen=True)
    class Grayscale(grain.transforms.Map):
        def map(self, example: dict) -> dict:
            gray = example["image"].mean(axis=2, keepdims=True).round().astype(np.uint8)
            return {**example, "image": np.repeat(gray, 3, axis=2)}

The class must live at module level of an importable module: grain pickles ops into its worker
processes. Arguments in a spec are Python literals (`ast.literal_eval`: numbers, strings, tuples).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
from collections.abc import Callable

import grain
import numpy as np
from PIL import Image, ImageOps

from jaxclf.data.sources import DataError

Op = grain.transforms.Map | grain.transforms.RandomMap

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


def _check_size(size: int) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ValueError(f"size must be a positive int, got {size!r}")


def _check_method(method: str) -> None:
    if method not in RESAMPLING:
        raise ValueError(f"method must be one of {sorted(RESAMPLING)}, got {method!r}")


def _check_range(name: str, value: tuple[float, float]) -> None:
    if not (isinstance(value, tuple) and len(value) == 2 and 0 < value[0] <= value[1]):
        raise ValueError(f"{name} must be a tuple (low, high) with 0 < low <= high, got {value!r}")


def _resize(image: np.ndarray, height: int, width: int, method: str) -> np.ndarray:
    """Resize `image: uint8[H, W, 3]` to uint8[height, width, 3] with PIL (antialiased when shrinking)."""
    return np.asarray(Image.fromarray(image).resize((width, height), RESAMPLING[method]))


@register_op("decode")
@dataclasses.dataclass(frozen=True)
class Decode(grain.transforms.Map):
    """Read example["path"] into example["image"]: uint8[H, W, 3] RGB, EXIF orientation applied."""

    def map(self, example: dict) -> dict:
        example = dict(example)
        path = example.pop("path")
        try:
            with Image.open(path) as img:
                img = ImageOps.exif_transpose(img).convert("RGB")
        except OSError as e:  # PIL.UnidentifiedImageError is an OSError
            raise DataError(f"{path}: cannot decode the image ({e}); replace or remove the file") from None
        example["image"] = np.asarray(img)
        return example


@register_op("inception_crop")
@dataclasses.dataclass(frozen=True)
class InceptionCrop(grain.transforms.RandomMap):
    """Random crop of area `scale` and aspect `ratio`, resized to `size x size` (torchvision RandomResizedCrop).

    After 10 rejected draws it falls back to the largest central crop with the aspect clamped into `ratio`.
    """

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    method: str = "bilinear"

    def __post_init__(self):
        _check_size(self.size)
        _check_range("scale", self.scale)
        _check_range("ratio", self.ratio)
        _check_method(self.method)

    def crop_box(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """The crop (top, left, crop_height, crop_width) for a `height x width` image."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            w, h = round(height * self.ratio[1]), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def random_map(self, example: dict, rng: np.random.Generator) -> dict:
        image = example["image"]
        top, left, h, w = self.crop_box(image.shape[0], image.shape[1], rng)
        crop = np.ascontiguousarray(image[top : top + h, left : left + w])
        return {**example, "image": _resize(crop, self.size, self.size, self.method)}


@register_op("flip_lr")
@dataclasses.dataclass(frozen=True)
class FlipLr(grain.transforms.RandomMap):
    """Mirror the image left-right with probability `p`."""

    p: float = 0.5

    def __post_init__(self):
        if not 0 <= self.p <= 1:
            raise ValueError(f"p must be in [0, 1], got {self.p!r}")

    def random_map(self, example: dict, rng: np.random.Generator) -> dict:
        if rng.random() < self.p:
            return {**example, "image": np.ascontiguousarray(example["image"][:, ::-1])}
        return example


@register_op("resize_small")
@dataclasses.dataclass(frozen=True)
class ResizeSmall(grain.transforms.Map):
    """Resize the shorter side to `size`, keeping the aspect (long side truncated, as torchvision Resize(int))."""

    size: int
    method: str = "bilinear"

    def __post_init__(self):
        _check_size(self.size)
        _check_method(self.method)

    def map(self, example: dict) -> dict:
        h, w = example["image"].shape[:2]
        if h <= w:
            new_h, new_w = self.size, int(self.size * w / h)
        else:
            new_h, new_w = int(self.size * h / w), self.size
        return {**example, "image": _resize(example["image"], new_h, new_w, self.method)}


@register_op("central_crop")
@dataclasses.dataclass(frozen=True)
class CentralCrop(grain.transforms.Map):
    """Crop the central `size x size` window (offsets rounded down)."""

    size: int

    def __post_init__(self):
        _check_size(self.size)

    def map(self, example: dict) -> dict:
        image = example["image"]
        h, w = image.shape[:2]
        if h < self.size or w < self.size:
            raise ValueError(
                f"central_crop({self.size}) got a {h}x{w} image; put resize_small({self.size}) or larger before it"
            )
        top, left = (h - self.size) // 2, (w - self.size) // 2
        crop = image[top : top + self.size, left : left + self.size]
        return {**example, "image": np.ascontiguousarray(crop)}


@register_op("resize")
@dataclasses.dataclass(frozen=True)
class Resize(grain.transforms.Map):
    """Resize to `size x size`, ignoring the aspect."""

    size: int
    method: str = "bilinear"

    def __post_init__(self):
        _check_size(self.size)
        _check_method(self.method)

    def map(self, example: dict) -> dict:
        return {**example, "image": _resize(example["image"], self.size, self.size, self.method)}
