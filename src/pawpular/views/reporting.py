"""`pawpular report`: one self-contained ``report.html`` describing an experiment folder.

Reads   what ``results.load_results`` gathers (every stage's outputs so far, the manifests, the competition)
Writes  <experiment>/report.html: figures embedded as base64 PNGs (opens offline), the stages' status (done /
        stale and why / missing), the model table (OOF RMSE and weight per head, the in-sample, cross-validated
        and holdout scores of the blend, predicting the mean; a model no better than the mean is flagged), per-fold
        scores, time per stage and the config that made the artifacts
Run     pawpular report --output output/default [--data input/synthetic]
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from ..data.tables import TARGET
from ..store import artifacts, manifest
from ..store.errors import UsageError
from ..store.files import write_text
from . import plots, plots_eda
from .results import NOT_RUN, RunResults, fold_table, load_results, model_table, oof_rmse

log = logging.getLogger("pawpular")


# ---------------------------------------------------------------------------------------------------------------
# HTML


CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:0 auto;max-width:1180px;padding:12px 28px;
color:#222}
h1{margin-bottom:0}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:36px}
.sub{color:#666;margin-top:4px}table{border-collapse:collapse;margin:10px 0}
th,td{border:1px solid #ddd;padding:4px 10px;text-align:left}th{background:#f4f4f4}
td.num{text-align:right;font-variant-numeric:tabular-nums}tr.notrun td{color:#999;font-style:italic}
tr.best td{font-weight:600}figure{margin:14px 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{color:#555;font-size:.92em}.missing{color:#999;font-style:italic;margin:8px 0}
.note{background:#fff8e1;border-left:4px solid #f0c040;padding:6px 10px;margin:6px 0}
.warn{background:#fdecea;border-left:4px solid #d93025;padding:6px 10px;margin:6px 0;font-weight:600}
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
        rows.append(
            f'<tr class="{cls}" {attrs}><td>{html.escape(r.model)}</td>{_num(r.oof_rmse)}{_num(r.weight)}'
            f"{_num(ratio)}<td>{html.escape(r.status)}</td></tr>"
        )
    return (
        '<table id="models"><tr><th>model</th><th>OOF RMSE</th><th>weight</th><th>RMSE / mean\'s</th>'
        "<th>status</th></tr>" + "".join(rows) + "</table>"
    )


def _df_html(df: pd.DataFrame, table_id: str, index_name: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in [index_name, *df.columns])
    rows = []
    for index, values in zip(df.index, df.to_numpy(), strict=False):
        cells = "".join(
            _num(v) if isinstance(v, (int, float, np.number)) else f"<td>{html.escape(str(v))}</td>" for v in values
        )
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
            self.parts.append(
                f'<p class="note">figure failed ({html.escape(type(e).__name__)}: {html.escape(str(e))})</p>'
            )
            return
        self.n_figures += 1
        b64 = base64.b64encode(png).decode()
        self.parts.append(
            f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{b64}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )


def _stages_section(page: _Page, res: RunResults) -> None:
    page.section("Stages")
    if not res.stages:
        page.missing("stage status unknown (no config.yaml or no competition data)")
        return
    rows = "".join(
        f'<tr data-stage="{s}" data-state="{st}"><td>{s}</td><td>{st}</td><td>{html.escape(why)}</td></tr>'
        for s, (st, why) in res.stages.items()
    )
    page.add(f'<table id="stages"><tr><th>stage</th><th>state</th><th>why</th></tr>{rows}</table>')
    stale = [s for s, (st, _) in res.stages.items() if st not in ("done", "missing", manifest.NOT_NEEDED)]
    if stale:
        page.add(
            f'<p class="warn">WARNING: {", ".join(stale)} no longer match their inputs or settings: the '
            "numbers below describe the old results; run <code>pawpular all</code>.</p>"
        )


def _what_ran(page: _Page, res: RunResults, config: dict) -> None:
    """The recipe, each embedding set (backbone, image size, feature kind, reused or not), and the fine-tuned
    model only when this experiment trained one."""
    from .. import recipe

    ran = recipe.what_ran(res.out, config)
    trained, sets, kind = ran["model"], ran["sets"], ran["recipe"]
    rows = "".join(
        f'<tr data-set="{html.escape(s["name"])}"><td>{html.escape(s["name"])}</td>'
        f"<td>{html.escape(str(s['backbone'] or '-'))}</td><td>{s['img_size'] or '-'}</td>"
        f"<td>{html.escape(s['kind'])}</td><td>{html.escape(str(s['source'] or '-'))}</td>"
        f"<td>{'reused from another experiment' if s['reused'] else 'computed here'}</td></tr>"
        for s in sets
    )
    model = (
        "nothing is fine-tuned"
        if not trained
        else f"fine-tuned model: {trained['model']} ({trained['finetune']}, {trained['epochs']} epochs, "
        f"image size {trained['img_size'] or 'its own'})"
    )
    page.add(f'<p id="recipe">What ran: <b>{kind}</b>; {html.escape(model)}.</p>')
    if rows:
        page.add(
            '<table id="sets"><tr><th>embedding set</th><th>backbone</th><th>image size</th><th>features</th>'
            f"<th>weights</th><th>made</th></tr>{rows}</table>"
        )


def _models_section(page: _Page, res: RunResults) -> None:
    models = model_table(res)
    page.section("Models")
    page.add(_model_html(models))
    score = dict(zip(models["model"], models["oof_rmse"], strict=False))
    ens, mean = score.get("ensemble, cross-val.", score["ensemble"]), score["predict the mean"]
    trusted = score.get("ensemble, nested", np.nan)
    held = f"; on the holdout, {score['holdout RMSE']:.3f}" if "holdout RMSE" in score else ""
    if not res.weights.get("trusted", False) and not np.isnan(trusted):
        page.add(
            f"<p>The blend's nested out-of-fold RMSE is {trusted:.3f}, but no score here is to be trusted: "
            f"{html.escape(str(res.weights.get('trust', 'own-best checkpoints')))}.</p>"
        )
    elif not np.isnan(trusted) and not np.isnan(mean) and mean > 0:
        page.add(
            f"<p>The blend's nested out-of-fold RMSE (every choice, the SVR's C and the blend weights, made "
            f"without the fold scored, on checkpoints no rows chose: the one to trust) is <b>{trusted:.3f}</b>, "
            f"{trusted / mean:.3f}x that of predicting the mean ({mean:.3f}){held}. The cross-validated "
            f"{ens:.3f} is optimistic.</p>"
        )
    elif not np.isnan(ens) and not np.isnan(mean) and mean > 0:
        why = (res.weights.get("nested_rmse") or {}).get("missing", "rerun the stages")
        page.add(
            f"<p>The blend's cross-validated out-of-fold RMSE is <b>{ens:.3f}</b>, {ens / mean:.3f}x that of "
            f"predicting the mean ({mean:.3f}){held}; optimistic: no nested score was recorded "
            f"({html.escape(str(why))}).</p>"
        )
    for line in res.weights.get("worse_than_mean", []):
        page.add(f'<p class="warn">WARNING: {html.escape(line)}</p>')
    folds = fold_table(res)
    page.section("Per-fold scores")
    if len(folds):
        page.add(
            _df_html(
                pd.concat([folds, pd.DataFrame({h: [oof_rmse(res, h)] for h in folds}, index=["all (OOF)"])]),
                "folds",
                "fold",
            )
        )
    page.figure(
        lambda: plots.fold_scores(folds),
        "Validation RMSE of every head on every fold.",
        missing=None if len(folds) else "no fold scores: no head has run",
    )
    if res.status.get("nn") != manifest.NOT_NEEDED:  # the frozen recipe trains nothing: no figure to miss
        page.figure(
            lambda: plots.training_curves(res.metrics),
            "NN head: loss and validation RMSE per epoch and fold.",
            missing=None if len(res.metrics) else "NN head: not run (no train/fold*/metrics.csv)",
        )


def _oof_section(page: _Page, res: RunResults) -> None:
    page.section("Out-of-fold predictions")
    heads = res.heads
    why = "competition data not found" if res.train is None else (None if heads else "no head has run")
    page.figure(lambda: plots.oof_scatter(res.oof, heads), "Out-of-fold prediction against the true score.", why)
    page.figure(
        lambda: plots.residuals_by_target(res.oof, heads),
        "Bias and RMSE by true score: regression to the mean shows as positive bias low, negative high.",
        why,
    )
    page.figure(
        lambda: plots.worst_predictions(res.data, res.oof, res.main_head, heads),
        f"The train photos the {res.main_head} head misses most.",
        why,
    )


def _svr_section(page: _Page, res: RunResults, config: dict) -> None:
    page.section("SVR tuning (Optuna)")
    if res.trials is not None and len(res.trials):
        param = "C"
        page.add(f"<p>Study <code>{html.escape(str(res.study_name))}</code>: {len(res.trials)} completed trials.</p>")
        svr_cfg = config.get("svr") or {}
        bounds = (svr_cfg["c_min"], svr_cfg["c_max"]) if param == "C" and "c_min" in svr_cfg else None
        page.figure(
            lambda: plots.optuna_study(res.trials, param, str(res.study_name), res.minimize, bounds),
            f"Objective per trial and its response to {param}.",
        )
    else:
        page.missing(f"SVR: {res.status.get('svr', NOT_RUN)} (no Optuna study in svr/study.db)")
    if res.best_params:
        page.add(f"<pre>{html.escape(yaml.safe_dump(res.best_params, sort_keys=False, default_flow_style=None))}</pre>")


def _timings_table(timings: dict[str, float], states: dict[str, tuple[str, str]]) -> str:
    stages = artifacts.PIPELINE
    rows = [(s, timings.get(s)) for s in stages] + [(s, v) for s, v in timings.items() if s not in stages]
    total = sum(v for _, v in rows if v is not None)
    unrun = {s: manifest.NOT_NEEDED if states.get(s, ("",))[0] == manifest.NOT_NEEDED else NOT_RUN for s, _ in rows}
    body = "".join(
        f"<tr><td>{s}</td>{_num(v, '{:.1f}')}<td>{_duration(v) if v is not None else unrun[s]}</td></tr>"
        for s, v in rows
    )
    return (
        f'<table id="timings"><tr><th>stage</th><th>seconds</th><th>duration</th></tr>{body}'
        f"<tr><th>total</th>{_num(total, '{:.1f}')}<th>{_duration(total)}</th></tr></table>"
    )


def render(res: RunResults, config: dict, title: str = "") -> tuple[str, int]:
    """The report's HTML and how many figures it embeds."""
    page = _Page()
    _stages_section(page, res)
    _what_ran(page, res, config)
    _models_section(page, res)
    _oof_section(page, res)
    _svr_section(page, res, config)
    page.section("Ensemble")
    page.figure(
        lambda: plots.ensemble_weights(res.weights.get("weights", {}), res.weights.get("oof_rmse", {})),
        "Blend weights fit on out-of-fold predictions, and every model's OOF RMSE.",
        missing=None if res.weights else "ensemble: not run",
    )
    page.section("The competition")
    no_data = "competition data not found" if res.train is None else None
    page.figure(lambda: plots_eda.target_distribution(res.train[TARGET]), "Pawpularity in train.csv.", no_data)
    page.figure(lambda: plots_eda.metadata_effect(res.train), "The 12 metadata flags and the target.", no_data)
    page.section("Time per stage")
    page.add(_timings_table(res.timings, res.stages))
    page.section("Config")
    page.add(f"<pre>{html.escape(yaml.safe_dump(config, sort_keys=False, default_flow_style=None))}</pre>")

    notes = "".join(f'<p class="note">{html.escape(n)}</p>' for n in res.notes)
    toc = "".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, t in page.toc)
    stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    doc = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
        f'<p class="sub">experiment folder <code>{html.escape(str(res.out))}</code> &middot; data '
        f"<code>{html.escape(str(res.data))}</code> &middot; written {stamp}</p><nav>{toc}</nav>{notes}"
        + "".join(page.parts)
        + "</body></html>"
    )
    return doc, page.n_figures


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def check_writable_for_report(out: Path) -> None:
    """report writes report.html into the experiment: a read-only one (an earlier run attached as a read-only
    dataset) is refused in one line, before any work, saying what it needed to write."""
    if out.is_dir() and not os.access(out, os.W_OK):
        raise UsageError(
            f"report --output {out}: the experiment folder is read-only, and report writes "
            f"{artifacts.report_html(out)} into it; copy the folder somewhere writable and report that copy "
            "(status, runs and export read a read-only experiment)"
        )


def write_report(out: Path, data: Path | None = None) -> Path:
    """Write ``out/report.html`` from what the experiment folder holds (under its lock); return its path."""
    from ..store.lock import experiment_lock

    t0 = time.time()
    from ..config.schema import public_dict

    check_writable_for_report(Path(out))
    res = load_results(out, data)
    config = public_dict(res.config)  # a config.yaml of an older version may still hold a password
    with experiment_lock(out, "report"):
        doc, n_figures = render(res, config, title=f"pawpular report: {Path(out).resolve().name}")
        path = artifacts.report_html(out)
        write_text(path, doc)
    log.info(
        "report: %d figures, heads %s, %.1f KB in %.1fs -> %s",
        n_figures,
        ", ".join(f"{h} {s}" for h, s in res.status.items()),
        path.stat().st_size / 1024,
        time.time() - t0,
        path,
    )
    return path
