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

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

Score = Callable[[list[str]], tuple[float, float]]


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


def forward_from(start: str, candidates: Sequence[str], score: Score, min_improvement: float,
                 allowed: Callable[[list[str]], bool] = lambda names: True) -> Start:
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


def multi_start(candidates: Sequence[str], score: Score, starts: int, min_improvement: float,
                allowed: Callable[[list[str]], bool] = lambda names: True) -> list[Start]:
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
