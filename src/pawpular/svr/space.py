"""The SVR head's search space: what an Optuna trial samples, the parameters a finished trial fits with, and what
each fold caches so that a trial is cheap.

    params = suggest(trial, cfg.svr)          # {"C", "epsilon"[, "gamma_x"]}: what fit_predict takes
    params = trial_params(study.best_params, cfg.svr)
    attach(folds, cfg.svr, cache_mode(cfg, fold_of, device))

C is log-uniform in [svr.c_min, svr.c_max]; epsilon in [svr.epsilon_min, svr.epsilon_max] with svr.tune_epsilon;
with svr.tune_gamma the RBF width is each fold's svr.gamma width ('scale') times ``gamma_x``, log-uniform in
[svr.gamma_min, svr.gamma_max]. A tuned width caches each fold's squared distances (a trial: exp + fit), a fixed
one its kernels (a trial: a fit); ``svr_memory`` decides whether they fit in svr.max_kernel_gb.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import head as svr_head
from . import memory as svr_memory


def suggest(trial: Any, s: Any) -> dict:
    """A trial's SVR parameters: C log-uniform in [c_min, c_max]; epsilon too with svr.tune_epsilon; with
    svr.tune_gamma the width's multiple ``gamma_x`` log-uniform in [gamma_min, gamma_max]."""
    eps = trial.suggest_float("epsilon", s.epsilon_min, s.epsilon_max, log=True) if s.tune_epsilon else s.epsilon
    params = {"C": trial.suggest_float("C", s.c_min, s.c_max, log=True), "epsilon": eps}
    if s.tune_gamma:
        params["gamma_x"] = trial.suggest_float("gamma_x", s.gamma_min, s.gamma_max, log=True)
    return params


def trial_params(sampled: dict, s: Any) -> dict:
    """The fit parameters of a finished trial's ``params`` (what ``suggest`` returned for it)."""
    params = {"C": float(sampled["C"]), "epsilon": float(sampled.get("epsilon", s.epsilon))}
    if s.tune_gamma:
        params["gamma_x"] = float(sampled["gamma_x"])
    return params


def cache_mode(cfg: Any, fold_of: np.ndarray, device: str) -> str:
    """svr.kernel_cache resolved: 'precomputed' (kernels, or distances with svr.tune_gamma) or 'plain'."""
    return svr_memory.resolve_kernel_cache(
        cfg.svr.kernel_cache,
        fold_of,
        cfg.svr.max_kernel_gb,
        device,
        cfg.svr.workers,
        cfg.svr.tune_gamma,
    )


def attach(folds: list, s: Any, mode: str, device: str = "cpu") -> None:
    """What a trial reads cached: squared distances with a tuned width, kernels with a fixed one."""
    if mode == "precomputed" and s.tune_gamma:
        svr_head.attach_distances(folds, device)
    elif mode == "precomputed":
        svr_head.attach_kernels(folds)
