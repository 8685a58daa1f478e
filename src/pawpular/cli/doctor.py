"""``pawpular doctor``: what will run where on this machine, and the fix when a GPU is out of reach.

    python -m pawpular.cli.doctor [--config FILE] [--short]

One screen: Python, torch and the CUDA it was built for, the driver's CUDA version (nvidia-smi), each GPU with its
memory and bf16 support, RAPIDS (cuML / cuDF, and whether cuML's SVR takes precomputed kernels), the versions of
the libraries the stages use, then per stage the device, precision and backend the config gets. ``--short`` prints
the same in 1-3 lines (``./run.sh`` does, before the pipeline).

Exit 1, with the fix, when a GPU the driver lists is out of torch's reach (a CPU-only torch, or one built for a newer
CUDA than the driver runs), when RAPIDS is installed but does not import, or when ``device: cuda`` cannot be met;
exit 2 for a config that does not load. Facts are gathered once (``gather_facts``); ``diagnose`` and the renderers
only read them, so tests build the facts of machines they do not have.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..config.schema import Config, load_config
from ..machine import backend, cuda_builds, install_plan
from ..machine.backend import RapidsStatus
from ..machine.install_plan import Driver, GpuInfo, TorchInfo
from ..store.errors import ConfigError

PACKAGES = ("timm", "albumentations", "optuna", "scikit-learn", "pandas", "numpy", "pyarrow")


@dataclass(frozen=True)
class Facts:
    python: str  # '3.11.7'
    executable: str
    torch: TorchInfo | None  # None: not installed
    torch_gpus: tuple[GpuInfo, ...]  # the GPUs torch sees (empty when it sees none)
    driver: Driver | None  # None: no nvidia-smi
    rapids: RapidsStatus
    packages: Mapping[str, str | None] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)  # CUDA_VISIBLE_DEVICES, PAWPULAR_CUDA
    tested: Mapping[str, str] = field(default_factory=dict)  # constraints.txt, for the versions a fix installs
    cpu_count: int = 1


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def torch_facts() -> tuple[TorchInfo | None, tuple[GpuInfo, ...]]:
    dist = _version("torch")
    if dist is None:
        return None, ()
    try:
        import torch
    except Exception as e:  # a broken install: a missing libcudnn, an ABI mismatch
        return TorchInfo(dist, error=f"{type(e).__name__}: {e}"), ()
    available = torch.cuda.is_available()
    info = TorchInfo(dist, torch.__version__, torch.version.cuda, available, _version("torchvision"))
    gpus = []
    for i in range(torch.cuda.device_count() if available else 0):
        p = torch.cuda.get_device_properties(i)
        gpus.append(GpuInfo(i, p.name, p.total_memory // 2**20, (p.major, p.minor)))
    return info, tuple(gpus)


def gather_facts() -> Facts:
    torch, gpus = torch_facts()
    return Facts(
        python=platform.python_version(),
        executable=sys.executable,
        torch=torch,
        torch_gpus=gpus,
        driver=install_plan.read_driver(),
        rapids=backend.rapids_status(),
        packages={p: _version(p) for p in PACKAGES},
        env={k: os.environ[k] for k in ("CUDA_VISIBLE_DEVICES", "PAWPULAR_CUDA") if k in os.environ},
        tested=install_plan.read_tested(),
        cpu_count=os.cpu_count() or 1,
    )


# ---------------------------------------------------------------------------------------------------------------
# The verdict


@dataclass(frozen=True)
class Problem:
    message: str
    fix: str


@dataclass(frozen=True)
class Diagnosis:
    device: str  # 'cuda' | 'cpu' | 'none' (device: cuda that cannot be met)
    stages: tuple[tuple[str, str], ...]  # (stage, what it runs on)
    problems: tuple[Problem, ...]
    notes: tuple[str, ...]


def precision(device: str, gpu: GpuInfo | None, amp: bool, asked: str = "auto") -> str:
    """``inference.resolve_precision`` (the one the stages use) for the GPU the facts describe, in words."""
    from ..model.inference import resolve_precision

    rule = resolve_precision(device, asked, amp, gpu is not None and bool(gpu.bf16))
    if rule != "fp32":
        return f"{rule} autocast"
    return "fp32 (train.amp: false)" if device == "cuda" and asked == "auto" else "fp32"


def _rapids_blocker(facts: Facts) -> str | None:
    """``backend.rapids_gpu_blocker`` for GPU 0 of the facts."""
    gpu = facts.torch_gpus[0] if facts.torch_gpus else None
    return backend.rapids_gpu_blocker(facts.rapids, gpu.name, gpu.capability) if gpu is not None else None


def _device(facts: Facts, cfg: Config, problems: list[Problem], notes: list[str]) -> str:
    """The device, as backend.resolve_device decides it ('none': device: cuda that cannot be met)."""
    driver = facts.driver
    verdict = cuda_builds.torch_verdict(facts.torch, driver, facts.env)
    torch_fix = cuda_builds.torch_fix(facts.executable, driver, facts.tested, facts.env)
    device = backend.choose_device(cfg.device, verdict.usable)
    if cfg.device == "cpu" and verdict.usable:
        notes.append("device: cpu in the config, although torch can use the GPU")
    elif device == backend.NO_DEVICE:
        problems.append(
            Problem(
                "device: cuda is asked for, but "
                + (verdict.problem or "torch sees no GPU and no NVIDIA driver lists one")
                + ": every GPU stage stops with this error",
                torch_fix if verdict.problem else "run on a machine with an NVIDIA GPU, or set device: auto / cpu",
            )
        )
    if verdict.problem and cfg.device != "cuda":
        consequence = "every stage runs on the CPU" if cfg.device == "auto" else "(the config asks for the CPU anyway)"
        problems.append(
            Problem(f"nvidia-smi lists {cuda_builds.gpu_names(driver)} but {verdict.problem}: {consequence}", torch_fix)
        )
    if driver is not None and driver.error:
        notes.append(f"nvidia-smi failed: {driver.error}")
    if driver is not None and driver.gpus and cuda_builds.gpus_hidden(facts.env):
        notes.append(f"CUDA_VISIBLE_DEVICES={facts.env['CUDA_VISIBLE_DEVICES']!r} hides the GPUs from torch")
    return device


def _rapids(facts: Facts, device: str, problems: list[Problem], notes: list[str]) -> bool:
    """Whether cuML / cuDF will be used, as backend.has_rapids decides it; problems and notes on the way."""
    torch, driver, rapids = facts.torch, facts.driver, facts.rapids
    blocker = _rapids_blocker(facts) if rapids.ok else None
    use_rapids = backend.rapids_usable(device, rapids, blocker)
    if rapids.error:
        major = torch.cuda_major if torch is not None and torch.cuda_major in cuda_builds.SUPPORTED_CUDA else None
        why = rapids.error
        if driver is not None and driver.cuda and rapids.cuda_major and rapids.cuda_major > driver.cuda[0]:
            why += (
                f" ({', '.join(rapids.dists)} need{'s' if len(rapids.dists) == 1 else ''} a CUDA "
                f"{rapids.cuda_major} driver; this one runs {driver.cuda_text})"
            )
            major = major or cuda_builds.cuda_major({}, driver)
        problems.append(
            Problem(
                f"RAPIDS is installed but does not import: {why}; the SVR head falls back to "
                "scikit-learn and tables to pandas",
                backend.rapids_fix(rapids, facts.executable, major),
            )
        )
    elif blocker:
        notes.append(f"RAPIDS {rapids.cuml} is installed but {blocker}: the SVR head runs on scikit-learn")
    elif device == "cuda" and not rapids.installed and torch is not None:
        major = torch.cuda_major if torch.cuda_major in cuda_builds.SUPPORTED_CUDA else min(cuda_builds.SUPPORTED_CUDA)
        rapids_blocked = cuda_builds.rapids_blocker(major, driver)
        notes.append(
            "RAPIDS is not installed: the SVR head runs on scikit-learn on the CPU"
            + (
                f" ({rapids_blocked})"
                if rapids_blocked
                else f"; for cuML: PAWPULAR_CUDA={major} {facts.executable} -m pip install -r requirements-gpu.txt "
                f"torch=={torch.dist} --extra-index-url {cuda_builds.NVIDIA_INDEX}"
            )
        )
    if use_rapids and torch is not None and rapids.cuda_major and torch.cuda_major != rapids.cuda_major:
        notes.append(
            f"torch is built for CUDA {torch.cuda} but RAPIDS for CUDA {rapids.cuda_major} ("
            f"{', '.join(rapids.dists)}): both load their own CUDA libraries; one major is safer"
        )
    return use_rapids


def _svr_line(facts: Facts, cfg: Config, use_rapids: bool, notes: list[str]) -> str:
    rapids, cache = facts.rapids, cfg.svr.kernel_cache
    if not use_rapids:
        sklearn = facts.packages.get("scikit-learn") or "?"
        kernels = (
            "refit from features every trial (svr.kernel_cache: plain)"
            if cache == "plain"
            else "precomputed kernels"
            + (f" (up to svr.max_kernel_gb = {cfg.svr.max_kernel_gb:g} GB)" if cache == "auto" else "")
        )
        return f"scikit-learn {sklearn} on CPU, {kernels}"
    precomputed_ok = backend.cuml_takes_precomputed(rapids.cuml)
    kernels = (
        "precomputed kernels"
        if precomputed_ok and cache != "plain"
        else "refit from features every trial"
        + (" (svr.kernel_cache: plain)" if cache == "plain" else " (cuML < 26.02 takes no precomputed kernels)")
    )
    if not precomputed_ok:
        notes.append(
            f"cuML {rapids.cuml} predates precomputed kernels (26.02): each Optuna trial refits from "
            f"features; upgrade: {' '.join(cuda_builds.rapids_requirements(rapids.cuda_major or 12))}"
        )
    return f"cuML {rapids.cuml} on cuda:0, {kernels}"


def diagnose(facts: Facts, cfg: Config) -> Diagnosis:
    problems: list[Problem] = []
    notes: list[str] = []
    device = _device(facts, cfg, problems, notes)
    use_rapids = _rapids(facts, device, problems, notes)
    gpu = facts.torch_gpus[0] if facts.torch_gpus else None
    on = f"cuda:0 ({gpu.name})" if device == "cuda" and gpu else "cuda:0" if device == "cuda" else "CPU"
    prec = precision(device, gpu, cfg.train.amp, cfg.train.precision)
    stages: list[tuple[str, str]] = []
    if device == backend.NO_DEVICE:
        stages.append(("train, embed, svr", "stop: device: cuda but torch cannot use a GPU"))
    else:
        multi = len(facts.torch_gpus) > 1 and device == "cuda"
        stages.append(
            (
                "train",
                f"{on}, {prec}"
                + (
                    f" (torchrun --nproc_per_node {len(facts.torch_gpus)} uses all {len(facts.torch_gpus)} GPUs)"
                    if multi
                    else ""
                ),
            )
        )
        compress = f", compress: {cfg.embed.compress}" if cfg.embed.compress != "none" else ""
        prec = precision(device, gpu, True, cfg.embed.precision)
        stages.append(("embed", f"{on}, {prec}{compress}, parquet through " + ("cuDF" if use_rapids else "pandas")))
        stages.append(("svr", _svr_line(facts, cfg, use_rapids, notes)))
    stages.append(("folds, ensemble", "CPU"))
    return Diagnosis(device, tuple(stages), tuple(problems), tuple(notes))


# ---------------------------------------------------------------------------------------------------------------
# Rendering


def _torch_line(torch: TorchInfo | None) -> str:
    if torch is None:
        return "not installed"
    if torch.error:
        return f"{torch.dist}, does not import: {torch.error}"
    build = f"built for CUDA {torch.cuda}" if torch.cuda else "CPU-only build"
    return f"{torch.label} ({build}), torch.cuda.is_available(): {torch.available}"


def _driver_line(driver: Driver | None) -> str:
    if driver is None:
        return "no NVIDIA driver (nvidia-smi not found)"
    if driver.error:
        return f"nvidia-smi fails: {driver.error}"
    return f"{driver.version}, runs CUDA {driver.cuda_text} at most; {len(driver.gpus)} GPU(s)"


def _gpu_line(gpu: GpuInfo) -> str:
    mem = f"{gpu.memory_mib / 1024:.1f} GiB" if gpu.memory_mib else "memory ?"
    if gpu.capability is None:
        return f"{gpu.name}, {mem}, bf16: unknown"
    return (
        f"{gpu.name}, {mem}, compute {gpu.capability[0]}.{gpu.capability[1]}, "
        f"bf16: {'yes' if gpu.bf16 else 'no (fp16 autocast instead)'}"
    )


def _rapids_line(r: RapidsStatus) -> str:
    if not r.installed:
        return "not installed (scikit-learn and pandas)"
    if r.error:
        return f"{', '.join(r.dists) or 'installed'} but does not import: {r.error}"
    precomputed = backend.cuml_takes_precomputed(r.cuml)
    return (
        f"cuML {r.cuml}, cuDF {r.cudf}"
        + (f" ({', '.join(r.dists)})" if r.dists else "")
        + f"; cuML's SVR takes precomputed kernels: {'yes' if precomputed else 'no (needs cuML >= 26.02)'}"
    )


def render(facts: Facts, diag: Diagnosis, config: str) -> str:
    gpus = facts.torch_gpus or (facts.driver.gpus if facts.driver else ())
    rows = [
        ("python", f"{facts.python} ({facts.executable})"),
        ("torch", _torch_line(facts.torch)),
        ("driver", _driver_line(facts.driver)),
    ]
    rows += [(f"GPU {g.index}", _gpu_line(g)) for g in gpus]
    rows += [
        ("RAPIDS", _rapids_line(facts.rapids)),
        ("packages", ", ".join(f"{p} {v or 'missing'}" for p, v in facts.packages.items())),
        ("config", config),
    ]
    width = max(len(k) for k, _ in [*rows, *diag.stages]) + 2
    lines = ["pawpular doctor", ""] + [f"  {k:<{width}}{v}" for k, v in rows]
    lines += ["", "what runs where"] + [f"  {k + ':':<{width}}{v}" for k, v in diag.stages]
    if diag.notes:
        lines += [""] + [f"note: {n}" for n in diag.notes]
    lines.append("")
    for p in diag.problems:
        lines += [f"ERROR: {p.message}", f"  fix: {p.fix}"]
    lines.append(f"{len(diag.problems)} problem(s): exit 1" if diag.problems else "OK: nothing to fix")
    return "\n".join(lines)


def render_short(facts: Facts, diag: Diagnosis) -> str:
    """At most three lines: where the stages run, then the problems and the first fix."""
    stages = dict(diag.stages)
    torch = facts.torch.label if facts.torch else "no torch"
    driver = (
        f"driver CUDA {facts.driver.cuda_text}"
        if facts.driver and not facts.driver.error
        else "nvidia-smi fails"
        if facts.driver
        else "no NVIDIA driver"
    )
    if diag.device == backend.NO_DEVICE:
        where = stages["train, embed, svr"]
    else:
        where = f"train/embed on {stages['embed'].rsplit(', parquet', 1)[0]}; svr: {stages['svr']}"
    lines = [f"doctor: torch {torch}, {driver}: {where}"]
    if diag.problems:
        lines.append("doctor: ERROR: " + " | ".join(p.message for p in diag.problems))
        lines.append(f"doctor: fix: {diag.problems[0].fix}  (details: python -m pawpular.cli.doctor)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="pawpular doctor",
        description="What will run where (device, precision, "
        "backend per stage), and the fix when a GPU is out of torch's reach.",
    )
    p.add_argument("--config", help="experiment YAML (default: the built-in defaults, device: auto)")
    p.add_argument("--short", action="store_true", help="a 1-3 line summary (./run.sh prints it)")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(f"doctor: {e}", file=sys.stderr)
        return 2
    facts = gather_facts()
    diag = diagnose(facts, cfg)
    config = (
        f"{args.config}: " if args.config else "defaults (no --config): "
    ) + f"device: {cfg.device}, train.amp: {str(cfg.train.amp).lower()}, svr.kernel_cache: {cfg.svr.kernel_cache}"
    print(render_short(facts, diag) if args.short else render(facts, diag, config))
    return 1 if diag.problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
