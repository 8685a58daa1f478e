"""An experiment folder's results as tables: what ``pawpular report`` and ``notebooks/02_results.ipynb`` show.

Reads whatever the stages have written so far (``store/artifacts.py``): config.yaml, folds/folds.csv,
train/fold{k}/metrics.csv, {train,svr,ensemble}/oof.parquet, the SVR's Optuna study and best_params.json,
ensemble/weights.json, timings.json, the stage manifests (what is done, stale or missing), and the
competition's train.csv. Writes nothing. A stage that has not run is "not run"; nothing missing is an error
except the experiment folder itself.

    res = load_results("output/default", "input/synthetic")
    model_table(res); fold_table(res)
"""

from __future__ import annotations

import datetime as dt
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import yaml

from ..data.tables import ID, TARGET, DataError, read_competition, read_id_csv
from ..scores.metrics import rmse
from ..store import artifacts, manifest
from ..store.files import MissingArtifact, not_a_folder, read_json_object

# Head name -> the stage folder holding its {oof,test}.parquet; the ensemble's own.
HEAD_DIRS = {**artifacts.HEADS, "ensemble": "ensemble"}
NOT_RUN = "not run"


@dataclass
class RunResults:
    """Everything an experiment folder holds so far, as tables; absent pieces are empty, never an error."""

    out: Path
    data: Path | None = None
    train: pd.DataFrame | None = None  # the competition's train.csv
    oof: pd.DataFrame = field(default_factory=pd.DataFrame)  # Id, fold, Pawpularity, one column per head that ran
    status: dict[str, str] = field(default_factory=dict)  # head -> "ok" | "not run" | "partial: ..."
    metrics: pd.DataFrame = field(default_factory=pd.DataFrame)  # NN head: fold, epoch, train_loss, val_rmse, ...
    trials: pd.DataFrame | None = None  # completed Optuna trials of the SVR study
    study_name: str | None = None
    minimize: bool = True
    best_params: dict = field(default_factory=dict)
    weights: dict = field(default_factory=dict)  # ensemble/weights.json
    timings: dict[str, float] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    stages: dict[str, tuple[str, str]] = field(default_factory=dict)  # stage -> (state, why) from the manifests
    notes: list[str] = field(default_factory=list)  # what could not be read, and why

    @property
    def heads(self) -> list[str]:
        """Heads with out-of-fold predictions (nn, svr, ensemble), in pipeline order."""
        return [h for h in HEAD_DIRS if h in self.oof.columns]

    @property
    def main_head(self) -> str:
        """The head whose predictions are submitted: the ensemble when it ran, else the first that did."""
        return "ensemble" if "ensemble" in self.heads else (self.heads[0] if self.heads else "")

    @property
    def has_target(self) -> bool:
        return TARGET in self.oof.columns

    def summary(self) -> str:
        """The stages' status, then the blend's scores, the one to trust first (``compare.score_line``)."""
        from ..scores.compare import score_line

        parts = [f"{h}: {s}" for h, s in self.status.items()]
        line = score_line(self.weights)
        return f"{self.out} (data {self.data}): " + ", ".join(parts) + (f"\nscores: {line}" if line else "")


# ---------------------------------------------------------------------------------------------------------------
# Reading an experiment folder


def _read_yaml(path: Path) -> dict:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _pick_data(
    candidates: list[Any], folds: pd.DataFrame | None, notes: list[str]
) -> tuple[Path | None, pd.DataFrame | None]:
    """The first candidate competition whose train Ids are the ones in folds.csv (any, without folds.csv)."""
    tried = []
    for cand in candidates:
        why = not_a_folder(cand) if cand else "unset"
        why = why or (None if (Path(cand) / "train.csv").is_file() else "has no train.csv")
        if why:
            tried.append(f"{cand} {why}" if cand else "")
            continue
        try:
            train = read_competition(cand).train
        except DataError as e:
            notes.append(f"{cand}: {e}")
            continue
        if folds is not None and set(folds[ID]) != set(train[ID]):
            notes.append(f"{cand}: its train Ids are not those of folds.csv; not this experiment's data")
            continue
        return Path(cand), train
    notes.append("competition data not found (tried " + "; ".join(t for t in tried if t) + ")")
    return None, None


def _nn_fold_oofs(out: Path) -> tuple[pd.DataFrame | None, list[int]]:
    found = {
        k: d / "oof.parquet" for k, d in artifacts.fold_dirs(out / "train").items() if (d / "oof.parquet").is_file()
    }
    if not found:
        return None, []
    return pd.concat([pd.read_parquet(f) for f in found.values()], ignore_index=True), list(found)


def read_metrics(out: Path) -> pd.DataFrame:
    frames = [
        pd.read_csv(d / "metrics.csv").assign(fold=k)
        for k, d in artifacts.fold_dirs(out / "train").items()
        if (d / "metrics.csv").is_file()
    ]
    return pd.concat(frames, ignore_index=True).sort_values(["fold", "epoch"]) if frames else pd.DataFrame()


class Study(NamedTuple):
    name: str | None
    trials: pd.DataFrame | None  # completed trials: number, value, params_<name>, ...
    minimize: bool = True
    note: str = ""  # why there is no study ("not run", or the error reading it)


def load_study(out: Path, storage: str | None = None, name: str | None = None) -> Study:
    """The SVR's Optuna study: the one called ``name`` if the storage holds it, else the newest."""
    from ..config.schema import redact_url
    from ..svr.study import StudyStorageError, storage_url

    db = artifacts.study_db(out)
    try:  # env:NAME resolved; a bare postgresql:// means psycopg2, as for the stage
        url = storage_url(storage, db) if storage else (storage_url(None, db) if db.is_file() else None)
    except StudyStorageError as e:
        return Study(None, None, note=f"could not read the Optuna study ({e})")
    if url is None:
        return Study(None, None, note=NOT_RUN)
    with warnings.catch_warnings():  # optuna imports tqdm.auto, which warns inside a notebook without ipywidgets
        warnings.filterwarnings("ignore", message="IProgress not found")
        import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        summaries = optuna.get_all_study_summaries(url)
        if not summaries:
            return Study(None, None, note="the study storage holds no study")
        named = [s for s in summaries if s.study_name == name]
        far_past = dt.datetime.min
        chosen = named[0] if named else max(summaries, key=lambda s: s.datetime_start or far_past)
        study = optuna.load_study(study_name=chosen.study_name, storage=url)
        trials = study.trials_dataframe()
    except Exception as e:  # a locked, foreign or newer-schema database must not sink the whole report
        note = f"could not read the Optuna study at {redact_url(url, '***')} ({type(e).__name__}: {e})"
        return Study(None, None, note=_without_password(note, url))
    if "state" in trials:
        trials = trials[trials["state"] == "COMPLETE"]
    minimize = study.direction == optuna.study.StudyDirection.MINIMIZE
    return Study(chosen.study_name, trials.reset_index(drop=True), minimize)


def _without_password(text: str, url: str) -> str:
    """``text`` with the password of ``url`` (if any) masked: a driver's error may quote its connection string."""
    from ..config.schema import without_password

    return without_password(text, url)


def load_results(out: str | Path, data: str | Path | None = None, storage: str | None = None) -> RunResults:
    """Gather an experiment folder's tables. ``data`` is tried first, then the data_dir in its config.yaml."""
    out = Path(out)
    if not out.is_dir():
        raise MissingArtifact(f"{out}: no such experiment folder (run the pipeline first: ./run.sh)")
    res = RunResults(out=out, config=_read_yaml(out / "config.yaml"))
    folds = read_id_csv(artifacts.folds_csv(out)) if artifacts.folds_csv(out).is_file() else None
    res.data, res.train = _pick_data([data, res.config.get("data_dir")], folds, res.notes)

    if folds is not None:  # the holdout rows (fold -1) have no OOF predictions: the holdout scores are apart
        folds = folds[folds["fold"] >= 0]
    if res.train is not None:
        oof = res.train[[ID, TARGET]].astype({TARGET: float})
        oof = oof.merge(folds, on=ID, how="inner") if folds is not None else oof
    else:
        oof = folds.copy() if folds is not None else pd.DataFrame(columns=[ID])
    n_folds = int(folds["fold"].nunique()) if folds is not None else None
    for head in HEAD_DIRS:
        path = artifacts.preds(out, head, "oof")
        pred, status = None, NOT_RUN
        if path.is_file():
            pred, status = pd.read_parquet(path), "ok"
        elif head == "nn":
            pred, done = _nn_fold_oofs(out)
            if pred is not None:
                status = f"partial: folds {', '.join(map(str, done))}" + (f" of {n_folds}" if n_folds else "")
        res.status[head] = status
        if pred is None:
            continue
        cols = [ID, "pred"] + (["fold"] if "fold" in pred and "fold" not in oof else [])
        oof = (oof.merge(pred[cols], on=ID, how="outer") if len(oof) else pred[cols]).rename(columns={"pred": head})
    res.oof = oof

    res.metrics = read_metrics(out)
    bp = artifacts.best_params(out)
    res.best_params = read_json_object(bp) if bp.is_file() else {}
    wanted = res.best_params.get("study_name")
    storage = storage or (res.config.get("svr") or {}).get("storage")
    res.study_name, res.trials, res.minimize, note = load_study(out, storage, wanted)
    if note and note != NOT_RUN:
        res.notes.append(note)
    w = artifacts.weights_json(out)
    res.weights = read_json_object(w) if w.is_file() else {}
    t = artifacts.timings_json(out)
    res.timings = read_json_object(t) if t.is_file() else {}
    res.stages = stage_states(out, res.data, res.notes)
    for head, folder in HEAD_DIRS.items():  # the frozen recipe: a head nothing asks for is not missing
        if res.status.get(head) == NOT_RUN and res.stages.get(folder, ("",))[0] == manifest.NOT_NEEDED:
            res.status[head] = manifest.NOT_NEEDED
    return res


def stage_states(out: Path, data: Path | None, notes: list[str]) -> dict[str, tuple[str, str]]:
    """stage -> (done | stale | damaged | missing | partial, why), from the manifests; {} if it cannot be told."""
    if not artifacts.config_yaml(out).is_file() or data is None:
        return {}
    try:
        from ..config.schema import load_config
        from ..runner import status

        cfg = load_config(artifacts.config_yaml(out), output_dir=str(out), data_dir=str(data))
        return {name: (v.state, v.why()) for name, v in status(cfg).items()}
    except Exception as e:  # a report of a foreign or half-written folder still shows what it can
        notes.append(f"stage status unknown ({type(e).__name__}: {e})")
        return {}


# ---------------------------------------------------------------------------------------------------------------
# Tables


def oof_rmse(res: RunResults, head: str) -> float:
    """RMSE of a head's out-of-fold predictions over the train Ids it covers (NaN without them)."""
    if not res.has_target or head not in res.oof:
        return np.nan
    sel = res.oof[[head, TARGET]].dropna()
    return rmse(sel[head], sel[TARGET])


def model_table(res: RunResults) -> pd.DataFrame:
    """model, oof_rmse, weight, status: every head (run or not), the ensemble and predicting the mean.

    Scores come from ``ensemble/weights.json`` when the ensemble ran, else from the OOF files."""
    w = res.weights.get("weights", {})
    scores = res.weights.get("oof_rmse", {})

    rows = []
    for head in ["nn", "svr", *[n for n in w if n not in ("nn", "svr")]]:
        status = res.status.get(head, "ok")
        if status == manifest.NOT_NEEDED:
            continue
        if status == NOT_RUN:
            rows.append((head, np.nan, np.nan, NOT_RUN))
            continue
        in_blend = head in w
        if w and not in_blend:
            status += "; not in the blend (rerun ensemble)"
        rows.append((head, scores.get(head, oof_rmse(res, head)), w.get(head, np.nan), status))
    if w:
        method = res.weights.get("method", "?")
        rows.append(("ensemble", scores.get("ensemble", oof_rmse(res, "ensemble")), np.nan, f"ok ({method})"))
        if "ensemble_cv" in scores:  # weights refit without each fold, scored on it
            rows.append(("ensemble, cross-val.", scores["ensemble_cv"], np.nan, "ok; optimistic"))
        nested = res.weights.get("nested_rmse") or {}
        for name in [n for n in nested if n not in ("ensemble", "missing")] + ["ensemble"]:
            if name in nested:  # every choice made without the fold scored (scores/nested.py)
                rows.append((f"{name}, nested", nested[name], np.nan, _nested_note(res.weights, name)))
        if "equal_weights" in scores:
            rows.append(("equal-weight blend", scores["equal_weights"], np.nan, "ok"))
        holdout = res.weights.get("holdout_rmse") or {}
        if "ensemble" in holdout:
            rows.append(("holdout RMSE", holdout["ensemble"], np.nan, f"{holdout.get('rows')} rows"))
    else:
        rows.append(("ensemble", np.nan, np.nan, NOT_RUN))
    mean = scores.get("predict_mean")
    if mean is None and res.train is not None:
        y = res.train[TARGET].to_numpy(float)
        mean = rmse(np.full_like(y, y.mean()), y)
    rows.append(("predict the mean", np.nan if mean is None else mean, np.nan, "baseline"))
    table = pd.DataFrame(rows, columns=["model", "oof_rmse", "weight", "status"])
    if mean is not None and mean > 0:  # a model no better than the mean is a warning, not a footnote
        worse = (table["oof_rmse"] >= mean) & (table["status"] != "baseline") & (table["model"] != "holdout RMSE")
        table.loc[worse, "status"] += "; WORSE THAN PREDICTING THE MEAN"
    return table


def fold_table(res: RunResults) -> pd.DataFrame:
    """Validation RMSE of each head (columns) on each fold (rows), from the out-of-fold predictions."""
    if not res.has_target or "fold" not in res.oof or not res.heads:
        return pd.DataFrame()
    sq = pd.DataFrame({h: (res.oof[h] - res.oof[TARGET]) ** 2 for h in res.heads}).assign(fold=res.oof["fold"])
    table = np.sqrt(sq.dropna(subset=["fold"]).groupby("fold").mean())
    table.index = table.index.astype(int)
    return table.sort_index()


def _nested_note(weights: dict, name: str) -> str:
    """The blend's nested score is the one to trust only on checkpoints no rows chose (weights.json "trusted")."""
    if name != "ensemble":
        return "ok"
    return "ok; the score to trust" if weights.get("trusted", False) else "ok; optimistic: own-best checkpoints"
