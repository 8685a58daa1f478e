"""Scores a Kaggler can trust: choices made without the rows they are scored on, and differences against noise.

    choice = leave_one_out(loss)            # loss[candidate, fold]: per fold k, the best candidate on the others
    rmse_nested = nested_rmse(sse, counts, choice)
    d = paired_bootstrap(pred_a, pred_b, y, groups)   # RMSE(a) - RMSE(b), 95% interval over duplicate groups

A score is *optimistic* when a choice (the NN's epoch, the SVR's C, select's sets, the blend's weights) was made
on the rows it is scored on, and *nested* when, for every fold k, the choice is made again on the other folds and
fold k is scored with it. The nested score is never below the optimistic one for a choice that minimizes the
score itself over fixed candidates (the optimistic choice is their minimum on all rows, or on each fold's own rows).

A difference between two sets of predictions on the same rows is measured with a paired bootstrap that resamples
duplicate groups (``folds/duplicates.csv``: photos of one pet move together), not single rows, so near-identical
rows do not narrow the interval. Pure numpy: the stages, ``scores/compare.py`` and the tests call it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

N_BOOT = 2000  # bootstrap resamples: the 2.5% / 97.5% percentiles move by well under 0.01 RMSE beyond this
LEVEL = 0.95


def sse_by_fold(pred: np.ndarray, y: np.ndarray, fold: np.ndarray, folds: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(sum of squared errors, rows) of each fold in ``folds``."""
    err = (np.asarray(pred, float) - np.asarray(y, float)) ** 2
    return (np.array([err[fold == k].sum() for k in folds]), np.array([int((fold == k).sum()) for k in folds]))


def leave_one_out(loss: np.ndarray) -> np.ndarray:
    """For each fold k (column), the candidate (row) with the least total ``loss`` over the other folds; ties go to
    the earlier candidate. ``loss``: per-fold sums of squared errors (the pooled RMSE's choice) or per-fold RMSEs
    (the choice by the mean validation curve). A candidate with a NaN (a fold lacks it) is never chosen."""
    loss = np.asarray(loss, float)
    if loss.ndim != 2 or loss.shape[0] == 0 or loss.shape[1] < 2:
        raise ValueError(f"leave_one_out needs [candidates, folds >= 2] losses, got shape {loss.shape}")
    others = loss.sum(axis=1, keepdims=True) - loss  # [candidates, folds]: the total without fold k
    others[np.isnan(loss).any(axis=1)] = np.inf
    return np.argmin(others, axis=0)


def epoch_choice(curves: list) -> list[int]:
    """Per fold, the epoch (1-based) with the lowest mean validation RMSE over the *other* folds (``curves``: each
    fold's RMSE after every epoch; only the epochs every fold ran are candidates: early stopping may end one)."""
    n_epochs = min(len(c) for c in curves)
    if n_epochs == 0:
        raise ValueError("a fold has no epoch to choose from")
    loss = np.array([list(c[:n_epochs]) for c in curves], float).T  # [epochs, folds]
    return [int(e) + 1 for e in leave_one_out(loss)]


def nested_rmse(sse: np.ndarray, counts: np.ndarray, choice: np.ndarray) -> float:
    """RMSE over all folds when fold k is scored with candidate ``choice[k]`` (``sse``: [candidates, folds])."""
    sse = np.asarray(sse, float)
    picked = sse[np.asarray(choice), np.arange(sse.shape[1])]
    return float(np.sqrt(picked.sum() / np.sum(counts)))


def optimistic_rmse(sse: np.ndarray, counts: np.ndarray) -> float:
    """RMSE of the one candidate best on all folds' rows together (the choice scored on its own rows)."""
    return float(np.sqrt(np.nanmin(np.asarray(sse, float).sum(axis=1)) / np.sum(counts)))


# ---------------------------------------------------------------------------------------------------------------
# Differences against the noise


def seed_spread(base: float, repeats: list[float]) -> float:
    """How far a rerun of the same config at another seed moved the score: the largest |RMSE(repeat) - RMSE(base)|
    (0 without repeats)."""
    return float(max((abs(r - base) for r in repeats), default=0.0))


def group_codes(ids, groups: dict | None = None) -> np.ndarray:
    """An integer group per row: ``groups`` maps an Id to its duplicate group; every other Id is a group alone."""
    groups = groups or {}
    labels = [("g", groups[i]) if i in groups else ("id", i) for i in ids]
    _, codes = np.unique(np.array([f"{a}:{b}" for a, b in labels]), return_inverse=True)
    return codes


@dataclass
class Difference:
    """RMSE(a) - RMSE(b) on the same rows (negative: a is better), its interval, and the folds a wins."""

    delta: float
    low: float
    high: float
    rows: int
    groups: int
    folds_won: int | None = None
    folds: int | None = None
    spread: float = 0.0  # the seed-to-seed spread the verdict also allows for (``with_spread``)

    @property
    def verdict(self) -> str:
        """'better' / 'worse' when the whole interval, widened by ``spread`` on each side, is below / above 0,
        else 'within noise'."""
        if self.high + self.spread < 0:
            return "better"
        if self.low - self.spread > 0:
            return "worse"
        return "within noise"

    def with_spread(self, spread: float) -> Difference:
        """The same difference, its verdict widened by a seed-to-seed spread (>= 0)."""
        return dataclasses.replace(self, spread=float(spread))

    def to_dict(self) -> dict:
        return {
            "delta": self.delta,
            "low": self.low,
            "high": self.high,
            "verdict": self.verdict,
            "rows": self.rows,
            "groups": self.groups,
            "folds_won": self.folds_won,
            "folds": self.folds,
            "spread": self.spread,
        }


def paired_bootstrap(
    pred_a: np.ndarray,
    pred_b: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray | None = None,
    fold: np.ndarray | None = None,
    n_boot: int = N_BOOT,
    seed: int = 0,
    level: float = LEVEL,
) -> Difference:
    """RMSE(a) - RMSE(b) on the same rows, with a ``level`` percentile interval from ``n_boot`` resamples of whole
    groups (``groups``: an integer code per row; default, one group per row), and with ``fold`` the folds where a's
    RMSE is lower. Deterministic for a seed."""
    a, b, y = (np.asarray(v, float) for v in (pred_a, pred_b, y))
    if not (len(a) == len(b) == len(y)) or len(y) == 0:
        raise ValueError(f"paired_bootstrap needs predictions of the same rows, got {len(a)}, {len(b)}, {len(y)}")
    codes = np.arange(len(y)) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    n_groups = int(codes.max()) + 1
    sse_a = np.bincount(codes, (a - y) ** 2, n_groups)
    sse_b = np.bincount(codes, (b - y) ** 2, n_groups)
    rows = np.bincount(codes, minlength=n_groups).astype(float)
    rng = np.random.default_rng(seed)
    deltas = []
    for start in range(0, n_boot, 250):  # chunks: [resamples, groups] counts stay small for 10k groups
        w = rng.multinomial(n_groups, np.full(n_groups, 1 / n_groups), size=min(250, n_boot - start)).astype(float)
        n = w @ rows
        deltas.append(np.sqrt(w @ sse_a / n) - np.sqrt(w @ sse_b / n))
    deltas = np.concatenate(deltas)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(deltas, [tail, 100 - tail])
    delta = float(np.sqrt(sse_a.sum() / len(y)) - np.sqrt(sse_b.sum() / len(y)))
    won = n_folds = None
    if fold is not None:
        fold = np.asarray(fold)
        ks = np.unique(fold)
        err_a, err_b = (a - y) ** 2, (b - y) ** 2
        won, n_folds = int(sum(err_a[fold == k].mean() < err_b[fold == k].mean() for k in ks)), len(ks)
    return Difference(delta, float(low), float(high), len(y), n_groups, won, n_folds)
