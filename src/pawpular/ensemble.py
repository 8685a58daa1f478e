"""Stage 5, ensemble: blend the heads with weights fit on out-of-fold predictions -> submission.csv.

    pawpular ensemble --config configs/default.yaml

Reads ``train/{oof,test}.parquet`` (NN head) and ``svr/{oof,test}.parquet`` (SVR head) of this experiment and of
every folder in ``ensemble.experiments``; writes ``ensemble/weights.json``, ``ensemble/{oof,test}.parquet`` and
``submission.csv`` (``Id,Pawpularity`` in ``sample_submission.csv`` order, checked as the grader checks it).

Weights are non-negative and sum to 1. ``method: nnls`` solves that constrained least-squares problem exactly
(SLSQP); ``method: hill`` is Caruana's hill climbing with replacement from the best single model, adding a model
only while the OOF RMSE improves by at least ``min_improvement``: with 20+ correlated models it keeps few of them
and overfits the OOF less. Either way the blend's OOF RMSE is never worse than the best single model's.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from . import artifacts
from .config import Config
from .data import ID, TARGET, read_competition
from .io import write_csv, write_json, write_parquet
from .metrics import rmse

log = logging.getLogger("pawpular")
HEADS = ("train", "svr")  # artifact folders holding {oof,test}.parquet, in blend order


class SubmissionError(ValueError):
    pass


@dataclass
class Blend:
    names: list[str]
    weights: np.ndarray
    steps: list[tuple[str, float]]  # (what was added, OOF RMSE after it)


def fit_weights(oof: np.ndarray, y: np.ndarray, names: list[str], method: str = "nnls", min_improvement: float = 1e-4) -> Blend:
    """Non-negative weights summing to 1 minimizing the RMSE of ``oof @ w`` against ``y`` (oof: [n, models])."""
    n_models = oof.shape[1]
    singles = [rmse(oof[:, j], y) for j in range(n_models)]
    best = int(np.argmin(singles))
    steps = [(names[best], singles[best])]
    if method == "hill":
        counts = np.zeros(n_models)
        counts[best] = 1
        current = singles[best]
        while True:
            trials = [rmse(oof @ ((counts + np.eye(n_models)[j]) / (counts.sum() + 1)), y) for j in range(n_models)]
            j = int(np.argmin(trials))
            if current - trials[j] < min_improvement:
                break
            counts[j] += 1
            current = trials[j]
            steps.append((names[j], current))
        return Blend(names, counts / counts.sum(), steps)
    if method != "nnls":
        raise ValueError(f"ensemble.method must be nnls or hill, got {method!r}")
    gram, rhs = oof.T @ oof / len(y), oof.T @ y / len(y)
    res = minimize(lambda w: w @ gram @ w - 2 * rhs @ w, np.full(n_models, 1 / n_models), jac=lambda w: 2 * (gram @ w - rhs),
                   bounds=[(0, 1)] * n_models, constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}],
                   method="SLSQP", options={"ftol": 1e-12, "maxiter": 1000})
    w = np.clip(res.x, 0, None)
    w = w / w.sum()
    if rmse(oof @ w, y) > singles[best]:  # never worse than the best single model (guards solver tolerance)
        w = np.eye(n_models)[best]
    steps.append(("nnls", rmse(oof @ w, y)))
    return Blend(names, w, steps)


def validate_submission(sub: pd.DataFrame, sample: pd.DataFrame) -> None:
    """Check ``sub`` as the grader does; raise SubmissionError naming the first Ids that fail."""
    def ids(s: pd.Series) -> str:
        v = s.astype(str).tolist()
        return ", ".join(v[:5]) + (f" ... ({len(v)} in all)" if len(v) > 5 else "")

    if list(sub.columns) != [ID, TARGET]:
        raise SubmissionError(f"submission columns must be exactly {ID},{TARGET}; got {','.join(map(str, sub.columns))}")
    if sub[ID].duplicated().any():
        raise SubmissionError(f"submission has duplicated Ids: {ids(sub[ID][sub[ID].duplicated()])}")
    missing = sample[ID][~sample[ID].isin(sub[ID])]
    extra = sub[ID][~sub[ID].isin(sample[ID])]
    if len(missing) or len(extra):
        raise SubmissionError("submission Ids differ from sample_submission.csv: "
                              + (f"missing {ids(missing)}" if len(missing) else "")
                              + ("; " if len(missing) and len(extra) else "")
                              + (f"not in the sample {ids(extra)}" if len(extra) else ""))
    values = pd.to_numeric(sub[TARGET], errors="coerce")
    if values.isna().any():
        raise SubmissionError(f"submission has missing or non-numeric Pawpularity for Ids {ids(sub[ID][values.isna()])}")
    bad = (values < 1) | (values > 100)
    if bad.any():
        raise SubmissionError(f"submission Pawpularity outside [1, 100] for Ids {ids(sub[ID][bad])} "
                              f"(e.g. {values[bad].iloc[0]:g})")


def write_submission(test_pred: pd.DataFrame, sample: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Clip, order as the sample, validate, then write atomically (an invalid one is never written)."""
    missing = sample[ID][~sample[ID].isin(test_pred[ID])]
    if len(missing):
        raise SubmissionError(f"no prediction for {len(missing)} sample_submission Id(s), missing "
                              + ", ".join(missing.astype(str).tolist()[:5]))
    sub = sample[[ID]].merge(test_pred[[ID, "pred"]], on=ID, how="left").rename(columns={"pred": TARGET})
    sub[TARGET] = sub[TARGET].clip(1, 100)
    validate_submission(sub, sample)
    write_csv(sub, path, float_format="%.5f")
    return sub


def gather(cfg: Config) -> tuple[list[str], pd.DataFrame, pd.DataFrame]:
    """Names, OOF table (Id, fold, one column per model) and test table (Id, one column per model)."""
    folders = [("", cfg.out)] + [(Path(e).name + "/", Path(e)) for e in cfg.ensemble.experiments]
    names, oofs, tests = [], [], []
    for prefix, folder in folders:
        found = 0
        for head in HEADS:
            oof_path, test_path = artifacts.preds(folder, head, "oof"), artifacts.preds(folder, head, "test")
            if not oof_path.is_file() or not test_path.is_file():
                log.warning("no %s predictions in %s: blending without that head", head, folder)
                continue
            found += 1
            name = f"{prefix}{'nn' if head == 'train' else head}"
            names.append(name)
            oofs.append(pd.read_parquet(oof_path)[[ID, "fold", "pred"]].rename(columns={"pred": name, "fold": f"fold:{name}"}))
            tests.append(pd.read_parquet(test_path)[[ID, "pred"]].rename(columns={"pred": name}))
        if prefix and not found:
            raise FileNotFoundError(f"{folder} (in ensemble.experiments) has no train/ or svr/ predictions")
    if not names:
        raise FileNotFoundError(f"no predictions to blend in {cfg.out}: run `pawpular train` and/or `pawpular svr` first")
    oof, test = oofs[0], tests[0]
    for o, t in zip(oofs[1:], tests[1:]):
        oof, test = oof.merge(o, on=ID, how="outer"), test.merge(t, on=ID, how="outer")
    if oof[names].isna().any().any() or test[names].isna().any().any():
        bad = [n for n in names if oof[n].isna().any() or test[n].isna().any()]
        raise ValueError(f"predictions do not cover the same Ids: {', '.join(bad)} miss some (rerun them on the same data)")
    fold_cols = [f"fold:{n}" for n in names]
    if (oof[fold_cols].nunique(axis=1) > 1).any():
        raise ValueError("the blended models used different folds: OOF weights would leak; use one folds.csv for all")
    oof = oof.rename(columns={fold_cols[0]: "fold"}).drop(columns=fold_cols[1:])
    return names, oof, test


def run(cfg: Config) -> Path:
    comp = read_competition(cfg.data)
    names, oof, test = gather(cfg)
    oof = oof.merge(comp.train[[ID, TARGET]], on=ID, how="inner")
    if len(oof) != len(comp.train):
        raise ValueError(f"OOF predictions cover {len(oof)} of {len(comp.train)} train Ids")
    y = oof[TARGET].to_numpy(float)
    P = oof[names].to_numpy(float)
    blend = fit_weights(P, y, names, cfg.ensemble.method, cfg.ensemble.min_improvement)
    oof_pred = np.clip(P @ blend.weights, 1, 100)
    test_pred = np.clip(test[names].to_numpy(float) @ blend.weights, 1, 100)
    scores = {n: rmse(P[:, j], y) for j, n in enumerate(names)}
    equal = rmse(np.clip(P.mean(1), 1, 100), y)
    ens = rmse(oof_pred, y)
    mean_rmse = rmse(np.full_like(y, y.mean()), y)

    out = cfg.out / "ensemble"
    write_parquet(pd.DataFrame({ID: oof[ID], "fold": oof["fold"], "pred": oof_pred}), out / "oof.parquet")
    write_parquet(pd.DataFrame({ID: test[ID], "pred": test_pred}), out / "test.parquet")
    write_json(out / "weights.json", {
        "weights": dict(zip(names, map(float, blend.weights))), "method": cfg.ensemble.method,
        "oof_rmse": {**scores, "ensemble": ens, "equal_weights": equal, "predict_mean": mean_rmse},
        "steps": [{"added": a, "oof_rmse": r} for a, r in blend.steps],
    })
    sub_path = artifacts.submission(cfg.out)
    write_submission(pd.DataFrame({ID: test[ID], "pred": test_pred}), comp.sample, sub_path)

    rows = [f"  {n:<24} {scores[n]:>8.3f} {w:>8.3f}" for n, w in zip(names, blend.weights)]
    log.info("ensemble (%s):\n  %-24s %8s %8s\n%s\n  %-24s %8.3f\n  %-24s %8.3f\n  %-24s %8.3f  (%.3fx the mean's)\n"
             "submission: %s", cfg.ensemble.method, "model", "OOF RMSE", "weight", "\n".join(rows),
             "predict the mean", mean_rmse, "equal-weight blend", equal, "ensemble", ens, ens / mean_rmse, sub_path)
    if cfg.ensemble.method == "hill":
        log.info("hill climbing: %s", " -> ".join(f"{a} {r:.3f}" for a, r in blend.steps))
    return sub_path
