"""glibc's heap kept for the next image in the processes that decode: freed image buffers are reused, not re-faulted.

Every decoded JPEG, crop, flip and batch row is a fresh 0.1-0.6 MB array. glibc serves blocks
that size with mmap, or hands them back with the top of its heap once freed, so each image
page-faults its memory in again: 60-80 faults per image, 0.2-0.4 of a worker's 1.5-1.9 CPU
milliseconds (bench/README.md). Fixed thresholds, as MALLOC_MMAP_THRESHOLD_ and
MALLOC_TRIM_THRESHOLD_ would set at start-up, make the freed memory serve the next image; a
process then keeps about its peak heap instead of returning it between images. Only grain's worker
processes set them (reader.py): in the training process XLA's large buffers would fragment a kept heap.
"""

from __future__ import annotations

import ctypes
import functools
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, glibc's malloc.h
MMAP_THRESHOLD = 32 * 2**20  # glibc's maximum: blocks below it come from the heap (a phone photo decodes to ~9 MB)
TRIM_THRESHOLD = 256 * 2**20  # free memory at the heap's top kept for reuse


@functools.cache
def reuse_freed_memory() -> bool:
    """Sets the thresholds above in this process, once; False where the C library is not glibc (nothing changes)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success; musl's stub returns 0 and changes nothing.
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
