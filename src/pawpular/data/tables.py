"""The competition's data contract: read and validate the CSVs and images (their fingerprints:
data/digest.py).

Layout (exactly Kaggle's)::

    DIR/train.csv               Id, 12 metadata flags, Pawpularity
    DIR/test.csv                Id, 12 metadata flags
    DIR/sample_submission.csv   Id, Pawpularity
    DIR/train/{Id}.jpg, DIR/test/{Id}.jpg

``pawpular check-data --data DIR`` lists every problem with its file, line or Id and reason, and exits 2. Reads
the competition folder; the record ``<experiment>/.data_check.json`` (what was last checked, and digests) is
written by data/digest.py.
"""

from __future__ import annotations

import difflib
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..store.errors import PawpularError
from ..store.files import not_a_folder
from .images import ImageDecodeError, PixelBudget, check_image, image_path, max_pixels

ID = "Id"
TARGET = "Pawpularity"
META_COLS = [
    "Subject Focus",
    "Eyes",
    "Face",
    "Near",
    "Action",
    "Accessory",
    "Group",
    "Collage",
    "Human",
    "Occlusion",
    "Info",
    "Blur",
]
TRAIN_COLS = [ID, *META_COLS, TARGET]
TEST_COLS = [ID, *META_COLS]
SUBMISSION_COLS = [ID, TARGET]
_ID_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
# pandas' default spellings of a missing value (read_csv's na_values), for every column but Id: an Id "NA" or
# "null" is an Id, not an empty cell.
NA_STRINGS = [
    "",
    "#N/A",
    "#N/A N/A",
    "#NA",
    "-1.#IND",
    "-1.#QNAN",
    "-NaN",
    "-nan",
    "1.#IND",
    "1.#QNAN",
    "<NA>",
    "N/A",
    "NA",
    "NULL",
    "NaN",
    "None",
    "n/a",
    "nan",
    "null",
]
__all__ = [
    "ID",
    "TARGET",
    "META_COLS",
    "DataError",
    "ImageDecodeError",
    "Problem",
    "Competition",
    "check_competition",
    "read_competition",
    "read_test_set",
    "check_images",
]


class DataError(PawpularError, ValueError):
    """The competition folder breaks the contract; ``problems`` lists each one."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        head = "\n".join(f"  {p}" for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{len(problems)} data problem(s):\n{head}{more}")


@dataclass(frozen=True)
class Problem:
    file: str
    where: str  # "line 7", "Id abc", "columns"
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.where}: {self.reason}"


@dataclass
class Competition:
    root: Path
    train: pd.DataFrame
    test: pd.DataFrame
    sample: pd.DataFrame


# -------------------------------------------------------------------------------------------------------------
# CSVs


def read_id_csv(path: str | Path) -> pd.DataFrame:
    """A CSV with an ``Id`` column, Ids as written (``NA`` is an Id); other columns' empty cells are NaN."""
    others = [c for c in (*TRAIN_COLS, "fold", "group") if c != ID]
    return pd.read_csv(path, dtype={ID: str}, keep_default_na=False, na_values={c: NA_STRINGS for c in others})


def _read_csv(path: Path, problems: list[Problem], name: str | None = None) -> pd.DataFrame | None:
    from ..store.errors import reason

    name = name or path.name
    if not path.is_file():
        what = "is not a file" if path.exists() else "missing"
        problems.append(Problem(name, "file", f"{what} (expected at {path})"))
        return None
    try:
        return read_id_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        problems.append(Problem(name, "file", f"cannot be parsed as CSV: {str(e).strip()}"))
    except OSError as e:  # permission, I/O error: one listed problem, the others still checked
        problems.append(Problem(name, "file", f"cannot be read ({reason(e)})"))
    return None


def read_csv_or_raise(path: str | Path, name: str | None = None) -> pd.DataFrame:
    """``read_id_csv``, or DataError naming the file when it is missing, unreadable or not CSV."""
    problems: list[Problem] = []
    df = _read_csv(Path(path), problems, name)
    if df is None:
        raise DataError(problems)
    return df


def _check_columns(df: pd.DataFrame, expected: list[str], file: str, problems: list[Problem]) -> bool:
    cols = list(df.columns)
    missing = [c for c in expected if c not in cols]
    extra = [c for c in cols if c not in expected]
    for c in missing:
        near = difflib.get_close_matches(c, extra, n=1, cutoff=0.6)
        hint = f" (found '{near[0]}': columns are case- and space-sensitive)" if near else ""
        problems.append(Problem(file, "columns", f"missing column '{c}'{hint}"))
    for c in extra:
        if not difflib.get_close_matches(c, missing, n=1, cutoff=0.6):
            problems.append(Problem(file, "columns", f"unexpected column '{c}'"))
    return not missing


def _fmt(v: object) -> str:
    """A cell value as the user typed it: 3, 0.5, 'yes' (no numpy reprs)."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return repr(v)


def _line(i: int) -> str:
    return f"line {i + 2}"  # header is line 1


def _check_ids(df: pd.DataFrame, file: str, problems: list[Problem]) -> None:
    ids = df[ID]
    empty = (ids.isna() | (ids.astype(str).str.strip() == "")).to_numpy()
    for i in np.flatnonzero(empty):
        problems.append(Problem(file, _line(i), "empty Id"))
    for i, v in ids.items():
        if isinstance(v, str) and v.strip() and not _ID_RE.match(v):
            problems.append(Problem(file, _line(i), f"Id {v!r} has characters not allowed in a file name"))
    dup = ids[ids.duplicated(keep=False) & ids.notna()]
    for v, rows in dup.groupby(dup).groups.items():
        problems.append(Problem(file, f"Id {v}", f"duplicated on {', '.join(_line(r) for r in rows)}"))


def _check_flags(df: pd.DataFrame, file: str, problems: list[Problem]) -> None:
    for c in (c for c in META_COLS if c in df.columns):
        col = pd.to_numeric(df[c], errors="coerce")
        bad = ~col.isin([0, 1])
        for i in np.flatnonzero(bad.to_numpy()):
            problems.append(Problem(file, _where(df, i), f"'{c}' must be 0 or 1, got {_fmt(df[c].iloc[i])}"))


def _check_target(df: pd.DataFrame, file: str, problems: list[Problem]) -> None:
    col = pd.to_numeric(df[TARGET], errors="coerce")
    for i in np.flatnonzero(col.isna().to_numpy()):
        raw = df[TARGET].iloc[i]
        what = "missing (NaN)" if pd.isna(raw) else f"not a number: {_fmt(raw)}"
        problems.append(Problem(file, _where(df, i), f"Pawpularity {what}"))
    out = col.notna() & ((col < 1) | (col > 100))
    for i in np.flatnonzero(out.to_numpy()):
        problems.append(Problem(file, _where(df, i), f"Pawpularity {col.iloc[i]:g} outside [1, 100]"))


def _check_sample_ids(test: pd.DataFrame, sample: pd.DataFrame, problems: list[Problem]) -> None:
    t, s = set(test[ID].dropna()), set(sample[ID].dropna())
    problems += [
        Problem("sample_submission.csv", f"Id {v}", "in test.csv but not in sample_submission.csv")
        for v in sorted(t - s)
    ]
    problems += [Problem("sample_submission.csv", f"Id {v}", "not in test.csv") for v in sorted(s - t)]


def _where(df: pd.DataFrame, i: int) -> str:
    return f"{_line(i)} (Id {df[ID].iloc[i]})" if ID in df.columns else _line(i)


def _check_rows(df: pd.DataFrame, file: str, problems: list[Problem], target: bool) -> None:
    """Every row check whose columns are there: a missing column does not hide the other columns' problems."""
    if ID in df.columns:
        _check_ids(df, file, problems)
    _check_flags(df, file, problems)
    if target and TARGET in df.columns:
        _check_target(df, file, problems)


def check_competition(
    root: str | Path, images: bool = True, workers: int = 8
) -> tuple[list[Problem], Competition | None]:
    """Check every rule of the contract in one pass; return (problems, competition-or-None)."""
    root = Path(root)
    problems: list[Problem] = []
    if why := not_a_folder(root):
        return [Problem(str(root), "folder", f"competition folder {why}")], None
    train = _read_csv(root / "train.csv", problems)
    test = _read_csv(root / "test.csv", problems)
    sample = _read_csv(root / "sample_submission.csv", problems)
    ok, has_id = {}, {}
    for name, df, cols in (
        ("train.csv", train, TRAIN_COLS),
        ("test.csv", test, TEST_COLS),
        ("sample_submission.csv", sample, SUBMISSION_COLS),
    ):
        ok[name] = df is not None and _check_columns(df, cols, name, problems)
        has_id[name] = df is not None and ID in df.columns and len(df) > 0
        if df is not None and len(df) == 0:
            problems.append(Problem(name, "file", "has no rows"))
            ok[name] = False
    if test is not None and TARGET in test.columns:
        problems.append(Problem("test.csv", "columns", "must not contain the target 'Pawpularity'"))
    for name, df in (("train.csv", train), ("test.csv", test)):
        if df is not None and len(df):
            _check_rows(df, name, problems, target=name == "train.csv")
    if has_id["sample_submission.csv"]:
        _check_ids(sample, "sample_submission.csv", problems)
    if has_id["test.csv"] and has_id["sample_submission.csv"]:
        _check_sample_ids(test, sample, problems)
    if has_id["train.csv"] and has_id["test.csv"]:
        for v in sorted(set(train[ID].dropna()) & set(test[ID].dropna())):
            problems.append(Problem("test.csv", f"Id {v}", "also in train.csv"))
    if images:
        for name, df, split in (("train.csv", train, "train"), ("test.csv", test, "test")):
            if has_id[name]:
                problems += check_images(root, split, _named_ids(df), workers)
    if problems:
        return problems, None
    return [], Competition(root, _typed_train(train), _typed_test(test), sample)


def _named_ids(df: pd.DataFrame) -> list[str]:
    """The non-empty Ids (an empty one is reported as such, not as a missing image)."""
    return [i for i in df[ID].dropna().astype(str) if i.strip()]


def check_images(root: Path, split: str, ids: list[str], workers: int) -> list[Problem]:
    folder = root / split
    if not folder.is_dir():
        return [Problem(f"{split}/", "folder", f"image folder missing: {len(ids)} images expected as {split}/<Id>.jpg")]
    paths = [image_path(root, split, i) for i in ids]
    budget = PixelBudget(max_pixels())  # memory bound: at most one cap of decoded pixels in flight (data/images.py)
    with ThreadPoolExecutor(workers) as pool:  # PIL releases the GIL while decoding
        reasons = list(pool.map(lambda p: check_image(p, budget), paths))
    return [Problem(f"{split}/{i}.jpg", f"Id {i}", r) for i, r in zip(ids, reasons, strict=False) if r]


def _typed_train(df: pd.DataFrame) -> pd.DataFrame:
    out = df[TRAIN_COLS].copy()
    out[META_COLS] = out[META_COLS].astype(np.int8)
    out[TARGET] = out[TARGET].astype(np.float32)
    return out.reset_index(drop=True)


def _typed_test(df: pd.DataFrame) -> pd.DataFrame:
    out = df[TEST_COLS].copy()
    out[META_COLS] = out[META_COLS].astype(np.int8)
    return out.reset_index(drop=True)


def read_competition(root: str | Path, images: bool = False) -> Competition:
    """The validated competition, or DataError listing every problem. Stages call this before anything else."""
    problems, comp = check_competition(root, images=images)
    if problems:
        raise DataError(problems)
    assert comp is not None
    return comp


def read_test_set(root: str | Path, images: bool = True, workers: int = 8) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``test.csv`` and ``sample_submission.csv`` (and the test images) checked alone: what inference needs.

    A Kaggle notebook's competition folder may hold a hidden test set and no usable training data; ``predict``
    reads only these. Raises DataError listing every problem.
    """
    root = Path(root)
    problems: list[Problem] = []
    if why := not_a_folder(root):
        raise DataError([Problem(str(root), "folder", f"competition folder {why}")])
    test = _read_csv(root / "test.csv", problems)
    sample = _read_csv(root / "sample_submission.csv", problems)
    if test is not None:
        _check_columns(test, TEST_COLS, "test.csv", problems)
        _check_rows(test, "test.csv", problems, target=False)
    if sample is not None:
        _check_columns(sample, SUBMISSION_COLS, "sample_submission.csv", problems)
    for name, df in (("test.csv", test), ("sample_submission.csv", sample)):
        if df is not None and len(df) == 0:
            problems.append(Problem(name, "file", "has no rows (only a header): there is nothing to predict"))
    has_t, has_s = test is not None and ID in test.columns, sample is not None and ID in sample.columns
    if has_s:
        _check_ids(sample, "sample_submission.csv", problems)
    if has_t and has_s:
        _check_sample_ids(test, sample, problems)
    if has_t and images:
        problems += check_images(root, "test", _named_ids(test), workers)
    if problems:
        raise DataError(problems)
    return _typed_test(test), sample
