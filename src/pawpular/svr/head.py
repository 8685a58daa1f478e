"""The SVR head, whole: embedding tables -> features -> scaler -> RBF kernel -> fit / predict -> the arrays that ship.

    x, columns = assemble_matrix(sets, ids, names, meta)        # embedding sets side by side (+ the 12 flags)
    fold = make_fold(k, x, y, fold_of, gamma, device)           # standardized on the other folds' rows
    oof = fit_predict({"C": 30, "epsilon": 0.1}, folds)         # what an Optuna trial scores (svr/study.py)
    head, estimator = fit_head(fold, params, columns, mode, device)
    head.to_bytes() / SvrHead.load(path) / head.predict(features)   # svr/fold{k}/head.safetensors; predict

**Features** (``svr/features.py``, re-exported here). An embedding table is ``Id`` + ``e0..e{D-1}`` (float32), one
row per image (``emb/<set>/{train,test}.parquet``). The SVR's input is the listed sets' tables joined on Id, side by
side (``<set>/e<j>`` columns), plus the 12 metadata flags with ``svr.use_meta``: the same code for the SVR stage,
``select`` and ``predict``. Each column is z-scored on the fold's training rows; with ``svr.set_weighting: sets``
it is then multiplied by 1/sqrt(its set's width), so every set (the flags as one) weighs the same in the RBF
distance. The weight is folded into the scaler's ``scale``, so what ships and how predict computes are unchanged.

**Fitting.** Each fold has a reference RBF width (``svr.gamma``: 'scale' = 1 / (n_features * X_train.var()) as
scikit-learn defines it, 'auto' = 1 / n_features, or a number); a trial's width is that reference times its
``gamma_x`` (``svr.tune_gamma``: Optuna samples it with C; 1 otherwise). With a width that varies, each fold's
squared distances are computed once (one BLAS product, float64) and a trial's kernels are their element-wise
``exp(-gamma * d2)`` (``attach_distances``); with a fixed width the kernels themselves are cached
(``attach_kernels``). Either way every trial fits ``SVR(kernel='precomputed')``: the same model as refitting
``SVR(kernel='rbf')`` on the features, without n^2 distances per trial. scikit-learn on a CPU, cuML on a RAPIDS
GPU (``backend.build_svr``).

**What ships.** ``SvrHead``: whichever library fitted it, the feature columns, the scaler's mean and scale, the
support vectors (standardized), their dual coefficients, the intercept and gamma, in one safetensors file. Its
``predict`` computes the decision function with numpy::

    f(x) = sum_i dual_coef[i] * exp(-gamma * ||(x - mean) / scale - sv_i||^2) + intercept,   clipped to [1, 100]

so ``predict`` (a Kaggle notebook) needs neither scikit-learn nor cuML, and loading a head runs no code. The
pipeline's own SVR predictions come from the same arrays. Of files, it reads head files only (``SvrHead.load``;
embedding tables: ``embedding_sets.read_sets``) and writes none (``to_bytes`` gives the bytes a stage writes).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..machine import backend
from ..scores.metrics import rmse
from ..store.errors import env_number
from ..store.files import read_safetensors, safetensors_bytes

# the features and the kernel maths, re-exported: the stage, predict and the tests name them here
from .features import WEIGHTINGS as WEIGHTINGS
from .features import assemble_features as assemble_features
from .features import assemble_matrix as assemble_matrix
from .features import embedding_table as embedding_table
from .features import set_weights as set_weights
from .kernel import RbfKernel as RbfKernel
from .kernel import kernel_of_distances as kernel_of_distances
from .kernel import rbf_kernel as rbf_kernel
from .kernel import squared_distances as squared_distances

log = logging.getLogger("pawpular")
LO, HI = 1.0, 100.0  # Pawpularity range: predictions are clipped to it
Array = Any  # numpy.ndarray on CPU, cupy.ndarray on a RAPIDS GPU
FORMAT = "pawpular-svr-head/1"
ROWS_PER_BLOCK = 2048  # rows of the kernel computed at once at predict: 2048 x 10,000 support vectors = 160 MB


# ---------------------------------------------------------------------------------------------------------------
# Scaler, kernel and the arrays that ship


@dataclass
class Standardizer:
    """Per-column (x - mean) / std fit on a fold's training rows; constant columns keep scale 1 (as scikit-learn)."""

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, x: Array, weight: np.ndarray | None = None) -> Standardizer:
        """``weight`` (per column, e.g. ``set_weights``): each z-scored column is multiplied by it (its scale divided),
        so a column's share of the RBF distance is weight^2; what ships is still a mean and a scale."""
        x = x.astype(np.float64)
        scale = backend.to_numpy(x.std(axis=0))
        scale[scale < 1e-12] = 1.0
        if weight is not None:
            scale = scale / np.asarray(weight, np.float64)
        return cls(backend.to_numpy(x.mean(axis=0)), scale)

    def transform(self, x: Array) -> Array:
        xp = backend.array_module_of(x)
        return (x.astype(np.float64) - xp.asarray(self.mean)) / xp.asarray(self.scale)


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
    def from_fitted(
        cls,
        estimator: Any,
        x_train: Array,
        scaler: Standardizer,
        gamma: float,
        columns: list[str],
        fold: int,
        params: dict | None = None,
    ) -> SvrHead:
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
        return cls(
            list(columns),
            np.asarray(scaler.mean, np.float64),
            np.asarray(scaler.scale, np.float64),
            vectors,
            dual,
            intercept,
            float(gamma),
            int(fold),
            dict(params or {}),
        )

    def decision(self, x: np.ndarray) -> np.ndarray:
        """The SVR's output for standardized rows ``x`` (not clipped), a block of rows at a time."""
        out = np.empty(len(x), np.float64)
        for start in range(0, len(x), ROWS_PER_BLOCK):
            block = x[start : start + ROWS_PER_BLOCK]
            out[start : start + len(block)] = rbf_kernel(block, self.support_vectors, self.gamma) @ self.dual_coef
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
        arrays = {
            "mean": self.mean,
            "scale": self.scale,
            "support_vectors": self.support_vectors,
            "dual_coef": self.dual_coef,
        }
        meta = {
            "format": FORMAT,
            "kernel": "rbf",
            "columns": self.columns,
            "intercept": self.intercept,
            "gamma": self.gamma,
            "fold": self.fold,
            "params": self.params,
        }
        return safetensors_bytes({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in arrays.items()}, meta)

    @classmethod
    def load(cls, path: str | Path) -> SvrHead:
        """Read a head written by ``to_bytes``; a file of another kind is an ArtifactError naming it."""
        meta, arrays = read_safetensors(path, "np", "an SVR head file", FORMAT)
        return cls(
            meta["columns"],
            arrays["mean"],
            arrays["scale"],
            arrays["support_vectors"],
            arrays["dual_coef"],
            float(meta["intercept"]),
            float(meta["gamma"]),
            int(meta["fold"]),
            meta.get("params", {}),
        )


# ---------------------------------------------------------------------------------------------------------------
# Fitting: per-fold standardized rows, cached kernels, fits and out-of-fold predictions


def resolve_gamma(x_train: Array, gamma: float | str) -> float:
    """The RBF width for standardized training rows: scikit-learn's 'scale' and 'auto', or a number."""
    if gamma == "scale":
        var = float(x_train.var())
        return 1.0 / (x_train.shape[1] * var) if var > 0 else 1.0 / x_train.shape[1]
    if gamma == "auto":
        return 1.0 / x_train.shape[1]
    if isinstance(gamma, (int, float)) and gamma > 0:
        return float(gamma)
    raise ValueError(f"svr.gamma must be 'scale', 'auto' or a positive number, got {gamma!r}")


@dataclass
class FoldData:
    """One fold's standardized training and validation rows (train-table order) and, when cached, its kernels."""

    fold: int
    x_train: Array
    y_train: Array
    x_val: Array
    val_rows: np.ndarray  # positions of the fold's rows in the competition's train table
    scaler: Standardizer
    gamma: float  # the reference width (svr.gamma resolved on x_train); a trial's is gamma * params["gamma_x"]
    k_train: Array | None = None  # rbf(x_train, x_train) at the reference width (attach_kernels)
    k_val: Array | None = None  # rbf(x_val, x_train)
    n_rows: int = 0  # rows of the whole train table (holdout included)
    d_train: Array | None = None  # squared distances x_train - x_train (attach_distances)
    d_val: Array | None = None  # squared distances x_val - x_train
    buffers: Any = None  # attach_distances: a queue of kernel buffers the folds a trial fits at once share


def make_fold(
    fold: int,
    x: Array,
    y: np.ndarray,
    fold_of: np.ndarray,
    gamma: float | str,
    device: str,
    target_clip: Sequence[float] | None = None,
    weight: np.ndarray | None = None,
) -> FoldData:
    """Split the train matrix ``x`` (rows = train table) by ``fold_of``; standardize on the training rows (each
    column then multiplied by ``weight``, ``set_weights``).

    Training rows are the other folds' (fold_of >= 0 and != fold): holdout rows (fold -1) are never fit on.
    ``target_clip`` ([low, high], svr.target_clip): the SVR is fit on the target clipped to it; scores
    (``oof_rmse``) compare with the true target the caller passes.
    """
    xp = backend.array_module(device)
    x = xp.asarray(x)
    val = np.flatnonzero(fold_of == fold)
    tr = np.flatnonzero((fold_of != fold) & (fold_of >= 0))
    rows = x[xp.asarray(tr)]
    scaler = Standardizer.fit(rows, weight)
    x_train = scaler.transform(rows)
    y_train = np.asarray(y[tr], np.float64) if target_clip is None else np.clip(y[tr], *target_clip).astype(np.float64)
    return FoldData(
        fold,
        x_train,
        xp.asarray(y_train),
        scaler.transform(x[xp.asarray(val)]),
        val,
        scaler,
        resolve_gamma(x_train, gamma),
        n_rows=len(fold_of),
    )


def attach_kernels(folds: Sequence[FoldData]) -> None:
    """Cache each fold's kernels at its reference width (trials that all use it: no ``gamma_x``)."""
    for f in folds:
        f.k_train = rbf_kernel(f.x_train, f.x_train, f.gamma)
        f.k_val = rbf_kernel(f.x_val, f.x_train, f.gamma)


def attach_distances(folds: Sequence[FoldData], device: str = "cpu") -> None:
    """Cache each fold's squared distances: a trial of any width then costs an element-wise exp and a fit. The
    exp is written into one of ``_n_jobs`` buffers kept for the whole study (a fresh matrix every trial would
    fault in its pages again: several times the exp itself on a busy machine)."""
    xp = backend.array_module(device)
    size = max(len(f.x_train) * (len(f.x_train) + len(f.x_val)) for f in folds)
    pool: queue.Queue = queue.Queue()
    for _ in range(_n_jobs(device, len(folds))):
        pool.put(xp.empty(size, np.float64))
    for f in folds:
        f.d_train = squared_distances(f.x_train, f.x_train)
        f.d_val = squared_distances(f.x_val, f.x_train)
        f.buffers = pool


@contextlib.contextmanager
def trial_kernels(f: FoldData, gamma: float) -> Iterator[tuple[Array, Array]]:
    """The fold's (train x train, validation x train) kernels at ``gamma`` from its cached distances, in a buffer
    held until the block ends."""
    buf = f.buffers.get()
    try:
        n, m = f.d_train.shape[0], f.d_val.shape[0]
        k_train = kernel_of_distances(f.d_train, gamma, out=buf[: n * n].reshape(n, n))
        k_val = kernel_of_distances(f.d_val, gamma, out=buf[n * n : n * (n + m)].reshape(m, n))
        yield k_train, k_val
    finally:
        f.buffers.put(buf)


def detach_kernels(folds: Sequence[FoldData]) -> None:
    """Drop whatever ``attach_kernels`` or ``attach_distances`` cached."""
    for f in folds:
        f.k_train = f.k_val = f.d_train = f.d_val = f.buffers = None


def split_params(params: dict) -> tuple[dict, float]:
    """(the estimator's parameters: C, epsilon; the width's multiple ``gamma_x``, 1 when absent)."""
    return {k: v for k, v in params.items() if k != "gamma_x"}, float(params.get("gamma_x", 1.0))


def _n_jobs(device: str, n_folds: int) -> int:
    """libsvm releases the GIL: CPU folds fit in parallel threads. A GPU runs them one after another."""
    if backend.use_rapids(device):
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores = int(env_number("PAWPULAR_SVR_THREADS", cores, int, 1))  # local svr workers take one core each
    return max(1, min(cores, n_folds))


def fit_predict(params: dict, folds: Sequence[FoldData], device: str = "cpu") -> np.ndarray:
    """Validation predictions of every fold (train-table rows; NaN elsewhere), clipped to [1, 100].

    ``params``: C and epsilon, and ``gamma_x`` (the fold's width is ``f.gamma * gamma_x``; 1 when absent). A fold
    with cached distances fits SVR(kernel='precomputed') on their exp at that width, one with cached kernels
    (reference width only) on those, otherwise SVR(kernel='rbf') on its features: the same model, so the same
    predictions up to the solver's tolerance.
    """
    svr_params, gamma_x = split_params(params)

    def fit_fold(f: FoldData) -> np.ndarray:
        gamma = f.gamma * gamma_x
        if f.d_train is not None:
            with trial_kernels(f, gamma) as (k_train, k_val):
                model = backend.build_svr(device, kernel="precomputed", **svr_params).fit(k_train, f.y_train)
                return backend.to_numpy(model.predict(k_val))
        if f.k_train is not None:
            if gamma_x != 1.0:
                raise ValueError(f"fold {f.fold}: kernels cached at the reference width, asked gamma_x={gamma_x}")
            k_train, k_val = f.k_train, f.k_val
        else:
            model = backend.build_svr(device, gamma=gamma, **svr_params).fit(f.x_train, f.y_train)
            return backend.to_numpy(model.predict(f.x_val))
        model = backend.build_svr(device, kernel="precomputed", **svr_params).fit(k_train, f.y_train)
        return backend.to_numpy(model.predict(k_val))

    oof = np.full(max(f.n_rows for f in folds), np.nan)
    with ThreadPoolExecutor(_n_jobs(device, len(folds))) as pool:
        for f, pred in zip(folds, pool.map(fit_fold, folds), strict=True):
            oof[f.val_rows] = pred
    return np.clip(oof, LO, HI)


def oof_rmse(
    params: dict, folds: Sequence[FoldData], y: np.ndarray, device: str = "cpu", per_fold: dict | None = None
) -> float:
    """RMSE of ``fit_predict`` over the validation rows of every fold (what a trial scores); ``per_fold`` is
    filled with each fold's sum of squared errors (the nested choice of C, ``scores/nested.py``)."""
    pred = fit_predict(params, folds, device)
    rows = ~np.isnan(pred)  # every fold's validation rows, in train-table order (not the holdout)
    if per_fold is not None:
        per_fold.update({str(f.fold): float(((pred[f.val_rows] - y[f.val_rows]) ** 2).sum()) for f in folds})
    return rmse(pred[rows], y[rows])


def fit_head(f: FoldData, params: dict, columns: list[str], mode: str, device: str) -> tuple[SvrHead, Any]:
    """The final SVR of a fold, fitted on its standardized features at width ``f.gamma * params["gamma_x"]`` (the
    width the head records and predicts with); returns (the head's arrays, the estimator).

    On a CPU with cached kernels its kernel is ``RbfKernel(gamma)`` (scikit-learn computes the Gram matrix by one
    BLAS product instead of libsvm's row by row dot products); otherwise kernel='rbf'. Same model either way, and
    the same arrays: what ships is ``SvrHead``, never the estimator.
    """
    svr_params, gamma_x = split_params(params)
    gamma = f.gamma * gamma_x
    kernel: Any = RbfKernel(gamma) if mode == "precomputed" and not backend.use_rapids(device) else "rbf"
    model = backend.build_svr(device, kernel=kernel, gamma=gamma, **svr_params).fit(f.x_train, f.y_train)
    return SvrHead.from_fitted(model, f.x_train, f.scaler, gamma, columns, f.fold, params), model
