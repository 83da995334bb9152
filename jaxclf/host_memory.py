"""How the process's C allocator treats freed memory: kept for reuse, so XLA:CPU steps do not page-fault.

XLA:CPU's Eigen convolutions and matmuls allocate their packing buffers on every call (up to
~110 MB at once in a ResNet-18 train step). glibc's malloc serves requests that large with a fresh
mmap and unmaps them when they are freed, so every step faults all those pages in again: ~410k
minor page faults and ~1 s of system time per ViT-S/16 train step (batch 16) on a 2-core machine,
~136k for ResNet-18. Kept in the heap instead, they are reused: no faults, and train steps 10-15%
faster (bench/README.md). The command-line tools call `reuse_freed_memory` first thing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def reuse_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse; whether it could (False on other C libraries).

    No mmap for large requests, no returning the heap's top to the system, and one arena for all
    threads (a thread's own arena maps large requests regardless). Call it before JAX starts its
    threads: a thread keeps the arena it first allocated from. The process then holds on to the
    most memory it ever used, as PyTorch's caching allocator does.
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1), (_M_ARENA_MAX, 1))
    return all(mallopt(parameter, value) == 1 for parameter, value in settings)
