"""Figures shared by ``notebooks/*.ipynb`` and ``pawpular report``: each function takes tables, returns a Figure.

Reads only what it is given (DataFrames, dicts) and, for the photo grids, the competition's images; writes
nothing. Figures are plain ``matplotlib.figure.Figure`` objects, not pyplot ones: no global state, nothing to
close, safe in a report loop; a notebook shows one when it is a cell's value (after ``%matplotlib inline``), and
``to_png(fig)`` renders one with Agg. Empty inputs give a figure that says what is missing instead of raising.

    from pawpular import plots
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

from .data import ID, META_COLS, TARGET
from .images import image_path, load_image
from .metrics import rmse

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


def _photo_grid(root: str | Path, ids: list[str], titles: list[str], cols: int, suptitle: str, split: str = "train",
                row_labels: list[str] | None = None) -> Figure:
    rows = max(1, -(-len(ids) // cols))
    fig = Figure(figsize=(3.0 * cols, 3.1 * rows + 0.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, id_, title in zip(axes, ids, titles):
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
# The competition (01_eda)


def target_distribution(y: Sequence[float]) -> Figure:
    y = np.asarray(y, float)
    fig = Figure(figsize=(9, 3.8), layout="constrained")
    ax = fig.add_subplot()
    ax.hist(y, bins=np.arange(0.5, 101.5, 2), color="#4c72b0", edgecolor="white")
    for value, name, style in ((y.mean(), "mean", "-"), (np.median(y), "median", "--")):
        ax.axvline(value, color="#c44e52", ls=style, lw=1.5, label=f"{name} {value:.1f}")
    ax.set(xlabel="Pawpularity", ylabel="photos", xlim=(0, 101),
           title=f"Target distribution: n={len(y)}, std {y.std():.2f} (= RMSE of predicting the mean)")
    ax.legend(frameon=False)
    return fig


def flag_table(train: pd.DataFrame) -> pd.DataFrame:
    """Per flag: share of photos with it (%), mean target with and without it, and the difference."""
    y = train[TARGET].astype(float)
    rows = {c: (train[c].mean() * 100, y[train[c] == 1].mean(), y[train[c] == 0].mean()) for c in META_COLS}
    table = pd.DataFrame.from_dict(rows, orient="index", columns=["share (%)", "mean with", "mean without"])
    table["difference"] = table["mean with"] - table["mean without"]
    return table


def metadata_effect(train: pd.DataFrame) -> Figure:
    """Left: how often each flag is set. Right: mean target with and without it (95% intervals)."""
    y = train[TARGET].to_numpy(float)
    flags = META_COLS[::-1]  # top-to-bottom in column order
    pos = np.arange(len(flags))
    freq = np.array([train[c].mean() * 100 for c in flags])
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    left, right = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [1, 1.6]})
    left.barh(pos, freq, color="#4c72b0")
    for p, f in zip(pos, freq):
        left.text(f + 1, p, f"{f:.1f}%", va="center", fontsize=8)
    left.set(yticks=pos, yticklabels=flags, xlim=(0, 110), xlabel="photos with the flag (%)", title="Flag frequency")
    for offset, value, label, c in ((0.15, 1, "flag = 1", "#c44e52"), (-0.15, 0, "flag = 0", "#8c8c8c")):
        means, errs = [], []
        for col in flags:
            sel = y[train[col].to_numpy() == value]
            means.append(sel.mean() if len(sel) else np.nan)
            errs.append(1.96 * sel.std() / np.sqrt(len(sel)) if len(sel) > 1 else np.nan)
        right.errorbar(means, pos + offset, xerr=errs, fmt="o", color=c, label=label, capsize=2, ms=5)
    right.axvline(y.mean(), color="k", ls=":", lw=1, label=f"overall mean {y.mean():.1f}")
    right.set(xlabel="mean Pawpularity (95% interval)", title="Mean target with and without each flag")
    right.legend(frameon=False, fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    return fig


def sample_grid(root: str | Path, train: pd.DataFrame, n: int = 12, cols: int = 4, split: str = "train") -> Figure:
    """``n`` photos spread evenly over the target's range, lowest first, titled with their score."""
    if TARGET not in train:
        return message("no target in this table")
    if not len(train):
        return message("no photos")
    ordered = train.sort_values(TARGET, kind="stable").reset_index(drop=True)
    picks = ordered.iloc[np.unique(np.linspace(0, len(ordered) - 1, min(n, len(ordered))).round().astype(int))]
    titles = [f"Pawpularity {r[TARGET]:g}  ·  {str(r[ID])[:10]}" for _, r in picks.iterrows()]
    return _photo_grid(root, picks[ID].tolist(), titles, cols, "Sample photos from lowest to highest Pawpularity", split)


def image_size_stats(sizes: pd.DataFrame) -> Figure:
    fig = Figure(figsize=(13, 4), layout="constrained")
    a, b, c = fig.subplots(1, 3)
    a.scatter(sizes["width"], sizes["height"], s=6, alpha=0.4, color="#4c72b0")
    a.set(xlabel="width (px)", ylabel="height (px)", title=f"Image size (median {sizes['width'].median():.0f} x "
                                                            f"{sizes['height'].median():.0f})")
    a.set_aspect("equal", adjustable="datalim")
    b.hist(sizes["aspect"], bins=40, color="#4c72b0", edgecolor="white")
    b.axvline(1, color="k", ls=":", lw=1)
    b.set(xlabel="aspect ratio (width / height)", ylabel="photos",
          title=f"Aspect ratio: {(sizes['aspect'] < 1).mean():.0%} portrait")
    mp = sizes["width"] * sizes["height"] / 1e6
    c.hist(mp, bins=40, color="#4c72b0", edgecolor="white")
    c.set(xlabel="megapixels", ylabel="photos", title=f"Pixels per photo (max {mp.max():.2f} MP)")
    return fig


def duplicate_pairs(root: str | Path, dups: pd.DataFrame, train: pd.DataFrame, max_groups: int = 6,
                    per_group: int = 3) -> Figure:
    """One row per duplicate group (largest first): its photos with their scores; the score spread is label noise."""
    if dups is None or not len(dups):
        return message("no duplicate groups found", "Duplicate photos")
    score = train.set_index(ID)[TARGET]
    groups = dups.groupby("group")[ID].apply(list).sort_values(key=lambda s: -s.str.len()).head(max_groups)
    cols = min(per_group, int(groups.str.len().max()))
    ids, titles, labels = [], [], []
    for g, members in groups.items():
        members = members[:cols]
        scores = [score.get(m, np.nan) for m in members]
        ids += members + [None] * (cols - len(members))
        titles += [f"Pawpularity {s:g}  ·  {str(m)[:10]}" for m, s in zip(members, scores)] + [""] * (cols - len(members))
        labels.append(f"group {g}: spread {np.nanmax(scores) - np.nanmin(scores):g}")
    n_groups = dups["group"].nunique()
    return _photo_grid(root, ids, titles, cols, f"Duplicate photos: {n_groups} group(s) holding {len(dups)} photos ("
                                                f"showing {len(groups)})", row_labels=labels)


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
    b.set(xlabel="epoch", ylabel="validation RMSE", title="NN head: validation RMSE (star: best epoch, kept)")
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
    for i, (ax, head) in enumerate(zip(axes, heads)):
        p = oof[head].to_numpy(float)
        ax.scatter(y, p, s=6, alpha=0.35, color=color(head, i))
        ax.plot([0, 100], [0, 100], "k--", lw=1)
        ax.set(xlim=(-1, 102), ylim=(-1, 102), xlabel="true Pawpularity",
               title=f"{head}: RMSE {rmse(p, y):.3f}, r = {np.corrcoef(p, y)[0, 1]:.3f}" if len(y) > 1 else head)
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
        b.bar(off, res.apply(lambda r: np.sqrt(np.mean(r**2)) if len(r) else np.nan).to_numpy(), width,
              color=color(head, i), label=head)
    ticks = [f"{lab}\nn={c}" for lab, c in zip(labels, counts)]
    a.axhline(0, color="k", lw=0.8)
    a.set(ylabel="mean residual (prediction - true)", title="Bias by true Pawpularity")
    b.set(ylabel="RMSE", title="RMSE by true Pawpularity")
    for ax in (a, b):
        ax.set_xticks(x, ticks, fontsize=8)
        ax.set_xlabel("true Pawpularity")
        ax.grid(axis="y", alpha=0.3)
    a.legend(frameon=False, loc="lower left")
    return fig


def optuna_study(trials: pd.DataFrame | None, param: str = "C", title: str = "", minimize: bool = True,
                 bounds: tuple[float, float] | None = None) -> Figure:
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
    for p, n in zip(pos, names):
        a.text(weights[n] + 0.02, p, f"{weights[n]:.3f}", va="center")
    a.set(yticks=pos, yticklabels=names, xlim=(0, 1.15), xlabel="weight", title="Blend weights (non-negative, sum 1)")
    labels = {"ensemble": "ensemble", "equal_weights": "equal-weight blend", "predict_mean": "predict the mean"}
    rows = [(n, oof_rmse[n]) for n in names if n in oof_rmse] + [(labels[k], oof_rmse[k]) for k in labels if k in oof_rmse]
    pos = np.arange(len(rows))[::-1]
    vals = [v for _, v in rows]
    b.plot(vals, pos, "o", color="#333333")
    for p, v in zip(pos, vals):
        b.text(v, p + 0.18, f"{v:.3f}", ha="center", fontsize=8)
    b.set(yticks=pos, yticklabels=[n for n, _ in rows], xlabel="OOF RMSE", title="OOF RMSE (lower is better)")
    b.set_ylim(-0.6, len(rows) - 0.3)
    b.grid(axis="x", alpha=0.3)
    return fig


def worst_predictions(root: str | Path | None, oof: pd.DataFrame, head: str, others: Sequence[str] = (), n: int = 8,
                      cols: int = 4) -> Figure:
    """The ``n`` train photos with the largest absolute OOF error of ``head``, titled with truth and predictions."""
    if head not in oof.columns or TARGET not in oof or root is None:
        return message(f"no {head or 'out-of-fold'} predictions (or no competition data)", "Worst predictions")
    err = (oof[head] - oof[TARGET]).abs()
    worst = oof.loc[err.sort_values(ascending=False).index[:n]]
    titles = []
    for _, r in worst.iterrows():
        extra = ", ".join(f"{o} {r[o]:.0f}" for o in others if o in r and o != head)
        titles.append(f"true {r[TARGET]:g} | {head} {r[head]:.1f}" + (f"\n({extra})" if extra else "")
                      + f"\n{str(r[ID])[:10]}")
    return _photo_grid(root, worst[ID].tolist(), titles, cols, f"Worst {head} out-of-fold predictions")


def stage_timings(timings: dict[str, float]) -> Figure:
    if not timings:
        return message("no timings.json", "Time per stage")
    names = list(timings)
    pos = np.arange(len(names))[::-1]
    fig = Figure(figsize=(8, 0.45 * len(names) + 1.2), layout="constrained")
    ax = fig.add_subplot()
    ax.barh(pos, [timings[n] for n in names], color="#4c72b0")
    for p, n in zip(pos, names):
        ax.text(timings[n], p, f" {timings[n]:.1f}s", va="center", fontsize=9)
    ax.set(yticks=pos, yticklabels=names, xlabel="seconds", title="Time per stage")
    return fig
