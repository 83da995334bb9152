"""`decode`: image files (or arrays a source already decoded) to RGB, whatever mode they were saved in."""

from __future__ import annotations

import dataclasses
import io
import math
import struct

import grain
import numpy as np
from PIL import Image, ImageOps

from jaxclf.data.ops.base import check_size, register_op
from jaxclf.data.sources import DataError

# What Pillow raises for a file it cannot read: not an image, truncated, corrupt headers or EXIF,
# or more pixels than Image.MAX_IMAGE_PIXELS (the decompression-bomb limit, left on).
_UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


class BadImage(DataError):
    """An image that cannot be decoded; `name` is its file (or record), `reason` what Pillow said."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: cannot decode the image ({reason})")
        self.name, self.reason = name, reason

    def __reduce__(self):  # grain workers send exceptions back pickled
        return BadImage, (self.name, self.reason)


@register_op("decode")
@dataclasses.dataclass(frozen=True)
class Decode(grain.transforms.Map):
    """Read example["path"] into example["image"], an RGB image with its EXIF orientation applied.

    An example with "bytes" (an upload the server received) is decoded from them; its "path" then
    only names the image in errors.

    `decode(size)`: a JPEG whose shorter side is at least 2 * size is decoded at 1/2, 1/4 or 1/8
    scale by libjpeg (much faster), keeping the shorter side >= size; give the size the next
    resize or crop produces. Grayscale, palette, RGBA (alpha dropped, as torchvision), CMYK and
    16-bit images become 8-bit RGB. An example that already holds an "image" array (a TFDS
    source decodes its records itself) is only converted to RGB; `size` does not apply to it.
    Raises BadImage naming the file when Pillow cannot read it.
    """

    size: int | None = None

    def __post_init__(self):
        if self.size is not None:
            check_size(self.size)

    def map(self, example: dict) -> dict:
        example = dict(example)
        if "image" in example:
            example["image"] = array_to_rgb(np.asarray(example["image"]))
            return example
        path = example.pop("path")
        data = example.pop("bytes", None)
        try:
            with Image.open(path if data is None else io.BytesIO(data)) as img:
                if self.size is not None and img.format == "JPEG":
                    self._draft(img)
                img.load()
                ImageOps.exif_transpose(img, in_place=True)
                example["image"] = pil_to_rgb(img)
        except _UNREADABLE as e:
            raise BadImage(path, f"{type(e).__name__}: {e}") from None
        return example

    def _draft(self, img: Image.Image) -> None:
        width, height = img.size
        short = min(width, height)
        if short >= 2 * self.size:
            # PIL picks the largest power-of-two reduction that keeps both sides >= the request.
            img.draft(img.mode, (math.ceil(width * self.size / short), math.ceil(height * self.size / short)))


def pil_to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any Pillow mode; 16- and 32-bit integer images are scaled from 0..65535."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        return Image.fromarray(array_to_rgb(np.asarray(img)))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # Pillow warns when a palette with transparency goes straight to RGB
    return img.convert("RGB")


def array_to_rgb(image: np.ndarray) -> np.ndarray:
    """uint8[H, W, 3] from [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] (alpha dropped); uint16/int32 scaled from 0..65535."""
    if image.dtype != np.uint8:
        image = np.clip((image.astype(np.int64) * 255 + 32767) // 65535, 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        return np.repeat(image, 3, axis=-1)
    return np.ascontiguousarray(image[..., :3])

