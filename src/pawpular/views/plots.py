"""Figures shared by ``notebooks/*.ipynb`` and ``pawpular report``: each function takes tables, returns a Figure.
The competition's own figures (01_eda) are in ``views/plots_eda.py``; the helpers here serve both.

Reads only what it is given (DataFrames, dicts) and, for the photo grids, the competition's images; writes
nothing. Figures are plain ``matplotlib.figure.Figure`` objects, not pyplot ones: no global state, nothing to
close, safe in a report loop; a notebook shows one when it is a cell's value (after ``%matplotlib inline``), and
``to_png(fig)`` renders one with Agg. Empty inputs give a figure that says what is missing instead of raising.

    from pawpular.views import plots
    plots.target_distribution(train["Pawpularity"])
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter
from PIL import Image

from ..data.images import image_path, load_image
from ..data.tables import ID, TARGET
from ..scores.metrics import rmse

# One colour per head, the same in every figure.
HEAD_COLORS = {"nn": "#1f77b4", "svr": "#ff7f0e", "ensemble": "#2ca02c"}
_CYCLE = ["#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
TARGET_BINS = [0, 10, 20, 30, 40, 50, 60, 80, 100]


def color(name: str, i: int = 0) -> str:
    return HEAD_COLORS.get(name, _CYCLE[i % len(_CYCLE)])


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def to_png(fig: Figure, dpi: int = 100, colors: int | None = None) -> bytes:
    """PNG bytes of ``fig`` (Agg). ``colors``: quantize to a palette of that many colours, which makes photo
    grids about 5x smaller for an embedded report at no visible cost."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    if colors is None:
        return buf.getvalue()
    with Image.open(buf) as im:
        small = im.convert("RGB").quantize(colors, method=Image.Quantize.FASTOCTREE)
    out = io.BytesIO()
    small.save(out, format="png", optimize=True)
    return out.getvalue()


def message(text: str, title: str = "", size: tuple[float, float] = (7, 2)) -> Figure:
    """A figure that only says why there is nothing to plot."""
    fig = Figure(figsize=size)
    ax = fig.add_subplot()
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=12, color="#555", wrap=True)
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return fig


def _thumb(root: str | Path, split: str, id_: str, side: int = 384) -> np.ndarray:
    """A photo at most ``side`` pixels wide and high (a real 4000 px photo decoded at a reduced DCT scale)."""
    im = Image.fromarray(load_image(image_path(root, split, id_), min_side=side))
    im.thumbnail((side, side))
    return np.asarray(im)


def photo_grid(
    root: str | Path,
    ids: list[str],
    titles: list[str],
    cols: int,
    suptitle: str,
    split: str = "train",
    row_labels: list[str] | None = None,
) -> Figure:
    rows = max(1, -(-len(ids) // cols))
    fig = Figure(figsize=(3.0 * cols, 3.1 * rows + 0.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, id_, title in zip(axes, ids, titles, strict=False):
        if id_ is None:
            continue
        ax.imshow(_thumb(root, split, id_))
        ax.set_title(title, fontsize=9)
    if row_labels:
        for r, label in enumerate(row_labels):
            axes[r * cols].set_axis_on()
            axes[r * cols].set_xticks([])
            axes[r * cols].set_yticks([])
            axes[r * cols].set_ylabel(label, fontsize=9)
    fig.suptitle(suptitle, fontsize=12)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# A run's results (02_results, report.html)


def fold_scores(table: pd.DataFrame) -> Figure:
    """``table``: one row per fold, one column of validation RMSE per head (NaN where a head has no score)."""
    table = table.dropna(axis=1, how="all")
    if table.empty:
        return message("no fold scores: no head has run", "Validation RMSE per fold")
    fig = Figure(figsize=(9, 4), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(table))
    for i, head in enumerate(table.columns):
        ax.plot(x, table[head], "o-", color=color(head, i), label=f"{head} (mean {table[head].mean():.3f})", lw=1.2)
    ax.set_xticks(x, [f"fold {k}" for k in table.index])
    ax.set(ylabel="validation RMSE", title="Validation RMSE per fold (lower is better)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(frameon=False)
    return fig


def training_curves(metrics: pd.DataFrame) -> Figure:
    """``metrics``: fold, epoch, train_loss, val_rmse (the NN head's ``train/fold{k}/metrics.csv``)."""
    if metrics is None or not len(metrics):
        return message("the NN head has no metrics.csv yet", "NN head training curves")
    fig = Figure(figsize=(12, 3.8), layout="constrained")
    a, b = fig.subplots(1, 2)
    for i, (fold, m) in enumerate(metrics.groupby("fold")):
        c = _CYCLE[i % len(_CYCLE)]
        a.plot(m["epoch"], m["train_loss"], "o-", color=c, ms=3, label=f"fold {fold}")
        b.plot(m["epoch"], m["val_rmse"], "o-", color=c, ms=3, label=f"fold {fold}")
        best = m.loc[m["val_rmse"].idxmin()]
        b.plot(best["epoch"], best["val_rmse"], "*", color=c, ms=12)
    a.set(xlabel="epoch", ylabel="train loss (BCE)", title="NN head: training loss")
    b.set(xlabel="epoch", ylabel="validation RMSE", title="NN head: validation RMSE (star: own best epoch)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_xlim(metrics["epoch"].min() - 0.5, metrics["epoch"].max() + 0.5)
    b.legend(frameon=False, fontsize=8)
    return fig


def oof_scatter(oof: pd.DataFrame, heads: Sequence[str]) -> Figure:
    """Out-of-fold prediction against the true score, one panel per head."""
    heads = [h for h in heads if h in oof.columns]
    if not heads or TARGET not in oof:
        return message("no out-of-fold predictions (or no train.csv to score them)", "OOF predicted vs true")
    fig = Figure(figsize=(4.3 * len(heads), 4.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(heads), sharey=True))
    y = oof[TARGET].to_numpy(float)
    for i, (ax, head) in enumerate(zip(axes, heads, strict=False)):
        p = oof[head].to_numpy(float)
        ax.scatter(y, p, s=6, alpha=0.35, color=color(head, i))
        ax.plot([0, 100], [0, 100], "k--", lw=1)
        ax.set(
            xlim=(-1, 102),
            ylim=(-1, 102),
            xlabel="true Pawpularity",
            title=f"{head}: RMSE {rmse(p, y):.3f}, r = {np.corrcoef(p, y)[0, 1]:.3f}" if len(y) > 1 else head,
        )
        ax.set_aspect("equal")
    axes[0].set_ylabel("out-of-fold prediction")
    return fig


def residuals_by_target(oof: pd.DataFrame, heads: Sequence[str], edges: Sequence[float] = TARGET_BINS) -> Figure:
    """Mean residual (prediction - truth) and RMSE in bins of the true score: where the models shrink to the mean."""
    heads = [h for h in heads if h in oof.columns]
    if not heads or TARGET not in oof:
        return message("no out-of-fold predictions (or no train.csv to score them)", "Residuals by target range")
    y = oof[TARGET].to_numpy(float)
    bins = pd.cut(y, edges, include_lowest=True)
    labels = [f"{int(i.left) + (i.left > 0)}-{int(i.right)}" for i in bins.categories]
    counts = pd.Series(bins).value_counts(sort=False).to_numpy()
    fig = Figure(figsize=(12, 4), layout="constrained")
    a, b = fig.subplots(1, 2)
    x = np.arange(len(labels))
    width = 0.8 / len(heads)
    for i, head in enumerate(heads):
        res = pd.Series(oof[head].to_numpy(float) - y).groupby(bins, observed=False)
        off = x + (i - (len(heads) - 1) / 2) * width
        a.bar(off, res.mean().to_numpy(), width, color=color(head, i), label=head)
        b.bar(
            off,
            res.apply(lambda r: np.sqrt(np.mean(r**2)) if len(r) else np.nan).to_numpy(),
            width,
            color=color(head, i),
            label=head,
        )
    ticks = [f"{lab}\nn={c}" for lab, c in zip(labels, counts, strict=False)]
    a.axhline(0, color="k", lw=0.8)
    a.set(ylabel="mean residual (prediction - true)", title="Bias by true Pawpularity")
    b.set(ylabel="RMSE", title="RMSE by true Pawpularity")
    for ax in (a, b):
        ax.set_xticks(x, ticks, fontsize=8)
        ax.set_xlabel("true Pawpularity")
        ax.grid(axis="y", alpha=0.3)
    a.legend(frameon=False, loc="lower left")
    return fig


def optuna_study(
    trials: pd.DataFrame | None,
    param: str = "C",
    title: str = "",
    minimize: bool = True,
    bounds: tuple[float, float] | None = None,
) -> Figure:
    """Left: objective per trial and the best so far. Right: objective against ``param`` (log scale), over the
    searched interval ``bounds`` when given.

    ``trials``: Optuna's ``study.trials_dataframe()`` (completed trials: number, value, params_<name>).
    """
    col = f"params_{param}"
    if trials is None or not len(trials) or "value" not in trials:
        return message("no completed Optuna trials", "SVR tuning")
    t = trials.dropna(subset=["value"]).sort_values("number")
    best_so_far = t["value"].cummin() if minimize else t["value"].cummax()
    best = t.loc[t["value"].idxmin() if minimize else t["value"].idxmax()]
    fig = Figure(figsize=(12, 4), layout="constrained")
    a, b = fig.subplots(1, 2)
    a.scatter(t["number"], t["value"], s=18, color="#7f7f7f", label="trial")
    a.step(t["number"], best_so_far, where="post", color="#c44e52", label="best so far")
    a.set(xlabel="trial", ylabel="objective (CV RMSE)", title=f"Optuna history{' - ' + title if title else ''}")
    a.legend(frameon=False)
    a.grid(alpha=0.3)
    a.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if col in t:
        sc = b.scatter(t[col], t["value"], c=t["number"], cmap="viridis", s=22)
        b.plot(best[col], best["value"], "*", color="#c44e52", ms=16, label=f"best {param} = {best[col]:.3g}")
        b.set_xscale("log")
        if bounds:
            b.set_xlim(bounds[0] / 1.3, bounds[1] * 1.3)
        b.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        b.xaxis.set_minor_formatter(NullFormatter())
        b.set(xlabel=f"{param} (log scale)", ylabel="objective (CV RMSE)", title=f"Response to {param}")
        fig.colorbar(sc, ax=b, label="trial").ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        b.legend(frameon=False, loc="best")
        b.grid(alpha=0.3)
    else:
        b.text(0.5, 0.5, f"no parameter {param!r} in the study", ha="center", va="center")
        b.set_axis_off()
    return fig


def ensemble_weights(weights: dict[str, float], oof_rmse: dict[str, float]) -> Figure:
    """Left: blend weight per model. Right: OOF RMSE of each model, the blend and the baselines."""
    if not weights:
        return message("the ensemble has not run", "Ensemble")
    fig = Figure(figsize=(12, 3.6), layout="constrained")
    a, b = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.3]})
    names = list(weights)
    pos = np.arange(len(names))[::-1]
    a.barh(pos, [weights[n] for n in names], color=[color(n, i) for i, n in enumerate(names)])
    for p, n in zip(pos, names, strict=False):
        a.text(weights[n] + 0.02, p, f"{weights[n]:.3f}", va="center")
    a.set(yticks=pos, yticklabels=names, xlim=(0, 1.15), xlabel="weight", title="Blend weights (non-negative, sum 1)")
    labels = {"ensemble": "ensemble", "equal_weights": "equal-weight blend", "predict_mean": "predict the mean"}
    rows = [(n, oof_rmse[n]) for n in names if n in oof_rmse] + [
        (labels[k], oof_rmse[k]) for k in labels if k in oof_rmse
    ]
    pos = np.arange(len(rows))[::-1]
    vals = [v for _, v in rows]
    b.plot(vals, pos, "o", color="#333333")
    for p, v in zip(pos, vals, strict=False):
        b.text(v, p + 0.18, f"{v:.3f}", ha="center", fontsize=8)
    b.set(yticks=pos, yticklabels=[n for n, _ in rows], xlabel="OOF RMSE", title="OOF RMSE (lower is better)")
    b.set_ylim(-0.6, len(rows) - 0.3)
    b.grid(axis="x", alpha=0.3)
    return fig


def worst_predictions(
    root: str | Path | None, oof: pd.DataFrame, head: str, others: Sequence[str] = (), n: int = 8, cols: int = 4
) -> Figure:
    """The ``n`` train photos with the largest absolute OOF error of ``head``, titled with truth and predictions."""
    if head not in oof.columns or TARGET not in oof or root is None:
        return message(f"no {head or 'out-of-fold'} predictions (or no competition data)", "Worst predictions")
    err = (oof[head] - oof[TARGET]).abs()
    worst = oof.loc[err.sort_values(ascending=False).index[:n]]
    titles = []
    for _, r in worst.iterrows():
        extra = ", ".join(f"{o} {r[o]:.0f}" for o in others if o in r and o != head)
        titles.append(
            f"true {r[TARGET]:g} | {head} {r[head]:.1f}" + (f"\n({extra})" if extra else "") + f"\n{str(r[ID])[:10]}"
        )
    return photo_grid(root, worst[ID].tolist(), titles, cols, f"Worst {head} out-of-fold predictions")


def stage_timings(timings: dict[str, float]) -> Figure:
    if not timings:
        return message("no timings.json", "Time per stage")
    names = list(timings)
    pos = np.arange(len(names))[::-1]
    fig = Figure(figsize=(8, 0.45 * len(names) + 1.2), layout="constrained")
    ax = fig.add_subplot()
    ax.barh(pos, [timings[n] for n in names], color="#4c72b0")
    for p, n in zip(pos, names, strict=False):
        ax.text(timings[n], p, f" {timings[n]:.1f}s", va="center", fontsize=9)
    ax.set(yticks=pos, yticklabels=names, xlabel="seconds", title="Time per stage")
    return fig
