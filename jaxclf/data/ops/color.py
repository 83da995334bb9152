"""Colour ops: brightness, contrast, saturation and hue jitter, and random erasing (uint8, in the workers)."""

from __future__ import annotations

import dataclasses
import math

import grain
import numpy as np
from PIL import Image, ImageEnhance

from jaxclf.data.ops.base import as_array, as_pil, check_fill, check_probability, check_range, register_op


def adjust_hue(image: Image.Image, shift: float) -> Image.Image:
    """Rotate the hue by `shift` turns (-0.5..0.5) in PIL's 8-bit HSV, as torchvision's adjust_hue."""
    h, s, v = image.convert("HSV").split()
    hue = (np.asarray(h, np.int32) + int(shift * 255)) % 256  # int() truncates, like torchvision
    return Image.merge("HSV", (Image.fromarray(hue.astype(np.uint8)), s, v)).convert("RGB")


_ADJUSTMENTS = {
    "brightness": lambda image, factor: ImageEnhance.Brightness(image).enhance(factor),
    "contrast": lambda image, factor: ImageEnhance.Contrast(image).enhance(factor),
    "saturation": lambda image, factor: ImageEnhance.Color(image).enhance(factor),
    "hue": adjust_hue,
}


@register_op("color_jitter")
@dataclasses.dataclass(frozen=True)
class ColorJitter(grain.transforms.RandomMap):
    """torchvision's ColorJitter: brightness, contrast and saturation factors drawn from [max(0, 1 - x), 1 + x],
    a hue shift from [-hue, hue] (hue <= 0.5), applied in a random order; 0 leaves that property alone."""

    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0

    def __post_init__(self):
        for name in ("brightness", "contrast", "saturation"):
            if not (isinstance(getattr(self, name), (int, float)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {getattr(self, name)!r}")
        if not (isinstance(self.hue, (int, float)) and 0 <= self.hue <= 0.5):
            raise ValueError(f"hue must be in [0, 0.5], got {self.hue!r}")

    def draw(self, rng: np.random.Generator) -> list[tuple[str, float]]:
        """The adjustments to apply, in order: [(name, factor or hue shift), ...]."""
        steps = []
        for k in rng.permutation(4):
            name = tuple(_ADJUSTMENTS)[k]
            amount = getattr(self, name)
            if amount == 0:
                continue
            low, high = (-amount, amount) if name == "hue" else (max(0.0, 1 - amount), 1 + amount)
            steps.append((name, float(rng.uniform(low, high))))
        return steps

    @staticmethod
    def apply(image: Image.Image, steps: list[tuple[str, float]]) -> Image.Image:
        for name, value in steps:
            image = _ADJUSTMENTS[name](image, value)
        return image

    def random_map(self, example: dict, rng: np.random.Generator) -> dict:
        return {**example, "image": self.apply(as_pil(example["image"]), self.draw(rng))}


@register_op("random_erasing")
@dataclasses.dataclass(frozen=True)
class RandomErasing(grain.transforms.RandomMap):
    """With probability `p`, overwrite a random rectangle of area `scale` and aspect `ratio` (torchvision
    RandomErasing's box; nothing is erased if 10 draws do not fit).

    `value`: "random" fills with uniform noise 0..255 per pixel and channel (timm's mode="pixel" draws
    normal noise after normalisation instead; these images are normalised later, on the device),
    or an int / RGB tuple fills with that colour.
    """

    p: float = 0.5
    scale: tuple[float, float] = (0.02, 1 / 3)
    ratio: tuple[float, float] = (0.3, 3.3)
    value: str | int | tuple[int, int, int] = "random"

    def __post_init__(self):
        check_probability(self.p)
        check_range("scale", self.scale)
        check_range("ratio", self.ratio)
        if self.value != "random":
            check_fill(self.value)

    def box(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int] | None:
        """(top, left, box_height, box_width), or None when no draw fits."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            erase_area = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            h = round(math.sqrt(erase_area * aspect))
            w = round(math.sqrt(erase_area / aspect))
            if 0 < h < height and 0 < w < width:
                return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
        return None

    def random_map(self, example: dict, rng: np.random.Generator) -> dict:
        if rng.random() >= self.p:
            return example
        image = as_array(example["image"])
        found = self.box(image.shape[0], image.shape[1], rng)
        if found is None:
            return example
        top, left, h, w = found
        image = image.copy() if image is example["image"] else image  # never write into the caller's array
        if self.value == "random":
            image[top : top + h, left : left + w] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        else:
            image[top : top + h, left : left + w] = np.asarray(self.value, np.uint8)
        return {**example, "image": image}
