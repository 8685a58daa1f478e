"""``submission.csv``: built in sample_submission order, checked as Kaggle's grader checks it, written atomically.

Used by the ensemble stage and by ``predict``; an invalid submission is never written.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..data.tables import ID, TARGET
from ..store.errors import PawpularError
from ..store.files import write_csv


class SubmissionError(PawpularError, ValueError):
    """A submission the grader would reject (columns, Ids, values); never written."""


def _ids(s: pd.Series) -> str:
    v = s.astype(str).tolist()
    return ", ".join(v[:5]) + (f" ... ({len(v)} in all)" if len(v) > 5 else "")


def validate_submission(sub: pd.DataFrame, sample: pd.DataFrame) -> None:
    """Check ``sub`` as the grader does; raise SubmissionError naming the first Ids that fail."""
    if list(sub.columns) != [ID, TARGET]:
        raise SubmissionError(
            f"submission columns must be exactly {ID},{TARGET}; got {','.join(map(str, sub.columns))}"
        )
    if sub[ID].duplicated().any():
        raise SubmissionError(f"submission has duplicated Ids: {_ids(sub[ID][sub[ID].duplicated()])}")
    missing = sample[ID][~sample[ID].isin(sub[ID])]
    extra = sub[ID][~sub[ID].isin(sample[ID])]
    if len(missing) or len(extra):
        raise SubmissionError(
            "submission Ids differ from sample_submission.csv: "
            + (f"missing {_ids(missing)}" if len(missing) else "")
            + ("; " if len(missing) and len(extra) else "")
            + (f"not in the sample {_ids(extra)}" if len(extra) else "")
        )
    values = pd.to_numeric(sub[TARGET], errors="coerce")
    if values.isna().any():
        raise SubmissionError(
            f"submission has missing or non-numeric Pawpularity for Ids {_ids(sub[ID][values.isna()])}"
        )
    bad = (values < 1) | (values > 100)
    if bad.any():
        raise SubmissionError(
            f"submission Pawpularity outside [1, 100] for Ids {_ids(sub[ID][bad])} (e.g. {values[bad].iloc[0]:g})"
        )


def build_submission(test_pred: pd.DataFrame, sample: pd.DataFrame) -> pd.DataFrame:
    """Id, Pawpularity in sample order, clipped to [1, 100], validated (raises SubmissionError)."""
    missing = sample[ID][~sample[ID].isin(test_pred[ID])]
    if len(missing):
        raise SubmissionError(
            f"no prediction for {len(missing)} sample_submission Id(s), missing "
            + ", ".join(missing.astype(str).tolist()[:5])
        )
    sub = sample[[ID]].merge(test_pred[[ID, "pred"]], on=ID, how="left").rename(columns={"pred": TARGET})
    sub[TARGET] = sub[TARGET].clip(1, 100)
    validate_submission(sub, sample)
    return sub


def write_submission(test_pred: pd.DataFrame, sample: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Build, validate, then write atomically (an invalid one is never written)."""
    sub = build_submission(test_pred, sample)
    write_csv(sub, path, float_format="%.5f")
    return sub


def check_output_path(path: Path) -> None:
    """Fail before long work when ``path`` cannot become a file: a folder, or a parent that is not writable."""
    import errno
    import os

    from ..store.errors import UsageError, WriteError

    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path} is a directory: give a file name, e.g. {path / 'submission.csv'}")
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(e.errno, e.strerror, str(path)) from None
    if not os.access(parent, os.W_OK):
        raise WriteError(errno.EACCES, f"{parent} is not writable", str(path))
