"""What gets pickled and shipped: the SVR head of one fold (its columns, scaler and fitted SVR) and its kernel.

``svr/fold{k}/model.pkl`` holds an ``SvrHead``; ``predict`` unpickles it in a Kaggle notebook, so this module
imports nothing from the stages (only numpy, pandas and ``backend`` for CPU/GPU arrays).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from . import backend

LO, HI = 1.0, 100.0  # Pawpularity range: predictions are clipped to it
Array = Any  # numpy.ndarray on CPU, cupy.ndarray on a RAPIDS GPU


@dataclass
class Standardizer:
    """Per-column (x - mean) / std fit on a fold's training rows; constant columns keep scale 1 (as scikit-learn)."""

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, x: Array) -> "Standardizer":
        x = x.astype(np.float64)
        scale = backend.to_numpy(x.std(axis=0))
        scale[scale < 1e-12] = 1.0
        return cls(backend.to_numpy(x.mean(axis=0)), scale)

    def transform(self, x: Array) -> Array:
        xp = backend.array_module_of(x)
        return (x.astype(np.float64) - xp.asarray(self.mean)) / xp.asarray(self.scale)


def rbf_kernel(a: Array, b: Array, gamma: float) -> Array:
    """exp(-gamma * ||a_i - b_j||^2) in float64: one matrix product, ||a||^2 + ||b||^2 - 2ab clamped at 0, in place."""
    xp = backend.array_module_of(a)
    a, b = a.astype(np.float64, copy=False), b.astype(np.float64, copy=False)
    k = a @ b.T
    k *= -2.0
    k += (a * a).sum(axis=1)[:, None]
    k += (b * b).sum(axis=1)[None, :]
    xp.maximum(k, 0.0, out=k)  # rounding can make a tiny distance negative
    k *= -gamma
    xp.exp(k, out=k)
    return k


@dataclass(frozen=True)
class RbfKernel:
    """A picklable RBF kernel callable for scikit-learn's SVR: the same kernel as kernel='rbf', computed by BLAS."""

    gamma: float

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return rbf_kernel(np.asarray(a), np.asarray(b), self.gamma)


@dataclass
class SvrHead:
    """What ``predict`` needs for one fold: the feature columns in order, the fitted scaler and SVR."""

    columns: list[str]
    scaler: Standardizer
    svr: Any  # scikit-learn SVR fitted on standardized features (kernel 'rbf' or an RbfKernel); cuML if unconvertible
    fold: int

    def predict(self, features: pd.DataFrame) -> np.ndarray:
        """Pawpularity (clipped to [1, 100]) for a table holding at least ``columns``."""
        missing = [c for c in self.columns if c not in features.columns]
        if missing:
            raise ValueError(f"SVR fold {self.fold}: {len(missing)} feature columns missing, e.g. {missing[:3]}")
        x = self.scaler.transform(features[self.columns].to_numpy(np.float64))
        return np.clip(backend.to_numpy(self.svr.predict(x)).astype(np.float64), LO, HI)
