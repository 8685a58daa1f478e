"""The only module that imports cudf / cuml / cupy. Decides the device once and picks GPU or CPU implementations.

``device: auto`` means CUDA when torch sees a GPU, else CPU. RAPIDS (cuML, cuDF) is used only on a CUDA device
where it is installed (``requirements-gpu.txt``); otherwise scikit-learn and pandas, which give the same results.
"""
from __future__ import annotations

import functools
import importlib.util
import logging

log = logging.getLogger("pawpular")


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
    log.info("device: %s (%s; asked for %s)", resolved, name, device)
    return resolved


@functools.lru_cache(maxsize=None)
def has_rapids() -> bool:
    """True when cuML and cuDF are importable (GPU machines with requirements-gpu.txt)."""
    return importlib.util.find_spec("cuml") is not None and importlib.util.find_spec("cudf") is not None


def use_rapids(device: str) -> bool:
    return resolve_device(device) == "cuda" and has_rapids()
