"""On-demand stage, select: greedy forward selection of the embedding sets the SVR head concatenates.

Reads   folds/folds.csv, train.csv (targets; flags with svr.use_meta) and the train embeddings of every candidate:
        "model" (this experiment's fold backbones, emb/fold{k}/) when every fold has finished embeddings, and each
        name in embed.backbones whose emb/<name>/ is finished (a missing one is skipped and named)
Writes  select/selection.json (candidates, every step with every set tried, the chosen sets, their OOF RMSE and
        C); prints the steps and the --set 'svr.features=[...]' line to use. Never writes svr/.
Needs   pawpular embed (with embed.backbones listing the candidates)
Keys    embed.backbones, svr.c_min / c_max, svr.epsilon, svr.gamma, svr.use_meta, svr.target_clip,
        select.starts (--starts), select.budget_hours / test_images (--budget-hours, --test-images)
Run     pawpular select --config configs/multi_backbone.yaml [--starts 3] [--budget-hours 9 --test-images 6800]

Selection: score every candidate alone and start from the best; at each step add the set whose addition lowers
the OOF RMSE most; stop when the best addition improves it by less than MIN_IMPROVEMENT (RMSE points) or no set
is left, so the chosen sets never score worse than the best single set. Scoring is the SVR stage's own code
(``svr_head.assemble_matrix``, ``make_fold``, ``attach_kernels``, ``oof_rmse``) with C tuned
deterministically instead of by Optuna: a log grid of C_GRID_POINTS values over [svr.c_min, svr.c_max], then the
two geometric midpoints beside the grid's best. ``pawpular svr`` with the chosen features (Optuna over the same
range) lands at or near the reported RMSE.

With ``--starts N`` (or an inference budget) the selection runs from each of the N best single sets
(``selection.multi_start``): up to N different feature sets, each printed with the commands that make it an SVR
head of its own (the first in this experiment, the others in experiments beside it) and the
``ensemble.experiments`` line that blends them; export and predict carry every head of the blend. With
``--budget-hours H --test-images N`` only combinations whose embedding of N photos, at the images per second each
set's manifest recorded (``budget.py``), fits in H hours are tried.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import artifacts, backend, budget, manifest, selection, svr_head
from ..config import Config, backbone_configs
from ..errors import ConfigError
from ..data import ID, META_COLS, TARGET, Competition
from ..files import MissingArtifact, write_json
from ..splits import read_folds
from ..progress import Progress
from . import Plan, Result

log = logging.getLogger("pawpular")
SUMMARY = "forward selection of embedding sets for the SVR head (several backbones)"
HELP = __doc__
IMAGES = False

# A set is added only when it lowers the OOF RMSE by at least this much (Pawpularity points): each added set costs
# a backbone's embedding time at inference, which a gain in the third decimal does not pay for. A module constant
# (no config key): change it here, e.g. to 0.05 on a small data set where OOF RMSE differences are noisier.
MIN_IMPROVEMENT = 0.01
# C values tried per candidate: log-spaced over [svr.c_min, svr.c_max] (7 points over 0.1-100 = half-decades).
C_GRID_POINTS = 7


# ---------------------------------------------------------------------------------------------------------------
# Scoring one combination of sets


def c_grid(c_min: float, c_max: float, points: int = C_GRID_POINTS) -> list[float]:
    """``points`` log-spaced C values from c_min to c_max (both included)."""
    if not 0 < c_min <= c_max:
        raise ConfigError(f"svr.c_min and svr.c_max must satisfy 0 < c_min <= c_max, got {c_min}, {c_max}")
    return [float(c) for c in np.geomspace(c_min, c_max, max(points, 1) if c_max > c_min else 1)]


def tune_c(folds: Sequence[svr_head.FoldData], y: np.ndarray, grid: Sequence[float], epsilon: float,
           device: str = "cpu") -> tuple[float, float]:
    """(best OOF RMSE, its C): every C of ``grid``, then the geometric midpoints beside the best. Deterministic."""
    scores: dict[float, float] = {}

    def score(c: float) -> float:
        if c not in scores:
            scores[c] = svr_head.oof_rmse({"C": c, "epsilon": epsilon}, folds, y, device)
        return scores[c]

    for c in grid:
        score(c)
    i = int(np.argmin([scores[c] for c in grid]))
    for j in (i - 1, i + 1):  # refine between the best grid point and its neighbours
        if 0 <= j < len(grid):
            score(float(np.sqrt(grid[i] * grid[j])))
    best = min(scores, key=lambda c: (scores[c], c))
    return scores[best], best


@dataclass
class TrainSets:
    """Every candidate's train embeddings (per fold for "model"), the targets and the fold of each train row."""

    tables: dict[tuple[str, int], Any]  # (set name, fold) -> table; frozen sets are the same table for every fold
    ids: list[str]
    y: np.ndarray
    fold_of: np.ndarray
    meta: np.ndarray | None

    @property
    def fold_ids(self) -> list[int]:
        return sorted(k for k in np.unique(self.fold_of).tolist() if k >= 0)

    def folds(self, names: Sequence[str], gamma: float | str, device: str,
              target_clip: Sequence[float] | None = None) -> list[svr_head.FoldData]:
        """The SVR stage's folds (standardized per fold, gamma per fold) for the sets ``names`` concatenated."""
        xp = backend.array_module(device)
        out = []
        for k in self.fold_ids:
            sets = {n: self.tables[(n, k)] for n in names}
            x, _ = svr_head.assemble_matrix(sets, self.ids, names, self.meta, xp)
            out.append(svr_head.make_fold(k, x, self.y, self.fold_of, gamma, device, target_clip))
        return out


def score_sets(data: TrainSets, names: Sequence[str], cfg: Config, device: str, mode: str = "precomputed") -> tuple[float, float]:
    """(OOF RMSE, C) of the SVR head on the sets ``names``; ``mode``: 'precomputed' caches each fold's kernels."""
    folds = data.folds(names, cfg.svr.gamma, device, cfg.svr.target_clip)
    if mode == "precomputed":
        svr_head.attach_kernels(folds)
    return tune_c(folds, data.y, c_grid(cfg.svr.c_min, cfg.svr.c_max), cfg.svr.epsilon, device)


# ---------------------------------------------------------------------------------------------------------------
# Greedy forward selection


@dataclass
class Step:
    step: int
    added: str
    features: list[str]
    oof_rmse: float
    C: float
    tried: dict[str, dict]  # every set tried at this step -> {"oof_rmse", "C"}


def forward_select(candidates: Sequence[str], score: Any, min_improvement: float = MIN_IMPROVEMENT) -> tuple[list[Step], dict]:
    """Greedy forward selection. ``score(names) -> (rmse, C)``; returns the steps taken and the last step's
    rejected best addition (``{}`` when every candidate was taken). Ties go to the earlier candidate."""
    if not candidates:
        raise ValueError("no candidate embedding sets to select from")
    chosen: list[str] = []
    steps: list[Step] = []
    remaining = list(candidates)
    rejected: dict = {}
    while remaining:
        tried = {name: score([*chosen, name]) for name in remaining}
        best = min(remaining, key=lambda n: tried[n][0])
        rmse, c = tried[best]
        if steps and steps[-1].oof_rmse - rmse < min_improvement:
            rejected = {"set": best, "oof_rmse": rmse, "C": c, "improvement": steps[-1].oof_rmse - rmse,
                        "tried": {n: {"oof_rmse": r, "C": cc} for n, (r, cc) in tried.items()}}
            break
        chosen.append(best)
        remaining.remove(best)
        steps.append(Step(len(steps) + 1, best, list(chosen), rmse, c,
                          {n: {"oof_rmse": r, "C": cc} for n, (r, cc) in tried.items()}))
    return steps, rejected


# ---------------------------------------------------------------------------------------------------------------
# The stage


def _finished(folder: Path) -> bool:
    """An embedding folder whose manifest exists and whose files are the ones it records."""
    record = manifest.read(folder / "manifest.json")
    return record is not None and not manifest.damaged_outputs(record, folder.parent.parent)


def find_candidates(cfg: Config, fold_ids: Sequence[int]) -> tuple[list[str], dict[str, str]]:
    """Sets whose embeddings are finished, and the skipped ones with the reason."""
    found, skipped = [], {}
    candidates = [(artifacts.MODEL_SET, fold_ids), *((b.name, fold_ids[:1]) for b in backbone_configs(cfg))]
    for name, folds in candidates:
        if all(_finished(artifacts.set_file(cfg.out, name, "train", k).parent) for k in folds):
            found.append(name)
        else:
            where = "emb/fold{k}/" if name == artifacts.MODEL_SET else f"emb/{name}/"
            skipped[name] = f"no finished embeddings in {where}"
    return found, skipped


def load_train_sets(cfg: Config, comp: Competition, folds_df: Any, names: Sequence[str], device: str) -> TrainSets:
    """Read each set's train embeddings once (a frozen set once for all folds)."""
    fold_of = folds_df["fold"].to_numpy()  # read_folds returns them in train-table order
    tables: dict[tuple[str, int], Any] = {}
    for name in names:
        frozen = None
        for k in sorted(k for k in np.unique(fold_of).tolist() if k >= 0):
            path = artifacts.set_file(cfg.out, name, "train", k)
            if name == artifacts.MODEL_SET:
                tables[(name, k)] = backend.read_table(path, device)
            else:
                frozen = frozen if frozen is not None else backend.read_table(path, device)
                tables[(name, k)] = frozen
    meta = comp.train[META_COLS].to_numpy(np.float32) if cfg.svr.use_meta else None
    return TrainSets(tables, comp.train[ID].astype(str).tolist(), comp.train[TARGET].to_numpy(np.float64), fold_of, meta)


def features_line(names: Sequence[str]) -> str:
    """The override to pass to `pawpular svr` / `all` (quoted: unquoted brackets are a shell glob)."""
    return f"--set 'svr.features=[{','.join(names)}]'"


def format_table(steps: Sequence[Step], rejected: dict) -> str:
    rows = [f"{'step':>4}  {'added set':<20} {'OOF RMSE':>9} {'gain':>7} {'C':>9}"]
    prev = None
    for s in steps:
        gain = "" if prev is None else f"{prev - s.oof_rmse:7.4f}"
        rows.append(f"{s.step:>4}  {s.added:<20} {s.oof_rmse:9.4f} {gain:>7} {s.C:9.4g}")
        prev = s.oof_rmse
    if rejected:
        rows.append(f"{'-':>4}  {rejected['set'] + ' (not added)':<20} {rejected['oof_rmse']:9.4f} "
                    f"{rejected['improvement']:7.4f} {rejected['C']:9.4g}")
    return "\n".join(rows)


def plan(ctx) -> Plan:
    s = ctx.cfg.svr
    settings = {"c_min": s.c_min, "c_max": s.c_max, "epsilon": s.epsilon, "gamma": s.gamma, "use_meta": s.use_meta,
                "target_clip": s.target_clip}
    folds = range(ctx.cfg.folds.n_folds)
    files = [artifacts.set_file(ctx.out, b.name, "train", 0) for b in backbone_configs(ctx.cfg)]
    files += [artifacts.set_file(ctx.out, artifacts.MODEL_SET, "train", k) for k in folds]
    return Plan({"svr": settings, "embed": {"backbones": ctx.cfg.embed.backbones},
                 "select": dataclasses.asdict(ctx.cfg.select)},
                {**ctx.file_inputs([artifacts.folds_csv(ctx.out), *files]), **ctx.data_inputs("train.csv")})


def run(ctx) -> Result:
    """Select embedding sets by greedy forward selection; print the steps; writes select/selection.json."""
    cfg, device, comp = ctx.cfg, ctx.device, ctx.comp
    t0 = time.time()
    folds_df = read_folds(cfg.out, comp.train, cfg.folds)
    fold_ids = sorted(k for k in folds_df["fold"].unique().tolist() if k >= 0)
    candidates, skipped = find_candidates(cfg, fold_ids)
    for name, why in skipped.items():
        log.warning("select: skipping %r: %s (run `pawpular embed` first)", name, why)
    if not candidates:
        raise MissingArtifact(f"no finished embedding sets under {cfg.out / 'emb'}: run `pawpular embed` first")
    data = load_train_sets(cfg, comp, folds_df, candidates, device)
    # Kernel memory depends on the fold sizes only, not on the sets: decide once.
    mode = svr_head.resolve_kernel_cache(cfg.svr.kernel_cache, data.fold_of, cfg.svr.max_kernel_gb, device)
    grid = c_grid(cfg.svr.c_min, cfg.svr.c_max)
    log.info("select: %d candidate sets (%s), %d train rows, %d folds, C grid %s", len(candidates),
             ", ".join(candidates), len(data.ids), len(data.fold_ids), ", ".join(f"{c:.3g}" for c in grid))
    allowed, speeds = budget_rule(cfg, candidates, data.fold_ids)
    several = cfg.select.starts > 1 or cfg.select.budget_hours is not None
    with Progress(desc="select", total=sum(range(1, len(candidates) + 1)), unit="fit") as bar:
        def score(names: list[str]) -> tuple[float, float]:
            result = score_sets(data, names, cfg, device, mode)
            bar.update()
            return result

        if several:
            runs = selection.multi_start(candidates, score, cfg.select.starts, MIN_IMPROVEMENT, allowed)
            return write_starts(ctx, runs, speeds, {"candidates": candidates, "skipped": skipped, "c_grid": grid,
                                                    "n_train": len(data.ids), "n_folds": len(data.fold_ids)}, t0)
        steps, rejected = forward_select(candidates, score, MIN_IMPROVEMENT)
    best = steps[-1]
    result = {
        "candidates": candidates, "skipped": skipped, "single": steps[0].tried,
        "steps": [dataclasses.asdict(s) for s in steps], "rejected": rejected, "chosen": best.features,
        "oof_rmse": best.oof_rmse, "C": best.C, "set_line": features_line(best.features),
        "settings": {"min_improvement": MIN_IMPROVEMENT, "c_grid": grid, "epsilon": cfg.svr.epsilon,
                     "gamma": cfg.svr.gamma, "use_meta": cfg.svr.use_meta, "n_folds": len(data.fold_ids),
                     "n_train": len(data.ids)},
    }
    path = artifacts.selection_json(cfg.out)
    write_json(path, result)
    print(format_table(steps, rejected))
    print(f"chosen: {', '.join(best.features)} (OOF RMSE {best.oof_rmse:.4f} at C={best.C:.4g}; best single "
          f"{steps[0].added} {steps[0].oof_rmse:.4f})")
    print(f"use:    {features_line(best.features)}")
    log.info("select: %d of %d sets chosen in %.1fs -> %s", len(best.features), len(candidates), time.time() - t0, path)
    return Result([path], {"chosen": best.features, "oof_rmse": best.oof_rmse})


# ---------------------------------------------------------------------------------------------------------------
# Several starts and the inference budget (select.starts, select.budget_hours; selection.py)


def budget_rule(cfg: Config, candidates: Sequence[str], fold_ids: Sequence[int]) -> tuple[Any, dict]:
    """(allowed(names) -> bool, each set's (images/s, passes)): every combination, or with select.budget_hours
    those whose inference on select.test_images photos fits, at the speeds the sets' manifests recorded."""
    s = cfg.select
    if s.budget_hours is None:
        return (lambda names: True), {}
    finetuned = cfg.embed.source == "finetuned"  # else "model" is one frozen pass, as predict runs it
    speeds = {n: budget.set_speed(cfg.out, n, fold_ids, finetuned) for n in candidates}
    return (lambda names: budget.inference_hours(speeds, names, s.test_images) <= s.budget_hours), speeds


def write_starts(ctx, runs: list[selection.Start], speeds: dict, facts: dict, t0: float) -> Result:
    """selection.json and the printout of several starts: each feature set an SVR head of its own (the first in
    this experiment, the others in experiments of their own), blended by ``ensemble.experiments``."""
    cfg = ctx.cfg
    s = cfg.select
    hours = {i: budget.inference_hours(speeds, r.features, s.test_images) if speeds else None
             for i, r in enumerate(runs)}
    others = [f"{cfg.out}-start{i + 1}" for i in range(1, len(runs))]
    result = {**facts, "chosen": runs[0].features, "oof_rmse": runs[0].oof_rmse, "C": runs[0].C,
              "set_line": features_line(runs[0].features),
              "starts": [{**dataclasses.asdict(r), "inference_hours": hours[i], "set_line": features_line(r.features),
                          "output": str(cfg.out if i == 0 else others[i - 1])} for i, r in enumerate(runs)],
              "blend_line": f"--set 'ensemble.experiments=[{','.join(others)}]'" if others else "",
              "settings": {"min_improvement": MIN_IMPROVEMENT, "starts": s.starts, "budget_hours": s.budget_hours,
                           "test_images": s.test_images, "epsilon": cfg.svr.epsilon, "gamma": cfg.svr.gamma,
                           "use_meta": cfg.svr.use_meta, "target_clip": cfg.svr.target_clip}}
    path = artifacts.selection_json(cfg.out)
    write_json(path, result)
    for i, r in enumerate(runs):
        cost = f"; {hours[i]:.2f} h for {s.test_images} photos" if hours[i] is not None else ""
        print(f"start {i + 1} ({r.start}): {' + '.join(r.features)}  OOF RMSE {r.oof_rmse:.4f} at C={r.C:.4g}{cost}")
    for i, r in enumerate(runs):
        where = "" if i == 0 else f" --output {others[i - 1]}"
        print(f"use:    pawpular all --config <this config>{where} {features_line(r.features)}")
    if others:
        print(f"blend:  pawpular ensemble {result['blend_line']}   (every head; export and predict carry them)")
    log.info("select: %d feature sets from %d starts in %.1fs -> %s", len(runs), s.starts, time.time() - t0, path)
    return Result([path], {"chosen": runs[0].features, "oof_rmse": runs[0].oof_rmse, "starts": len(runs)})
