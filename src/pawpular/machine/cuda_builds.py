"""Which builds of torch and RAPIDS fit a machine: the CUDA majors pawpular installs for, their wheel indexes and
versions, and the verdicts on the machine's facts (does torch use the GPU, and if not why and what fixes it; can
RAPIDS run on this driver and GPU). One set of rules, applied by the installer (``install_plan.py``), at run time
(``backend.py``) and by ``pawpular doctor``.

Standard library only, like ``machine/install_plan.py`` (``run.sh`` runs that before the venv holds anything).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .facts import Driver, TorchInfo

# PyTorch's wheel index per CUDA major. torch 2.14 ships one CUDA 12 build, cu126 (the last: 2.15 drops it), which
# also keeps Pascal GPUs such as Kaggle's P100; cu130 runs on every CUDA 13 driver.
TORCH_INDEX = {12: "https://download.pytorch.org/whl/cu126", 13: "https://download.pytorch.org/whl/cu130"}
SUPPORTED_CUDA = tuple(TORCH_INDEX)
NVIDIA_INDEX = "https://pypi.nvidia.com"
# Keep in step with requirements-gpu.txt (a test checks). 26.02 is the first cuML whose SVR takes precomputed kernels.
RAPIDS_SPEC = ">=26.2,<27"
RAPIDS_PACKAGES = ("cuml", "cudf")
# RAPIDS 26.x platform support: the driver's CUDA and the GPU's compute capability, per CUDA major.
RAPIDS_MIN_DRIVER = {12: (12, 2), 13: (13, 0)}
RAPIDS_MIN_CAPABILITY = {12: (7, 0), 13: (7, 5)}


class PlanError(ValueError):
    """An override or a machine the installer cannot plan for; the message says what to set."""


@dataclass(frozen=True)
class TorchVerdict:
    usable: bool  # torch sees a GPU
    problem: str | None = None  # why the GPUs the driver lists are out of torch's reach (None: usable or no GPU)
    wrong_build: bool = False  # installing torch built for the driver's CUDA fixes it


def gpus_hidden(env: Mapping[str, str]) -> bool:
    """CUDA_VISIBLE_DEVICES set to nothing (or -1): the user hid the GPUs on purpose."""
    value = env.get("CUDA_VISIBLE_DEVICES")
    return value is not None and value.strip() in ("", "-1")


def gpu_names(driver: Driver) -> str:
    names = [g.name for g in driver.gpus]
    return ", ".join(names) if len(set(names)) > 1 else f"{len(names)} x {names[0]}" if len(names) > 1 else names[0]


def torch_verdict(torch: TorchInfo | None, driver: Driver | None, env: Mapping[str, str] = {}) -> TorchVerdict:
    """Whether torch uses the GPU, and if the driver lists one torch cannot use, why and whether a torch build fixes
    it."""
    if torch is not None and torch.available and torch.error is None:
        return TorchVerdict(True)
    if driver is None or not driver.gpus or gpus_hidden(env):
        return TorchVerdict(False)
    where = f"the driver {driver.version or '?'} runs CUDA {driver.cuda_text} at most"
    if driver.cuda and driver.cuda[0] < min(SUPPORTED_CUDA):
        return TorchVerdict(
            False,
            f"torch {torch.label if torch else '(not installed)'} cannot use it: {where}, older "
            "than any torch or RAPIDS build pawpular installs (CUDA 12 or 13)",
        )
    if torch is None:
        return TorchVerdict(False, "torch is not installed", True)
    if torch.error:
        return TorchVerdict(False, f"torch {torch.dist} does not import ({torch.error})", True)
    if torch.cuda is None:
        return TorchVerdict(False, f"torch {torch.label} is a CPU-only build", True)
    if driver.cuda and (torch.cuda_major or 0) > driver.cuda[0]:
        return TorchVerdict(False, f"torch {torch.label} is built for CUDA {torch.cuda} while {where}", True)
    return TorchVerdict(
        False,
        f"torch {torch.label} (built for CUDA {torch.cuda}) sees no GPU although {where} and lists {gpu_names(driver)}",
    )


def wants_gpu(env: Mapping[str, str], driver: Driver | None) -> bool:
    flag = env.get("PAWPULAR_GPU", "").strip()
    if flag not in ("", "0", "1"):
        raise PlanError(f"PAWPULAR_GPU must be 0 or 1, got {flag!r}")
    return flag == "1" or (flag == "" and driver is not None and bool(driver.gpus))


def cuda_major(env: Mapping[str, str], driver: Driver | None, torch: TorchInfo | None = None) -> int | None:
    """The CUDA major of the builds: PAWPULAR_CUDA, else that of a torch already using the GPU, else the driver's
    (a driver newer than CUDA 13 runs the CUDA 13 builds); None when the driver is too old or unknown."""
    forced = env.get("PAWPULAR_CUDA", "").strip()
    if forced:
        if not forced.isdigit() or int(forced) not in SUPPORTED_CUDA:
            raise PlanError(f"PAWPULAR_CUDA must be one of {', '.join(map(str, SUPPORTED_CUDA))}, got {forced!r}")
        return int(forced)
    if torch is not None and torch.available and torch.cuda_major in SUPPORTED_CUDA:
        return torch.cuda_major
    if driver is not None and driver.cuda and driver.cuda[0] >= min(SUPPORTED_CUDA):
        return min(driver.cuda[0], max(SUPPORTED_CUDA))
    return None


def torch_index(major: int, env: Mapping[str, str] = {}) -> str:
    return env.get("PAWPULAR_TORCH_INDEX", "").strip() or TORCH_INDEX[major]


def torch_requirements(major: int, tested: Mapping[str, str], env: Mapping[str, str] = {}) -> list[str]:
    """torch and torchvision at the tested versions, with the index's local label ('torch==2.14.1+cu126') so that
    an installed build of the same version (PyPI's, for another CUDA) does not count as already satisfied."""
    label = torch_index(major, env).rstrip("/").rsplit("/", 1)[-1]
    local = f"+{label}" if re.fullmatch(r"cu\d+", label) else ""
    return [f"{name}=={tested[name]}{local}" if name in tested else name for name in ("torch", "torchvision")]


def torch_install_command(python: str, major: int, tested: Mapping[str, str], env: Mapping[str, str] = {}) -> list[str]:
    return [
        python,
        "-m",
        "pip",
        "install",
        *torch_requirements(major, tested, env),
        "--index-url",
        torch_index(major, env),
    ]


def torch_fix(python: str, driver: Driver | None, tested: Mapping[str, str], env: Mapping[str, str] = {}) -> str:
    """What to run so that torch uses the GPU the driver lists (one command, then the installer alternative)."""
    if driver is not None and driver.cuda and driver.cuda[0] < min(SUPPORTED_CUDA):
        return (
            "update the NVIDIA driver to one that runs CUDA 12 (driver >= 525) or CUDA 13 (>= 580); torch and "
            "RAPIDS have no builds for this one"
        )
    major = cuda_major({k: v for k, v in env.items() if k == "PAWPULAR_CUDA"}, driver) or min(SUPPORTED_CUDA)
    return (
        f"install the CUDA {major} build of torch into this python:  "
        f"{shlex.join(torch_install_command(python, major, tested, env))}  "
        f"(in a checkout, `{shlex.quote(python)} src/pawpular/machine/install_plan.py --run` plans it and adds RAPIDS)"
    )


def rapids_requirements(major: int) -> list[str]:
    return [f"{name}-cu{major}{RAPIDS_SPEC}" for name in RAPIDS_PACKAGES]


def rapids_blocker(major: int, driver: Driver | None) -> str | None:
    """Why RAPIDS for CUDA ``major`` cannot run here (driver or GPU too old), else None."""
    if driver is None:
        return None
    need = RAPIDS_MIN_DRIVER[major]
    if driver.cuda and driver.cuda < need:
        return (
            f"RAPIDS for CUDA {major} needs a driver that runs CUDA {need[0]}.{need[1]}; "
            f"this one runs {driver.cuda_text}"
        )
    gpu = driver.gpus[0] if driver.gpus else None
    return capability_blocker(major, gpu.name, gpu.capability) if gpu is not None else None


def capability_blocker(major: int, gpu_name: str, capability: tuple[int, int] | None) -> str | None:
    """Why RAPIDS for CUDA ``major`` cannot run on a GPU of ``capability`` (the rule the installer, the runtime
    and ``pawpular doctor`` all apply); None when it can or the capability is unknown."""
    cap = RAPIDS_MIN_CAPABILITY[major]
    if capability is not None and tuple(capability) < cap:
        return (
            f"RAPIDS for CUDA {major} needs compute capability {cap[0]}.{cap[1]} or newer; GPU 0 ({gpu_name}) has "
            f"compute capability {capability[0]}.{capability[1]}"
        )
    return None
