"""RandAugment and TrivialAugment: random choices from torchvision's 14 PIL augmentations.

Each augmentation takes a value in its own unit (shear factor, pixels, degrees, enhancement
delta, bits kept, threshold); `augment(image, name, value)` equals torchvision's `_apply_op`.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from jaxclf.data.ops.base import RESAMPLING, as_pil, check_fill, check_method, pil_fill, register_op


def _affine(image: Image.Image, matrix: tuple, method: str, fill) -> Image.Image:
    # PIL maps each output pixel (x, y) to the input pixel (a x + b y + c, d x + e y + f).
    return image.transform(image.size, Image.AFFINE, matrix, RESAMPLING[method], fillcolor=pil_fill(fill))


_AUGMENTATIONS = {
    "identity": lambda img, v, method, fill: img,
    "shear_x": lambda img, v, method, fill: _affine(img, (1, v, 0, 0, 1, 0), method, fill),
    "shear_y": lambda img, v, method, fill: _affine(img, (1, 0, 0, v, 1, 0), method, fill),
    "translate_x": lambda img, v, method, fill: _affine(img, (1, 0, -int(v), 0, 1, 0), method, fill),
    "translate_y": lambda img, v, method, fill: _affine(img, (1, 0, 0, 0, 1, -int(v)), method, fill),
    "rotate": lambda img, v, method, fill: img.rotate(v, RESAMPLING[method], fillcolor=pil_fill(fill)),
    "brightness": lambda img, v, method, fill: ImageEnhance.Brightness(img).enhance(1 + v),
    "color": lambda img, v, method, fill: ImageEnhance.Color(img).enhance(1 + v),
    "contrast": lambda img, v, method, fill: ImageEnhance.Contrast(img).enhance(1 + v),
    "sharpness": lambda img, v, method, fill: ImageEnhance.Sharpness(img).enhance(1 + v),
    "posterize": lambda img, v, method, fill: ImageOps.posterize(img, int(v)),
    "solarize": lambda img, v, method, fill: ImageOps.solarize(img, v),
    "autocontrast": lambda img, v, method, fill: ImageOps.autocontrast(img),
    "equalize": lambda img, v, method, fill: ImageOps.equalize(img),
}
NAMES = tuple(_AUGMENTATIONS)
_SIGNED = {"shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color", "contrast", "sharpness"}


def augment(image: Image.Image, name: str, value: float, method: str = "nearest", fill=0) -> Image.Image:
    """Apply augmentation `name` with `value` in its own unit (see the module docstring)."""
    return _AUGMENTATIONS[name](image, value, method, fill)


def randaugment_value(name: str, level: float, height: int, width: int) -> float:
    """The value of `name` at `level` (0..1 of its maximum) in torchvision's RandAugment space."""
    maxima = {
        "shear_x": 0.3, "shear_y": 0.3, "translate_x": 150 / 331 * width, "translate_y": 150 / 331 * height,
        "rotate": 30.0, "brightness": 0.9, "color": 0.9, "contrast": 0.9, "sharpness": 0.9,
    }
    if name == "posterize":
        return 8 - round(4 * level)  # bits kept: 8 .. 4
    if name == "solarize":
        return 255.0 * (1 - level)  # threshold: 255 .. 0
    return maxima.get(name, 0.0) * level


def trivial_augment_value(name: str, level: float) -> float:
    """The value of `name` at `level` (0..1) in torchvision's TrivialAugmentWide space."""
    maxima = {
        "shear_x": 0.99, "shear_y": 0.99, "translate_x": 32.0, "translate_y": 32.0, "rotate": 135.0,
        "brightness": 0.99, "color": 0.99, "contrast": 0.99, "sharpness": 0.99,
    }
    if name == "posterize":
        return 8 - round(6 * level)  # bits kept: 8 .. 2
    if name == "solarize":
        return 255.0 * (1 - level)
    return maxima.get(name, 0.0) * level


def _signed(name: str, value: float, rng: np.random.Generator) -> float:
    return -value if name in _SIGNED and rng.random() < 0.5 else value


@register_op("randaugment")
@dataclasses.dataclass(frozen=True)
class RandAugment(grain.transforms.RandomMap):
    """Apply `n` augmentations drawn uniformly (with repeats) from the 14, each at magnitude `m`.

    `m` is on timm's and big_vision's scale, 0..10 (m / 10 of each maximum; torchvision's
    RandAugment(magnitude=k) with 31 bins is m = k / 3); the sign of signed ones is random.
    Maxima are torchvision's: shear 0.3, translate 45% of the side, rotate 30 degrees,
    enhancements +-0.9, posterize to 4 bits, solarize down to threshold 0.
    """

    n: int = 2
    m: float = 9.0
    method: str = "nearest"
    fill: int | tuple[int, int, int] = 0

    def __post_init__(self):
        if not isinstance(self.n, int) or self.n < 0:
            raise ValueError(f"n must be an int >= 0, got {self.n!r}")
        if not (isinstance(self.m, (int, float)) and 0 <= self.m <= 10):
            raise ValueError(f"m must be in [0, 10], got {self.m!r}")
        check_method(self.method)
        check_fill(self.fill)

    def random_map(self, example: dict, rng: np.random.Generator) -> dict:
        image = as_pil(example["image"])
        for _ in range(self.n):
            name = NAMES[rng.integers(len(NAMES))]
            value = _signed(name, randaugment_value(name, self.m / 10, image.height, image.width), rng)
            image = augment(image, name, value, self.method, self.fill)
        return {**example, "image": image}


@register_op("trivial_augment")
@dataclasses.dataclass(frozen=True)
class TrivialAugment(grain.transforms.RandomMap):
    """TrivialAugment (torchvision's TrivialAugmentWide): one augmentation drawn uniformly from the 14, at a
    magnitude drawn uniformly from 31 levels (random sign); maxima: shear 0.99, translate 32 px,
    rotate 135 degrees, enhancements +-0.99, posterize to 2 bits, solarize down to threshold 0."""

    method: str = "nearest"
    fill: int | tuple[int, int, int] = 0

    def __post_init__(self):
        check_method(self.method)
        check_fill(self.fill)

    def random_map(self, example: dict, rng: np.random.Generator) -> dict:
        image = as_pil(example["image"])
        name = NAMES[rng.integers(len(NAMES))]
        value = _signed(name, trivial_augment_value(name, rng.integers(31) / 30), rng)
        return {**example, "image": augment(image, name, value, self.method, self.fill)}
