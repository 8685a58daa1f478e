"""Stage 4, svr: an RBF support-vector regressor on the cached embeddings, its C and RBF width tuned by Optuna on
OOF RMSE.

Reads   folds/folds.csv, train.csv / test.csv (targets, flags), and for every name in svr.features the
        embeddings emb/fold{k}/{train,test}.parquet ("model": fold k's backbone) or emb/<name>/ (a frozen one)
Writes  svr/study.db (the Optuna study, unless svr.storage names a database), svr/best_params.json,
        svr/fold{k}/head.safetensors (the head as arrays: columns, scaler, support vectors, dual
        coefficients, intercept, gamma; what predict computes from),
        svr/{oof,test,holdout}.parquet, svr/nested.parquet (fold k predicted with the C best on the other folds);
        the same files in svr/<name>/ for every head of svr.heads (config/heads.py: each runs this code on its own
        settings, with its own study)
Needs   pawpular embed
Keys    svr.n_trials, svr.c_min / c_max, svr.epsilon (svr.tune_epsilon), svr.gamma (svr.tune_gamma,
        svr.gamma_min / gamma_max), svr.use_meta, svr.features, svr.kernel_cache, svr.storage, svr.heads
Run     pawpular svr --config configs/default.yaml [--set svr.n_trials=60] [--workers 3]
        pawpular delete-study --config ...   (the only way a shared svr.storage study is deleted)

Per fold k the listed sets are joined on Id and concatenated (plus the 12 flags with svr.use_meta), standardized
on the rows of the other folds (never the holdout), and an SVR fit on those rows predicts fold k (OOF), the test
set and the holdout. A trial samples C (log-uniform in [c_min, c_max]) and, with svr.tune_gamma, the RBF width as
a multiple ``gamma_x`` of each fold's svr.gamma ('scale'), log-uniform in [gamma_min, gamma_max]: each fold's
squared distances are cached once, so a trial is an element-wise exp and a fit. ``svr.n_trials`` is the total of
one study: a rerun with more trials continues it. The
study's name is a hash of the values it is tuned on (the feature matrices, folds, targets and svr settings), so
the same embeddings written by cuDF on one machine and pandas on another share a study, and new inputs never mix
with old ones. The SVR is scikit-learn on a CPU and cuML on a RAPIDS GPU (``backend.build_svr``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import signal
import time

import numpy as np
import pandas as pd

from ..config import heads as svr_heads
from ..data.splits import HOLDOUT, read_folds
from ..data.tables import ID, META_COLS, TARGET
from ..logs import tracking
from ..machine import backend
from ..scores import nested
from ..scores.metrics import rmse
from ..store import artifacts
from ..store.files import remove, write_json
from ..svr import fits as svr_fits
from ..svr import head as svr_head
from ..svr import space as svr_space
from ..svr import study as studies
from ..svr.embedding_sets import read_sets
from . import Plan, Result

log = logging.getLogger("pawpular")
SUMMARY = "fit the SVR head per fold on the embeddings, Optuna tuning C and the RBF width on out-of-fold RMSE"
HELP = __doc__
IMAGES = False
# Settings that do not change the results (n_trials is checked on its own: raising it continues the study).
FOLD_SSE = "fold_sse"  # trial user attribute: {fold: sum of squared errors of its validation rows}
NOT_RESULTS = ("n_trials", "storage", "kernel_cache", "max_kernel_gb", "workers")


def check(ctx) -> None:
    """Before anything changes: a bad svr.storage fails here, the finished stage's files untouched; a damaged
    study.db of the experiment's own is replaced with --overwrite."""
    studies.open_storage(ctx.cfg, replace_damaged=ctx.cfg.overwrite)


def input_files(ctx) -> list:
    out, names = ctx.out, svr_heads.all_features(ctx.cfg)
    folds = range(ctx.cfg.folds.n_folds)
    return [artifacts.folds_csv(out)] + [
        artifacts.set_file(out, name, split, k)
        for name in names
        for k in (folds if name == artifacts.MODEL_SET else [0])
        for split in artifacts.SPLITS
    ]


def plan(ctx) -> Plan:
    svr = {k: v for k, v in dataclasses.asdict(ctx.cfg.svr).items() if k not in NOT_RESULTS}
    if not svr["heads"]:  # no extra head: the settings (and so the manifests) of a config without svr.heads
        del svr["heads"]
    heads = svr_heads.heads(ctx.cfg)

    def more_trials_asked(record) -> list[str]:
        done = {svr_heads.FIRST: record.info.get("n_trials", 0)}
        done.update({n: h.get("n_trials", 0) for n, h in record.info.get("heads", {}).items()})
        return [
            f"{'svr' if name == svr_heads.FIRST else f'svr.heads {name}'}: n_trials raised ({done.get(name, 0)} "
            f"trials done, {s.n_trials} asked)"
            for name, s in heads.items()
            if done.get(name, 0) < s.n_trials
        ]

    return Plan(
        {"svr": svr},
        {**ctx.file_inputs(input_files(ctx)), **ctx.data_inputs("train.csv", "test.csv")},
        more_trials_asked,
    )


def recorded_settings(record) -> dict:
    """For config.yaml: svr.n_trials is the trials the study held when the stage ran (a later, lower request
    reuses that study and changes nothing)."""
    n = record.info.get("n_trials")
    return {"svr": {"n_trials": n}} if isinstance(n, int) and n > 0 else {}


def load_folds(cfg, comp, folds_df: pd.DataFrame, device: str) -> tuple[list[svr_head.FoldData], list[str], str]:
    """Every fold's standardized features and targets (train-table row order), the column names, and a digest
    of the values the study is tuned on."""
    xp = backend.array_module(device)
    ids = comp.train[ID].astype(str).tolist()
    fold_of = folds_df["fold"].to_numpy()
    y = comp.train[TARGET].to_numpy(np.float64)
    meta = comp.train[META_COLS].to_numpy(np.float32) if cfg.svr.use_meta else None
    h = hashlib.blake2b(digest_size=8)
    h.update(fold_of.astype(np.int64).tobytes() + y.tobytes())
    frozen: dict = {}
    folds, columns = [], []
    for k in sorted(k for k in np.unique(fold_of).tolist() if k != HOLDOUT):
        x, columns = svr_head.assemble_matrix(
            read_sets(cfg.out, cfg.svr.features, "train", k, device, frozen), ids, cfg.svr.features, meta, xp
        )
        h.update(np.ascontiguousarray(backend.to_numpy(x)).tobytes())
        weight = svr_head.set_weights(columns, cfg.svr.set_weighting)
        folds.append(svr_head.make_fold(k, x, y, fold_of, cfg.svr.gamma, device, cfg.svr.target_clip, weight))
        del x
    return folds, columns, h.hexdigest()


def run(ctx) -> Result:
    """Every SVR head of the experiment (svr, then svr.heads), each with its own study and folder."""
    outputs, info = [], {}
    ctx.comp  # noqa: B018 (read once, shared by every head's context)
    for name, settings in svr_heads.heads(ctx.cfg).items():
        files, head_info = run_head(dataclasses.replace(ctx, cfg=svr_heads.with_head(ctx.cfg, settings)), name)
        outputs += files
        if name == svr_heads.FIRST:
            info.update(head_info)
        else:
            info.setdefault("heads", {})[name] = head_info
    return Result(outputs, info)


def run_head(ctx, head: str) -> tuple[list, dict]:
    """One SVR head (``ctx.cfg.svr``: its settings) into its folder (``artifacts.head_dir``): tune, fit, predict."""
    cfg, device, comp = ctx.cfg, ctx.device, ctx.comp
    t0 = time.time()
    if not cfg.svr.features:
        raise ValueError("svr.features is empty: list embedding sets, e.g. [model]")
    storage = studies.open_storage(cfg)  # a bad svr.storage fails here, before minutes of loading
    folds_df = read_folds(cfg.out, comp.train, cfg.folds)
    folds, columns, values = load_folds(cfg, comp, folds_df, device)
    y = comp.train[TARGET].to_numpy(np.float64)
    name = study_name(cfg, values)
    shared = cfg.svr.storage is not None or cfg.svr.workers > 1
    if cfg.overwrite and cfg.svr.storage is None:  # the experiment's own study; a shared one is never deleted here
        studies.delete_study(name, storage)
    handle = studies.open_study(name, storage, cfg.svr.seed, shared=shared)
    study = handle.study  # the optuna.Study
    mode = svr_space.cache_mode(cfg, folds_df["fold"].to_numpy(), device)
    ran, t_tune = _tune(handle, folds, y, cfg, mode, device, ctx.tracker)
    tracking.log_trials(ctx.tracker, study)  # every trial of the study: earlier runs', the workers'
    params = svr_space.trial_params(study.best_params, cfg.svr)
    preds, svr_class = svr_fits.final_fits(ctx, folds, folds_df, columns, params, mode, head)
    outputs = svr_fits.write_predictions(ctx, folds_df, preds, head)
    oof_rmse = rmse(preds["oof"][1], y[folds_df["fold"].to_numpy() != HOLDOUT])
    t_nested = time.time()
    nested_files, nested_info = nested_c(ctx, study, folds, folds_df, y, params, preds["oof"][1], head)
    t_nested = time.time() - t_nested
    best = {
        **params,
        "oof_rmse": oof_rmse,
        "best_trial_rmse": float(study.best_value),
        "n_trials": studies.n_complete(study),
        "study_name": name,
        "gamma": {str(f.fold): f.gamma * params.get("gamma_x", 1.0) for f in folds},  # what each head ships
        "n_features": len(columns),
        "features": list(cfg.svr.features),
        "use_meta": cfg.svr.use_meta,
        "kernel_cache": mode,
        "device": device,
        "svr_class": svr_class,
        **nested_info,
    }
    write_json(artifacts.best_params(cfg.out, head), best)  # no timings in it: the same inputs give the same bytes
    tag = "" if head == svr_heads.FIRST else f"{head}/"
    ctx.tracker.summary(
        {f"{tag}best/C": params["C"], f"{tag}best/oof_rmse": oof_rmse, f"{tag}n_trials": best["n_trials"]}
    )
    _log_summary(cfg, best, study.best_value, ran, t_tune, time.time() - t0, t_nested, head)
    models = [artifacts.svr_head(cfg.out, f.fold, head) for f in folds]
    return (
        [*outputs, *nested_files, *models, artifacts.best_params(cfg.out, head)],
        {"n_trials": best["n_trials"], "study_name": name, "oof_rmse": oof_rmse},
    )  # no timings: same bytes


def _log_summary(
    cfg, best: dict, best_trial: float, ran: int, t_tune: float, seconds: float, t_nested: float, head: str = "svr"
) -> None:
    """The head's last lines: the best C and its OOF RMSE, the edge warnings, the nested score and its cost."""
    width = f" gamma={best['gamma_x']:.3g} x {cfg.svr.gamma}" if "gamma_x" in best else ""
    log.info(
        "%s: best C=%.4g epsilon=%.3g%s, OOF RMSE %.4f (best trial %.4f); %d trials (%d new, %.1fs) on %d "
        "features, %s kernels, %s; %.1fs in all -> %s",
        head,
        best["C"],
        best["epsilon"],
        width,
        best["oof_rmse"],
        best_trial,
        best["n_trials"],
        ran,
        t_tune,
        best["n_features"],
        best["kernel_cache"],
        best["device"],
        seconds,
        artifacts.head_dir(cfg.out, head),
    )
    if edge := studies.c_at_edge(best["C"], cfg.svr.c_min, cfg.svr.c_max):
        log.warning("%s: %s", head, edge)
    if "gamma_x" in best and (
        edge := studies.at_edge(
            f"width (x {cfg.svr.gamma})",
            best["gamma_x"],
            cfg.svr.gamma_min,
            cfg.svr.gamma_max,
            "svr.gamma_min",
            "svr.gamma_max",
        )
    ):
        log.warning("%s: %s", head, edge)
    if "nested_rmse" in best:
        log.info(
            "%s: nested RMSE %.4f (C%s per fold chosen on the other folds' trial scores: %s; %.1fs, %.1f%% of "
            "the head); the OOF RMSE %.4f of the parameters best on all folds is optimistic",
            head,
            best["nested_rmse"],
            " and width" if "nested_gamma_x" in best else "",
            ", ".join(f"{c:.3g}" for c in best["nested_C"].values()),
            t_nested,
            100 * t_nested / max(seconds, 1e-9),
            best["oof_rmse"],
        )


def nested_c(
    ctx, study, folds: list, folds_df: pd.DataFrame, y: np.ndarray, params: dict, oof: np.ndarray, head: str = "svr"
) -> tuple[list, dict]:
    """svr/nested.parquet: fold k predicted with the trial whose C (and epsilon, and width) is best on the other
    folds' squared errors (each trial recorded them); a fold is refit only where that is not the study's best
    (``oof``: the final fits' predictions of the fold-assigned rows). Returns (files, best_params.json keys)."""
    from optuna.trial import TrialState

    path = artifacts.nested_preds(ctx.out, head)
    remove(path)
    keys = [str(f.fold) for f in folds]
    trials = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if set(keys) <= set(t.user_attrs.get(FOLD_SSE, {}))
    ]
    if not trials:
        log.info(
            "svr: no nested score (no trial of study %s recorded its per-fold errors: an older study; "
            "--overwrite starts a new one)",
            study.study_name,
        )
        return [], {}
    choice = nested.leave_one_out(np.array([[t.user_attrs[FOLD_SSE][k] for k in keys] for t in trials]))
    keep = folds_df["fold"].to_numpy() != HOLDOUT
    pred = np.full(len(y), np.nan)
    pred[keep] = oof
    chosen, widths = {}, {}
    for f, c in zip(folds, choice, strict=False):
        p = svr_space.trial_params(trials[c].params, ctx.cfg.svr)
        chosen[str(f.fold)] = p["C"]
        if "gamma_x" in p:
            widths[str(f.fold)] = p["gamma_x"]
        if p != params:  # its predictions with this C were not kept: one more fit of this fold
            pred[f.val_rows] = svr_head.fit_predict(p, [f], ctx.device)[f.val_rows]
    table = pd.DataFrame(
        {
            ID: ctx.comp.train[ID][keep].astype(str).to_numpy(),
            "fold": folds_df["fold"][keep].to_numpy(),
            "pred": pred[keep],
        }
    )
    backend.write_table(table, path, ctx.device)
    info = {"nested_rmse": rmse(pred[keep], y[keep]), "nested_C": chosen}
    return [path], {**info, "nested_gamma_x": widths} if widths else info


def study_name(cfg, values: str) -> str:
    """The study's name: a hash of the values it is tuned on and of the settings that change results."""
    settings = {k: v for k, v in dataclasses.asdict(cfg.svr).items() if k not in (*NOT_RESULTS, "heads")}
    if settings["target_clip"] is None:  # the default names the studies it named before the setting existed
        del settings["target_clip"]
    return f"svr-{hashlib.blake2b((values + repr(sorted(settings.items()))).encode(), digest_size=8).hexdigest()}"


def make_objective(folds: list, y: np.ndarray, s, device: str):
    """Optuna's objective, thin: sample, then the head's plain ``oof_rmse`` (what tests call without Optuna)."""

    def objective(trial) -> float:
        per_fold: dict = {}  # each fold's squared errors: the nested choice of C picks per fold on the others'
        value = svr_head.oof_rmse(svr_space.suggest(trial, s), folds, y, device, per_fold)
        trial.set_user_attr(FOLD_SSE, per_fold)
        return value

    return objective


def _tune(handle, folds: list, y: np.ndarray, cfg, mode: str, device: str, tracker=None) -> tuple[int, float]:
    """Run the trials the study lacks (with svr.workers local processes); the kernels live only while trials
    run. Returns (trials this process ran, seconds)."""
    from ..logs.progress import Progress

    s, t0, study = cfg.svr, time.time(), handle.study
    missing = max(0, s.n_trials - studies.n_complete(study))
    if not missing:
        return 0, 0.0
    log.info(
        "svr: study %s: %d of %d trials done%s",
        study.study_name,
        s.n_trials - missing,
        s.n_trials,
        f"; {s.workers} local workers" if s.workers > 1 else "",
    )
    helpers = studies.start_workers(_worker, (cfg.to_dict(), study.study_name, device), s.workers - 1)
    svr_space.attach(folds, s, mode, device)
    try:
        with Progress(desc="svr trials", total=missing, unit="trial") as bar:

            def progress(study, trial) -> None:  # the study's count: local workers' trials too
                bar.update(studies.n_complete(study) - (s.n_trials - missing) - bar.done)
                best = study.best_params
                bar.set(best=f"{study.best_value:.4f}", C=f"{best['C']:.3g}")
                if "gamma_x" in best:
                    bar.set(gamma_x=f"{best['gamma_x']:.3g}")
                if tracker is not None:
                    tracking.log_trials(tracker, study)

            # the experiment's own study with one process (the experiment lock held): no heartbeat to go stale
            sole = s.storage is None and s.workers <= 1
            ran = studies.run_trials(
                handle, make_objective(folds, y, s, device), s.n_trials, callbacks=[progress], sole=sole
            )
    finally:
        svr_head.detach_kernels(folds)
        failed = studies.stop_workers(helpers)  # never raises: an error or Ctrl-C on its way out stays the one reported
    if failed:
        raise RuntimeError(f"svr: {len(failed)} local worker(s) failed (exit codes {failed}); see the log above")
    return ran, time.time() - t0


# ---------------------------------------------------------------------------------------------------------------
# A local worker (svr.workers > 1, started by svr_study.start_workers): the same folds and objective


def _worker(cfg_dict: dict, name: str, device: str) -> None:
    """A local worker: the same folds and objective, trials from the shared budget; writes nothing else."""
    import os

    from ..config.schema import load_config_dict
    from ..logs.progress import setup_logging
    from ..runner import Context

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the stage stops us
    ran = 0

    def stop(signum, frame) -> None:  # studies.stop_workers: the study is full, or the stage is failing
        log.info("svr worker %d: %d trials (stopped by the stage)", os.getpid(), ran)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    os.environ["PAWPULAR_SVR_THREADS"] = "1"  # the stage's process and its workers share the cores
    setup_logging(False)
    cfg = load_config_dict(cfg_dict)
    ctx = Context(cfg, device)
    folds_df = read_folds(cfg.out, ctx.comp.train, cfg.folds)
    folds, _, _ = load_folds(cfg, ctx.comp, folds_df, device)
    svr_space.attach(folds, cfg.svr, svr_space.cache_mode(cfg, folds_df["fold"].to_numpy(), device), device)
    study = studies.open_study(name, studies.open_storage(cfg), cfg.svr.seed, shared=True)
    y = ctx.comp.train[TARGET].to_numpy(np.float64)

    def count(study, trial) -> None:
        nonlocal ran
        ran += 1

    studies.run_trials(study, make_objective(folds, y, cfg.svr, device), cfg.svr.n_trials, callbacks=[count])
    log.info("svr worker %d: %d trials", os.getpid(), ran)
