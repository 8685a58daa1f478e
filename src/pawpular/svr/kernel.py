"""The SVR head's RBF kernel in float64, computed once as squared distances and then as exp(-gamma * d2) for any
width: the head (``svr/head.py``) caches either per fold, and predict computes its kernel the same way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..machine import backend

Array = Any  # numpy.ndarray on CPU, cupy.ndarray on a RAPIDS GPU


def squared_distances(a: Array, b: Array) -> Array:
    """||a_i - b_j||^2 in float64: one matrix product, ||a||^2 + ||b||^2 - 2ab clamped at 0, in place."""
    xp = backend.array_module_of(a)
    a, b = a.astype(np.float64, copy=False), b.astype(np.float64, copy=False)
    d = a @ b.T
    d *= -2.0
    d += (a * a).sum(axis=1)[:, None]
    d += (b * b).sum(axis=1)[None, :]
    xp.maximum(d, 0.0, out=d)  # rounding can make a tiny distance negative
    return d


def kernel_of_distances(d2: Array, gamma: float, out: Array | None = None) -> Array:
    """exp(-gamma * d2), into ``out`` when given (``d2`` itself: in place): the same operations as ``rbf_kernel``,
    so the same bits."""
    xp = backend.array_module_of(d2)
    out = xp.multiply(d2, -gamma, out=out)
    xp.exp(out, out=out)
    return out


def rbf_kernel(a: Array, b: Array, gamma: float) -> Array:
    """exp(-gamma * ||a_i - b_j||^2) in float64 (``squared_distances`` then ``kernel_of_distances``, in place)."""
    d = squared_distances(a, b)
    return kernel_of_distances(d, gamma, out=d)


@dataclass(frozen=True)
class RbfKernel:
    """An RBF kernel callable for scikit-learn's SVR: the same kernel as kernel='rbf', computed by BLAS."""

    gamma: float

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return rbf_kernel(np.asarray(a), np.asarray(b), self.gamma)
