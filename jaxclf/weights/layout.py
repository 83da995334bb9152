"""Array layouts: PyTorch (OIHW convs, [out, in] linears) to Flax (HWIO convs, [in, out] kernels) and back."""

from __future__ import annotations

import numpy as np


def conv_kernel(weight: np.ndarray) -> np.ndarray:
    """A PyTorch conv weight [out, in, h, w] as a Flax kernel [h, w, in, out]."""
    return np.ascontiguousarray(np.transpose(weight, (2, 3, 1, 0)))


def linear_kernel(weight: np.ndarray) -> np.ndarray:
    """A PyTorch linear weight [out, in] as a Flax kernel [in, out]."""
    return np.ascontiguousarray(weight.T)


def conv_weight(kernel: np.ndarray) -> np.ndarray:
    """A Flax conv kernel [h, w, in, out] as a PyTorch weight [out, in, h, w] (the inverse of `conv_kernel`)."""
    return np.ascontiguousarray(np.transpose(kernel, (3, 2, 0, 1)))


def linear_weight(kernel: np.ndarray) -> np.ndarray:
    """A Flax kernel [in, out] as a PyTorch linear weight [out, in] (the inverse of `linear_kernel`)."""
    return np.ascontiguousarray(kernel.T)
