"""How much memory the SVR head's cached kernels take, and whether to cache them (``svr.kernel_cache``,
``svr.max_kernel_gb``): every local worker's kernels, plus with cuML the cache each fit allocates on the GPU."""

from __future__ import annotations

import logging

import numpy as np

from . import backend

log = logging.getLogger("pawpular")


def kernel_gb(fold_of: np.ndarray) -> float:
    """Memory the cached float64 kernels take: per fold, train x (train + validation) rows. Fold sizes alone
    decide it, so it is known before any fold is built."""
    folds = [k for k in np.unique(fold_of) if k >= 0]
    n_train = {k: int(((fold_of != k) & (fold_of >= 0)).sum()) for k in folds}
    return sum(8 * n_train[k] * (n_train[k] + int((fold_of == k).sum())) for k in folds) / 2**30


def fit_cache_gb(fold_of: np.ndarray) -> float:
    """The kernel cache one cuML SVR fit allocates on the GPU: ``cache_size`` MiB of SVR_ARGS, at most the fold's
    float32 train x train rows. (libsvm grows its cache in RAM as it needs rows, up to the same size.)"""
    n_train = max((int(((fold_of != k) & (fold_of >= 0)).sum()) for k in np.unique(fold_of) if k >= 0), default=0)
    return min(backend.SVR_ARGS["cache_size"] / 1024, 4 * n_train**2 / 2**30)


def memory_gb(fold_of: np.ndarray, device: str, workers: int = 1) -> float:
    """What tuning with cached kernels holds at once: every local worker process (``svr.workers``, on the same
    machine and GPU) its own kernels, plus with cuML the cache of the one fit each process runs at a time."""
    cache = fit_cache_gb(fold_of) if backend.use_rapids(device) else 0.0
    return workers * (kernel_gb(fold_of) + cache)


def resolve_kernel_cache(mode: str, fold_of: np.ndarray, max_gb: float, device: str, workers: int = 1) -> str:
    """'precomputed' or 'plain' for ``svr.kernel_cache``, logged with the reason.

    auto: cached kernels when ``memory_gb`` (every worker's kernels, cuML's fit caches) fits in
    ``max_gb``; precomputed: cached kernels whatever their size (an explicit request); plain: refit from features
    every trial.
    """
    need = memory_gb(fold_of, device, workers)
    each = f" ({workers} workers)" if workers > 1 else ""
    if mode == "plain":
        chosen, why = "plain", "asked for"
    elif not backend.svr_precomputed_ok(device):
        chosen, why = "plain", "this cuML has no kernel='precomputed' (needs 26.02+)"
    elif mode == "auto" and need > max_gb:
        chosen, why = "plain", f"cached kernels would need {need:.2f} GB{each} > svr.max_kernel_gb={max_gb:g}"
    else:
        chosen, why = "precomputed", f"{need:.2f} GB of kernels{each}"
    log.info("kernel_cache: %s -> %s (%s)", mode, chosen, why)
    return chosen
