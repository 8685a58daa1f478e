"""The SVR head's fitting: per-fold standardized features, the RBF width, cached kernels, fits and predictions.

Used by the SVR stage (Optuna trials, final fits) and ``select`` (scoring sets of embeddings). Reads and writes
nothing. The RBF width gamma is fixed per fold (``svr.gamma``: 'scale' = 1 / (n_features * X_train.var()) as
scikit-learn defines it, 'auto' = 1 / n_features, or a number), so each fold's kernel matrices can be computed
once (one BLAS product) and every trial fits ``SVR(kernel='precomputed')`` on them: the same model as refitting
``SVR(kernel='rbf')`` on the features, without recomputing n^2 distances per trial.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from . import backend
from .config import SvrConfig
from .heads import HI, LO, RbfKernel, Standardizer, SvrHead, rbf_kernel
from .metrics import rmse

log = logging.getLogger("pawpular")
Array = Any  # numpy.ndarray on CPU, cupy.ndarray on a RAPIDS GPU


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
    gamma: float
    k_train: Array | None = None  # rbf(x_train, x_train)
    k_val: Array | None = None  # rbf(x_val, x_train)
    n_rows: int = 0  # rows of the whole train table (holdout included)


def make_fold(fold: int, x: Array, y: np.ndarray, fold_of: np.ndarray, gamma: float | str, device: str) -> FoldData:
    """Split the train matrix ``x`` (rows = train table) by ``fold_of``; standardize on the training rows.

    Training rows are the other folds' (fold_of >= 0 and != fold): holdout rows (fold -1) are never fit on.
    """
    xp = backend.array_module(device)
    x = xp.asarray(x)
    val = np.flatnonzero(fold_of == fold)
    tr = np.flatnonzero((fold_of != fold) & (fold_of >= 0))
    rows = x[xp.asarray(tr)]
    scaler = Standardizer.fit(rows)
    x_train = scaler.transform(rows)
    return FoldData(fold, x_train, xp.asarray(y[tr], dtype=np.float64), scaler.transform(x[xp.asarray(val)]), val,
                    scaler, resolve_gamma(x_train, gamma), n_rows=len(fold_of))


def kernel_gb(fold_of: np.ndarray) -> float:
    """Memory the cached float64 kernels take: per fold, train x (train + validation) rows. Fold sizes alone
    decide it, so it is known before any fold is built."""
    folds = [k for k in np.unique(fold_of) if k >= 0]
    n_train = {k: int(((fold_of != k) & (fold_of >= 0)).sum()) for k in folds}
    return sum(8 * n_train[k] * (n_train[k] + int((fold_of == k).sum())) for k in folds) / 2**30


def attach_kernels(folds: Sequence[FoldData]) -> None:
    for f in folds:
        f.k_train = rbf_kernel(f.x_train, f.x_train, f.gamma)
        f.k_val = rbf_kernel(f.x_val, f.x_train, f.gamma)


def detach_kernels(folds: Sequence[FoldData]) -> None:
    for f in folds:
        f.k_train = f.k_val = None


def resolve_kernel_cache(mode: str, fold_of: np.ndarray, max_gb: float, device: str) -> str:
    """'precomputed' or 'plain' for ``svr.kernel_cache``, logged with the reason.

    auto: cached kernels when they fit in ``max_gb``; precomputed: cached kernels whatever their size (an
    explicit request); plain: refit from features every trial.
    """
    need = kernel_gb(fold_of)
    if mode == "plain":
        chosen, why = "plain", "asked for"
    elif not backend.svr_precomputed_ok(device):
        chosen, why = "plain", "this cuML has no kernel='precomputed' (needs 26.02+)"
    elif mode == "auto" and need > max_gb:
        chosen, why = "plain", f"cached kernels would need {need:.2f} GB > svr.max_kernel_gb={max_gb:g}"
    else:
        chosen, why = "precomputed", f"{need:.2f} GB of kernels"
    log.info("kernel_cache: %s -> %s (%s)", mode, chosen, why)
    return chosen


def _n_jobs(device: str, n_folds: int) -> int:
    """libsvm releases the GIL: CPU folds fit in parallel threads. A GPU runs them one after another."""
    if backend.use_rapids(device):
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores = int(os.environ.get("PAWPULAR_SVR_THREADS", cores))  # local svr workers take one core each
    return max(1, min(cores, n_folds))


def fit_predict(params: dict, folds: Sequence[FoldData], device: str = "cpu") -> np.ndarray:
    """Validation predictions of every fold (train-table rows; NaN elsewhere), clipped to [1, 100].

    ``params``: C and epsilon. A fold with cached kernels fits SVR(kernel='precomputed') on them, otherwise
    SVR(kernel='rbf') on its features: the same model, so the same predictions up to the solver's tolerance.
    """
    def one(f: FoldData) -> np.ndarray:
        if f.k_train is not None:
            model = backend.build_svr(device, kernel="precomputed", **params).fit(f.k_train, f.y_train)
            return backend.to_numpy(model.predict(f.k_val))
        model = backend.build_svr(device, gamma=f.gamma, **params).fit(f.x_train, f.y_train)
        return backend.to_numpy(model.predict(f.x_val))

    oof = np.full(max(f.n_rows for f in folds), np.nan)
    with ThreadPoolExecutor(_n_jobs(device, len(folds))) as pool:
        for f, pred in zip(folds, pool.map(one, folds), strict=True):
            oof[f.val_rows] = pred
    return np.clip(oof, LO, HI)


def oof_rmse(params: dict, folds: Sequence[FoldData], y: np.ndarray, device: str = "cpu") -> float:
    """RMSE of ``fit_predict`` over the validation rows of every fold (what a trial scores)."""
    pred = fit_predict(params, folds, device)
    rows = ~np.isnan(pred)  # every fold's validation rows, in train-table order (not the holdout)
    return rmse(pred[rows], y[rows])


def fit_head(f: FoldData, params: dict, columns: list[str], mode: str, device: str) -> tuple[SvrHead, Any]:
    """The final SVR of a fold, fitted on its standardized features; returns (the head's arrays, the estimator).

    On a CPU with cached kernels its kernel is ``RbfKernel(gamma)`` (scikit-learn computes the Gram matrix by one
    BLAS product instead of libsvm's row by row dot products); otherwise kernel='rbf'. Same model either way, and
    the same arrays: what ships is ``SvrHead``, never the estimator.
    """
    kernel: Any = RbfKernel(f.gamma) if mode == "precomputed" and not backend.use_rapids(device) else "rbf"
    model = backend.build_svr(device, kernel=kernel, gamma=f.gamma, **params).fit(f.x_train, f.y_train)
    return SvrHead.from_fitted(model, f.x_train, f.scaler, f.gamma, columns, f.fold, params), model


def suggest(trial: Any, s: SvrConfig) -> dict:
    """The trial's SVR parameters: C log-uniform in [c_min, c_max]; epsilon too with tune_epsilon."""
    eps = trial.suggest_float("epsilon", s.epsilon_min, s.epsilon_max, log=True) if s.tune_epsilon else s.epsilon
    return {"C": trial.suggest_float("C", s.c_min, s.c_max, log=True), "epsilon": eps}


def make_objective(folds: Sequence[FoldData], y: np.ndarray, s: SvrConfig, device: str) -> Callable[[Any], float]:
    """Optuna's objective: only sampling, then the plain ``oof_rmse`` that tests call without Optuna."""
    def objective(trial: Any) -> float:
        return oof_rmse(suggest(trial, s), folds, y, device)

    return objective
