"""Forward selection from several starts, under an inference budget (``pawpular select --starts N``).

The first place of the competition ran forward selection from several starting models and got different feature
sets, fitted an SVR head on each and blended them. ``multi_start`` does that: the candidates are ranked by their
score alone; from each of the ``starts`` best singles, sets are added one at a time (the one that lowers the OOF
RMSE most) while the addition gains at least ``min_improvement``. Runs that end on the same sets are kept once,
so there are up to ``starts`` different feature sets, best first. ``allowed(names)`` (the inference budget) keeps
any combination that does not fit out: a single that does not fit starts nothing, an addition that would not fit
is never tried. Scores are cached per combination: a combination reached from two starts is fit once.

Plain functions of a ``score(names) -> (rmse, C)`` callable: the select stage passes the SVR's own scoring.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..scores import budget
from ..store import artifacts
from ..store.errors import ConfigError
from ..store.files import write_json

log = logging.getLogger("pawpular")
MIN_IMPROVEMENT = 0.01

Score = Callable[[list[str]], tuple[float, float]]


@dataclass
class Step:
    step: int
    added: str
    features: list[str]
    oof_rmse: float
    C: float
    tried: dict[str, dict]  # every set tried at this step -> {"oof_rmse", "C"}


def forward_select(
    candidates: Sequence[str], score: Any, min_improvement: float = MIN_IMPROVEMENT
) -> tuple[list[Step], dict]:
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
            rejected = {
                "set": best,
                "oof_rmse": rmse,
                "C": c,
                "improvement": steps[-1].oof_rmse - rmse,
                "tried": {n: {"oof_rmse": r, "C": cc} for n, (r, cc) in tried.items()},
            }
            break
        chosen.append(best)
        remaining.remove(best)
        steps.append(
            Step(
                len(steps) + 1,
                best,
                list(chosen),
                rmse,
                c,
                {n: {"oof_rmse": r, "C": cc} for n, (r, cc) in tried.items()},
            )
        )
    return steps, rejected


@dataclass
class Start:
    """One start's forward selection: the sets in the order they were added, with the OOF RMSE after each."""

    start: str
    features: list[str]
    oof_rmse: float
    C: float
    path: list[tuple[str, float]] = field(default_factory=list)  # (added set, OOF RMSE with it)


def cached(score: Score) -> Score:
    """``score`` memoized on the set of names (the RMSE does not depend on their order)."""
    memo: dict[frozenset, tuple[float, float]] = {}

    def run(names: list[str]) -> tuple[float, float]:
        key = frozenset(names)
        if key not in memo:
            memo[key] = score(list(names))
        return memo[key]

    return run


def forward_from(
    start: str,
    candidates: Sequence[str],
    score: Score,
    min_improvement: float,
    allowed: Callable[[list[str]], bool] = lambda names: True,
) -> Start:
    """Greedy forward selection beginning with ``start``; ties go to the earlier candidate."""
    chosen = [start]
    rmse, c = score(chosen)
    path = [(start, rmse)]
    remaining = [n for n in candidates if n != start]
    while True:
        tried = {n: score([*chosen, n]) for n in remaining if allowed([*chosen, n])}
        if not tried:
            break
        best = min(tried, key=lambda n: tried[n][0])
        if rmse - tried[best][0] < min_improvement:
            break
        chosen.append(best)
        remaining.remove(best)
        rmse, c = tried[best]
        path.append((best, rmse))
    return Start(start, chosen, rmse, c, path)


def multi_start(
    candidates: Sequence[str],
    score: Score,
    starts: int,
    min_improvement: float,
    allowed: Callable[[list[str]], bool] = lambda names: True,
) -> list[Start]:
    """Up to ``starts`` different feature sets, each from forward selection beginning with one of the best
    ``starts`` single sets that fit ``allowed``; sorted by OOF RMSE. ValueError when no single set fits."""
    if starts < 1:
        raise ValueError(f"starts must be >= 1, got {starts}")
    score = cached(score)
    singles = sorted((n for n in candidates if allowed([n])), key=lambda n: (score([n])[0], list(candidates).index(n)))
    if not singles:
        raise ValueError("no candidate embedding set fits the inference budget on its own")
    found: dict[frozenset, Start] = {}
    for first in singles[:starts]:
        run = forward_from(first, candidates, score, min_improvement, allowed)
        found.setdefault(frozenset(run.features), run)
    return sorted(found.values(), key=lambda s: s.oof_rmse)


def features_line(names: Sequence[str]) -> str:
    """The override to pass to `pawpular svr` / `all` (shell-quoted: unquoted brackets are a shell glob)."""
    return "--set " + shlex.quote(f"svr.features=[{','.join(names)}]")


def blend_line(folders: Sequence[str | Path]) -> str:
    """The override that blends the experiments in ``folders`` (``ensemble.experiments``), shell-quoted."""
    return "--set " + shlex.quote(f"ensemble.experiments=[{','.join(map(str, folders))}]")


# ---------------------------------------------------------------------------------------------------------------
# What select writes and prints for several starts, and the inference budget (select.starts, select.budget_hours)


def budget_rule(cfg: Any, candidates: Sequence[str], fold_ids: Sequence[int]) -> tuple[Any, dict]:
    """(allowed(names) -> bool, each set's (images/s, passes)): every combination, or with select.budget_hours
    those whose inference on select.test_images photos fits, at the speeds the sets' manifests recorded."""
    s = cfg.select
    if s.budget_hours is None:
        return (lambda names: True), {}
    finetuned = cfg.embed.source == "finetuned"  # else "model" is one frozen pass, as predict runs it
    speeds = {n: budget.set_speed(cfg.out, n, fold_ids, finetuned) for n in candidates}
    hours = {n: budget.inference_hours(speeds, [n], s.test_images) for n in candidates}
    if hours and (fastest := min(hours, key=hours.get)) and hours[fastest] > s.budget_hours:
        ips, passes = speeds[fastest]
        raise ConfigError(
            f"select.budget_hours={s.budget_hours:g} (--budget-hours): no embedding set fits on its own: the "
            f"fastest, {fastest!r}, needs {hours[fastest]:.3g} h for select.test_images={s.test_images} photos "
            f"({ips:.3g} images/s, {passes} pass(es) each); raise --budget-hours to at least {hours[fastest]:.3g} "
            "or lower --test-images",
            ("select.budget_hours",),
        )
    return (lambda names: budget.inference_hours(speeds, names, s.test_images) <= s.budget_hours), speeds


NO_NESTED_STARTS = (
    "no nested score: the starts' sets were chosen on all rows (with a budget too); an experiment whose svr.features "
    "are one of them has every score labelled optimistic, none to trust"
)


def write_starts(cfg: Any, runs: list[Start], speeds: dict, facts: dict, min_improvement: float, t0: float) -> Path:
    """selection.json and the printout of several starts: each feature set an SVR head of its own (the first in
    this experiment, the others in experiments of their own), blended by ``ensemble.experiments``."""
    s = cfg.select
    hours = {
        i: budget.inference_hours(speeds, r.features, s.test_images) if speeds else None for i, r in enumerate(runs)
    }
    others = [f"{cfg.out}-start{i + 1}" for i in range(1, len(runs))]
    result = {
        **facts,
        "chosen": runs[0].features,
        "oof_rmse": runs[0].oof_rmse,
        "C": runs[0].C,
        "set_line": features_line(runs[0].features),
        "starts": [
            {
                **dataclasses.asdict(r),
                "inference_hours": hours[i],
                "set_line": features_line(r.features),
                "output": str(cfg.out if i == 0 else others[i - 1]),
            }
            for i, r in enumerate(runs)
        ],
        "blend_line": blend_line(others) if others else "",
        "nested": {"missing": NO_NESTED_STARTS},
        "settings": {
            "min_improvement": min_improvement,
            "starts": s.starts,
            "budget_hours": s.budget_hours,
            "test_images": s.test_images,
            "epsilon": cfg.svr.epsilon,
            "gamma": cfg.svr.gamma,
            "use_meta": cfg.svr.use_meta,
            "target_clip": cfg.svr.target_clip,
        },
    }
    path = artifacts.selection_json(cfg.out)
    write_json(path, result)
    for i, r in enumerate(runs):
        cost = f"; {hours[i]:.2f} h for {s.test_images} photos" if hours[i] is not None else ""
        print(f"start {i + 1} ({r.start}): {' + '.join(r.features)}  OOF RMSE {r.oof_rmse:.4f} at C={r.C:.4g}{cost}")
    for i, r in enumerate(runs):
        where = "" if i == 0 else f" --output {shlex.quote(others[i - 1])}"
        print(f"use:    pawpular all --config <this config>{where} {features_line(r.features)}")
    if others:
        print(f"blend:  pawpular ensemble {result['blend_line']}   (every head; export and predict carry them)")
    print(f"note:   {NO_NESTED_STARTS}")
    log.info("select: %d feature sets from %d starts in %.1fs -> %s", len(runs), s.starts, time.time() - t0, path)
    return path


def format_table(steps: Sequence[Step], rejected: dict) -> str:
    rows = [f"{'step':>4}  {'added set':<20} {'OOF RMSE':>9} {'gain':>7} {'C':>9}"]
    prev = None
    for s in steps:
        gain = "" if prev is None else f"{prev - s.oof_rmse:7.4f}"
        rows.append(f"{s.step:>4}  {s.added:<20} {s.oof_rmse:9.4f} {gain:>7} {s.C:9.4g}")
        prev = s.oof_rmse
    if rejected:
        rows.append(
            f"{'-':>4}  {rejected['set'] + ' (not added)':<20} {rejected['oof_rmse']:9.4f} "
            f"{rejected['improvement']:7.4f} {rejected['C']:9.4g}"
        )
    return "\n".join(rows)


def format_steps(steps: Sequence[Step], rejected: dict) -> str:
    """Every score: each set alone (best first), then each step's every try with its gain over the step before."""
    rows = ["each set alone:", f"  {'set':<20} {'OOF RMSE':>9} {'C':>9}"]
    for name, r in sorted(steps[0].tried.items(), key=lambda kv: (kv[1]["oof_rmse"], kv[0])):
        mark = "  <- start" if name == steps[0].added else ""
        rows.append(f"  {name:<20} {r['oof_rmse']:9.4f} {r['C']:9.4g}{mark}")
    tries = [(s.step, s.features[:-1], s.tried, s.added) for s in steps[1:]]
    if rejected:
        tries.append((len(steps) + 1, steps[-1].features, rejected["tried"], None))
    for step, base, tried, added in tries:
        prev = steps[step - 2].oof_rmse
        rows.append(f"step {step}: {' + '.join(base)} ({prev:.4f}) plus one more:")
        for name, r in sorted(tried.items(), key=lambda kv: (kv[1]["oof_rmse"], kv[0])):
            mark = "  <- added" if name == added else ""
            rows.append(f"  + {name:<18} {r['oof_rmse']:9.4f} {r['C']:9.4g}  gain {prev - r['oof_rmse']:7.4f}{mark}")
        if added is None:
            rows.append(f"  none added: the best gain ({rejected['improvement']:.4f}) is below {MIN_IMPROVEMENT}")
    return "\n".join(rows)


def print_choice(cfg: Any, steps: list, rejected: dict | None, nested_result: dict, gains: list[dict]) -> None:
    """Every set's score and step, the choice, its nested score and each step's gain against the noise."""
    best = steps[-1]
    print(format_steps(steps, rejected))
    print()
    print(format_table(steps, rejected))
    print(
        f"chosen: {', '.join(best.features)} (OOF RMSE {best.oof_rmse:.4f} at C={best.C:.4g}; best single "
        f"{steps[0].added} {steps[0].oof_rmse:.4f})"
    )
    print(f"use:    {features_line(best.features)}   (or `pawpular select --as NAME`: a new experiment)")
    print(
        f"nested: {nested_result['nested_rmse']:.4f} (the selection and C redone without each fold, scored on it: "
        f"the selection's score to trust; the {best.oof_rmse:.4f} above is optimistic, and so is every score of an "
        "experiment that uses these sets: their choice is not redone there)"
    )
    for g in gains:
        print(
            f"        step {g['step']} adds {g['added']}: {g['delta']:+.4f} [{g['low']:+.4f}, {g['high']:+.4f}] "
            f"(95% over duplicate groups), {g['folds_won']}/{g['folds']} folds: {g['verdict']}"
        )
    from .study import c_at_edge

    if edge := c_at_edge(best.C, cfg.svr.c_min, cfg.svr.c_max):
        log.warning("select: %s", edge)


def write_single(cfg: Any, facts: dict, steps: list[Step], rejected: dict, nested_result: dict, gains: list) -> Path:
    """select/selection.json of one start: every step, the choice, its nested score and each step's gain;
    ``facts``: the candidates, the sets left out, the C grid, the train rows and folds."""
    best = steps[-1]
    result = {
        "candidates": facts["candidates"],
        "skipped": facts["skipped"],
        "single": steps[0].tried,
        "steps": [dataclasses.asdict(s) for s in steps],
        "rejected": rejected,
        "chosen": best.features,
        "oof_rmse": best.oof_rmse,
        "C": best.C,
        "set_line": features_line(best.features),
        "nested": nested_result,
        "gains": gains,
        "settings": {
            "min_improvement": MIN_IMPROVEMENT,
            "c_grid": facts["c_grid"],
            "epsilon": cfg.svr.epsilon,
            "gamma": cfg.svr.gamma,
            "use_meta": cfg.svr.use_meta,
            "n_folds": facts["n_folds"],
            "n_train": facts["n_train"],
        },
    }
    path = artifacts.selection_json(cfg.out)
    write_json(path, result)
    return path
