"""Stage 4, svr: an RBF support-vector regressor on the cached embeddings, its C tuned by Optuna on OOF RMSE.

    pawpular svr --config configs/default.yaml

Reads ``folds.csv``, the competition CSVs (targets, metadata flags) and, for every name in ``svr.features``, the
embeddings ``emb/fold{k}/{train,test}.parquet`` ("model": fold k's fine-tuned backbone) or
``emb/<name>/{train,test}.parquet`` (a frozen backbone, the same for every fold). Per fold k the listed sets are
joined on Id and concatenated (plus the 12 flags with ``svr.use_meta``), standardized with a scaler fit on the
rows with fold != k, and an SVR fit on those rows predicts the rows with fold == k (OOF) and the test set.

Writes ``svr/study.db`` (the Optuna study, unless ``svr.storage`` names another database), ``svr/best_params.json``,
``svr/oof.parquet`` (Id, fold, pred: every train Id once), ``svr/test.parquet`` (Id, pred: mean over folds),
``svr/fold{k}/model.pkl`` (an ``SvrHead``: scaler + SVR fitted on features + column order, for ``predict``) and
``svr/meta.json`` (the cache key).

Tuning: ``svr.n_trials`` is the total number of trials of one study; a rerun with more trials continues it. A
study's name carries a key of the inputs (embedding and fold files' bytes, the competition tables, the svr
section less n_trials / storage / kernel_cache / max_kernel_gb), so new inputs start a new study and never mix.
With the same key and all trials done, the stage skips and says so.

Speed: the RBF width gamma is fixed per fold (``svr.gamma``: 'scale' = 1 / (n_features * X_train.var()) as
scikit-learn defines it, 'auto' = 1 / n_features, or a number), so each fold's kernel matrices are computed once
(one BLAS product) and every trial fits ``SVR(kernel='precomputed')`` on them: the same model as refitting
``SVR(kernel='rbf')`` on the features, without recomputing n^2 distances per trial. ``svr.kernel_cache``: auto
uses the cached kernels when they fit in ``svr.max_kernel_gb``, else refits from features (plain) and logs it.
The SVR is scikit-learn on a CPU and cuML on a RAPIDS GPU (``backend.SVR``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import pickle
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from . import artifacts, backend
from .config import Config, SvrConfig, config_hash
from .data import ID, META_COLS, TARGET, Competition, read_competition
from .folds import read_folds
from .io import atomic_write_bytes, file_digest, read_json, write_json
from .metrics import rmse

log = logging.getLogger("pawpular")
Array = Any  # numpy.ndarray on CPU, cupy.ndarray on a RAPIDS GPU
LO, HI = 1.0, 100.0  # Pawpularity range: predictions are clipped to it


# ---------------------------------------------------------------------------------------------------------------
# Features


def set_path(out: Path, name: str, split: str, fold: int) -> Path:
    """Embedding file of set ``name``: 'model' is fold k's own backbone, any other name a frozen backbone."""
    return artifacts.emb_file(out, split, fold=fold) if name == "model" else artifacts.emb_file(out, split, backbone=name)


def assemble_matrix(sets: dict[str, Any], ids: Sequence[str], names: Sequence[str], meta: np.ndarray | None = None,
                    xp: Any = np) -> tuple[Array, list[str]]:
    """Rows ``ids`` of the embedding tables ``sets[name]`` side by side (+ ``meta``), with their column names."""
    blocks, columns = [], []
    for name in names:
        table = sets[name]
        have = pd.Index(backend.column_values(table, ID).astype(str))
        if not have.is_unique:
            raise ValueError(f"embedding set {name!r} has duplicated Ids, e.g. {have[have.duplicated()][0]!r}")
        pos = have.get_indexer(pd.Index(ids))
        if (pos < 0).any():
            missing = [ids[i] for i in np.flatnonzero(pos < 0)[:3]]
            raise ValueError(f"embedding set {name!r} lacks {int((pos < 0).sum())} Ids, e.g. {missing}: rerun `pawpular embed`")
        cols = [c for c in table.columns if c != ID]
        blocks.append(backend.table_matrix(table, cols)[xp.asarray(pos)])
        columns += [f"{name}/{c}" for c in cols]
    if meta is not None:
        blocks.append(xp.asarray(meta, dtype=np.float32))
        columns += list(META_COLS)
    return xp.concatenate(blocks, axis=1), columns


def assemble_features(sets: dict[str, pd.DataFrame], table: pd.DataFrame, cfg: Config) -> pd.DataFrame:
    """The SVR's input for the rows of ``table`` (Id + flags): what ``SvrHead.predict`` takes (pandas, CPU)."""
    ids = table[ID].astype(str).tolist()
    meta = table[META_COLS].to_numpy(np.float32) if cfg.svr.use_meta else None
    x, columns = assemble_matrix(sets, ids, cfg.svr.features, meta)
    return pd.DataFrame(x, columns=columns, index=table.index)


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


def resolve_gamma(x_train: Array, gamma: float | str) -> float:
    """The RBF width for standardized training rows: scikit-learn's 'scale' and 'auto', or a number."""
    if gamma == "scale":
        return 1.0 / (x_train.shape[1] * float(x_train.var()))
    if gamma == "auto":
        return 1.0 / x_train.shape[1]
    if isinstance(gamma, (int, float)) and gamma > 0:
        return float(gamma)
    raise ValueError(f"svr.gamma must be 'scale', 'auto' or a positive number, got {gamma!r}")


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


def make_fold(fold: int, x: Array, y: np.ndarray, fold_of: np.ndarray, gamma: float | str, device: str) -> FoldData:
    """Split the train matrix ``x`` (rows = train table) by ``fold_of``; standardize on the training rows."""
    xp = backend.array_module(device)
    x = xp.asarray(x)
    val = np.flatnonzero(fold_of == fold)
    tr = np.flatnonzero(fold_of != fold)
    rows = x[xp.asarray(tr)]
    scaler = Standardizer.fit(rows)
    x_train = scaler.transform(rows)
    return FoldData(fold, x_train, xp.asarray(y[tr], dtype=np.float64), scaler.transform(x[xp.asarray(val)]), val,
                    scaler, resolve_gamma(x_train, gamma))


def kernel_gb(fold_of: np.ndarray) -> float:
    """Memory the cached float64 kernels take: per fold, train x (train + validation) rows. Fold sizes alone
    decide it, so it is known before any fold is built."""
    n = len(fold_of)
    return sum(8 * int((fold_of != k).sum()) * n for k in np.unique(fold_of)) / 2**30


def attach_kernels(folds: Sequence[FoldData]) -> None:
    for f in folds:
        f.k_train = rbf_kernel(f.x_train, f.x_train, f.gamma)
        f.k_val = rbf_kernel(f.x_val, f.x_train, f.gamma)


def resolve_kernel_cache(mode: str, fold_of: np.ndarray, max_gb: float, device: str) -> str:
    """'precomputed' or 'plain' for ``svr.kernel_cache`` (auto | precomputed | plain), logged with the reason."""
    need = kernel_gb(fold_of)
    if mode == "plain":
        chosen, why = "plain", "asked for"
    elif not backend.svr_precomputed_ok(device):
        chosen, why = "plain", "this cuML has no kernel='precomputed' (needs 26.02+)"
    elif need > max_gb:
        chosen, why = "plain", f"cached kernels would need {need:.2f} GB > svr.max_kernel_gb={max_gb:g}"
    else:
        chosen, why = "precomputed", f"{need:.2f} GB of kernels"
    log.info("kernel_cache: %s -> %s (%s)", mode, chosen, why)
    return chosen


# ---------------------------------------------------------------------------------------------------------------
# Fitting


def _n_jobs(device: str, n_folds: int) -> int:
    """libsvm releases the GIL: CPU folds fit in parallel threads. A GPU runs them one after another."""
    if backend.use_rapids(device):
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, n_folds))


def fit_predict(params: dict, folds: Sequence[FoldData], device: str = "cpu") -> np.ndarray:
    """OOF predictions (train-table order, clipped to [1, 100]) of an SVR with ``params`` refit on every fold.

    ``params``: C and epsilon. A fold with cached kernels fits SVR(kernel='precomputed') on them, otherwise
    SVR(kernel='rbf') on its features: the same model, so the same predictions up to the solver's tolerance.
    """
    def one(f: FoldData) -> np.ndarray:
        if f.k_train is not None:
            model = backend.SVR.build(device, kernel="precomputed", **params).fit(f.k_train, f.y_train)
            return backend.to_numpy(model.predict(f.k_val))
        model = backend.SVR.build(device, gamma=f.gamma, **params).fit(f.x_train, f.y_train)
        return backend.to_numpy(model.predict(f.x_val))

    oof = np.full(sum(len(f.val_rows) for f in folds), np.nan)
    with ThreadPoolExecutor(_n_jobs(device, len(folds))) as pool:
        for f, pred in zip(folds, pool.map(one, folds), strict=True):
            oof[f.val_rows] = pred
    return np.clip(oof, LO, HI)


@dataclass
class SvrHead:
    """What ``predict`` needs for one fold: the feature columns in order, the fitted scaler and SVR."""

    columns: list[str]
    scaler: Standardizer
    svr: Any  # scikit-learn SVR fitted on standardized features (kernel 'rbf' or an RbfKernel); cuML if unconvertible
    gamma: float
    fold: int

    def predict(self, features: pd.DataFrame) -> np.ndarray:
        """Pawpularity (clipped to [1, 100]) for a table holding at least ``columns``."""
        missing = [c for c in self.columns if c not in features.columns]
        if missing:
            raise ValueError(f"SVR fold {self.fold}: {len(missing)} feature columns missing, e.g. {missing[:3]}")
        x = self.scaler.transform(features[self.columns].to_numpy(np.float64))
        return np.clip(backend.to_numpy(self.svr.predict(x)).astype(np.float64), LO, HI)


def fit_head(f: FoldData, params: dict, columns: list[str], mode: str, device: str) -> tuple[SvrHead, Any]:
    """The final SVR of a fold, fitted on its standardized features; returns (picklable head, fitted estimator).

    On a CPU with cached kernels its kernel is ``RbfKernel(gamma)`` (scikit-learn computes the Gram matrix by one
    BLAS product instead of libsvm's row by row dot products); otherwise kernel='rbf'. Same model either way.
    """
    kernel: Any = RbfKernel(f.gamma) if mode == "precomputed" and not backend.use_rapids(device) else "rbf"
    model = backend.SVR.build(device, kernel=kernel, gamma=f.gamma, **params).fit(f.x_train, f.y_train)
    return SvrHead(columns, f.scaler, backend.portable(model), f.gamma, f.fold), model


# ---------------------------------------------------------------------------------------------------------------
# Optuna


def suggest(trial: Any, s: SvrConfig) -> dict:
    """The trial's SVR parameters: C log-uniform in [c_min, c_max]; epsilon too with tune_epsilon."""
    eps = trial.suggest_float("epsilon", s.epsilon_min, s.epsilon_max, log=True) if s.tune_epsilon else s.epsilon
    return {"C": trial.suggest_float("C", s.c_min, s.c_max, log=True), "epsilon": eps}


def make_objective(folds: Sequence[FoldData], y: np.ndarray, s: SvrConfig, device: str) -> Callable[[Any], float]:
    def objective(trial: Any) -> float:
        return rmse(fit_predict(suggest(trial, s), folds, device), y)

    return objective


def _replayable_tpe(seed: int, shared: bool) -> Any:
    """TPE whose random draws for a trial are seeded by (seed, completed trials so far).

    A study killed mid-trial and rerun then samples exactly the C values an uninterrupted study samples: the
    killed trial stays RUNNING in the storage (TPE ignores it) and the completed history is the same, so the
    resumed run ends with the same best C and bitwise-identical predictions. For a study shared by several
    machines (``svr.storage``) the trial number seeds instead, so concurrent workers do not draw the same C.
    """
    import optuna

    class ReplayableTPESampler(optuna.samplers.TPESampler):
        def before_trial(self, study: Any, trial: Any) -> None:
            key = trial.number if shared else n_complete(study)
            state = (seed * 1_000_003 + key) % 2**32
            self._rng.rng.seed(state)
            self._random_sampler._rng.rng.seed(state)
            super().before_trial(study, trial)

    return ReplayableTPESampler(seed=seed)


def open_study(name: str, storage: str | None, seed: int, fresh: bool = False, shared: bool = False) -> Any:
    """Create or load study ``name`` with a sampler that replays identically after a kill (see above)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if fresh:
        try:
            optuna.delete_study(study_name=name, storage=storage)
        except KeyError:
            pass
    return optuna.create_study(study_name=name, storage=storage, direction="minimize", load_if_exists=True,
                               sampler=_replayable_tpe(seed, shared))


def n_complete(study: Any) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def tune(study: Any, folds: Sequence[FoldData], y: np.ndarray, s: SvrConfig, device: str) -> int:
    """Run the trials ``study`` lacks to reach ``s.n_trials`` complete ones; returns how many ran."""
    from tqdm import tqdm

    missing = max(0, s.n_trials - n_complete(study))
    if missing == 0:
        return 0
    with tqdm(total=missing, desc="svr trials", leave=False, disable=None) as bar:
        def progress(study: Any, trial: Any) -> None:
            bar.update(1)
            bar.set_postfix(best=f"{study.best_value:.4f}", C=f"{study.best_params['C']:.3g}")

        study.optimize(make_objective(folds, y, s, device), n_trials=missing, callbacks=[progress])
    return missing


def best_params(study: Any, s: SvrConfig) -> dict:
    p = study.best_params
    return {"C": float(p["C"]), "epsilon": float(p.get("epsilon", s.epsilon))}


# ---------------------------------------------------------------------------------------------------------------
# The stage


def _table_digest(df: pd.DataFrame) -> str:
    return hashlib.blake2b(pd.util.hash_pandas_object(df, index=False).to_numpy().tobytes(), digest_size=16).hexdigest()


def input_files(cfg: Config, fold_ids: Sequence[int]) -> list[Path]:
    """Every file the stage reads besides the competition CSVs; a missing one is an error naming it."""
    files = [artifacts.folds_csv(cfg.out)]
    for name in dict.fromkeys(cfg.svr.features):
        for k in fold_ids if name == "model" else fold_ids[:1]:
            files += [set_path(cfg.out, name, split, k) for split in ("train", "test")]
    for p in files:
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: run `pawpular embed` first" if "emb" in p.parts else f"{p} not found")
    return files


def input_key(cfg: Config, comp: Competition, fold_ids: Sequence[int]) -> str:
    """Hash of what the results depend on: input files' bytes, the competition tables and the svr settings
    (less n_trials, which a rerun may raise to continue the study, and settings that do not change results)."""
    files = {str(p.relative_to(cfg.out)): file_digest(p) for p in input_files(cfg, fold_ids)}
    svr = {k: v for k, v in dataclasses.asdict(cfg.svr).items()
           if k not in ("n_trials", "storage", "kernel_cache", "max_kernel_gb")}
    return config_hash(svr, files, _table_digest(comp.train), _table_digest(comp.test))


def _storage(cfg: Config) -> str:
    return cfg.svr.storage or f"sqlite:///{artifacts.study_db(cfg.out).resolve()}"


def _outputs(cfg: Config, fold_ids: Sequence[int]) -> list[Path]:
    out = artifacts.svr_dir(cfg.out)
    return [out / "best_params.json", artifacts.preds(cfg.out, "svr", "oof"), artifacts.preds(cfg.out, "svr", "test"),
            *(artifacts.svr_model(cfg.out, k) for k in fold_ids)]


def _load_sets(cfg: Config, fold: int, split: str, frozen: dict[str, Any], device: str) -> dict[str, Any]:
    """The embedding tables for one fold and split; frozen backbones are read once and kept in ``frozen``."""
    sets = {}
    for name in cfg.svr.features:
        if name == "model":
            sets[name] = backend.read_table(set_path(cfg.out, name, split, fold), device)
        else:
            if (name, split) not in frozen:
                frozen[(name, split)] = backend.read_table(set_path(cfg.out, name, split, fold), device)
            sets[name] = frozen[(name, split)]
    return sets


def load_folds(cfg: Config, comp: Competition, folds_df: pd.DataFrame, device: str) -> tuple[list[FoldData], list[str]]:
    """Every fold's standardized features and targets (train-table row order), and the feature column names."""
    xp = backend.array_module(device)
    ids = comp.train[ID].astype(str).tolist()
    fold_of = folds_df["fold"].to_numpy()  # read_folds returns them in train-table order
    y = comp.train[TARGET].to_numpy(np.float64)
    meta = comp.train[META_COLS].to_numpy(np.float32) if cfg.svr.use_meta else None
    frozen: dict = {}
    folds, columns = [], []
    for k in sorted(np.unique(fold_of).tolist()):
        x, columns = assemble_matrix(_load_sets(cfg, k, "train", frozen, device), ids, cfg.svr.features, meta, xp)
        folds.append(make_fold(k, x, y, fold_of, cfg.svr.gamma, device))
        del x
    return folds, columns


def final_fits(cfg: Config, comp: Competition, folds: Sequence[FoldData], columns: list[str], params: dict,
               mode: str, device: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Each fold's SVR with the best params, fitted on features and saved as model.pkl.

    Returns (OOF predictions, fold of each train row, test predictions averaged over folds, the SVR class used).
    """
    n = sum(len(f.val_rows) for f in folds)
    oof, fold_of, test_preds = np.full(n, np.nan), np.full(n, -1, dtype=np.int64), []
    meta = comp.test[META_COLS].to_numpy(np.float32) if cfg.svr.use_meta else None
    test_ids = comp.test[ID].astype(str).tolist()
    frozen: dict = {}
    for f in folds:
        head, model = fit_head(f, params, columns, mode, device)
        oof[f.val_rows] = np.clip(backend.to_numpy(model.predict(f.x_val)), LO, HI)
        fold_of[f.val_rows] = f.fold
        x_test, _ = assemble_matrix(_load_sets(cfg, f.fold, "test", frozen, device), test_ids, cfg.svr.features,
                                    meta, backend.array_module(device))
        test_preds.append(np.clip(backend.to_numpy(model.predict(f.scaler.transform(x_test))), LO, HI))
        atomic_write_bytes(artifacts.svr_model(cfg.out, f.fold), pickle.dumps(head, protocol=pickle.HIGHEST_PROTOCOL))
    return oof, fold_of, np.mean(test_preds, axis=0), f"{type(model).__module__}.{type(model).__name__}"


def run(cfg: Config) -> Path:
    """Tune (or continue tuning) the SVR head, then write its predictions and per-fold models; returns svr/."""
    t0 = time.time()
    out = artifacts.svr_dir(cfg.out)
    if not cfg.svr.features:
        raise ValueError("svr.features is empty: list embedding sets, e.g. [model]")
    device = backend.resolve_device(cfg.device)
    comp = read_competition(cfg.data)
    folds_df = read_folds(cfg.out, comp.train)
    fold_ids = sorted(folds_df["fold"].unique().tolist())
    key = input_key(cfg, comp, fold_ids)
    name, storage = f"svr-{key}", _storage(cfg)
    out.mkdir(parents=True, exist_ok=True)
    study = open_study(name, storage, cfg.svr.seed, fresh=cfg.overwrite, shared=cfg.svr.storage is not None)
    done_before = n_complete(study)
    meta_path = out / "meta.json"
    state = read_json(meta_path) if meta_path.is_file() else {}
    if (not cfg.overwrite and state.get("key") == key and done_before >= cfg.svr.n_trials
            and all(p.is_file() for p in _outputs(cfg, fold_ids))):
        log.info("svr: cached: study %s already has %d complete trials on the same inputs; nothing to do "
                 "(raise svr.n_trials to continue it, or --overwrite to redo)", name, done_before)
        return out

    if done_before:
        log.info("svr: continuing study %s: %d of %d trials done", name, done_before, cfg.svr.n_trials)
    folds, columns = load_folds(cfg, comp, folds_df, device)
    y = comp.train[TARGET].to_numpy(np.float64)
    mode = resolve_kernel_cache(cfg.svr.kernel_cache, folds_df["fold"].to_numpy(), cfg.svr.max_kernel_gb, device)
    if mode == "precomputed":
        attach_kernels(folds)
    t_tune = time.time()
    ran = tune(study, folds, y, cfg.svr, device)
    t_tune = time.time() - t_tune
    params = best_params(study, cfg.svr)
    for f in folds:  # free the kernels before the final fits
        f.k_train = f.k_val = None

    oof, fold_of, test_pred, svr_class = final_fits(cfg, comp, folds, columns, params, mode, device)
    oof_rmse = rmse(oof, y)
    backend.write_table(pd.DataFrame({ID: comp.train[ID].astype(str), "fold": fold_of, "pred": oof}),
                        artifacts.preds(cfg.out, "svr", "oof"), device)
    backend.write_table(pd.DataFrame({ID: comp.test[ID].astype(str), "pred": test_pred}),
                        artifacts.preds(cfg.out, "svr", "test"), device)
    seconds = time.time() - t0
    write_json(out / "best_params.json", {
        **params, "oof_rmse": oof_rmse, "best_trial_rmse": float(study.best_value), "n_trials": n_complete(study),
        "study_name": name, "gamma": {str(f.fold): f.gamma for f in folds}, "n_features": len(columns),
        "features": list(cfg.svr.features), "use_meta": cfg.svr.use_meta, "kernel_cache": mode, "device": device,
        "svr_class": svr_class, "tune_seconds": round(t_tune, 2),
        "seconds": round(seconds, 2)})
    write_json(meta_path, {"key": key, "study_name": name, "n_trials": n_complete(study)})
    log.info("svr: best C=%.4g epsilon=%.3g, OOF RMSE %.4f (best trial %.4f); %d trials (%d new, %.1fs) on %d "
             "features, %s kernels, %s; %.1fs in all -> %s", params["C"], params["epsilon"], oof_rmse,
             study.best_value, n_complete(study), ran, t_tune, len(columns), mode, device, seconds, out)
    return out
