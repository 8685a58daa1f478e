"""On-demand stage, select: which embedding sets should the SVR head join? Tried one more at a time.

Reads   the embeddings this experiment already has: each frozen backbone of embed.backbones, and "model" (this
        experiment's fine-tuned folds) when it fine-tunes; a listed backbone not embedded yet is named and left out
Writes  select/selection.json (every set's own score, every step with every set tried, the chosen sets, their
        OOF RMSE and C; the nested score and each step's gain against the noise). Never changes the experiment's
        SVR, ensemble or submission.
Needs   pawpular embed
Keys    embed.backbones, svr.c_min / c_max, svr.epsilon, svr.gamma, svr.use_meta, svr.target_clip,
        select.starts (--starts), select.budget_hours / test_images (--budget-hours, --test-images)
Run     pawpular select --config configs/multi_backbone.yaml [--starts 3] [--budget-hours 9 --test-images 6800]
        pawpular select ... --as NAME   also write the choice as a new experiment output/NAME beside this one,
                                        reusing its folds, fine-tuned folds and embeddings (nothing is embedded
                                        again); then `pawpular all --output output/NAME` fits its SVR head

How it chooses: each set is scored alone (the SVR head's out-of-fold RMSE on it), the best one is kept, then at
each step the set whose addition lowers the RMSE most is added, until no set improves it by at least 0.01
RMSE points or none is left; so the choice never scores worse than the best set alone. Every score
and every step is printed. C is chosen from a fixed grid over [svr.c_min, svr.c_max] (so two runs agree); a
warning says when the best C is at an edge of that range and which bound to move. `pawpular svr` with the chosen
sets (C tuned by Optuna over the same range) lands at or near the printed RMSE, which is optimistic: the sets are
chosen on the rows they are scored on. The nested score redoes the selection for each fold k on the other folds
(C from the grid) and scores fold k with what it chose, reusing every fit already made; each step's gain is
measured against the noise.

``--starts N`` runs it from each of the N best single sets: up to N different feature sets, each an SVR head of
its own, blended by ``ensemble.experiments``; ``--budget-hours H --test-images N`` tries only combinations whose
inference fits, at the images/s each set recorded (``svr/selection.py``, ``scores/budget.py``).
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

from ..config.schema import Config, backbone_configs
from ..data.splits import read_folds
from ..data.tables import ID, META_COLS, TARGET, Competition
from ..logs.progress import Progress
from ..machine import backend
from ..scores.metrics import rmse
from ..store import artifacts, manifest
from ..store.errors import ConfigError
from ..store.files import ArtifactError, MissingArtifact
from ..svr import head as svr_head
from ..svr import memory as svr_memory
from ..svr import selection
from ..svr.embedding_sets import read_sets
from ..svr.selection import MIN_IMPROVEMENT, Step, forward_select
from . import Plan, Result, wants_fold_embeddings

log = logging.getLogger("pawpular")
SUMMARY = "forward selection of embedding sets for the SVR head (several backbones)"
HELP = __doc__
IMAGES = False

# A set is added only when it lowers the OOF RMSE by at least this much (Pawpularity points): each added set costs
# a backbone's embedding time at inference, which a gain in the third decimal does not pay for. A module constant
# (no config key): change it here, e.g. to 0.05 on a small data set where OOF RMSE differences are noisier.
# C values tried per candidate: log-spaced over [svr.c_min, svr.c_max] (7 points over 0.1-100 = half-decades).
C_GRID_POINTS = 7


# ---------------------------------------------------------------------------------------------------------------
# Scoring one combination of sets


def c_grid(c_min: float, c_max: float, points: int = C_GRID_POINTS) -> list[float]:
    """``points`` log-spaced C values from c_min to c_max (both included)."""
    if not 0 < c_min <= c_max:
        raise ConfigError(f"svr.c_min and svr.c_max must satisfy 0 < c_min <= c_max, got {c_min}, {c_max}")
    return [float(c) for c in np.geomspace(c_min, c_max, max(points, 1) if c_max > c_min else 1)]


def tune_c(
    folds: Sequence[svr_head.FoldData],
    y: np.ndarray,
    grid: Sequence[float],
    epsilon: float,
    device: str = "cpu",
    preds: dict | None = None,
) -> tuple[float, float]:
    """(best OOF RMSE, its C): every C of ``grid``, then the geometric midpoints beside the best. Deterministic.
    ``preds``: filled with each C's OOF predictions (train-table rows; the nested choice picks among them)."""
    scores: dict[float, float] = {}

    def score(c: float) -> float:
        if c not in scores:
            pred = svr_head.fit_predict({"C": c, "epsilon": epsilon}, folds, device)
            rows = ~np.isnan(pred)
            scores[c] = rmse(pred[rows], y[rows])
            if preds is not None:
                preds[c] = pred
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

    def folds(
        self,
        names: Sequence[str],
        gamma: float | str,
        device: str,
        target_clip: Sequence[float] | None = None,
        weighting: str = "columns",
    ) -> list[svr_head.FoldData]:
        """The SVR stage's folds (standardized per fold, each set weighed by ``weighting``, gamma per fold) for the
        sets ``names`` concatenated."""
        xp = backend.array_module(device)
        out = []
        for k in self.fold_ids:
            sets = {n: self.tables[(n, k)] for n in names}
            x, columns = svr_head.assemble_matrix(sets, self.ids, names, self.meta, xp)
            weight = svr_head.set_weights(columns, weighting)
            out.append(svr_head.make_fold(k, x, self.y, self.fold_of, gamma, device, target_clip, weight))
        return out


def score_sets(
    data: TrainSets,
    names: Sequence[str],
    cfg: Config,
    device: str,
    mode: str = "precomputed",
    preds: dict | None = None,
) -> tuple[float, float]:
    """(OOF RMSE, C) of the SVR head on the sets ``names``; ``mode``: 'precomputed' caches each fold's kernels;
    ``preds``: see ``tune_c``."""
    folds = data.folds(names, cfg.svr.gamma, device, cfg.svr.target_clip, cfg.svr.set_weighting)
    if mode == "precomputed":
        svr_head.attach_kernels(folds)
    return tune_c(folds, data.y, c_grid(cfg.svr.c_min, cfg.svr.c_max), cfg.svr.epsilon, device, preds)


def nested_selection(
    candidates: Sequence[str], evaluated: dict, rescore: Any, y: np.ndarray, fold_of: np.ndarray, grid: Sequence[float]
) -> tuple[dict, np.ndarray]:
    """Per fold k, the whole selection again on the other folds' rows (sets and C, C from ``grid``), and fold k
    predicted with what it chose. ``evaluated``: sets (tuple) -> {C: OOF predictions}, filled by ``rescore(names)``
    for a combination the selection on all rows never tried. Returns (selection.json's "nested", predictions)."""
    folds = sorted(k for k in np.unique(fold_of).tolist() if k >= 0)
    rows_of = [fold_of == k for k in folds]

    def sse(names: tuple) -> dict[float, np.ndarray]:
        if names not in evaluated:
            rescore(list(names))
        return {
            c: np.array([((p[r] - y[r]) ** 2).sum() for r in rows_of]) for c, p in evaluated[names].items() if c in grid
        }

    pred, chosen = np.full(len(y), np.nan), {}
    for i, (k, rows) in enumerate(zip(folds, rows_of, strict=False)):
        n_other = sum(int(r.sum()) for j, r in enumerate(rows_of) if j != i)

        def score_without_k(names: list[str], i: int = i, n_other: int = n_other) -> tuple[float, float]:
            table = sse(tuple(names))
            c = min(table, key=lambda c: (table[c].sum() - table[c][i], c))
            return float(np.sqrt((table[c].sum() - table[c][i]) / n_other)), c

        steps, _ = forward_select(candidates, score_without_k, MIN_IMPROVEMENT)
        names, c = tuple(steps[-1].features), steps[-1].C
        pred[rows] = evaluated[names][c][rows]
        chosen[str(k)] = {"features": list(names), "C": c}
    scored = fold_of >= 0
    return {"nested_rmse": rmse(pred[scored], y[scored]), "folds": chosen}, pred


def step_gains(
    steps: Sequence[Step],
    evaluated: dict,
    y: np.ndarray,
    fold_of: np.ndarray,
    grid: Sequence[float],
    groups: np.ndarray,
) -> list[dict]:
    """Does each set added beat what it is added to, beyond noise? Step s against step s - 1, each with C chosen per
    fold on the other folds (``nested.leave_one_out``): ``nested.paired_bootstrap`` over duplicate groups."""
    from ..scores import nested

    folds = sorted(k for k in np.unique(fold_of).tolist() if k >= 0)
    scored = fold_of >= 0

    def nested_c(names: list[str]) -> np.ndarray:
        preds = {c: p for c, p in evaluated[tuple(names)].items() if c in grid}
        cs = list(preds)
        sse = np.array([[((preds[c][fold_of == k] - y[fold_of == k]) ** 2).sum() for k in folds] for c in cs])
        out = np.full(len(y), np.nan)
        for k, j in zip(folds, nested.leave_one_out(sse), strict=False):
            out[fold_of == k] = preds[cs[j]][fold_of == k]
        return out[scored]

    gains = []
    for prev, step in zip(steps, steps[1:], strict=False):
        d = nested.paired_bootstrap(
            nested_c(step.features), nested_c(prev.features), y[scored], groups[scored], fold_of[scored]
        )
        gains.append({"step": step.step, "added": step.added, **d.to_dict()})
    return gains


# ---------------------------------------------------------------------------------------------------------------
# The stage


def _finished(folder: Path) -> bool:
    """An embedding folder whose manifest exists and whose files are the ones it records."""
    record = manifest.read(folder / "manifest.json")
    return record is not None and not manifest.damaged_outputs(record, folder.parent.parent)


def find_candidates(cfg: Config, fold_ids: Sequence[int]) -> tuple[list[str], dict[str, str]]:
    """Sets whose embeddings are finished, and the ones left out with the reason. "model" (the fine-tuned folds)
    is a candidate only in an experiment that fine-tunes (svr.features lists it, or it has fold embeddings)."""
    found, skipped = [], {}
    fine_tuned = wants_fold_embeddings(cfg) or bool(artifacts.fold_dirs(artifacts.stage_dir(cfg.out, "embed")))
    candidates = [(artifacts.MODEL_SET, fold_ids)] if fine_tuned else []
    candidates += [(b.name, fold_ids[:1]) for b in backbone_configs(cfg)]
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
    frozen: dict = {}
    for k in sorted(k for k in np.unique(fold_of).tolist() if k >= 0):
        for name, table in read_sets(cfg.out, names, "train", k, device, frozen).items():
            tables[(name, k)] = table
    meta = comp.train[META_COLS].to_numpy(np.float32) if cfg.svr.use_meta else None
    return TrainSets(
        tables, comp.train[ID].astype(str).tolist(), comp.train[TARGET].to_numpy(np.float64), fold_of, meta
    )


def _groups(cfg: Config, ids: list[str]) -> np.ndarray:
    from ..scores.compare import duplicate_groups
    from ..scores.nested import group_codes

    return group_codes(ids, duplicate_groups(cfg.out))


def plan(ctx) -> Plan:
    s = ctx.cfg.svr
    settings = {
        "c_min": s.c_min,
        "c_max": s.c_max,
        "epsilon": s.epsilon,
        "gamma": s.gamma,
        "use_meta": s.use_meta,
        "target_clip": s.target_clip,
    }
    folds = range(ctx.cfg.folds.n_folds)
    files = [artifacts.set_file(ctx.out, b.name, "train", 0) for b in backbone_configs(ctx.cfg)]
    files += [artifacts.set_file(ctx.out, artifacts.MODEL_SET, "train", k) for k in folds]
    return Plan(
        {
            "svr": settings,
            "embed": {"backbones": ctx.cfg.embed.backbones},
            "select": dataclasses.asdict(ctx.cfg.select),
        },
        {**ctx.file_inputs([artifacts.folds_csv(ctx.out), *files]), **ctx.data_inputs("train.csv")},
    )


def _candidates(cfg: Config, fold_ids: list[int]) -> tuple[list[str], dict[str, str]]:
    """The sets to choose among (``find_candidates``), each one left out named; none at all is an error."""
    candidates, skipped = find_candidates(cfg, fold_ids)
    for name, why in skipped.items():
        log.warning("select: leaving out %r: %s (run `pawpular embed` first)", name, why)
    if not candidates:
        raise MissingArtifact(f"no finished embedding sets under {cfg.out / 'emb'}: run `pawpular embed` first")
    return candidates, skipped


def check(ctx) -> None:
    """Before anything changes: every finished set select would score is current, as ``status`` judges the embed
    stage (``embed.stale_sets``: the photos or CSVs it was made on, a frozen set's weight file and settings, the
    fine-tuned folds it was made from); one that is not is refused naming it, what changed and the command that
    refreshes it, never scored as if it were the config's. A set whose manifest records no inputs (made by hand)
    is taken as it is. Then an inference budget no single set fits: refused naming what the fastest set needs."""
    from ..data.splits import written_fold_ids
    from .embed import stale_sets

    cfg = ctx.cfg
    candidates, _ = find_candidates(cfg, written_fold_ids(ctx.out))
    for name, (why, command) in stale_sets(ctx, candidates).items():
        raise ArtifactError(
            f"select: the embedding set {name!r} is stale ({why}): its scores would not be this config's; run "
            f"{command} first"
        )
    if cfg.select.budget_hours is None:
        return
    folds_df = read_folds(cfg.out, ctx.comp.train, cfg.folds)
    fold_ids = sorted(k for k in folds_df["fold"].unique().tolist() if k >= 0)
    selection.budget_rule(cfg, _candidates(cfg, fold_ids)[0], fold_ids)


def run(ctx) -> Result:
    """Select embedding sets by greedy forward selection; print the steps; writes select/selection.json."""
    cfg, device, comp = ctx.cfg, ctx.device, ctx.comp
    t0 = time.time()
    folds_df = read_folds(cfg.out, comp.train, cfg.folds)
    fold_ids = sorted(k for k in folds_df["fold"].unique().tolist() if k >= 0)
    candidates, skipped = _candidates(cfg, fold_ids)
    data = load_train_sets(cfg, comp, folds_df, candidates, device)
    # Kernel memory depends on the fold sizes only, not on the sets: decide once.
    mode = svr_memory.resolve_kernel_cache(cfg.svr.kernel_cache, data.fold_of, cfg.svr.max_kernel_gb, device)
    grid = c_grid(cfg.svr.c_min, cfg.svr.c_max)
    log.info(
        "select: %d candidate sets (%s), %d train rows, %d folds, C grid %s",
        len(candidates),
        ", ".join(candidates),
        len(data.ids),
        len(data.fold_ids),
        ", ".join(f"{c:.3g}" for c in grid),
    )
    facts = {
        "candidates": candidates,
        "skipped": skipped,
        "c_grid": grid,
        "n_train": len(data.ids),
        "n_folds": len(data.fold_ids),
    }
    evaluated: dict = {}  # sets -> {C: OOF predictions}: what the nested selection chooses among

    def rescore(names: list[str]) -> tuple[float, float]:
        evaluated[tuple(names)] = {}
        return score_sets(data, names, cfg, device, mode, evaluated[tuple(names)])

    allowed, speeds = selection.budget_rule(cfg, candidates, data.fold_ids)
    several = cfg.select.starts > 1 or cfg.select.budget_hours is not None
    with Progress(desc="select", total=sum(range(1, len(candidates) + 1)), unit="fit") as bar:

        def score(names: list[str]) -> tuple[float, float]:
            result = rescore(names)
            bar.update()
            return result

        if several:
            runs = selection.multi_start(candidates, score, cfg.select.starts, MIN_IMPROVEMENT, allowed)
            path = selection.write_starts(cfg, runs, speeds, facts, MIN_IMPROVEMENT, t0)
            return Result([path], {"chosen": runs[0].features, "oof_rmse": runs[0].oof_rmse, "starts": len(runs)})
        steps, rejected = forward_select(candidates, score, MIN_IMPROVEMENT)
    best = steps[-1]
    t_nested = time.time()
    nested_result, _ = nested_selection(candidates, evaluated, rescore, data.y, data.fold_of, grid)
    gains = step_gains(steps, evaluated, data.y, data.fold_of, grid, _groups(cfg, data.ids))
    t_nested = time.time() - t_nested
    path = selection.write_single(cfg, facts, steps, rejected, nested_result, gains)
    selection.print_choice(cfg, steps, rejected, nested_result, gains)
    log.info(
        "select: the nested score took %.1fs (%.1f%% of the stage)",
        t_nested,
        100 * t_nested / max(time.time() - t0, 1e-9),
    )
    log.info("select: %d of %d sets chosen in %.1fs -> %s", len(best.features), len(candidates), time.time() - t0, path)
    return Result([path], {"chosen": best.features, "oof_rmse": best.oof_rmse})
