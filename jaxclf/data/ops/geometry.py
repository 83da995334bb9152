"""Geometric ops: crops, resizes, flips and rotations (PIL resampling, as torchvision's PIL path)."""

from __future__ import annotations

import dataclasses
import math

import grain
import numpy as np
from PIL import Image

from jaxclf.data.ops import fast
from jaxclf.data.ops.base import (
    RESAMPLING,
    ImageLike,
    as_array,
    as_pil,
    check_fill,
    check_method,
    check_probability,
    check_range,
    check_size,
    image_size,
    pil_fill,
    register_op,
)
from jaxclf.data.ops.decode import DEFAULT_MAX_IMAGE_PIXELS, Decode, open_image


@register_op("inception_crop")
@dataclasses.dataclass(frozen=True)
class InceptionCrop(grain.transforms.RandomMap):
    """Random crop of area `scale` and aspect `ratio`, resized to `size x size` (torchvision RandomResizedCrop).

    After 10 rejected draws it falls back to the largest central crop with the aspect clamped into `ratio`.
    The box is drawn exactly as torchvision draws it. With `exact=True` the crop is resized by
    Pillow's antialiased filter, pixel for pixel torchvision's PIL path. By default, with
    jaxclf[fastjpeg] installed and method="bilinear", a crop downscaled at most 3x is resampled by
    OpenCV instead (fast.resample_box: within ~0.5 grey levels mean, a few levels at edges; 3-5x
    faster), and straight after `decode` a JPEG is decoded at the 1/2, 1/4 or 1/8 scale that
    still leaves the crop >= size (see `crop_while_decoding`).
    """

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    method: str = "bilinear"
    exact: bool = False

    def __post_init__(self):
        check_size(self.size)
        check_range("scale", self.scale)
        check_range("ratio", self.ratio)
        check_method(self.method)
        if not isinstance(self.exact, bool):
            raise ValueError(f"exact must be True or False, got {self.exact!r}")

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
        box = self.crop_box(*image_size(image), rng)
        return {**example, "image": self.resize_box(image, box)}

    def crop_while_decoding(self, example: dict, rng: np.random.Generator,
                            max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> dict:
        """`random_map(Decode(max_pixels=max_pixels).map(example), rng)`, decoding only as much of a JPEG as the crop needs."""
        example, box = self.decode_for_crop(example, rng, max_pixels)
        return {**example, "image": self.resize_box(example["image"], box)}

    def decode_for_crop(self, example: dict, rng: np.random.Generator,
                        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[dict, tuple[float, ...]]:
        """The example with its image decoded, and the crop's box (top, left, height, width) in that image.

        The box is drawn from the file's header (the same draws as on the decoded image), then the
        JPEG is decoded at the smallest DCT scale (1, 1/2, 1/4, 1/8) that leaves the box >= size
        on both sides; the box is then in fractions of the reduced image's pixels. Files the fast
        decoder does not take (see ImageFile.fast_jpeg) are decoded in full, as by `decode`.
        """
        if "path" not in example:  # arrays a TFDS source decoded
            example = Decode().map(example)
            return example, self.crop_box(*image_size(example["image"]), rng)
        example = dict(example)
        with open_image(example.pop("path"), example.pop("bytes", None), max_pixels) as image_file:
            if not (image_file.fast_jpeg and self._fast):
                example["image"] = image_file.decode()
                return example, self.crop_box(*image_size(example["image"]), rng)
            top, left, h, w = self.crop_box(image_file.height, image_file.width, rng)
            width, height = image_file.stored_size
            wanted = fast.jpeg_reduction(w, h, self.size, self.size)  # box // size, to a power of two
            request = (width // wanted, height // wanted) if wanted > 1 else None
            reduction = image_file.reduction(request)
            example["image"] = image_file.decode(request)
        return example, (top / reduction, left / reduction, h / reduction, w / reduction)

    def resize_box(self, image: ImageLike, box: tuple[float, float, float, float]) -> ImageLike:
        """The window box = (top, left, height, width) of `image` (fractions of a pixel allowed) at `size x size`."""
        top, left, h, w = box
        if self._fast and max(h, w) <= fast.MAX_DOWNSCALE * self.size:
            return fast.resample_box(as_array(image), box, self.size)
        image = as_pil(image)
        size, method = (self.size, self.size), RESAMPLING[self.method]
        if all(float(v).is_integer() for v in box):  # torchvision's order: crop, then resize the crop alone
            return image.crop((int(left), int(top), int(left + w), int(top + h))).resize(size, method)
        return image.resize(size, method, box=(left, top, left + w, top + h))

    @property
    def _fast(self) -> bool:
        return fast.AVAILABLE and not self.exact and self.method == "bilinear"


@dataclasses.dataclass(frozen=True)
class _Resizing(grain.transforms.Map):
    """The arguments and checks the resizing ops share."""

    size: int
    method: str = "bilinear"

    def __post_init__(self):
        check_size(self.size)
        check_method(self.method)


@register_op("resize_small")
@dataclasses.dataclass(frozen=True)
class ResizeSmall(_Resizing):
    """Resize the shorter side to `size`, keeping the aspect (long side truncated, as torchvision Resize(int))."""

    def map(self, example: dict) -> dict:
        h, w = image_size(example["image"])
        if h <= w:
            new_h, new_w = self.size, int(self.size * w / h)
        else:
            new_h, new_w = int(self.size * h / w), self.size
        resized = as_pil(example["image"]).resize((new_w, new_h), RESAMPLING[self.method])
        return {**example, "image": resized}


@register_op("resize")
@dataclasses.dataclass(frozen=True)
class Resize(_Resizing):
    """Resize to `size x size`, ignoring the aspect."""

    def map(self, example: dict) -> dict:
        resized = as_pil(example["image"]).resize((self.size, self.size), RESAMPLING[self.method])
        return {**example, "image": resized}


@register_op("central_crop")
@dataclasses.dataclass(frozen=True)
class CentralCrop(grain.transforms.Map):
    """Crop the central `size x size` window (offsets rounded down)."""

    size: int

    def __post_init__(self):
        check_size(self.size)

    def map(self, example: dict) -> dict:
        h, w = image_size(example["image"])
        if h < self.size or w < self.size:
            raise ValueError(
                f"central_crop({self.size}) got a {h}x{w} image; put resize_small({self.size}) or larger before it"
            )
        top, left = (h - self.size) // 2, (w - self.size) // 2
        crop = as_pil(example["image"]).crop((left, top, left + self.size, top + self.size))
        return {**example, "image": crop}


@register_op("random_crop")
@dataclasses.dataclass(frozen=True)
class RandomCrop(grain.transforms.RandomMap):
    """Pad each side by `padding` pixels of `fill`, then crop a random `size x size` window (torchvision RandomCrop)."""

    size: int
    padding: int = 0
    fill: int | tuple[int, int, int] = 0

    def __post_init__(self):
        check_size(self.size)
        if not isinstance(self.padding, int) or self.padding < 0:
            raise ValueError(f"padding must be an int >= 0, got {self.padding!r}")
        check_fill(self.fill)

    def random_map(self, example: dict, rng: np.random.Generator) -> dict:
        image = as_array(example["image"])
        p = self.padding
        if p:
            padded = np.empty((image.shape[0] + 2 * p, image.shape[1] + 2 * p, 3), np.uint8)
            padded[...] = np.asarray(pil_fill(self.fill), np.uint8)
            padded[p:-p, p:-p] = image
            image = padded
        h, w = image.shape[:2]
        if h < self.size or w < self.size:
            raise ValueError(
                f"random_crop({self.size}, padding={p}) got a {h - 2 * p}x{w - 2 * p} image; "
                f"resize it to at least {self.size - 2 * p} pixels first"
            )
        top, left = int(rng.integers(0, h - self.size + 1)), int(rng.integers(0, w - self.size + 1))
        return {**example, "image": np.ascontiguousarray(image[top : top + self.size, left : left + self.size])}


@register_op("flip_lr")
@dataclasses.dataclass(frozen=True)
class FlipLr(grain.transforms.RandomMap):
    """Mirror the image left-right with probability `p`."""

    p: float = 0.5

    def __post_init__(self):
        check_probability(self.p)

    def random_map(self, example: dict, rng: np.random.Generator) -> dict:
        if rng.random() >= self.p:
            return example
        image = example["image"]
        if isinstance(image, Image.Image):
            return {**example, "image": image.transpose(Image.FLIP_LEFT_RIGHT)}
        if fast.AVAILABLE and image.dtype == np.uint8:
            return {**example, "image": fast.flip_lr(image)}
        return {**example, "image": np.ascontiguousarray(image[:, ::-1])}


@register_op("rotate")
@dataclasses.dataclass(frozen=True)
class Rotate(grain.transforms.RandomMap):
    """Rotate counter-clockwise by an angle drawn uniformly from [-degrees, degrees] (or from a (low, high)
    tuple) about the centre, keeping the size; uncovered corners get `fill` (torchvision RandomRotation)."""

    degrees: float | tuple[float, float]
    method: str = "bilinear"
    fill: int | tuple[int, int, int] = 0

    def __post_init__(self):
        low, high = self.angle_range
        if not low <= high:
            raise ValueError(f"degrees must be a number >= 0 or a tuple (low, high), got {self.degrees!r}")
        check_method(self.method)
        check_fill(self.fill)

    @property
    def angle_range(self) -> tuple[float, float]:
        if isinstance(self.degrees, tuple) and len(self.degrees) == 2:
            return self.degrees
        if isinstance(self.degrees, (int, float)):
            return -self.degrees, self.degrees
        raise ValueError(f"degrees must be a number >= 0 or a tuple (low, high), got {self.degrees!r}")

    def random_map(self, example: dict, rng: np.random.Generator) -> dict:
        angle = rng.uniform(*self.angle_range)
        rotated = as_pil(example["image"]).rotate(angle, RESAMPLING[self.method], fillcolor=pil_fill(self.fill))
        return {**example, "image": rotated}
