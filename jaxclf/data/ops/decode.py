"""`decode`: image files (or arrays a source already decoded) to RGB, whatever mode they were saved in."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import struct
import warnings
from collections.abc import Iterator

import grain
import numpy as np
from PIL import ExifTags, Image, ImageOps

from jaxclf.data.ops import fast
from jaxclf.data.ops.base import ImageLike, check_size, register_op
from jaxclf.data.sources import DataError

# What Pillow raises for a file it cannot read: not an image, truncated, corrupt headers or EXIF,
# or more than twice Image.MAX_IMAGE_PIXELS (Pillow's own decompression-bomb limit, left on).
_UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)

# The most pixels an image may have (width x height, from its header, before decoding): config.data.max_image_pixels'
# default, Pillow's (about 0.27 GB decoded as RGB). Pillow itself only warns up to twice its limit; jaxclf refuses.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
# Pillow warns about images between one and two times its limit while reading the header; the limit
# above is what decides, so its warning (printed before jaxclf's refusal, or for an image a raised limit allows) is noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class BadImage(DataError):
    """An image that cannot be decoded; `name` is its file (or record), `reason` what Pillow said."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: cannot decode the image ({reason})")
        self.name, self.reason = name, reason

    def __reduce__(self):  # grain workers send exceptions back pickled
        return BadImage, (self.name, self.reason)


class TooManyPixels(BadImage):
    """An image whose header declares more than `limit` pixels: refused before any pixel is decoded."""

    def __init__(self, name: str, width: int, height: int, limit: int):
        super().__init__(name, f"TooManyPixels: {width}x{height} = {width * height:,} pixels, over the limit of "
                               f"{limit:,} (max_image_pixels); refused before decoding")
        self.width, self.height, self.limit = width, height, limit

    def __reduce__(self):
        return TooManyPixels, (self.name, self.width, self.height, self.limit)


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
    Raises BadImage naming the file when Pillow cannot read it, TooManyPixels when its header
    declares more than `max_pixels` (set from config.data.max_image_pixels by the loaders, not in
    the spec; out of the repr, which grain's saved iterator state compares on resume). Plain JPEGs
    are decoded by libjpeg-turbo directly where jaxclf[fastjpeg] is installed (the same pixels, see fast.py).
    """

    size: int | None = None
    max_pixels: int = dataclasses.field(default=DEFAULT_MAX_IMAGE_PIXELS, repr=False)

    def __post_init__(self):
        if self.size is not None:
            check_size(self.size)
        check_max_pixels(self.max_pixels)

    def map(self, example: dict) -> dict:
        example = dict(example)
        if "image" in example:
            example["image"] = array_to_rgb(np.asarray(example["image"]))
            return example
        with open_image(example.pop("path"), example.pop("bytes", None), self.max_pixels) as image_file:
            example["image"] = image_file.decode(self._request(image_file))
        return example

    def _request(self, image_file: ImageFile) -> tuple[int, int] | None:
        """The (width, height) a reduced JPEG must keep: the shorter side >= size, if it is at least twice that."""
        width, height = image_file.stored_size
        short = min(width, height)
        if self.size is None or short < 2 * self.size:
            return None
        return math.ceil(width * self.size / short), math.ceil(height * self.size / short)


class ImageFile:
    """An image file opened for decoding: Pillow's reading of its header, before any pixel is decoded.

    `height` and `width` are the image's as displayed (after its EXIF orientation), so that a crop
    can be chosen before decoding. Use as a context manager (it holds the file open). Errors
    raise BadImage naming the file, TooManyPixels for more than `max_pixels`. With `data`, the image
    is read from those bytes and `path` only names it.
    """

    def __init__(self, path: str, data: bytes | None = None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        self.path = path
        with _naming_the_file(path):
            self._image = Image.open(path if data is None else io.BytesIO(data))
            try:
                width, height = self._image.size
                if width * height > max_pixels:
                    raise TooManyPixels(path, width, height, max_pixels)
                self._orientation = self._image.getexif().get(ExifTags.Base.Orientation, 1)
            except BaseException:
                self._image.__exit__()
                raise
        self.stored_size = self._image.size  # (width, height) as stored
        self.height, self.width = (width, height) if self._orientation in _SWAPS_SIDES else (height, width)

    @property
    def fast_jpeg(self) -> bool:
        """Whether libjpeg-turbo decodes this file straight to the RGB the Pillow path gives (no turning, no CMYK)."""
        return (fast.AVAILABLE and self._image.format == "JPEG" and self._image.mode in ("RGB", "L")
                and self._orientation not in _TRANSPOSES)

    def reduction(self, request: tuple[int, int] | None) -> int:
        """1, 2, 4 or 8: the DCT-domain reduction `decode(request)` uses (Pillow's draft rule; 1 for other formats)."""
        if request is None or self._image.format != "JPEG":
            return 1
        return fast.jpeg_reduction(*self.stored_size, *request)

    def decode(self, request: tuple[int, int] | None = None) -> ImageLike:
        """The RGB image, oriented; a JPEG reduced by `reduction(request)`, keeping it >= request = (width, height) as stored."""
        with _naming_the_file(self.path):
            if self.fast_jpeg:
                self._image.fp.seek(0)
                data = self._image.fp.read()
                try:
                    return fast.decode_jpeg(data, *self.stored_size, self.reduction(request))
                except ValueError:
                    pass  # libjpeg-turbo warned (say, stray bytes before a marker): Pillow decides, as it always did
            img = self._image
            if request is not None and img.format == "JPEG":
                img.draft(img.mode, request)
            img.load()
            ImageOps.exif_transpose(img, in_place=True)
            return pil_to_rgb(img)

    def __enter__(self) -> ImageFile:
        return self

    def __exit__(self, *exc_info) -> None:
        self._image.__exit__(*exc_info)  # closes the file; a decoded Pillow image stays usable


def open_image(path: str, data: bytes | None = None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> ImageFile:
    """`path` (or `data`, named `path`) opened for decoding (see ImageFile); raises BadImage naming it when Pillow
    cannot read it, TooManyPixels when its header declares more than `max_pixels`."""
    return ImageFile(path, data, max_pixels)


def check_max_pixels(max_pixels: int) -> None:
    """A pixel limit: a positive whole number. (Pillow still refuses, by itself, more than twice its own
    Image.MAX_IMAGE_PIXELS: a limit above that needs PIL.Image.MAX_IMAGE_PIXELS raised too.)"""
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise DataError(f"max_image_pixels={max_pixels!r} (config.data.max_image_pixels; serve: --max_image_pixels): "
                        "give a positive whole number of pixels (width x height)")


# EXIF orientations Pillow's exif_transpose applies (2..8); 5 to 8 turn the image by 90 degrees.
_TRANSPOSES = frozenset(range(2, 9))
_SWAPS_SIDES = frozenset(range(5, 9))


@contextlib.contextmanager
def _naming_the_file(path: str) -> Iterator[None]:
    try:
        yield
    except BadImage:
        raise  # already named (a DataError, hence a ValueError)
    except _UNREADABLE as e:
        raise BadImage(path, f"{type(e).__name__}: {e}") from None


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

