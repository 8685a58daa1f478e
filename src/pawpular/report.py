"""`pawpular report`: one self-contained ``report.html`` describing an experiment folder.

    pawpular report --config configs/default.yaml [--output output/default] [--data input/synthetic]

Reads whatever the stages have written so far (see ``artifacts.py``): ``config.yaml``, ``folds.csv``,
``train/fold{k}/metrics.csv``, ``{train,svr,ensemble}/oof.parquet``, ``svr/study.db`` (Optuna) and
``svr/best_params.json``, ``ensemble/weights.json``, ``timings.json``, and the competition's ``train.csv`` and
photos. Writes ``<experiment>/report.html``: figures embedded as base64 PNGs (no other files, opens offline), a
model table (OOF RMSE and blend weight per head, the ensemble, predicting the mean), per-fold scores, time per
stage and the resolved config. A stage that has not run is shown as "not run"; nothing missing is an error
except the experiment folder itself.

``load_results(out, data)`` gathers the same tables for ``notebooks/02_results.ipynb``.
"""
from __future__ import annotations

import base64
import datetime as dt
import html
import logging
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import yaml

from . import artifacts, plots
from .config import Config
from .data import ID, TARGET, DataError, read_competition
from .io import atomic_write_text, read_json
from .metrics import rmse

log = logging.getLogger("pawpular")
# Head name -> artifact folder holding its {oof,test}.parquet.
HEAD_DIRS = {"nn": "train", "svr": "svr", "ensemble": "ensemble"}
STAGES = ["folds", "train", "embed", "svr", "ensemble"]
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
        parts = [f"{h}: {s}" for h, s in self.status.items()]
        return f"{self.out} (data {self.data}): " + ", ".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# Reading an experiment folder


def _read_yaml(path: Path) -> dict:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _pick_data(candidates: list[Any], folds: pd.DataFrame | None,
               notes: list[str]) -> tuple[Path | None, pd.DataFrame | None]:
    """The first candidate competition whose train Ids are the ones in folds.csv (any, without folds.csv)."""
    for cand in candidates:
        if not cand or not (Path(cand) / "train.csv").is_file():
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
    notes.append("competition data not found (tried " + ", ".join(str(c) for c in candidates if c) + ")")
    return None, None


def _nn_fold_oofs(out: Path) -> tuple[pd.DataFrame | None, list[int]]:
    files = sorted((out / "train").glob("fold*/oof.parquet"), key=lambda p: int(p.parent.name[4:]))
    if not files:
        return None, []
    df = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    return df, [int(f.parent.name[4:]) for f in files]


def read_metrics(out: Path) -> pd.DataFrame:
    frames = []
    for path in (out / "train").glob("fold*/metrics.csv"):
        if re.fullmatch(r"fold\d+", path.parent.name):
            frames.append(pd.read_csv(path).assign(fold=int(path.parent.name[4:])))
    return pd.concat(frames, ignore_index=True).sort_values(["fold", "epoch"]) if frames else pd.DataFrame()


def c_param(trials: pd.DataFrame | None) -> str | None:
    """The name of the SVR's C in an Optuna trials table (the first parameter if none is called C)."""
    if trials is None:
        return None
    params = [c[len("params_"):] for c in trials.columns if c.startswith("params_")]
    for p in params:
        if p.lower() in ("c", "svr_c", "log_c"):
            return p
    return params[0] if params else None


class Study(NamedTuple):
    name: str | None
    trials: pd.DataFrame | None  # completed trials: number, value, params_<name>, ...
    minimize: bool = True
    note: str = ""  # why there is no study ("not run", or the error reading it)


def load_study(out: Path, storage: str | None = None, name: str | None = None) -> Study:
    """The SVR's Optuna study: the one called ``name`` if the storage holds it, else the newest."""
    db = artifacts.study_db(out)
    url = storage or (f"sqlite:///{db.resolve()}" if db.is_file() else None)
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
        return Study(None, None, note=f"could not read the Optuna study ({type(e).__name__}: {e})")
    if "state" in trials:
        trials = trials[trials["state"] == "COMPLETE"]
    minimize = study.direction == optuna.study.StudyDirection.MINIMIZE
    return Study(chosen.study_name, trials.reset_index(drop=True), minimize)


def load_results(out: str | Path, data: str | Path | None = None, storage: str | None = None) -> RunResults:
    """Gather an experiment folder's tables. ``data`` is tried first, then the data_dir in its config.yaml."""
    out = Path(out)
    if not out.is_dir():
        raise FileNotFoundError(f"{out}: no such experiment folder (run the pipeline first: ./run.sh)")
    res = RunResults(out=out, config=_read_yaml(out / "config.yaml"))
    folds = pd.read_csv(artifacts.folds_csv(out), dtype={ID: str}) if artifacts.folds_csv(out).is_file() else None
    res.data, res.train = _pick_data([data, res.config.get("data_dir")], folds, res.notes)

    if res.train is not None:
        oof = res.train[[ID, TARGET]].astype({TARGET: float})
        oof = oof.merge(folds, on=ID, how="left") if folds is not None else oof
    else:
        oof = folds.copy() if folds is not None else pd.DataFrame(columns=[ID])
    n_folds = int(folds["fold"].nunique()) if folds is not None else None
    for head, folder in HEAD_DIRS.items():
        path = artifacts.preds(out, folder, "oof")
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
    bp = artifacts.svr_dir(out) / "best_params.json"
    res.best_params = read_json(bp) if bp.is_file() else {}
    wanted = res.best_params.get("study_name") or res.best_params.get("study")
    storage = storage or (res.config.get("svr") or {}).get("storage")
    res.study_name, res.trials, res.minimize, note = load_study(out, storage, wanted)
    if note and note != NOT_RUN:
        res.notes.append(note)
    w = out / "ensemble" / "weights.json"
    res.weights = read_json(w) if w.is_file() else {}
    t = out / "timings.json"
    res.timings = read_json(t) if t.is_file() else {}
    return res


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
        if "equal_weights" in scores:
            rows.append(("equal-weight blend", scores["equal_weights"], np.nan, "ok"))
    else:
        rows.append(("ensemble", np.nan, np.nan, NOT_RUN))
    mean = scores.get("predict_mean")
    if mean is None and res.train is not None:
        y = res.train[TARGET].to_numpy(float)
        mean = rmse(np.full_like(y, y.mean()), y)
    rows.append(("predict the mean", np.nan if mean is None else mean, np.nan, "baseline"))
    return pd.DataFrame(rows, columns=["model", "oof_rmse", "weight", "status"])


def fold_table(res: RunResults) -> pd.DataFrame:
    """Validation RMSE of each head (columns) on each fold (rows), from the out-of-fold predictions."""
    if not res.has_target or "fold" not in res.oof or not res.heads:
        return pd.DataFrame()
    sq = pd.DataFrame({h: (res.oof[h] - res.oof[TARGET]) ** 2 for h in res.heads}).assign(fold=res.oof["fold"])
    table = np.sqrt(sq.dropna(subset=["fold"]).groupby("fold").mean())
    table.index = table.index.astype(int)
    return table.sort_index()


# ---------------------------------------------------------------------------------------------------------------
# HTML


CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:0 auto;max-width:1180px;padding:12px 28px;color:#222}
h1{margin-bottom:0}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:36px}
.sub{color:#666;margin-top:4px}table{border-collapse:collapse;margin:10px 0}
th,td{border:1px solid #ddd;padding:4px 10px;text-align:left}th{background:#f4f4f4}
td.num{text-align:right;font-variant-numeric:tabular-nums}tr.notrun td{color:#999;font-style:italic}
tr.best td{font-weight:600}figure{margin:14px 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{color:#555;font-size:.92em}.missing{color:#999;font-style:italic;margin:8px 0}
.note{background:#fff8e1;border-left:4px solid #f0c040;padding:6px 10px;margin:6px 0}
pre{background:#f7f7f7;padding:10px;overflow:auto;font-size:.85em}nav a{margin-right:14px}
"""


def _num(v: Any, fmt: str = "{:.3f}") -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return '<td class="num">&ndash;</td>'
    return f'<td class="num" data-value="{float(v)!r}">{fmt.format(v)}</td>'


def _model_html(table: pd.DataFrame) -> str:
    mean = table.loc[table["model"] == "predict the mean", "oof_rmse"]
    mean = float(mean.iloc[0]) if len(mean) else np.nan
    best = table.loc[table["status"] != "baseline", "oof_rmse"].min()
    rows = []
    for r in table.itertuples():
        cls = "notrun" if r.status == NOT_RUN else ("best" if r.oof_rmse == best else "")
        attrs = f'data-model="{html.escape(r.model)}" data-status="{html.escape(r.status)}"'
        if not np.isnan(r.oof_rmse):
            attrs += f' data-rmse="{r.oof_rmse!r}"'
        if not np.isnan(r.weight):
            attrs += f' data-weight="{r.weight!r}"'
        ratio = r.oof_rmse / mean if mean and not np.isnan(r.oof_rmse) else np.nan
        rows.append(f'<tr class="{cls}" {attrs}><td>{html.escape(r.model)}</td>{_num(r.oof_rmse)}{_num(r.weight)}'
                    f'{_num(ratio)}<td>{html.escape(r.status)}</td></tr>')
    return ('<table id="models"><tr><th>model</th><th>OOF RMSE</th><th>weight</th><th>RMSE / mean\'s</th>'
            '<th>status</th></tr>' + "".join(rows) + "</table>")


def _df_html(df: pd.DataFrame, table_id: str, index_name: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in [index_name, *df.columns])
    rows = []
    for index, values in zip(df.index, df.to_numpy()):
        cells = "".join(_num(v) if isinstance(v, (int, float, np.number)) else f"<td>{html.escape(str(v))}</td>"
                        for v in values)
        rows.append(f"<tr><td>{html.escape(str(index))}</td>{cells}</tr>")
    return f'<table id="{table_id}"><tr>{head}</tr>{"".join(rows)}</table>'


class _Page:
    """Collects sections; ``figure`` embeds a PNG, or a note saying why there is none."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.toc: list[tuple[str, str]] = []
        self.n_figures = 0

    def section(self, title: str) -> None:
        anchor = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
        self.toc.append((anchor, title))
        self.parts.append(f'<h2 id="{anchor}">{html.escape(title)}</h2>')

    def add(self, raw_html: str) -> None:
        self.parts.append(raw_html)

    def missing(self, text: str) -> None:
        self.parts.append(f'<p class="missing">{html.escape(text)}</p>')

    def figure(self, make: Callable[[], Any], caption: str, missing: str | None = None) -> None:
        if missing:
            self.missing(missing)
            return
        try:
            png = plots.to_png(make(), colors=256)
        except Exception as e:  # one broken figure must not cost the whole report
            log.warning("report: figure %r failed: %s", caption, e, exc_info=True)
            self.parts.append(f'<p class="note">figure failed ({html.escape(type(e).__name__)}: {html.escape(str(e))})</p>')
            return
        self.n_figures += 1
        b64 = base64.b64encode(png).decode()
        self.parts.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{b64}">'
                          f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _models_section(page: _Page, res: RunResults) -> None:
    models = model_table(res)
    page.section("Models")
    page.add(_model_html(models))
    score = dict(zip(models["model"], models["oof_rmse"]))
    ens, mean = score["ensemble"], score["predict the mean"]
    if not np.isnan(ens) and not np.isnan(mean):
        page.add(f"<p>The blend's out-of-fold RMSE is <b>{ens:.3f}</b>, {ens / mean:.3f}x that of predicting the "
                 f"mean ({mean:.3f}).</p>")
    folds = fold_table(res)
    page.section("Per-fold scores")
    if len(folds):
        page.add(_df_html(pd.concat([folds, pd.DataFrame({h: [oof_rmse(res, h)] for h in folds}, index=["all (OOF)"])]),
                          "folds", "fold"))
    page.figure(lambda: plots.fold_scores(folds), "Validation RMSE of every head on every fold.",
                missing=None if len(folds) else "no fold scores: no head has run")
    page.figure(lambda: plots.training_curves(res.metrics), "NN head: loss and validation RMSE per epoch and fold.",
                missing=None if len(res.metrics) else "NN head: not run (no train/fold*/metrics.csv)")


def _oof_section(page: _Page, res: RunResults) -> None:
    page.section("Out-of-fold predictions")
    heads = res.heads
    why = "competition data not found" if res.train is None else (None if heads else "no head has run")
    page.figure(lambda: plots.oof_scatter(res.oof, heads), "Out-of-fold prediction against the true score.", why)
    page.figure(lambda: plots.residuals_by_target(res.oof, heads),
                "Bias and RMSE by true score: regression to the mean shows as positive bias low, negative high.", why)
    page.figure(lambda: plots.worst_predictions(res.data, res.oof, res.main_head, heads),
                f"The train photos the {res.main_head} head misses most.", why)


def _svr_section(page: _Page, res: RunResults, config: dict) -> None:
    page.section("SVR tuning (Optuna)")
    if res.trials is not None and len(res.trials):
        param = c_param(res.trials) or "C"
        page.add(f"<p>Study <code>{html.escape(str(res.study_name))}</code>: {len(res.trials)} completed trials.</p>")
        svr_cfg = config.get("svr") or {}
        bounds = (svr_cfg["c_min"], svr_cfg["c_max"]) if param == "C" and "c_min" in svr_cfg else None
        page.figure(lambda: plots.optuna_study(res.trials, param, str(res.study_name), res.minimize, bounds),
                    f"Objective per trial and its response to {param}.")
    else:
        page.missing(f"SVR: {res.status.get('svr', NOT_RUN)} (no Optuna study in svr/study.db)")
    if res.best_params:
        page.add(f"<pre>{html.escape(yaml.safe_dump(res.best_params, sort_keys=False, default_flow_style=None))}</pre>")


def _timings_table(timings: dict[str, float]) -> str:
    rows = [(s, timings.get(s)) for s in STAGES] + [(s, v) for s, v in timings.items() if s not in STAGES]
    total = sum(v for _, v in rows if v is not None)
    body = "".join(f"<tr><td>{s}</td>{_num(v, '{:.1f}')}<td>{_duration(v) if v is not None else NOT_RUN}</td></tr>"
                   for s, v in rows)
    return (f'<table id="timings"><tr><th>stage</th><th>seconds</th><th>duration</th></tr>{body}'
            f"<tr><th>total</th>{_num(total, '{:.1f}')}<th>{_duration(total)}</th></tr></table>")


def render(res: RunResults, config: dict, title: str = "") -> tuple[str, int]:
    """The report's HTML and how many figures it embeds."""
    page = _Page()
    _models_section(page, res)
    _oof_section(page, res)
    _svr_section(page, res, config)
    page.section("Ensemble")
    page.figure(lambda: plots.ensemble_weights(res.weights.get("weights", {}), res.weights.get("oof_rmse", {})),
                "Blend weights fit on out-of-fold predictions, and every model's OOF RMSE.",
                missing=None if res.weights else "ensemble: not run")
    page.section("The competition")
    no_data = "competition data not found" if res.train is None else None
    page.figure(lambda: plots.target_distribution(res.train[TARGET]), "Pawpularity in train.csv.", no_data)
    page.figure(lambda: plots.metadata_effect(res.train), "The 12 metadata flags and the target.", no_data)
    page.section("Time per stage")
    page.add(_timings_table(res.timings))
    page.section("Config")
    page.add(f"<pre>{html.escape(yaml.safe_dump(config, sort_keys=False, default_flow_style=None))}</pre>")

    notes = "".join(f'<p class="note">{html.escape(n)}</p>' for n in res.notes)
    toc = "".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, t in page.toc)
    stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    doc = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
           f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
           f'<p class="sub">experiment folder <code>{html.escape(str(res.out))}</code> &middot; data '
           f"<code>{html.escape(str(res.data))}</code> &middot; written {stamp}</p><nav>{toc}</nav>{notes}"
           + "".join(page.parts) + "</body></html>")
    return doc, page.n_figures


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def run(cfg: Config) -> Path:
    """Write ``cfg.out/report.html`` from what the experiment folder holds; return its path."""
    t0 = time.time()
    res = load_results(cfg.out, cfg.data, cfg.svr.storage)
    config = res.config or cfg.to_dict()  # the config that produced the outputs, when a stage saved one
    doc, n_figures = render(res, config, title=f"pawpular report: {config.get('experiment', cfg.experiment)}")
    path = cfg.out / "report.html"
    atomic_write_text(path, doc)
    log.info("report: %d figures, heads %s, %.1f KB in %.1fs -> %s", n_figures,
             ", ".join(f"{h} {s}" for h, s in res.status.items()), path.stat().st_size / 1024, time.time() - t0, path)
    return path
