"""The only module that imports cudf / cuml / cupy. Decides the device once and picks GPU or CPU implementations.

``device: auto`` means CUDA when torch sees a GPU, else CPU. RAPIDS (cuML, cuDF) is used only on a CUDA device
where it is installed (``requirements-gpu.txt``); otherwise scikit-learn and pandas, which give the same results.

- ``build_svr(device, C=..., epsilon=...)``: the SVR head declared once (``SVR_ARGS``): a cuML ``SVR`` on a
  RAPIDS GPU and a scikit-learn ``SVR`` elsewhere, with the same shared arguments.
- ``array_module(device)``: ``cupy`` or ``numpy``, so array code is written once.
- ``read_table`` / ``write_table``: parquet through cuDF on a RAPIDS GPU (the data stays on the device), through
  pandas / pyarrow elsewhere; writes are atomic; the files hold the same columns and values either way.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd

from .files import atomic_path

log = logging.getLogger("pawpular")


_LOGGED: set[str] = set()


@functools.lru_cache(maxsize=None)
def resolve_device(device: str = "auto") -> str:
    """'cpu' or 'cuda', decided once per process and logged."""
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    has_cuda = torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        raise RuntimeError("device: cuda was asked for, but torch sees no CUDA GPU")
    resolved = "cuda" if device == "cuda" or (device == "auto" and has_cuda) else "cpu"
    name = torch.cuda.get_device_name(0) if resolved == "cuda" else "CPU"
    if resolved not in _LOGGED:  # once per process, however many stages ask
        _LOGGED.add(resolved)
        log.info("device: %s (%s; asked for %s)", resolved, name, device)
    return resolved


@functools.lru_cache(maxsize=None)
def has_rapids() -> bool:
    """True when cuML and cuDF are importable (GPU machines with requirements-gpu.txt)."""
    return importlib.util.find_spec("cuml") is not None and importlib.util.find_spec("cudf") is not None


def use_rapids(device: str) -> bool:
    return resolve_device(device) == "cuda" and has_rapids()


# ---------------------------------------------------------------------------------------------------------------
# One estimator definition, two implementations


# epsilon-SVR with an RBF kernel: the arguments both libraries receive. cache_size is MiB of kernel rows in both
# (scikit-learn's default of 200 is too small to hold the rows of a Pawpularity fold, cuML's default is 1024).
SVR_ARGS = {"kernel": "rbf", "tol": 1e-3, "cache_size": 1024.0, "max_iter": -1}


def svr_class(device: str) -> type:
    """cuML's SVR on a RAPIDS GPU, scikit-learn's elsewhere: callers never branch on the device."""
    if use_rapids(device):
        from cuml.svm import SVR
    else:
        from sklearn.svm import SVR
    return SVR


def build_svr(device: str, **params: Any) -> Any:
    """The SVR head's estimator with the shared arguments; ``params`` (C, epsilon, kernel, gamma) override them."""
    return svr_class(device)(**{**SVR_ARGS, **params})


# cuML SVR accepts kernel='precomputed' from this release on (cuML PR #7616).
CUML_PRECOMPUTED = (26, 2)


def svr_precomputed_ok(device: str) -> bool:
    """Whether the chosen SVR implementation fits on a precomputed kernel matrix."""
    if not use_rapids(device):
        return True
    import cuml

    try:
        version = tuple(int(p) for p in cuml.__version__.split(".")[:2])
    except ValueError:
        return False
    return version >= CUML_PRECOMPUTED


def portable(estimator: Any) -> Any:
    """A scikit-learn copy of a fitted cuML estimator when cuML can convert it (``as_sklearn``), else itself.

    Pickles of scikit-learn estimators load on any machine; pickles of cuML ones need cuML and a GPU.
    """
    if type(estimator).__module__.startswith("cuml") and hasattr(estimator, "as_sklearn"):
        try:
            return estimator.as_sklearn()
        except Exception as e:  # an estimator state cuML cannot convert: keep the GPU model
            log.warning("could not convert %s to scikit-learn (%s): it will need cuML to load",
                        type(estimator).__name__, e)
    return estimator


# ---------------------------------------------------------------------------------------------------------------
# Arrays and tables: CuPy / cuDF on a RAPIDS GPU, NumPy / pandas otherwise


def array_module(device: str) -> ModuleType:
    """``cupy`` when the device uses RAPIDS, else ``numpy``: array code written once against ``xp``."""
    if use_rapids(device):
        import cupy

        return cupy
    return np


def on_gpu(x: Any) -> bool:
    """Whether ``x`` is a CuPy array or a cuDF table or column."""
    return type(x).__module__.split(".")[0] in ("cupy", "cudf")


def array_module_of(x: Any) -> ModuleType:
    """``cupy`` for a CuPy array, else ``numpy``."""
    if on_gpu(x):
        import cupy

        return cupy
    return np


def to_numpy(x: Any) -> np.ndarray:
    """A host NumPy array from a NumPy or CuPy array (or anything ``np.asarray`` takes)."""
    if type(x).__module__.split(".")[0] == "cupy":
        return x.get()
    return np.asarray(x)


def read_table(path: str | Path, device: str, columns: list[str] | None = None) -> Any:
    """A parquet table: a cuDF DataFrame on a RAPIDS GPU (the data goes straight to the device), else pandas."""
    if use_rapids(device):
        import cudf

        return cudf.read_parquet(path, columns=columns)
    return pd.read_parquet(path, columns=columns)


def write_table(df: Any, path: str | Path, device: str) -> None:
    """Write a pandas or cuDF table to parquet atomically, through cuDF on a RAPIDS GPU. Same columns either way."""
    with atomic_path(path) as tmp:
        if use_rapids(device):
            import cudf

            gdf = df if isinstance(df, cudf.DataFrame) else cudf.DataFrame.from_pandas(df)
            gdf.to_parquet(tmp, index=False)
        else:
            (df.to_pandas() if on_gpu(df) else df).to_parquet(tmp, index=False)


def column_values(df: Any, column: str) -> np.ndarray:
    """One column of a pandas or cuDF table as a host NumPy array (e.g. the Ids, to align tables)."""
    col = df[column]
    return (col.to_pandas() if on_gpu(col) else col).to_numpy()


def table_matrix(df: Any, columns: list[str], dtype: Any = np.float32) -> Any:
    """Columns of a table as one 2-D array on the table's device (CuPy for cuDF, NumPy for pandas)."""
    if on_gpu(df):
        return df[columns].to_cupy(dtype=dtype)
    return df[columns].to_numpy(dtype=dtype)
