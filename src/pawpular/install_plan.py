"""What to pip-install on this machine: the tested CPU set, or the torch and RAPIDS builds that match the driver.

Standard library only: ``run.sh`` runs it with the system python before the venv holds anything, and a Kaggle
notebook can run it with the image's own python::

    python src/pawpular/install_plan.py                                 # print the plan for this python
    python src/pawpular/install_plan.py --run                           # carry it out
    python3 -I src/pawpular/install_plan.py --python .venv/bin/python --run --quiet     # what ./run.sh does

Facts (each gathered by one small function, so tests can fake it): ``nvidia-smi`` (the driver's "CUDA Version:
X.Y", the newest CUDA it runs, and its GPUs with their compute capability), the target python's torch (installed
version, the CUDA it was built for, ``torch.cuda.is_available()``), the tested versions in ``constraints.txt``,
and the overrides ``PAWPULAR_GPU=0|1`` (default: a GPU install when nvidia-smi lists a GPU), ``PAWPULAR_CUDA=12|13``
(the CUDA major of the builds; default: the driver's, or that of a torch that already uses the GPU) and
``PAWPULAR_TORCH_INDEX`` (a wheel index instead of download.pytorch.org/whl/cuXXX).

The rules:

- CPU: ``requirements.txt -c constraints.txt``: the exact versions CI tests.
- GPU: a torch that already uses the GPU is kept (pinned to its installed version, so nothing replaces it). A torch
  whose build cannot (none, CPU-only, or built for another CUDA major than the one chosen) is replaced by the
  tested version from PyTorch's index for that major. Then ``requirements-gpu.txt`` with ``PAWPULAR_CUDA`` set,
  which names ``cuml-cuXX`` / ``cudf-cuXX`` (pip expands ``${PAWPULAR_CUDA}`` in requirement files); RAPIDS is
  left out where it cannot run (GPU too old, driver too old). The GPU set is resolved by pip within the lower
  bounds and RAPIDS's own pins (cuDF pins pandas and pyarrow), not locked to constraints.txt.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

# The machine's facts (GpuInfo, parse_nvidia_smi, read_tested are re-exported: doctor and the tests use them here)
if __package__:  # imported as pawpular.install_plan
    from .machine import (ENV_KEYS, ROOT, Driver, Facts, GpuInfo, Runner, TorchInfo, gather_facts,  # noqa: F401
                          parse_nvidia_smi, probe_torch, read_driver, read_tested)
else:  # run as a file with `python -I` (no sys.path entry for this folder): the sibling by its path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine import (ENV_KEYS, ROOT, Driver, Facts, GpuInfo, Runner, TorchInfo, gather_facts,  # noqa
                         parse_nvidia_smi, probe_torch, read_driver, read_tested)
    sys.path.pop(0)

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


# ---------------------------------------------------------------------------------------------------------------
# Verdicts shared with `pawpular doctor` and backend.resolve_device


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
    """Whether torch uses the GPU, and if the driver lists one torch cannot use, why and whether a torch build fixes it."""
    if torch is not None and torch.available and torch.error is None:
        return TorchVerdict(True)
    if driver is None or not driver.gpus or gpus_hidden(env):
        return TorchVerdict(False)
    where = f"the driver {driver.version or '?'} runs CUDA {driver.cuda_text} at most"
    if driver.cuda and driver.cuda[0] < min(SUPPORTED_CUDA):
        return TorchVerdict(False, f"torch {torch.label if torch else '(not installed)'} cannot use it: {where}, older "
                                   "than any torch or RAPIDS build pawpular installs (CUDA 12 or 13)")
    if torch is None:
        return TorchVerdict(False, "torch is not installed", True)
    if torch.error:
        return TorchVerdict(False, f"torch {torch.dist} does not import ({torch.error})", True)
    if torch.cuda is None:
        return TorchVerdict(False, f"torch {torch.label} is a CPU-only build", True)
    if driver.cuda and (torch.cuda_major or 0) > driver.cuda[0]:
        return TorchVerdict(False, f"torch {torch.label} is built for CUDA {torch.cuda} while {where}", True)
    return TorchVerdict(False, f"torch {torch.label} (built for CUDA {torch.cuda}) sees no GPU although {where} and "
                               f"lists {gpu_names(driver)}")


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
    return [python, "-m", "pip", "install", *torch_requirements(major, tested, env), "--index-url", torch_index(major, env)]


def torch_fix(python: str, driver: Driver | None, tested: Mapping[str, str], env: Mapping[str, str] = {}) -> str:
    """What to run so that torch uses the GPU the driver lists (one command, then the installer alternative)."""
    if driver is not None and driver.cuda and driver.cuda[0] < min(SUPPORTED_CUDA):
        return ("update the NVIDIA driver to one that runs CUDA 12 (driver >= 525) or CUDA 13 (>= 580); torch and "
                "RAPIDS have no builds for this one")
    major = cuda_major({k: v for k, v in env.items() if k == "PAWPULAR_CUDA"}, driver) or min(SUPPORTED_CUDA)
    return (f"install the CUDA {major} build of torch into this python:  "
            f"{shlex.join(torch_install_command(python, major, tested, env))}  "
            f"(in a checkout, `{shlex.quote(python)} src/pawpular/install_plan.py --run` plans it and adds RAPIDS)")


def rapids_requirements(major: int) -> list[str]:
    return [f"{name}-cu{major}{RAPIDS_SPEC}" for name in RAPIDS_PACKAGES]


def rapids_blocker(major: int, driver: Driver | None) -> str | None:
    """Why RAPIDS for CUDA ``major`` cannot run here (driver or GPU too old), else None."""
    if driver is None:
        return None
    need = RAPIDS_MIN_DRIVER[major]
    if driver.cuda and driver.cuda < need:
        return f"RAPIDS for CUDA {major} needs a driver that runs CUDA {need[0]}.{need[1]}; this one runs {driver.cuda_text}"
    gpu = driver.gpus[0] if driver.gpus else None
    return capability_blocker(major, gpu.name, gpu.capability) if gpu is not None else None


def capability_blocker(major: int, gpu_name: str, capability: tuple[int, int] | None) -> str | None:
    """Why RAPIDS for CUDA ``major`` cannot run on a GPU of ``capability`` (the rule the installer, the runtime
    and ``pawpular doctor`` all apply); None when it can or the capability is unknown."""
    cap = RAPIDS_MIN_CAPABILITY[major]
    if capability is not None and tuple(capability) < cap:
        return (f"RAPIDS for CUDA {major} needs compute capability {cap[0]}.{cap[1]} or newer; GPU 0 ({gpu_name}) has "
                f"compute capability {capability[0]}.{capability[1]}")
    return None


# ---------------------------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class Step:
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)  # set for this command only

    def shell(self) -> str:
        return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in self.env.items()), shlex.join(self.argv)])


@dataclass(frozen=True)
class Plan:
    mode: str  # "cpu" | "gpu"
    cuda: int | None  # CUDA major of the GPU builds
    steps: tuple[Step, ...]
    notes: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return self.mode if self.cuda is None else f"{self.mode} cu{self.cuda}"


def _pins(torch: TorchInfo) -> list[str]:
    """Requirements that keep the installed torch (and torchvision) exactly as they are."""
    return [f"torch=={torch.dist}"] + ([f"torchvision=={torch.torchvision}"] if torch.torchvision else [])


def make_plan(facts: Facts) -> Plan:
    env, driver, torch = facts.env, facts.driver, facts.torch
    pip = [facts.python, "-m", "pip", "install"]
    verdict = torch_verdict(torch, driver, env)
    keep = _pins(torch) if verdict.usable and torch is not None else []
    notes: list[str] = []

    major = None
    if wants_gpu(env, driver):
        major = cuda_major(env, driver, torch)
        if major is None and driver is not None and driver.cuda:
            notes.append(f"WARNING: {verdict.problem or 'the driver is too old'}: installing the CPU set; "
                         f"{torch_fix(facts.python, driver, facts.tested, env)}")
        elif major is None:
            raise PlanError("a GPU install was asked for (PAWPULAR_GPU=1) but no NVIDIA driver says which CUDA it runs "
                            "(nvidia-smi): set PAWPULAR_CUDA=12 or 13 to choose the builds")

    if major is None:  # the CPU set
        why = ("PAWPULAR_GPU=0" if env.get("PAWPULAR_GPU", "").strip() == "0" else
               "no NVIDIA driver: nvidia-smi not found" if driver is None else
               f"nvidia-smi failed: {driver.error}" if driver.error else
               "nvidia-smi lists no GPU" if not driver.gpus else "")
        if keep:
            notes.append(f"keeping torch {torch.label}: it uses the GPU (constraints.txt would replace it)")
            return Plan("cpu", None, (Step((*pip, "-r", "requirements.txt", *keep)),), tuple(notes))
        notes.append("CPU install" + (f" ({why})" if why else "") + ": requirements.txt at the tested versions "
                     "in constraints.txt")
        return Plan("cpu", None, (Step((*pip, "-r", "requirements.txt", "-c", "constraints.txt")),), tuple(notes))

    where = f"driver {driver.version}, CUDA {driver.cuda_text}, {gpu_names(driver)}" if driver and driver.gpus else \
        "no driver visible: PAWPULAR_GPU=1"
    notes.append(f"GPU install for CUDA {major} ({where})")
    steps = []
    if verdict.usable and torch is not None:
        notes.append(f"keeping torch {torch.label}: it already uses the GPU")
        if torch.cuda_major != major:
            notes.append(f"note: torch is built for CUDA {torch.cuda} but the RAPIDS builds are for CUDA {major} "
                         "(PAWPULAR_CUDA)")
    elif torch is None or torch.error or torch.cuda_major != major:
        what = verdict.problem or ("torch is not installed" if torch is None else f"torch {torch.label} is not a "
                                   f"CUDA {major} build")
        notes.append(f"{what}: installing torch for CUDA {major} from {torch_index(major, env)}")
        steps.append(Step(tuple(torch_install_command(facts.python, major, facts.tested, env))))
        keep = torch_requirements(major, facts.tested, env)
    elif driver is None or not driver.gpus:  # PAWPULAR_GPU=1 on a machine without a GPU (an image built for one)
        notes.append(f"keeping torch {torch.label}: a CUDA {major} build (no GPU here to try it on)")
        keep = _pins(torch)
    else:  # the right build, yet it sees no GPU: a reinstall would not help; keep it and say so loudly
        notes.append(f"WARNING: {verdict.problem or 'torch sees no GPU'}; keeping it (`pawpular doctor` says more)")
        keep = _pins(torch)

    blocker = rapids_blocker(major, driver)
    if blocker:
        notes.append(f"{blocker}: no RAPIDS, the SVR head runs on scikit-learn")
        steps.append(Step((*pip, "-r", "requirements.txt", *keep)))
    else:
        steps.append(Step((*pip, "-r", "requirements-gpu.txt", *keep, "--extra-index-url", NVIDIA_INDEX),
                          {"PAWPULAR_CUDA": str(major)}))
    return Plan("gpu", major, tuple(steps), tuple(notes))


def plan_key(facts: Facts) -> str:
    """What the install depends on besides the requirement files, without asking torch (fast): run.sh hashes it
    with them and reinstalls only when it changes ('cpu', 'gpu cu12', plus an index override)."""
    key = make_plan(replace(facts, torch=None)).key
    index = facts.env.get("PAWPULAR_TORCH_INDEX", "").strip()
    return f"{key} index={index}" if index and key != "cpu" else key


def execute(plan: Plan, root: Path = ROOT, quiet: bool = False,
            run: Callable[..., int] = lambda argv, env, cwd: subprocess.run(argv, env=env, cwd=cwd).returncode) -> int:
    """Print and run each step from ``root``; stop at the first failure and return its exit code."""
    for note in plan.notes:
        print(f"[install] {note}", flush=True)
    for step in plan.steps:
        argv = list(step.argv)
        if quiet and argv[1:4] == ["-m", "pip", "install"]:
            argv[4:4] = ["-q", "--disable-pip-version-check"]
        print(f"[install] $ {Step(tuple(argv), step.env).shell()}", flush=True)
        rc = run(argv, {**os.environ, **step.env}, str(root))
        if rc != 0:
            print(f"[install] failed (exit {rc}): {Step(tuple(argv), step.env).shell()}", file=sys.stderr)
            return rc
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="install_plan.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--python", default=sys.executable, help="the interpreter to install into (default: this one)")
    p.add_argument("--root", type=Path, default=ROOT, help="the checkout holding requirements*.txt")
    p.add_argument("--key", action="store_true", help="print only what the install depends on (for run.sh's stamp)")
    p.add_argument("--run", action="store_true", help="run the commands instead of printing them")
    p.add_argument("--quiet", action="store_true", help="pip -q")
    args = p.parse_args(argv)
    try:
        if args.key:  # no torch probe: this runs on every ./run.sh
            print(plan_key(Facts(read_driver(), None, {k: os.environ[k] for k in ENV_KEYS if k in os.environ})))
            return 0
        facts = gather_facts(args.python, args.root)
        plan = make_plan(facts)
    except PlanError as e:
        print(f"install_plan: error: {e}", file=sys.stderr)
        return 2
    if not args.run:
        print(f"# pawpular install plan ({plan.key}); run from {args.root}")
        print("\n".join([*(f"# {n}" for n in plan.notes), *(s.shell() for s in plan.steps)]))
        return 0
    rc = execute(plan, args.root, args.quiet)
    if rc == 0 and plan.mode == "gpu" and facts.driver is not None and facts.driver.gpus:
        verdict = torch_verdict(probe_torch(args.python), facts.driver, facts.env)
        if verdict.problem:
            print(f"[install] WARNING: after the install, {verdict.problem}: the pipeline would run on the CPU. "
                  "`pawpular doctor` says more.", file=sys.stderr)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
