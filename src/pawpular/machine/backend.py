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
import importlib.metadata
import importlib.util
import logging
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd

from ..store.errors import PawpularError
from ..store.files import atomic_path
from . import cuda_builds, install_plan

log = logging.getLogger("pawpular")


class DeviceError(PawpularError, RuntimeError):
    """``device: cuda`` on a machine where torch cannot use a GPU; the message says why and the fix."""


_LOGGED: set[str] = set()
NO_DEVICE = "none"  # device: cuda where torch can use no GPU


def choose_device(asked: str, cuda_usable: bool) -> str:
    """The device rule, for this machine (``resolve_device``) and for the facts ``pawpular doctor`` gathered:
    cpu when asked; cuda when torch can use a GPU and the config allows it; "none" for device: cuda without one."""
    if asked == "cpu":
        return "cpu"
    if cuda_usable:
        return "cuda"
    return NO_DEVICE if asked == "cuda" else "cpu"


@functools.cache
def resolve_device(device: str = "auto") -> str:
    """'cpu' or 'cuda', decided once per process and logged.

    Never a silent CPU run: when nvidia-smi lists a GPU that torch cannot use (a CPU-only torch, or one built for a
    newer CUDA than the driver runs), ``auto`` logs a warning that names the torch build, the driver's CUDA version
    and the fix, and ``cuda`` raises with them.
    """
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise DeviceError(f"device must be auto, cpu or cuda, got {device!r}")
    has_cuda = torch.cuda.is_available()
    unusable = None if has_cuda or device == "cpu" else unusable_gpu()
    resolved = choose_device(device, has_cuda)
    if resolved == NO_DEVICE:
        raise DeviceError(
            "device: cuda was asked for, but "
            + (unusable or "torch sees no CUDA GPU and no NVIDIA driver lists one (nvidia-smi)")
        )
    if unusable and "unusable-gpu" not in _LOGGED:
        _LOGGED.add("unusable-gpu")
        log.warning("device: auto falls back to the CPU for every stage: %s", unusable)
    name = torch.cuda.get_device_name(0) if resolved == "cuda" else "CPU"
    if resolved not in _LOGGED:  # once per process, however many stages ask
        _LOGGED.add(resolved)
        log.info("device: %s (%s; asked for %s)", resolved, name, device)
    return resolved


def unusable_gpu() -> str | None:
    """Why a GPU that nvidia-smi lists is out of this torch's reach, with the fix; None when torch uses it or
    there is none (no nvidia-smi: a PATH lookup, nothing more)."""
    import torch

    driver = install_plan.read_driver()
    if driver is None or not driver.gpus:
        return None
    info = install_plan.TorchInfo(
        dist=_dist_version("torch") or torch.__version__,
        version=torch.__version__,
        cuda=torch.version.cuda,
        available=torch.cuda.is_available(),
    )
    verdict = cuda_builds.torch_verdict(info, driver, os.environ)
    if verdict.problem is None:
        return None
    fix = cuda_builds.torch_fix(sys.executable, driver, install_plan.read_tested(), os.environ)
    return f"nvidia-smi lists {cuda_builds.gpu_names(driver)} but {verdict.problem}. Fix: {fix}"


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class RapidsStatus:
    """Whether RAPIDS is here and imports: the versions when it does, the import error when it does not."""

    installed: bool  # a cuml or cudf package is present
    cuml: str | None = None
    cudf: str | None = None
    error: str | None = None  # 'ImportError: libcuml++.so: ...' when installed but not importable
    dists: tuple[str, ...] = ()  # the installed RAPIDS distributions, e.g. ('cudf-cu12', 'cuml-cu12')

    @property
    def ok(self) -> bool:
        return self.installed and self.error is None and self.cuml is not None and self.cudf is not None

    @property
    def cuda_major(self) -> int | None:
        """The CUDA major of the installed wheels (cuml-cu12 -> 12)."""
        majors = {int(d.rsplit("-cu", 1)[1]) for d in self.dists if d.rsplit("-cu", 1)[-1].isdigit()}
        return majors.pop() if len(majors) == 1 else None


def rapids_status() -> RapidsStatus:
    """Import cuML and cuDF (not just find them): a broken install is reported with its error, not crashed on."""
    dists = tuple(
        f"{name}-cu{major}"
        for name in cuda_builds.RAPIDS_PACKAGES
        for major in cuda_builds.SUPPORTED_CUDA
        if _dist_version(f"{name}-cu{major}") is not None
    )
    found = {name: importlib.util.find_spec(name) is not None for name in cuda_builds.RAPIDS_PACKAGES}
    if not any(found.values()):
        return RapidsStatus(False, dists=dists)
    missing = [name for name, ok in found.items() if not ok]
    if missing:
        return RapidsStatus(True, error=f"{' and '.join(missing)} not installed (only half of RAPIDS is)", dists=dists)
    try:
        cuml = importlib.import_module("cuml")
        cudf = importlib.import_module("cudf")
    except Exception as e:  # ImportError, OSError for a missing libcu*.so, RuntimeError for a CUDA mismatch...
        return RapidsStatus(True, error=f"{type(e).__name__}: {e}", dists=dists)
    return RapidsStatus(
        True, str(getattr(cuml, "__version__", "?")), str(getattr(cudf, "__version__", "?")), None, dists
    )


def rapids_fix(status: RapidsStatus, python: str = sys.executable, major: int | None = None) -> str:
    """Reinstall RAPIDS for the CUDA major in use (replacing wheels of another major), or remove it."""
    major = major or status.cuda_major or min(cuda_builds.SUPPORTED_CUDA)
    remove = [python, "-m", "pip", "uninstall", "-y", *(status.dists or cuda_builds.RAPIDS_PACKAGES)]
    install = [
        python,
        "-m",
        "pip",
        "install",
        *cuda_builds.rapids_requirements(major),
        "--extra-index-url",
        cuda_builds.NVIDIA_INDEX,
    ]
    if status.cuda_major == major or not status.dists:
        fix = f"reinstall RAPIDS for CUDA {major}:  {shlex.join(install[:4] + ['--force-reinstall'] + install[4:])}"
    else:
        fix = f"replace it with RAPIDS for CUDA {major}:  {shlex.join(remove)} && {shlex.join(install)}"
    return f"{fix}  or remove it (scikit-learn and pandas give the same results, slower):  {shlex.join(remove)}"


def rapids_gpu_blocker(status: RapidsStatus, gpu_name: str, capability: tuple[int, int] | None) -> str | None:
    """Why the installed RAPIDS cannot run on GPU 0 (``cuda_builds.capability_blocker`` for its CUDA major)."""
    return cuda_builds.capability_blocker(status.cuda_major or min(cuda_builds.SUPPORTED_CUDA), gpu_name, capability)


def _gpu0() -> tuple[str, tuple[int, int] | None]:
    import torch

    if not torch.cuda.is_available():
        return "", None
    return torch.cuda.get_device_name(0), tuple(torch.cuda.get_device_capability(0))


@functools.cache
def has_rapids() -> bool:
    """True when cuML and cuDF import and can run on GPU 0. A RAPIDS install that does not import (or a GPU it
    does not support) falls back to scikit-learn and pandas with one warning naming the reason."""
    status = rapids_status()
    if not status.installed:
        return False
    if status.error:
        import torch

        major = int(torch.version.cuda.split(".")[0]) if torch.version.cuda else None  # RAPIDS to match torch
        log.warning(
            "RAPIDS is installed but does not import (%s): the SVR head runs on scikit-learn and tables go "
            "through pandas. Fix: %s",
            status.error,
            rapids_fix(status, major=major),
        )
        return False
    blocker = rapids_gpu_blocker(status, *_gpu0())
    if blocker:
        log.warning(
            "RAPIDS %s is installed but %s: the SVR head runs on scikit-learn and tables go through pandas",
            status.cuml,
            blocker,
        )
        return False
    return True


def rapids_usable(device: str, status: RapidsStatus, blocker: str | None) -> bool:
    """The rule ``use_rapids`` applies here and ``pawpular doctor`` to the facts it gathered."""
    return device == "cuda" and status.ok and blocker is None


def use_rapids(device: str) -> bool:
    """cuML / cuDF for this device: a CUDA device and a RAPIDS that imports and runs there."""
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


def cuml_takes_precomputed(version: str | None) -> bool:
    """Whether a cuML of ``version`` ('26.02.00') fits its SVR on a precomputed kernel matrix."""
    try:
        return tuple(int(p) for p in (version or "").split(".")[:2]) >= CUML_PRECOMPUTED
    except ValueError:
        return False


def svr_precomputed_ok(device: str) -> bool:
    """Whether the chosen SVR implementation fits on a precomputed kernel matrix."""
    if not use_rapids(device):
        return True
    import cuml

    return cuml_takes_precomputed(cuml.__version__)


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
