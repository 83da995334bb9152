"""The `jaxclf[fastjpeg]` kernels: libjpeg-turbo decoding (simplejpeg) and OpenCV's resampling.

Both are optional; `AVAILABLE` is False without them and every op then uses Pillow alone. Pillow
and simplejpeg run the same libjpeg-turbo decoder with the same settings (accurate integer DCT,
fancy upsampling), so they give the same pixels, at full size and at 1/2, 1/4 and 1/8 scale;
simplejpeg saves Pillow's chunked feeding of the file and its 4-bytes-per-pixel image (~30%
of a decode). OpenCV replaces Pillow's antialiased bilinear resize of a crop by a Gaussian prefilter and
bilinear sampling (`resample_box`), within ~0.5 grey levels (mean) of Pillow's filter on photos
and 3-5x faster (tests/test_data_fast_input.py, bench/README.md).
"""

from __future__ import annotations

import math

import numpy as np

try:
    import cv2
    import simplejpeg
except ImportError:  # the extra is not installed: Pillow does everything
    cv2 = simplejpeg = None
    AVAILABLE = False
else:
    AVAILABLE = True
    # Parallelism comes from grain's worker processes; OpenCV's own threads on 224-pixel images
    # only add scheduling overhead and oversubscribe the cores the workers share.
    cv2.setNumThreads(1)

# libjpeg-turbo's SIMD kernels cover 1/1, 1/2, 1/4 and 1/8; its other M/8 scales (7/8, 3/4, ...)
# run scalar code and decoded slower than the full image (bench/README.md).
REDUCTIONS = (8, 4, 2, 1)
# Up to this downscale resample_box is accurate and cheap; a crop straight from a JPEG decoded at
# its scale stays below it (at most 2x on the shorter side, 8/3x on the longer).
MAX_DOWNSCALE = 3
# Below this prefilter sigma (a downscale under 1.28x) OpenCV's 3-tap kernel is within 0.1 of the
# identity: skipping it changed the agreement with Pillow by < 0.02 grey levels, and saved its cost.
MIN_SIGMA = 0.4


def jpeg_reduction(width: int, height: int, min_width: int, min_height: int) -> int:
    """The largest of 1, 2, 4, 8 that keeps a `width x height` JPEG at least `min_width x min_height` (Pillow's draft rule)."""
    scale = min(width // max(min_width, 1), height // max(min_height, 1))
    return next(s for s in REDUCTIONS if s <= max(scale, 1))


def decode_jpeg(data: bytes, width: int, height: int, reduction: int = 1) -> np.ndarray:
    """uint8[ceil(height / reduction), ceil(width / reduction), 3] RGB from JPEG bytes.

    Raises ValueError for anything libjpeg-turbo reports, warnings included (strict): the caller
    then lets Pillow, which tolerates libjpeg's warnings, decide as it always did.
    """
    if reduction == 1:
        # No minimum size: with one, simplejpeg may pick a 7/8 scale for images under 8 pixels.
        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    return simplejpeg.decode_jpeg(
        data, colorspace="RGB", min_width=math.ceil(width / reduction), min_height=math.ceil(height / reduction)
    )


def resample_box(image: np.ndarray, box: tuple[float, float, float, float], size: int) -> np.ndarray:
    """uint8[size, size, 3]: the window (top, left, height, width) of `image` resampled to `size x size`.

    The window alone is used (as torchvision crops, then resizes). Downscaling by r on an axis:
    a Gaussian prefilter of sigma = sqrt(r^2 - 1) / 2 source pixels on that axis (the usual
    antialiasing rule), then bilinear sampling at the exact, possibly fractional, box; upscaling:
    bilinear sampling alone, as Pillow's bilinear. Meant for r <= MAX_DOWNSCALE: a wider
    Gaussian costs more than Pillow's filter.
    """
    top, left, height, width = box
    ry, rx = height / size, width / size
    t0, l0 = math.floor(top), math.floor(left)
    window = image[t0 : math.ceil(top + height), l0 : math.ceil(left + width)]
    sigma_y, sigma_x = (math.sqrt(max(r * r - 1, 0)) / 2 for r in (ry, rx))
    if max(sigma_y, sigma_x) >= MIN_SIGMA:
        # A sigma of 0 would make OpenCV derive one; 1e-3 gives its one-tap (identity) kernel.
        window = cv2.GaussianBlur(window, (0, 0), sigmaX=max(sigma_x, 1e-3), sigmaY=max(sigma_y, 1e-3),
                                  borderType=cv2.BORDER_REPLICATE)
    return warp_box(window, (top - t0, left - l0, height, width), size)


def warp_box(image: np.ndarray, box: tuple[float, float, float, float], size: int) -> np.ndarray:
    """uint8[size, size, 3]: the window (top, left, height, width) of `image`, in pixels (fractions allowed),
    resampled bilinearly; output pixel centres map to the window as in Pillow's resize(box=...)."""
    top, left, height, width = box
    sy, sx = height / size, width / size
    # Destination pixel x has its centre at x + 0.5, the source point left + (x + 0.5) * sx;
    # OpenCV puts pixel centres at integers, hence the -0.5 on both sides.
    matrix = np.array([[sx, 0.0, left + 0.5 * sx - 0.5], [0.0, sy, top + 0.5 * sy - 0.5]])
    return cv2.warpAffine(
        image, matrix, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE
    )


def flip_lr(image: np.ndarray) -> np.ndarray:
    """The uint8 image mirrored left-right, as a new array (numpy's reversed-stride copy of 3-byte pixels took 70x longer)."""
    return cv2.flip(image, 1)
