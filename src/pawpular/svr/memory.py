"""How much memory the SVR head's cached kernels take, and whether to cache them (``svr.kernel_cache``,
``svr.max_kernel_gb``): every local worker's kernels (or, with a tuned width, its squared distances plus the
kernels of the folds a trial fits at once), plus with cuML the cache each fit allocates on the GPU."""

from __future__ import annotations

import logging

import numpy as np

from ..machine import backend
from . import head as svr_head

log = logging.getLogger("pawpular")


def kernel_gb(fold_of: np.ndarray) -> float:
    """Memory the cached float64 kernels take: per fold, train x (train + validation) rows. Fold sizes alone
    decide it, so it is known before any fold is built."""
    folds = [k for k in np.unique(fold_of) if k >= 0]
    n_train = {k: int(((fold_of != k) & (fold_of >= 0)).sum()) for k in folds}
    return sum(8 * n_train[k] * (n_train[k] + int((fold_of == k).sum())) for k in folds) / 2**30


def trial_kernel_gb(fold_of: np.ndarray, parallel: int) -> float:
    """With a tuned width: the float64 kernels a trial makes from the cached distances, for the ``parallel`` largest
    folds it fits at once (train x (train + validation) rows each)."""
    folds = [k for k in np.unique(fold_of) if k >= 0]
    sizes = sorted(
        (8 * int(((fold_of != k) & (fold_of >= 0)).sum()) * int((fold_of >= 0).sum()) for k in folds), reverse=True
    )
    return sum(sizes[: max(1, parallel)]) / 2**30


def fit_cache_gb(fold_of: np.ndarray) -> float:
    """The kernel cache one cuML SVR fit allocates on the GPU: ``cache_size`` MiB of SVR_ARGS, at most the fold's
    float32 train x train rows. (libsvm grows its cache in RAM as it needs rows, up to the same size.)"""
    n_train = max((int(((fold_of != k) & (fold_of >= 0)).sum()) for k in np.unique(fold_of) if k >= 0), default=0)
    return min(backend.SVR_ARGS["cache_size"] / 1024, 4 * n_train**2 / 2**30)


def memory_gb(fold_of: np.ndarray, device: str, workers: int = 1, tuned_width: bool = False) -> float:
    """What tuning with cached kernels holds at once: every local worker process (``svr.workers``, on the same
    machine and GPU) its own kernels (``tuned_width``: its squared distances, the same size, plus the kernels of
    the folds one trial fits at once: one with cuML, one per thread on a CPU), plus with cuML the cache of the one
    fit each process runs at a time."""
    cache = fit_cache_gb(fold_of) if backend.use_rapids(device) else 0.0
    trial = 0.0
    if tuned_width:  # an upper bound: a local worker fits one fold at a time, the stage's process one per thread
        n_folds = len([k for k in np.unique(fold_of) if k >= 0])
        trial = trial_kernel_gb(fold_of, svr_head._n_jobs(device, n_folds))
    return workers * (kernel_gb(fold_of) + trial + cache)


def resolve_kernel_cache(
    mode: str, fold_of: np.ndarray, max_gb: float, device: str, workers: int = 1, tuned_width: bool = False
) -> str:
    """'precomputed' or 'plain' for ``svr.kernel_cache``, logged with the reason.

    auto: cached kernels (or distances, ``tuned_width``) when ``memory_gb`` (every worker's kernels, cuML's fit
    caches) fits in ``max_gb``; precomputed: cached kernels whatever their size (an explicit request); plain:
    refit from features every trial.
    """
    need = memory_gb(fold_of, device, workers, tuned_width)
    each = f" ({workers} workers)" if workers > 1 else ""
    if mode == "plain":
        chosen, why = "plain", "asked for"
    elif not backend.svr_precomputed_ok(device):
        chosen, why = "plain", "this cuML has no kernel='precomputed' (needs 26.02+)"
    elif mode == "auto" and need > max_gb:
        chosen, why = "plain", f"cached kernels would need {need:.2f} GB{each} > svr.max_kernel_gb={max_gb:g}"
    else:
        what = "distances and trial kernels" if tuned_width else "kernels"
        chosen, why = "precomputed", f"{need:.2f} GB of {what}{each}"
    log.info("kernel_cache: %s -> %s (%s)", mode, chosen, why)
    return chosen
