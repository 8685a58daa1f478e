"""The k-fold split (and the optional holdout) and ``folds.csv``, the file every later stage takes folds from.

``folds.csv`` has ``Id,fold``: fold k in 0..n_folds-1 marks validation rows of fold k; fold -1 marks the holdout
(``folds.holdout > 0``): rows no stage ever fits on, scored once by the ensemble. ``read_folds`` checks the file
against train.csv and the config (every train Id once, integer folds in range, no empty fold) before any stage
uses it, so a hand-edited file with fold 7, NaN or 1.5 is an error naming the row, not a 1-row fold.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..config.schema import FoldsConfig
from ..store import artifacts
from ..store.errors import MissingArtifact
from .tables import ID, TARGET, DataError, Problem, read_csv_or_raise, read_id_csv

HOLDOUT = -1


def sturges_bins(y: np.ndarray) -> np.ndarray:
    """Equal-width bins of the target, their number by Sturges' rule (one bin when every target is equal)."""
    n_bins = int(np.ceil(np.log2(max(len(y), 1)) + 1))
    if np.ptp(y) == 0:
        return np.zeros(len(y), dtype=int)
    return pd.cut(y, bins=n_bins, labels=False).astype(int)


def _splitter(n_splits: int, seed: int, grouped: bool):
    # imported here: the stages that only read folds.csv (train, embed, status, report) skip scikit-learn's 0.8 s
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    cls = StratifiedGroupKFold if grouped else StratifiedKFold
    return cls(n_splits, shuffle=True, random_state=seed)


def make_folds(
    train: pd.DataFrame, n_folds: int, seed: int, groups: np.ndarray | None = None, holdout: float = 0.0
) -> np.ndarray:
    """Fold index per row of ``train`` (-1: holdout), stratified on binned targets; deterministic in ``seed``.

    The holdout is one part of a stratified (group) k-fold with k = round(1 / holdout), taken before the folds,
    so its share is 1/k (0.1 -> 10%, 0.2 -> 20%); duplicate groups stay on one side.
    """
    y = train[TARGET].to_numpy(float)
    fold = np.full(len(train), -1, dtype=int)
    rows = np.arange(len(train))
    check_enough_rows(len(train), n_folds, holdout, groups)
    if holdout > 0:
        k = max(2, int(round(1 / holdout)))
        _check_bins(sturges_bins(y), k, "folds.holdout")
        _, held = next(_splitter(k, seed + 1, groups is not None).split(rows, sturges_bins(y), groups))
        rows = np.setdiff1d(rows, held)
    sub_groups = None if groups is None else groups[rows]
    check_enough_rows(len(rows), n_folds, 0.0, sub_groups)
    _check_bins(sturges_bins(y[rows]), n_folds, "folds.n_folds")
    for k, (_, val) in enumerate(
        _splitter(n_folds, seed, groups is not None).split(rows, sturges_bins(y[rows]), sub_groups)
    ):
        fold[rows[val]] = k
    return fold


def check_enough_rows(n_rows: int, n_folds: int, holdout: float = 0.0, groups: np.ndarray | None = None) -> None:
    """ConfigError unless every fold (and the holdout's split) can get a row, or a duplicate group, of its own."""
    from ..store.errors import ConfigError

    units = n_rows if groups is None else len(np.unique(groups))
    what = "rows" if groups is None else "groups of duplicates (folds.group_duplicates)"
    parts = max(2, int(round(1 / holdout))) if holdout > 0 else 0
    if parts > units:
        raise ConfigError(
            f"folds.holdout={holdout:g}: train.csv has {units} {what}, too few to set 1/{parts} "
            "aside; lower folds.holdout or add rows",
            ("folds.holdout",),
        )
    if n_folds > int(units * (1 - 1 / parts if parts else 1)):
        raise ConfigError(
            f"folds.n_folds={n_folds}: train.csv has {units} {what}"
            f"{' (before the holdout)' if parts else ''}, too few for one in each fold; lower "
            "folds.n_folds",
            ("folds.n_folds",),
        )


def _check_bins(bins: np.ndarray, k: int, key: str) -> None:
    """Stratified (group) k-fold needs a target bin with at least ``k`` rows (scikit-learn raises otherwise)."""
    from ..store.errors import ConfigError

    largest = int(np.bincount(np.unique(bins, return_inverse=True)[1]).max()) if len(bins) else 0
    if k > largest:
        raise ConfigError(
            f"{key}: {k} parts need a Pawpularity bin with {k} rows, but the largest of "
            f"train.csv's {len(bins)} rows' bins has {largest}: lower {key} or add rows",
            (key,),
        )


def read_folds(out, train: pd.DataFrame, folds_cfg: FoldsConfig) -> pd.DataFrame:
    """folds.csv (Id, fold) in train.csv's row order, checked; raises DataError listing every problem."""
    path = artifacts.folds_csv(out)
    if not path.is_file():
        raise MissingArtifact(f"{path} not found: run `pawpular folds` first")
    return check_folds(read_csv_or_raise(path), train, folds_cfg)


def written_fold_ids(out) -> list[int]:
    """The validation folds folds.csv holds as the folds stage wrote it, not checked against today's config (a
    changed folds.n_folds makes the folds stage stale, which its verdict says); [] when there is none or it
    cannot be read."""
    try:
        values = pd.to_numeric(read_id_csv(artifacts.folds_csv(out))["fold"], errors="coerce").dropna()
    except (OSError, ValueError, KeyError):
        return []
    return sorted(int(k) for k in values.unique() if k != HOLDOUT and float(k).is_integer())


def check_folds(
    folds: pd.DataFrame, train: pd.DataFrame, folds_cfg: FoldsConfig, name: str = "folds.csv"
) -> pd.DataFrame:
    """A folds table (Id, fold) checked against train.csv and the config; in train.csv's row order."""
    problems = [Problem(name, "columns", f"missing column '{c}'") for c in (ID, "fold") if c not in folds]
    if not problems:
        problems = _id_problems(folds, train, name) + _fold_problems(folds, folds_cfg, name)
    if problems:
        raise DataError(problems)
    out_df = train[[ID]].merge(folds[[ID, "fold"]], on=ID, how="left")
    out_df["fold"] = out_df["fold"].astype(int)
    return out_df


def _id_problems(folds: pd.DataFrame, train: pd.DataFrame, name: str) -> list[Problem]:
    ids, known = set(folds[ID]), set(train[ID])
    return (
        [Problem(name, f"Id {i}", "train Id without a fold") for i in sorted(known - ids)[:20]]
        + [Problem(name, f"Id {i}", "not in train.csv") for i in sorted(ids - known)[:20]]
        + [Problem(name, f"Id {i}", "listed more than once") for i in sorted(folds[ID][folds[ID].duplicated()])[:20]]
    )


def _fold_problems(folds: pd.DataFrame, fc: FoldsConfig, name: str) -> list[Problem]:
    values = pd.to_numeric(folds["fold"], errors="coerce")
    allowed = set(range(fc.n_folds)) | ({HOLDOUT} if fc.holdout > 0 or fc.file else set())
    problems = []
    for i in np.flatnonzero(~(values.isin(list(allowed))).to_numpy())[:20]:
        raw, id_ = folds["fold"].iloc[i], folds[ID].iloc[i]
        raw = raw.item() if isinstance(raw, np.generic) else raw  # 7, 1.5, nan or 'x' as written, not np.int64(7)
        why = (
            "fold -1 marks the holdout, but folds.holdout is 0 (and no folds.file)"
            if values.iloc[i] == HOLDOUT
            else f"fold must be an integer in 0..{fc.n_folds - 1} (folds.n_folds={fc.n_folds}), got {raw!r}"
        )
        problems.append(Problem(name, f"line {i + 2} (Id {id_})", why))
    if not problems:
        empty = sorted(set(range(fc.n_folds)) - set(values.astype(int)))
        problems += [Problem(name, f"fold {k}", f"has no rows (folds.n_folds={fc.n_folds})") for k in empty]
    return problems


def fold_ids(folds: pd.DataFrame) -> list[int]:
    """The validation folds (the holdout is not one)."""
    return sorted(k for k in folds["fold"].unique().tolist() if k != HOLDOUT)
