"""What to pip-install on this machine: the tested CPU set, or the torch and RAPIDS builds that match the driver.

Standard library only: ``run.sh`` runs it with the system python before the venv holds anything, and a Kaggle
notebook can run it with the image's own python::

    python src/pawpular/machine/install_plan.py                                 # print the plan for this python
    python src/pawpular/machine/install_plan.py --run                           # carry it out
    python3 -I src/pawpular/machine/install_plan.py --python .venv/bin/python --run --quiet     # what ./run.sh does

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
import shlex
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

# The machine's facts (GpuInfo, parse_nvidia_smi, read_tested are re-exported: doctor and the tests use them here)
# and the rules on them (machine/cuda_builds.py)
if __package__:  # imported as pawpular.machine.install_plan
    from .cuda_builds import (
        NVIDIA_INDEX,
        PlanError,
        TorchVerdict,
        cuda_major,
        gpu_names,
        rapids_blocker,
        torch_fix,
        torch_index,
        torch_install_command,
        torch_requirements,
        torch_verdict,
        wants_gpu,
    )
    from .facts import ENV_KEYS, ROOT, Facts, TorchInfo, gather_facts, probe_torch, read_driver
    from .facts import Driver as Driver  # re-exported (doctor and the tests use them here)
    from .facts import GpuInfo as GpuInfo
    from .facts import Runner as Runner
    from .facts import parse_nvidia_smi as parse_nvidia_smi
    from .facts import read_tested as read_tested
else:  # run as a file with `python -I` (no sys.path entry for this folder): the siblings by their path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from cuda_builds import (
        NVIDIA_INDEX,
        PlanError,
        TorchVerdict,
        cuda_major,
        gpu_names,
        rapids_blocker,
        torch_fix,
        torch_index,
        torch_install_command,
        torch_requirements,
        torch_verdict,
        wants_gpu,
    )
    from facts import ENV_KEYS, ROOT, Facts, TorchInfo, gather_facts, probe_torch, read_driver
    from facts import Driver as Driver  # re-exported (doctor and the tests use them here)
    from facts import GpuInfo as GpuInfo
    from facts import Runner as Runner
    from facts import parse_nvidia_smi as parse_nvidia_smi
    from facts import read_tested as read_tested

    sys.path.pop(0)

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


def _gpu_major(facts: Facts, verdict: TorchVerdict, notes: list[str]) -> int | None:
    """The CUDA major of a GPU install, or None for the CPU set (a driver too old for any build: with a warning)."""
    env, driver = facts.env, facts.driver
    if not wants_gpu(env, driver):
        return None
    major = cuda_major(env, driver, facts.torch)
    if major is None and driver is not None and driver.cuda:
        notes.append(
            f"WARNING: {verdict.problem or 'the driver is too old'}: installing the CPU set; "
            f"{torch_fix(facts.python, driver, facts.tested, env)}"
        )
    elif major is None:
        raise PlanError(
            "a GPU install was asked for (PAWPULAR_GPU=1) but no NVIDIA driver says which CUDA it runs "
            "(nvidia-smi): set PAWPULAR_CUDA=12 or 13 to choose the builds"
        )
    return major


def _cpu_plan(facts: Facts, keep: list[str], notes: list[str]) -> Plan:
    """requirements.txt at the tested versions, or beside a torch that uses the GPU (kept: pinned as it is)."""
    env, driver, torch = facts.env, facts.driver, facts.torch
    pip = [facts.python, "-m", "pip", "install"]
    why = (
        "PAWPULAR_GPU=0"
        if env.get("PAWPULAR_GPU", "").strip() == "0"
        else "no NVIDIA driver: nvidia-smi not found"
        if driver is None
        else f"nvidia-smi failed: {driver.error}"
        if driver.error
        else "nvidia-smi lists no GPU"
        if not driver.gpus
        else ""
    )
    if keep:
        notes.append(f"keeping torch {torch.label}: it uses the GPU (constraints.txt would replace it)")
        return Plan("cpu", None, (Step((*pip, "-r", "requirements.txt", *keep)),), tuple(notes))
    notes.append(
        "CPU install" + (f" ({why})" if why else "") + ": requirements.txt at the tested versions in constraints.txt"
    )
    return Plan("cpu", None, (Step((*pip, "-r", "requirements.txt", "-c", "constraints.txt")),), tuple(notes))


def _gpu_torch(facts: Facts, major: int, verdict: TorchVerdict, notes: list[str]) -> tuple[list[Step], list[str]]:
    """For a GPU install: the step that installs torch for CUDA ``major`` (none when the one there is kept) and the
    torch requirements the rest of the install must leave as they are."""
    env, driver, torch = facts.env, facts.driver, facts.torch
    if verdict.usable and torch is not None:
        notes.append(f"keeping torch {torch.label}: it already uses the GPU")
        if torch.cuda_major != major:
            notes.append(
                f"note: torch is built for CUDA {torch.cuda} but the RAPIDS builds are for CUDA {major} (PAWPULAR_CUDA)"
            )
        return [], _pins(torch)
    if torch is None or torch.error or torch.cuda_major != major:
        what = verdict.problem or (
            "torch is not installed" if torch is None else f"torch {torch.label} is not a CUDA {major} build"
        )
        notes.append(f"{what}: installing torch for CUDA {major} from {torch_index(major, env)}")
        return (
            [Step(tuple(torch_install_command(facts.python, major, facts.tested, env)))],
            torch_requirements(major, facts.tested, env),
        )
    if driver is None or not driver.gpus:  # PAWPULAR_GPU=1 on a machine without a GPU (an image built for one)
        notes.append(f"keeping torch {torch.label}: a CUDA {major} build (no GPU here to try it on)")
    else:  # the right build, yet it sees no GPU: a reinstall would not help; keep it and say so loudly
        notes.append(f"WARNING: {verdict.problem or 'torch sees no GPU'}; keeping it (`pawpular doctor` says more)")
    return [], _pins(torch)


def make_plan(facts: Facts) -> Plan:
    env, driver, torch = facts.env, facts.driver, facts.torch
    pip = [facts.python, "-m", "pip", "install"]
    verdict = torch_verdict(torch, driver, env)
    notes: list[str] = []
    major = _gpu_major(facts, verdict, notes)
    if major is None:  # the CPU set
        return _cpu_plan(facts, _pins(torch) if verdict.usable and torch is not None else [], notes)

    where = (
        f"driver {driver.version}, CUDA {driver.cuda_text}, {gpu_names(driver)}"
        if driver and driver.gpus
        else "no driver visible: PAWPULAR_GPU=1"
    )
    notes.append(f"GPU install for CUDA {major} ({where})")
    steps, keep = _gpu_torch(facts, major, verdict, notes)
    blocker = rapids_blocker(major, driver)
    if blocker:
        notes.append(f"{blocker}: no RAPIDS, the SVR head runs on scikit-learn")
        steps.append(Step((*pip, "-r", "requirements.txt", *keep)))
    else:
        steps.append(
            Step(
                (*pip, "-r", "requirements-gpu.txt", *keep, "--extra-index-url", NVIDIA_INDEX),
                {"PAWPULAR_CUDA": str(major)},
            )
        )
    return Plan("gpu", major, tuple(steps), tuple(notes))


def plan_key(facts: Facts) -> str:
    """What the install depends on besides the requirement files, without asking torch (fast): run.sh hashes it
    with them and reinstalls only when it changes ('cpu', 'gpu cu12', plus an index override)."""
    key = make_plan(replace(facts, torch=None)).key
    index = facts.env.get("PAWPULAR_TORCH_INDEX", "").strip()
    return f"{key} index={index}" if index and key != "cpu" else key


def execute(
    plan: Plan,
    root: Path = ROOT,
    quiet: bool = False,
    run: Callable[..., int] = lambda argv, env, cwd: subprocess.run(argv, env=env, cwd=cwd).returncode,
) -> int:
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
    p = argparse.ArgumentParser(prog="machine/install_plan.py", description=__doc__.split("\n\n")[0])
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
            print(
                f"[install] WARNING: after the install, {verdict.problem}: the pipeline would run on the CPU. "
                "`pawpular doctor` says more.",
                file=sys.stderr,
            )
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
