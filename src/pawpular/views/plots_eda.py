"""Figures of the competition itself (``notebooks/01_eda.ipynb``, the data section of ``pawpular report``): the
target, the 12 flags, sample photos, photo sizes and duplicates. Same conventions as ``views/plots.py`` (plain Figures;
empty inputs give a figure saying what is missing).

    from pawpular.views import plots_eda
    plots_eda.target_distribution(train["Pawpularity"])
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..data.tables import ID, META_COLS, TARGET
from .plots import message, photo_grid


def target_distribution(y: Sequence[float]) -> Figure:
    y = np.asarray(y, float)
    fig = Figure(figsize=(9, 3.8), layout="constrained")
    ax = fig.add_subplot()
    ax.hist(y, bins=np.arange(0.5, 101.5, 2), color="#4c72b0", edgecolor="white")
    for value, name, style in ((y.mean(), "mean", "-"), (np.median(y), "median", "--")):
        ax.axvline(value, color="#c44e52", ls=style, lw=1.5, label=f"{name} {value:.1f}")
    ax.set(
        xlabel="Pawpularity",
        ylabel="photos",
        xlim=(0, 101),
        title=f"Target distribution: n={len(y)}, std {y.std():.2f} (= RMSE of predicting the mean)",
    )
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
    for p, f in zip(pos, freq, strict=False):
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
    return photo_grid(root, picks[ID].tolist(), titles, cols, "Sample photos from lowest to highest Pawpularity", split)


def image_size_stats(sizes: pd.DataFrame) -> Figure:
    fig = Figure(figsize=(13, 4), layout="constrained")
    a, b, c = fig.subplots(1, 3)
    a.scatter(sizes["width"], sizes["height"], s=6, alpha=0.4, color="#4c72b0")
    a.set(
        xlabel="width (px)",
        ylabel="height (px)",
        title=f"Image size (median {sizes['width'].median():.0f} x {sizes['height'].median():.0f})",
    )
    a.set_aspect("equal", adjustable="datalim")
    b.hist(sizes["aspect"], bins=40, color="#4c72b0", edgecolor="white")
    b.axvline(1, color="k", ls=":", lw=1)
    b.set(
        xlabel="aspect ratio (width / height)",
        ylabel="photos",
        title=f"Aspect ratio: {(sizes['aspect'] < 1).mean():.0%} portrait",
    )
    mp = sizes["width"] * sizes["height"] / 1e6
    c.hist(mp, bins=40, color="#4c72b0", edgecolor="white")
    c.set(xlabel="megapixels", ylabel="photos", title=f"Pixels per photo (max {mp.max():.2f} MP)")
    return fig


def duplicate_pairs(
    root: str | Path, dups: pd.DataFrame, train: pd.DataFrame, max_groups: int = 6, per_group: int = 3
) -> Figure:
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
        titles += [f"Pawpularity {s:g}  ·  {str(m)[:10]}" for m, s in zip(members, scores, strict=False)] + [""] * (
            cols - len(members)
        )
        labels.append(f"group {g}: spread {np.nanmax(scores) - np.nanmin(scores):g}")
    n_groups = dups["group"].nunique()
    return photo_grid(
        root,
        ids,
        titles,
        cols,
        f"Duplicate photos: {n_groups} group(s) holding {len(dups)} photos (showing {len(groups)})",
        row_labels=labels,
    )
