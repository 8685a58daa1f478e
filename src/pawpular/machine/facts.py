"""What this machine has, as the installer and ``pawpular doctor`` see it: the NVIDIA driver (``nvidia-smi``), the
torch of a given python (probed in a child process), and the tested versions in ``constraints.txt``.

Standard library only (``machine/install_plan.py`` runs before the venv holds anything). Each fact is gathered by one
small function with its command runner injectable, so tests fake the machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]  # the checkout: requirements*.txt and constraints.txt live here
ENV_KEYS = ("PAWPULAR_GPU", "PAWPULAR_CUDA", "PAWPULAR_TORCH_INDEX", "CUDA_VISIBLE_DEVICES")
Runner = Callable[[Sequence[str]], "tuple[int, str]"]


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    memory_mib: int | None = None
    capability: tuple[int, int] | None = None

    @property
    def bf16(self) -> bool | None:
        """Native bf16 (Ampere, compute 8.0, and newer): what ``is_bf16_supported(including_emulation=False)``
        checks."""
        return None if self.capability is None else self.capability >= (8, 0)


@dataclass(frozen=True)
class Driver:
    """What ``nvidia-smi`` says: driver version, the newest CUDA it runs, its GPUs; ``error`` when it fails."""

    version: str | None = None
    cuda: tuple[int, int] | None = None
    gpus: tuple[GpuInfo, ...] = ()
    error: str | None = None

    @property
    def cuda_text(self) -> str:
        return f"{self.cuda[0]}.{self.cuda[1]}" if self.cuda else "unknown"


@dataclass(frozen=True)
class TorchInfo:
    """The torch of one python: ``dist`` is the installed distribution's version ('2.14.1', '2.6.0+cu124')."""

    dist: str
    version: str | None = None  # torch.__version__ ('2.14.1+cu130')
    cuda: str | None = None  # torch.version.cuda: the CUDA it was built for; None for a CPU-only build
    available: bool = False  # torch.cuda.is_available()
    torchvision: str | None = None
    error: str | None = None  # why ``import torch`` failed

    @property
    def label(self) -> str:
        return self.version or self.dist

    @property
    def cuda_major(self) -> int | None:
        return int(self.cuda.split(".")[0]) if self.cuda else None


@dataclass(frozen=True)
class Facts:
    driver: Driver | None  # None: no nvidia-smi on PATH
    torch: TorchInfo | None  # None: torch is not installed in the target python
    env: Mapping[str, str] = field(default_factory=dict)
    python: str = "python"  # the interpreter the commands install into
    tested: Mapping[str, str] = field(default_factory=dict)  # constraints.txt: name -> version


def _run(argv: Sequence[str], timeout: float = 300) -> tuple[int, str]:
    """(exit code, stdout + stderr); 127 when the program cannot be started, 124 on a timeout."""
    try:
        p = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except OSError as e:
        return 127, str(e)
    except subprocess.TimeoutExpired:
        return 124, f"{argv[0]} did not answer in {timeout:.0f} s"
    return p.returncode, p.stdout + p.stderr


def parse_nvidia_smi(header: str, query: str | None = None) -> Driver:
    """Parse plain ``nvidia-smi`` output (its banner says 'Driver Version: X  CUDA Version: Y.Z') and the CSV of
    ``--query-gpu=index,name,memory.total[,compute_cap] --format=csv,noheader,nounits``."""
    version = re.search(r"Driver Version\s*:\s*([0-9][\w.]*)", header)
    cuda = re.search(r"CUDA Version\s*:\s*(\d+)\.(\d+)", header)
    gpus = []
    for line in (query or "").splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3 or not parts[0].isdigit():
            continue
        cap = None
        if len(parts) >= 4 and re.fullmatch(r"\d+\.\d+", parts[-1]):
            cap = tuple(int(x) for x in parts[-1].split("."))
            parts = parts[:-1]
        mem = int(parts[-1]) if parts[-1].isdigit() else None
        gpus.append(GpuInfo(int(parts[0]), ", ".join(parts[1:-1]), mem, cap))  # type: ignore[arg-type]
    return Driver(
        version.group(1) if version else None, (int(cuda.group(1)), int(cuda.group(2))) if cuda else None, tuple(gpus)
    )


def read_driver(run: Runner = _run, which: Callable[[str], str | None] = shutil.which) -> Driver | None:
    """The NVIDIA driver as ``nvidia-smi`` reports it; None when there is no nvidia-smi on PATH."""
    exe = which("nvidia-smi")
    if exe is None:
        return None
    rc, header = run([exe])
    if rc != 0:
        lines = [ln for ln in header.strip().splitlines() if ln.strip()]
        return Driver(error=lines[0] if lines else f"nvidia-smi exited with {rc}")
    fmt = "--format=csv,noheader,nounits"
    rc, query = run([exe, "--query-gpu=index,name,memory.total,compute_cap", fmt])
    if rc != 0:  # drivers older than 510 have no compute_cap field
        rc, query = run([exe, "--query-gpu=index,name,memory.total", fmt])
    return parse_nvidia_smi(header, query if rc == 0 else None)


_PROBE = r"""
import json, importlib.metadata as md
def dist(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
out = {"dist": dist("torch"), "torchvision": dist("torchvision")}
if out["dist"] is not None:
    try:
        import torch
        out.update(version=torch.__version__, cuda=torch.version.cuda, available=bool(torch.cuda.is_available()))
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


def probe_torch(python: str, run: Runner = _run) -> TorchInfo | None:
    """torch in ``python`` (a venv's or the system's); None when that python does not exist or has no torch."""
    rc, out = run([python, "-c", _PROBE])
    if rc == 127:
        return None
    lines = [ln for ln in out.strip().splitlines() if ln.startswith("{")]
    try:
        data = json.loads(lines[-1])
    except (IndexError, ValueError):
        return TorchInfo(dist="unknown", error=out.strip()[-500:] or f"{python} exited with {rc}")
    if data.get("dist") is None:
        return None
    return TorchInfo(
        dist=data["dist"],
        version=data.get("version"),
        cuda=data.get("cuda"),
        available=bool(data.get("available")),
        torchvision=data.get("torchvision"),
        error=data.get("error"),
    )


def read_tested(root: Path = ROOT) -> dict[str, str]:
    """The versions pinned in ``constraints.txt`` (lower-case name -> version); empty outside a checkout."""
    path = Path(root) / "constraints.txt"
    if not path.is_file():
        return {}
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;#]+)", line)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def gather_facts(
    python: str,
    root: Path = ROOT,
    env: Mapping[str, str] = os.environ,
    run: Runner = _run,
    which: Callable[[str], str | None] = shutil.which,
) -> Facts:
    return Facts(
        driver=read_driver(run, which),
        torch=probe_torch(python, run),
        env={k: env[k] for k in ENV_KEYS if k in env},
        python=python,
        tested=read_tested(root),
    )
