"""How `pawpular runs` shows its table (``experiments.table``): text, JSON, or one self-contained HTML page.

    pawpular runs [FOLDER ...] [--sort KEY] [--json] [--html FILE] [--baseline NAME]

Text: the table (scores with 3 decimals, times in seconds; a nested score its weights.json does not call trusted
marked "opt.", with a legend line), why each row that is not done is not, then the settings that differ between
the rows. JSON: {"runs": [one object per row], "settings": [the differing keys]}.
HTML: both tables, why each row that is not done is not, and a figure of each run's blend scores (in-sample,
cross-validated, nested, holdout) beside its heads'; the figure is an embedded PNG (the page opens offline, as
report.html does).
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..store.files import write_text
from .experiments import COLUMNS, table

if TYPE_CHECKING:  # matplotlib loads only for the HTML page: the text table stays quick
    from matplotlib.figure import Figure

SCORES = ("nested", "nn", "svr", "blend", "blend_cv", "holdout", "mean")
# The table's columns (experiments.COLUMNS; --json has them all) less what the text and HTML tables leave out: the
# nested score's trust (a mark on it), the train mean's score, the total time, the reason (listed under the table),
# the folder and the per-stage states.
NOT_SHOWN = ("nested_trusted", "mean", "t_total", "why", "path", "stages")
SHOWN = tuple(c for c in COLUMNS if c not in NOT_SHOWN)
HEADERS = {
    "nn": "nn opt.",
    "svr": "svr opt.",
    "svr_heads": "svr.heads",
    "blend": "blend opt.",
    "blend_cv": "blend_cv opt.",  # optimistic
    "img_size": "img",
    "t_folds": "folds s",
    "t_train": "train s",
    "t_embed": "embed s",
    "t_svr": "svr s",
    "t_ensemble": "ens. s",
}


def _cell(column: str, value: Any) -> str:
    if column == "sets" and isinstance(value, list):  # each embedding set: name=backbone@size kind
        from ..recipe import set_label

        return ", ".join(set_label(s) for s in value) or "-"
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if column in SCORES:
        return f"{value:.3f}"
    if column == "best_C":
        return f"{value:.4g}"
    if column.startswith("t_"):
        return f"{value:.1f}" if value < 100 else f"{value:.0f}"
    if isinstance(value, (list, dict, bool)) or value is None:
        return json.dumps(value)
    return str(value)


OPTIMISTIC_MARK = " opt."  # after a nested score a choice upstream of it made on all rows
LEGEND = (
    '"opt." after a nested score: optimistic too, not the one to trust (a fold shipped its own best epoch, or select '
    "chose the svr.features on all rows; pawpular status names which)"
)


def _shown(column: str, row: pd.Series) -> str:
    """A cell as shown: a nested score its weights.json does not call trusted carries OPTIMISTIC_MARK."""
    shown = _cell(column, row[column])
    return shown + OPTIMISTIC_MARK if column == "nested" and _untrusted(row.get("nested_trusted")) else shown


def _untrusted(value: Any) -> bool:
    """False (not None: no nested score, nor NaN) in the nested_trusted column."""
    return isinstance(value, (bool, np.bool_)) and not value


def _marked(df: pd.DataFrame) -> bool:
    return "nested_trusted" in df and any(_untrusted(v) for v in df["nested_trusted"])


def _grid(rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=False))
        ).rstrip()
        for r in rows
    )


def text(df: pd.DataFrame) -> str:
    """The table as aligned text, the reasons of the rows that are not done, and the settings that differ."""
    cols = list(SHOWN)
    rows = [[HEADERS.get(c, c) for c in cols]] + [[_shown(c, r) for c in cols] for _, r in df.iterrows()]
    right = {
        i for i, c in enumerate(cols) if c in SCORES or c.startswith("t_") or c in ("best_C", "img_size", "epochs")
    }
    parts = [_grid(rows, right) + (f"\n{LEGEND}" if _marked(df) else "")]
    why = [[f"  {r['experiment']}", r["status"], r["why"]] for _, r in df.iterrows() if r["status"] != "done"]
    if why:
        parts.append("why not done:\n" + _grid(why, set()))
    settings = df.attrs.get("settings", [])
    if settings:
        grid = [["experiment", *settings]] + [
            [r["experiment"], *[_cell(k, r[k]) for k in settings]] for _, r in df.iterrows()
        ]
        parts.append("settings that differ:\n" + _grid(grid, set()))
    elif len(df) > 1:
        parts.append("settings that differ: none")
    return "\n\n".join(parts)


def _plain(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return value.item() if isinstance(value, np.generic) else value


def to_json(df: pd.DataFrame) -> str:
    runs = [{c: _plain(v) for c, v in r.items()} for r in df.to_dict(orient="records")]
    extra = {"baseline": df.attrs["baseline"], "inside": df.attrs.get("inside", [])} if "baseline" in df.attrs else {}
    return json.dumps({"runs": runs, "settings": df.attrs.get("settings", []), **extra}, indent=1, default=str)


# ---------------------------------------------------------------------------------------------------------------
# The HTML page


def blend_figure(df: pd.DataFrame) -> Figure:
    """Per run (a row each, best cross-validated blend on top): the blend's in-sample, cross-validated and
    holdout RMSE, the NN and SVR heads' OOF RMSE, and predicting the mean."""
    from matplotlib.figure import Figure

    from . import plots

    if df[["blend", "blend_cv", "holdout"]].isna().all().all():
        return plots.message("no experiment has a blend score yet (run pawpular ensemble)", "Blend scores")
    order = df.sort_values("blend_cv", na_position="first", ascending=False, kind="stable")
    if "nested_trusted" in order:  # an optimistic nested score is drawn hollow, never as the one to trust
        opt = np.array([_untrusted(v) for v in order["nested_trusted"]], dtype=bool)
        order = order.assign(nested=order["nested"].where(~opt), nested_opt=order["nested"].where(opt))
    pos = np.arange(len(order))
    fig = Figure(figsize=(10, 0.5 * len(order) + 1.8), layout="constrained")
    ax = fig.add_subplot()
    # (column, label, marker, colour, size, hollow, row offset): the heads above the blend, the holdout below it
    marks = [
        ("nn", "NN head (OOF)", "o", plots.color("nn"), 5, False, 0.22),
        ("svr", "SVR head (OOF)", "o", plots.color("svr"), 5, False, 0.22),
        ("blend", "blend, in-sample", "o", "#2ca02c", 10, True, 0.0),
        ("blend_cv", "blend, cross-validated", "D", "#145214", 6, False, 0.0),
        ("nested", "blend, nested (to trust)", "*", "#000000", 9, False, -0.11),
        ("nested_opt", "blend, nested, optimistic (opt.)", "*", "#000000", 9, True, -0.11),
        ("holdout", "blend, holdout", "s", "#d62728", 6, False, -0.22),
    ]
    for column, label, marker, color, size, hollow, offset in marks:
        values = order[column].to_numpy(float) if column in order else np.full(len(order), np.nan)
        if not np.isnan(values).all():
            ax.plot(
                values,
                pos + offset,
                marker,
                color=color,
                markersize=size,
                label=label,
                linestyle="none",
                markerfacecolor="none" if hollow else color,
                markeredgewidth=1.5 if hollow else 1,
            )
    for p, v in zip(pos, order["blend_cv"].to_numpy(float), strict=False):
        if not np.isnan(v):
            ax.annotate(f"{v:.3f}", (v, p), textcoords="offset points", xytext=(9, -3), fontsize=8)
    labels = [f"{e} ({s})" if s != "done" else e for e, s in zip(order["experiment"], order["status"], strict=False)]
    ax.set(yticks=pos, yticklabels=labels, xlabel="OOF RMSE (lower is better)", title="Blend score of each run")
    ax.set_ylim(-0.6, len(order) - 0.4)
    ax.grid(axis="x", alpha=0.3)
    fig.legend(loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    return fig


def _mean_note(df: pd.DataFrame) -> str:
    means = sorted({round(v, 3) for v in df["mean"].dropna()})
    if not means:
        return ""
    shown = f"{means[0]:.3f}" if len(means) == 1 else f"{means[0]:.3f} to {means[-1]:.3f}"
    return f" Predicting the mean scores {shown}."


PAGE_CSS = """
body{max-width:1560px}table{font-size:.85em}th,td{padding:3px 6px}th{white-space:nowrap}td.model{max-width:150px}
td.done{color:#1b7f2a;font-weight:600}td.stale,td.partial{color:#a05a00;font-weight:600}
td.damaged{color:#c5221f;font-weight:600}ul.why{font-size:.9em;color:#444}
"""  # after the report's own CSS (reporting.CSS)


def _html_table(df: pd.DataFrame, cols: list[str], table_id: str) -> str:
    head = "".join(f"<th>{html.escape(HEADERS.get(c, c))}</th>" for c in cols)
    body = []
    for _, r in df.iterrows():
        cells = []
        for c in cols:
            value, shown = r[c], html.escape(_shown(c, r))
            if c == "status":
                cells.append(f'<td class="{html.escape(str(value))}" title="{html.escape(str(r["why"]))}">{shown}</td>')
            elif c == "model":  # long timm names break after their underscores, not the page
                cells.append(f'<td class="model">{shown.replace("_", "_<wbr>")}</td>')
            elif isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
                data = "" if isinstance(value, float) and math.isnan(value) else f' data-value="{float(value)!r}"'
                cells.append(f'<td class="num"{data}>{shown}</td>')
            else:
                cells.append(f"<td>{shown}</td>")
        body.append(f'<tr data-experiment="{html.escape(str(r["experiment"]))}">{"".join(cells)}</tr>')
    return f'<table id="{table_id}"><tr>{head}</tr>{"".join(body)}</table>'


PAGE_START = '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>pawpular runs</title>'


def page(df: pd.DataFrame) -> str:
    """The self-contained page: the runs table, the settings that differ, and the blend-score figure."""
    from . import plots
    from .reporting import CSS

    settings = df.attrs.get("settings", [])
    png = base64.b64encode(plots.to_png(blend_figure(df))).decode()
    stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    differ = (
        _html_table(df, ["experiment", *settings], "settings")
        if settings
        else '<p class="missing">none: the listed runs have the same settings</p>'
    )
    why = "".join(
        f"<li><b>{html.escape(str(r['experiment']))}</b> {html.escape(str(r['status']))}: "
        f"{html.escape(str(r['why']))}</li>"
        for _, r in df.iterrows()
        if r["status"] != "done"
    )
    return (
        f"{PAGE_START}<style>{CSS}{PAGE_CSS}</style></head><body><h1>pawpular runs</h1>"
        f'<p class="sub">{len(df)} experiment(s) &middot; written {stamp} &middot; scores are OOF RMSE '
        "(lower is better); times in seconds; status from the manifests</p><h2>Experiments</h2>"
        + _html_table(df, list(SHOWN), "runs")
        + (f'<p class="legend">{html.escape(LEGEND)}</p>' if _marked(df) else "")
        + (f'<ul class="why">{why}</ul>' if why else "")
        + "<h2>Settings that differ</h2>"
        + differ
        + '<h2>Blend scores</h2><figure><img alt="Blend score of each run" '
        f'src="data:image/png;base64,{png}"><figcaption>Each run\'s blend RMSE in-sample, cross-validated and '
        f"on the holdout (where there is one), beside its heads' OOF RMSE.{_mean_note(df)}</figcaption></figure>"
        "</body></html>"
    )


def main(
    folders: list[str],
    sort: str | None = None,
    as_json: bool = False,
    html_file: str | None = None,
    baseline: str | None = None,
    repeats: list[str] | None = None,
) -> int:
    """`pawpular runs`: print the table (or JSON); with ``html_file`` also write the page; with ``baseline`` the
    comparisons against it (``scores/compare.py``), widened by the seed spread of ``repeats``."""
    if html_file:
        from ..store.guards import check_own_page

        check_own_page(Path(html_file), "--html", PAGE_START)  # before any work: never a user's file
    if repeats and baseline is None:
        from ..store.errors import UsageError

        raise UsageError("--repeats: name them with --baseline (they are the baseline's config at other seeds)")
    df = table(folders or None, sort, baseline, repeats)
    if html_file:
        write_text(Path(html_file), page(df))
    if as_json:
        print(to_json(df))
    else:
        print(text(df))
        if baseline is not None:
            from ..scores.compare import baseline_text

            print("\n" + baseline_text(df))
    if html_file and not as_json:
        print(f"\npage: {html_file}")
    return 0
