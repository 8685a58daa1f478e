"""The competition's metric, shared by every stage, the report and the benchmarks."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def rmse(pred: Iterable[float], target: Iterable[float]) -> float:
    """Root mean squared error in float64; NaN for empty input (a head with no predictions yet)."""
    d = np.asarray(pred, np.float64) - np.asarray(target, np.float64)
    return float(np.sqrt(np.mean(d**2))) if d.size else float("nan")
