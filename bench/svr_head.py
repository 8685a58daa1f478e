"""Benchmark: the SVR stage's tuning (RBF kernels cached per fold) vs a naive loop refitting SVR every trial.

    python bench/svr_head.py                                      # 9,912 x 1,536, 5 folds, 30 trials
    python bench/svr_head.py --rows 1500 --dims 256 --trials 6    # smoke run, under a minute
    python bench/svr_head.py --naive-trials 6                     # naive loop replays 6 of the 30 trials

Data: embedding-shaped synthetic rows: a latent z (8 dims) encoded into ``--dims`` features by a random linear map,
noise and tanh; the target is a nonlinear function of z plus noise, scaled to mean ~38 and std ~20 and clipped to
[1, 100] (Pawpularity's range), so C matters and the RMSE has a real optimum.

Fast loop: the stage's own code on these arrays: ``svr_head.make_fold`` (standardize per fold, gamma='scale'),
``svr_head.attach_kernels`` (one BLAS product per fold) and a seeded Optuna TPE study whose objective is
``stages.svr.make_objective`` (``svr_head.fit_predict`` with SVR(kernel='precomputed')). Timed from the raw
features to the last trial.

Naive loop: for each trial, for each fold, standardize the raw features (StandardScaler fit on the fold's training
rows) and fit scikit-learn's SVR(kernel='rbf', gamma='scale') on them, then predict the fold's rows: what a
notebook without caching does. It REPLAYS the trials the fast study chose (the same C and epsilon, in order), so
both loops evaluate the same sequence of C values and "same best C" is the argmin of two RMSE columns over the
same candidates. Both loops use the same SVR arguments (``backend.SVR_ARGS``: tol, cache_size) and run a
trial's folds on the same thread pool (libsvm releases the GIL): the ratio measures the kernel caching alone.

The full naive loop takes hours on 2 CPU cores (each fit evaluates ~63M kernel entries of 1,536 dims). With
``--naive-trials N`` below ``--trials`` it replays the fast study's best trial and the N-1 trials with the next
lowest RMSEs (the only contenders for the best place), and its time is extrapolated per trial to all trials; the
printout says so. Per-trial RMSE differences between the loops are printed for every replayed trial.

On a GPU with cuML the stage's tuning with device=cuda (cuML SVR) is timed as well and compared with the naive
scikit-learn loop.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pawpular import backend, svr_head, svr_memory
from pawpular.config import SvrConfig
from pawpular.metrics import rmse
from pawpular.stages.svr import make_objective
from pawpular.svr_head import HI, LO


def make_data(rows: int, dims: int, latent: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((rows, latent))
    w = rng.standard_normal((latent, dims)) / np.sqrt(latent)
    x = np.tanh(z @ w + 0.7 * rng.standard_normal((rows, dims))).astype(np.float32)
    s = np.sin(1.5 * z[:, 0]) + 0.5 * z[:, 1] ** 2 + z[:, 2] * z[:, 3] + 0.5 * np.abs(z[:, 4])
    s = (s - s.mean()) / s.std()
    y = np.clip(38 + 20 * (0.8 * s + 0.6 * rng.standard_normal(rows)), 1, 100)
    return x, y


def fast_tuning(x: np.ndarray, y: np.ndarray, fold_of: np.ndarray, s: SvrConfig, device: str) -> dict:
    """The stage's tuning on in-memory arrays; returns its timings and the study."""
    import optuna

    t0 = time.perf_counter()
    folds = [svr_head.make_fold(k, x, y, fold_of, s.gamma, device) for k in np.unique(fold_of)]
    mode = svr_memory.resolve_kernel_cache(s.kernel_cache, fold_of, s.max_kernel_gb, device)
    if mode == "precomputed":
        svr_head.attach_kernels(folds)
    t_prep = time.perf_counter() - t0
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=s.seed))
    study.optimize(make_objective(folds, y, s, device), n_trials=s.n_trials)
    return {"seconds": time.perf_counter() - t0, "prep": t_prep, "mode": mode, "study": study}


def naive_trial(
    params: dict, x: np.ndarray, y: np.ndarray, fold_of: np.ndarray, pool: ThreadPoolExecutor
) -> np.ndarray:
    """One trial the naive way: per fold, standardize the raw features and refit SVR(kernel='rbf') on them."""
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVR

    def one(k: int) -> tuple[np.ndarray, np.ndarray]:
        tr, va = np.flatnonzero(fold_of != k), np.flatnonzero(fold_of == k)
        scaler = StandardScaler().fit(x[tr].astype(np.float64))
        model = SVR(**{**backend.SVR_ARGS, "kernel": "rbf", "gamma": "scale", **params})
        model.fit(scaler.transform(x[tr].astype(np.float64)), y[tr])
        return va, model.predict(scaler.transform(x[va].astype(np.float64)))

    oof = np.full(len(y), np.nan)
    for va, pred in pool.map(one, np.unique(fold_of)):
        oof[va] = pred
    return np.clip(oof, LO, HI)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=9912)
    p.add_argument("--dims", type=int, default=1536)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--trials", type=int, default=30)
    p.add_argument("--naive-trials", type=int, default=None, help="replay only this many trials (default: all)")
    p.add_argument("--c-min", type=float, default=0.1)
    p.add_argument("--c-max", type=float, default=100.0)
    p.add_argument("--max-kernel-gb", type=float, default=8.0)
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    x, y = make_data(args.rows, args.dims)
    fold_of = np.random.default_rng(1).permutation(args.rows) % args.folds
    s = SvrConfig(
        n_trials=args.trials,
        c_min=args.c_min,
        c_max=args.c_max,
        seed=args.seed,
        kernel_cache="precomputed",
        max_kernel_gb=args.max_kernel_gb,
    )
    threads = svr_head._n_jobs("cpu", args.folds)
    print(
        f"data: {args.rows} rows x {args.dims} dims, {args.folds} folds, {args.trials} trials; target mean "
        f"{y.mean():.1f} std {y.std():.1f}; {threads} threads for the folds of a trial; {os.cpu_count()} CPUs",
        flush=True,
    )

    fast = fast_tuning(x, y, fold_of, s, "cpu")
    trials = fast["study"].trials
    fast_rmse = np.array([t.value for t in trials])
    print(
        f"fast  (stage, {fast['mode']} kernels): {fast['seconds']:8.1f} s  (folds + kernels {fast['prep']:.1f} s, "
        f"{len(trials)} trials {fast['seconds'] - fast['prep']:.1f} s)",
        flush=True,
    )

    n_naive = min(args.naive_trials or len(trials), len(trials))
    replay = sorted(np.argsort(fast_rmse, kind="stable")[:n_naive].tolist())
    naive_rmse = {}
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for i in replay:
            t1 = time.perf_counter()
            naive_rmse[i] = rmse(naive_trial(trials[i].params | {"epsilon": s.epsilon}, x, y, fold_of, pool), y)
            print(
                f"  naive trial {i:2d}: C={trials[i].params['C']:9.4f}  RMSE {naive_rmse[i]:.5f} "
                f"(fast {fast_rmse[i]:.5f})  {time.perf_counter() - t1:.1f} s",
                flush=True,
            )
    naive_s = (time.perf_counter() - t0) / len(replay) * len(trials)
    extrapolated = len(replay) < len(trials)

    fast_best = int(np.argmin(fast_rmse))
    naive_best = min(naive_rmse, key=naive_rmse.get)
    c_fast, c_naive = trials[fast_best].params["C"], trials[naive_best].params["C"]
    diffs = [abs(naive_rmse[i] - fast_rmse[i]) for i in replay]
    how = f"{len(replay)} of {len(trials)} trials replayed, time extrapolated" if extrapolated else "all trials"
    print(f"naive (scikit-learn SVR refit per trial, {how}): {naive_s:8.1f} s")
    print(f"speed ratio naive / fast: {naive_s / fast['seconds']:.1f}x")
    print(
        f"best C: fast {c_fast:.6g} (RMSE {fast_rmse[fast_best]:.5f}), naive {c_naive:.6g} (RMSE "
        f"{naive_rmse[naive_best]:.5f}); same best C: {'yes' if fast_best == naive_best else 'NO'}"
    )
    print(
        f"RMSE difference at the best C: {abs(fast_rmse[fast_best] - naive_rmse[naive_best]):.2e}; "
        f"largest over replayed trials: {max(diffs):.2e}"
    )

    if backend.has_rapids():
        try:
            gpu_ok = backend.resolve_device("auto") == "cuda"
        except Exception:  # no torch or no CUDA: nothing to compare
            gpu_ok = False
        if gpu_ok:
            s_gpu = SvrConfig(**{**s.__dict__, "kernel_cache": "auto"})
            gpu = fast_tuning(x, y, fold_of, s_gpu, "cuda")
            g = gpu["study"]
            print(
                f"cuML  (stage on GPU, {gpu['mode']} kernels): {gpu['seconds']:8.1f} s; "
                f"best C {g.best_params['C']:.6g} "
                f"RMSE {g.best_value:.5f}; speed ratio naive scikit-learn / cuML: {naive_s / gpu['seconds']:.1f}x"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
