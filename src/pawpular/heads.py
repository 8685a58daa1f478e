"""The SVR head as data: the scaler, the RBF kernel and the fitted decision function of one fold, as arrays.

``svr/fold{k}/head.safetensors`` holds, whichever library fitted it (scikit-learn or cuML), the feature columns
(in the metadata), the scaler's mean and scale, the support vectors (standardized), their dual coefficients, the
intercept and the RBF width gamma. ``SvrHead.predict`` computes the decision function itself with numpy::

    f(x) = sum_i dual_coef[i] * exp(-gamma * ||(x - mean) / scale - sv_i||^2) + intercept,   clipped to [1, 100]

so ``predict`` (a Kaggle notebook) needs neither scikit-learn nor cuML, and loading a head runs no code: no pickle,
only arrays and JSON. This module imports numpy, pandas and safetensors (and ``backend`` for CuPy arrays while
fitting on a GPU).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import backend
from .files import read_safetensors, safetensors_bytes

LO, HI = 1.0, 100.0  # Pawpularity range: predictions are clipped to it
Array = Any  # numpy.ndarray on CPU, cupy.ndarray on a RAPIDS GPU
FORMAT = "pawpular-svr-head/1"
ROWS_PER_BLOCK = 2048  # rows of the kernel computed at once at predict: 2048 x 10,000 support vectors = 160 MB


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
    """An RBF kernel callable for scikit-learn's SVR: the same kernel as kernel='rbf', computed by BLAS."""

    gamma: float

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return rbf_kernel(np.asarray(a), np.asarray(b), self.gamma)


@dataclass
class SvrHead:
    """One fold's SVR head: feature columns, scaler, support vectors (standardized), dual coefficients, intercept."""

    columns: list[str]
    mean: np.ndarray  # [D] the scaler, fit on the fold's training rows
    scale: np.ndarray  # [D]
    support_vectors: np.ndarray  # [n_sv, D] standardized training rows
    dual_coef: np.ndarray  # [n_sv]
    intercept: float
    gamma: float
    fold: int
    params: dict = field(default_factory=dict)  # what it was fit with (C, epsilon): a record, not used to predict

    @classmethod
    def from_fitted(cls, estimator: Any, x_train: Array, scaler: Standardizer, gamma: float, columns: list[str],
                    fold: int, params: dict | None = None) -> "SvrHead":
        """The arrays of a fitted epsilon-SVR with an RBF kernel (scikit-learn or cuML; kernel 'rbf' or a callable).

        The support vectors are the training rows at ``support_`` (a callable kernel leaves scikit-learn's
        ``support_vectors_`` empty), so the head holds the same vectors whatever the library.
        """
        support = backend.to_numpy(estimator.support_).astype(np.int64)
        vectors = backend.to_numpy(x_train)[support].astype(np.float64)
        dual = backend.to_numpy(estimator.dual_coef_).astype(np.float64).reshape(-1)
        intercept = float(backend.to_numpy(estimator.intercept_).reshape(-1)[0])
        if len(dual) != len(vectors):
            raise ValueError(f"SVR fold {fold}: {len(dual)} dual coefficients for {len(vectors)} support vectors")
        return cls(list(columns), np.asarray(scaler.mean, np.float64), np.asarray(scaler.scale, np.float64),
                   vectors, dual, intercept, float(gamma), int(fold), dict(params or {}))

    def decision(self, x: np.ndarray) -> np.ndarray:
        """The SVR's output for standardized rows ``x`` (not clipped), a block of rows at a time."""
        out = np.empty(len(x), np.float64)
        for start in range(0, len(x), ROWS_PER_BLOCK):
            block = x[start:start + ROWS_PER_BLOCK]
            out[start:start + len(block)] = rbf_kernel(block, self.support_vectors, self.gamma) @ self.dual_coef
        return out + self.intercept

    def predict_matrix(self, x: np.ndarray) -> np.ndarray:
        """Pawpularity (clipped to [1, 100]) for raw feature rows in ``columns`` order."""
        x = (backend.to_numpy(x).astype(np.float64) - self.mean) / self.scale
        return np.clip(self.decision(x), LO, HI)

    def predict(self, features: pd.DataFrame) -> np.ndarray:
        """Pawpularity (clipped to [1, 100]) for a table holding at least ``columns``."""
        missing = [c for c in self.columns if c not in features.columns]
        if missing:
            raise ValueError(f"SVR fold {self.fold}: {len(missing)} feature columns missing, e.g. {missing[:3]}")
        return self.predict_matrix(features[self.columns].to_numpy(np.float64))

    def to_bytes(self) -> bytes:
        """The safetensors file: the arrays, and the columns and scalars as metadata."""
        arrays = {"mean": self.mean, "scale": self.scale, "support_vectors": self.support_vectors,
                  "dual_coef": self.dual_coef}
        meta = {"format": FORMAT, "kernel": "rbf", "columns": self.columns, "intercept": self.intercept,
                "gamma": self.gamma, "fold": self.fold, "params": self.params}
        return safetensors_bytes({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in arrays.items()}, meta)

    @classmethod
    def load(cls, path: str | Path) -> "SvrHead":
        """Read a head written by ``to_bytes``; a file of another kind is an ArtifactError naming it."""
        meta, arrays = read_safetensors(path, "np", "an SVR head file", FORMAT)
        return cls(meta["columns"], arrays["mean"], arrays["scale"], arrays["support_vectors"], arrays["dual_coef"],
                   float(meta["intercept"]), float(meta["gamma"]), int(meta["fold"]), meta.get("params", {}))
