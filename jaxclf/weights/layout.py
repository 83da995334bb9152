"""Array layouts: PyTorch (OIHW convs, [out, in] linears) to Flax (HWIO convs, [in, out] kernels)."""

from __future__ import annotations

import numpy as np


def conv_kernel(weight: np.ndarray) -> np.ndarray:
    """A PyTorch conv weight [out, in, h, w] as a Flax kernel [h, w, in, out]."""
    return np.ascontiguousarray(np.transpose(weight, (2, 3, 1, 0)))


def linear_kernel(weight: np.ndarray) -> np.ndarray:
    """A PyTorch linear weight [out, in] as a Flax kernel [in, out]."""
    return np.ascontiguousarray(weight.T)
