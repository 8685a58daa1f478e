"""Benchmark: the SVR stage's tuning (RBF kernels cached per fold) vs a naive loop refitting SVR every trial.

    python bench/svr_head.py                                      # 9,912 x 1,536, 5 folds, 30 trials
    python bench/svr_head.py --rows 1500 --dims 256 --trials 6    # smoke run, under a minute
    python bench/svr_head.py --naive-trials 6                     # naive loop replays 6 of the 30 trials

Data: embedding-shaped synthetic rows: a latent z (8 dims) encoded into ``--dims`` features by a random linear map,
noise and tanh; the target is a nonlinear function of z plus noise, scaled to mean ~38 and std ~20 and clipped to
[1, 100] (Pawpularity's range), so C matters and the RMSE has a real optimum.

Fast loop: the stage's own code on these arrays: ``svr_head.make_fold`` (standardize per fold, gamma='scale'),
``svr_space.attach`` (per fold, one BLAS product: the squared distances with the width tuned, the kernels with
C only) and a seeded Optuna TPE study whose objective is ``stages.svr.make_objective`` (``svr_head.fit_predict``
with SVR(kernel='precomputed'); with the width tuned, on exp(-gamma * d2) of the cached distances). Timed from the
raw features to the last trial. It runs twice in one run: C only (svr.tune_gamma false, gamma='scale') and C with
the width (``gamma_x`` x 'scale' in [--gamma-min, --gamma-max]); the printout gives their seconds per trial, their
ratio (each study samples its own C, and a fit's time depends on C and the width), the exp timed on its own, and
what the width costs at equal parameters: the first ``--replay`` C-only trials fit again, in turn, on the cached
kernels and on the exp of the cached distances at gamma_x = 1 (the same kernels).

Naive loop: for each trial, for each fold, standardize the raw features (StandardScaler fit on the fold's training
rows) and fit scikit-learn's SVR(kernel='rbf', gamma=gamma_x / (n_features * X.var())) on them - 'scale' times
the trial's multiple - then predict the fold's rows: what a notebook without caching does. It REPLAYS the trials
the fast study with the width chose (the same C, width and epsilon, in order), so both loops evaluate the same
sequence of parameters and "same best parameters" is the argmin of two RMSE columns over the same candidates.
Both loops use the same SVR arguments (``backend.SVR_ARGS``: tol, cache_size) and run a trial's folds on the same
thread pool (libsvm releases the GIL): the ratio measures the caching alone.

The full naive loop takes hours on 2 CPU cores (each fit evaluates ~63M kernel entries of 1,536 dims). With
``--naive-trials N`` below ``--trials`` it replays the fast study's best trial and the N-1 trials with the next
lowest RMSEs (the only contenders for the best place), and its time is extrapolated per trial to all trials; the
printout says so. Per-trial RMSE differences between the loops are printed for every replayed trial.

On a GPU with cuML the stage's tuning with device=cuda (cuML SVR) is timed as well and compared with the naive
scikit-learn loop.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np

from pawpular.config.schema import SvrConfig
from pawpular.machine import backend
from pawpular.scores.metrics import rmse
from pawpular.stages.svr import make_objective
from pawpular.svr import head as svr_head
from pawpular.svr import space as svr_space
from pawpular.svr.head import HI, LO


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
    mode = svr_space.cache_mode(SimpleNamespace(svr=s), fold_of, device)
    svr_space.attach(folds, s, mode, device)
    t_prep = time.perf_counter() - t0
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=s.seed))
    study.optimize(make_objective(folds, y, s, device), n_trials=s.n_trials)
    seconds = time.perf_counter() - t0
    exp_s = None
    if s.tune_gamma and mode == "precomputed":  # what the width adds to a trial: every fold's exp, timed alone
        t1 = time.perf_counter()
        for f in folds:
            with svr_head.trial_kernels(f, f.gamma * 0.3):
                pass
        exp_s = time.perf_counter() - t1
    svr_head.detach_kernels(folds)
    return {"seconds": seconds, "prep": t_prep, "mode": mode, "study": study, "exp": exp_s}


def replay_overhead(x: np.ndarray, y: np.ndarray, fold_of: np.ndarray, params: list[dict]) -> tuple[float, float]:
    """Seconds a trial for the same C values fit on cached kernels (C only) and on the exp of cached distances at
    gamma_x = 1 (the same kernels: what the width adds), trial by trial in turn so both meet the same load."""
    folds = [svr_head.make_fold(k, x, y, fold_of, "scale", "cpu") for k in np.unique(fold_of)]
    with_d = [dataclasses.replace(f) for f in folds]
    svr_head.attach_kernels(folds)
    svr_head.attach_distances(with_d)
    seconds = {"kernels": 0.0, "distances": 0.0}
    for p in params:
        for label, fs, q in (("kernels", folds, p), ("distances", with_d, {**p, "gamma_x": 1.0})):
            t0 = time.perf_counter()
            svr_head.fit_predict(q, fs)
            seconds[label] += time.perf_counter() - t0
    svr_head.detach_kernels(folds + with_d)
    return seconds["kernels"] / len(params), seconds["distances"] / len(params)


def naive_trial(
    params: dict, x: np.ndarray, y: np.ndarray, fold_of: np.ndarray, pool: ThreadPoolExecutor
) -> np.ndarray:
    """One trial the naive way: per fold, standardize the raw features and refit SVR(kernel='rbf') on them."""
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVR

    def one(k: int) -> tuple[np.ndarray, np.ndarray]:
        tr, va = np.flatnonzero(fold_of != k), np.flatnonzero(fold_of == k)
        scaler = StandardScaler().fit(x[tr].astype(np.float64))
        x_tr = scaler.transform(x[tr].astype(np.float64))
        svr_params = {k: v for k, v in params.items() if k != "gamma_x"}
        gamma = params.get("gamma_x", 1.0) / (x_tr.shape[1] * x_tr.var())  # 'scale' x the trial's multiple
        model = SVR(**{**backend.SVR_ARGS, "kernel": "rbf", "gamma": gamma, **svr_params})
        model.fit(x_tr, y[tr])
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
    p.add_argument("--gamma-min", type=float, default=0.01)
    p.add_argument("--gamma-max", type=float, default=10.0)
    p.add_argument("--max-kernel-gb", type=float, default=8.0)
    p.add_argument("--replay", type=int, default=8, help="C-only trials replayed on kernels vs distances")
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
        gamma_min=args.gamma_min,
        gamma_max=args.gamma_max,
    )
    c_only = SvrConfig(**{**s.__dict__, "tune_gamma": False})
    threads = svr_head._n_jobs("cpu", args.folds)
    print(
        f"data: {args.rows} rows x {args.dims} dims, {args.folds} folds, {args.trials} trials; target mean "
        f"{y.mean():.1f} std {y.std():.1f}; {threads} threads for the folds of a trial; {os.cpu_count()} CPUs",
        flush=True,
    )

    per_trial, c_only_params = {}, []
    for label, cfg in (("C only", c_only), ("C + width", s)):
        fast = fast_tuning(x, y, fold_of, cfg, "cpu")
        trials = fast["study"].trials
        per_trial[label] = (fast["seconds"] - fast["prep"]) / len(trials)
        best = fast["study"].best_trial
        print(
            f"fast, {label} (stage, {fast['mode']} kernels): {fast['seconds']:8.1f} s  (folds + "
            f"{'distances' if cfg.tune_gamma else 'kernels'} {fast['prep']:.1f} s, {len(trials)} trials "
            f"{fast['seconds'] - fast['prep']:.1f} s, {per_trial[label]:.2f} s a trial); best RMSE {best.value:.5f} "
            f"at {', '.join(f'{k}={v:.4g}' for k, v in best.params.items())}",
            flush=True,
        )
        if fast["exp"] is not None:
            print(f"  the exp of every fold's distances, timed alone: {fast['exp']:.2f} s a trial", flush=True)
        else:
            c_only_params = [t.params | {"epsilon": s.epsilon} for t in trials[: args.replay]]
    print(
        f"seconds a trial, C + width / C only: {per_trial['C + width'] / per_trial['C only']:.2f}x (each study "
        "samples its own parameters: a trial's fit time depends on them)",
        flush=True,
    )
    if c_only_params:
        on_k, on_d = replay_overhead(x, y, fold_of, c_only_params)
        print(
            f"the same {len(c_only_params)} C-only trials, in turn: {on_k:.2f} s a trial on cached kernels, "
            f"{on_d:.2f} s on the exp of cached distances: a trial with the width costs {on_d / on_k:.2f}x a C-only "
            "trial",
            flush=True,
        )
    fast_rmse = np.array([t.value for t in trials])

    n_naive = min(args.naive_trials or len(trials), len(trials))
    replay = sorted(np.argsort(fast_rmse, kind="stable")[:n_naive].tolist())
    naive_rmse = {}
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for i in replay:
            t1 = time.perf_counter()
            naive_rmse[i] = rmse(naive_trial(trials[i].params | {"epsilon": s.epsilon}, x, y, fold_of, pool), y)
            print(
                f"  naive trial {i:2d}: C={trials[i].params['C']:9.4f} gamma_x={trials[i].params['gamma_x']:7.4f}  "
                f"RMSE {naive_rmse[i]:.5f} "
                f"(fast {fast_rmse[i]:.5f})  {time.perf_counter() - t1:.1f} s",
                flush=True,
            )
    naive_s = (time.perf_counter() - t0) / len(replay) * len(trials)
    extrapolated = len(replay) < len(trials)

    fast_best = int(np.argmin(fast_rmse))
    naive_best = min(naive_rmse, key=naive_rmse.get)
    p_fast, p_naive = trials[fast_best].params, trials[naive_best].params
    diffs = [abs(naive_rmse[i] - fast_rmse[i]) for i in replay]
    how = f"{len(replay)} of {len(trials)} trials replayed, time extrapolated" if extrapolated else "all trials"
    print(f"naive (scikit-learn SVR refit per trial, {how}): {naive_s:8.1f} s")
    print(f"speed ratio naive / fast (C + width): {naive_s / fast['seconds']:.1f}x")
    print(
        f"best C, gamma_x: fast {p_fast['C']:.6g}, {p_fast['gamma_x']:.6g} (RMSE {fast_rmse[fast_best]:.5f}), naive "
        f"{p_naive['C']:.6g}, {p_naive['gamma_x']:.6g} (RMSE {naive_rmse[naive_best]:.5f}); same best parameters: "
        f"{'yes' if fast_best == naive_best else 'NO'}"
    )
    print(
        f"RMSE difference at the best parameters: {abs(fast_rmse[fast_best] - naive_rmse[naive_best]):.2e}; "
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
