"""The installer's choice of builds, from faked machine facts (driver CUDA version, torch build, overrides), and
the real script on this machine (no NVIDIA driver: the CPU set from constraints.txt)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from pawpular.machine import cuda_builds as cb
from pawpular.machine import install_plan as ip
from pawpular.machine.install_plan import Driver, Facts, GpuInfo, TorchInfo

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "src" / "pawpular" / "machine" / "install_plan.py"
TESTED = {"torch": "2.14.1", "torchvision": "0.29.2"}

SMI_12_4 = """\
Tue Sep 22 10:00:00 2026
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 550.54.15              Driver Version: 550.54.15      CUDA Version: 12.4     |
|-----------------------------------------+------------------------+----------------------+
| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |
|   0  Tesla T4                       Off |   00000000:00:04.0 Off |                    0 |
+-----------------------------------------+------------------------+----------------------+
"""
SMI_13_0 = SMI_12_4.replace("550.54.15", "580.65.06").replace("CUDA Version: 12.4", "CUDA Version: 13.0")


def driver(cuda=(12, 4), *gpus: GpuInfo, version="550.54.15") -> Driver:
    return Driver(version, cuda, gpus or (GpuInfo(0, "Tesla T4", 15360, (7, 5)),))


def facts(drv=None, torch=None, **env) -> Facts:
    return Facts(drv, torch, env, "py", TESTED)


CPU_TORCH = TorchInfo("2.14.1", "2.14.1+cu130", "13.0", available=False, torchvision="0.29.2")
KAGGLE_TORCH = TorchInfo("2.6.0+cu124", "2.6.0+cu124", "12.4", available=True, torchvision="0.21.0+cu124")


# --- reading the facts ---------------------------------------------------------------------------------------------


def test_parse_nvidia_smi_reads_driver_cuda_and_gpus():
    d = ip.parse_nvidia_smi(SMI_12_4, "0, Tesla T4, 15360, 7.5\n1, NVIDIA L4, 23034, 8.9\n")
    assert d.version == "550.54.15" and d.cuda == (12, 4) and d.cuda_text == "12.4"
    assert d.gpus == (GpuInfo(0, "Tesla T4", 15360, (7, 5)), GpuInfo(1, "NVIDIA L4", 23034, (8, 9)))
    assert [g.bf16 for g in d.gpus] == [False, True]
    # a driver without the compute_cap field: no capability, bf16 unknown
    old = ip.parse_nvidia_smi(SMI_12_4, "0, Tesla P100-PCIE-16GB, 16384\n")
    assert old.gpus == (GpuInfo(0, "Tesla P100-PCIE-16GB", 16384, None),) and old.gpus[0].bf16 is None


def fake_runner(outputs: dict[str, tuple[int, str]]):
    calls = []

    def run(argv):
        calls.append(list(argv))
        for key, out in outputs.items():
            if key in " ".join(argv):
                return out
        return 127, "not found"

    return run, calls


def test_read_driver_absent_failing_and_old():
    assert ip.read_driver(which=lambda name: None) is None
    run, _ = fake_runner({"nvidia-smi": (9, "NVIDIA-SMI has failed because it couldn't communicate with the driver")})
    broken = ip.read_driver(run, which=lambda name: "/usr/bin/nvidia-smi")
    assert broken.error.startswith("NVIDIA-SMI has failed") and broken.gpus == ()
    # compute_cap unknown to an old driver: the query is retried without it
    run, calls = fake_runner(
        {
            "compute_cap": (2, 'Field "compute_cap" is not a valid field to query.'),
            "--query-gpu": (0, "0, Tesla P100-PCIE-16GB, 16384\n"),
            "/usr/bin/nvidia-smi": (0, SMI_12_4),
        }
    )
    d = ip.read_driver(run, which=lambda name: "/usr/bin/nvidia-smi")
    assert d.cuda == (12, 4) and d.gpus[0].name == "Tesla P100-PCIE-16GB" and len(calls) == 3


def test_probe_torch_parses_the_child_and_knows_absence():
    run, _ = fake_runner(
        {
            "-c": (
                0,
                'some warning\n{"dist": "2.6.0+cu124", "torchvision": "0.21.0+cu124", '
                '"version": "2.6.0+cu124", "cuda": "12.4", "available": true}\n',
            )
        }
    )
    assert ip.probe_torch("py", run) == KAGGLE_TORCH
    run, _ = fake_runner({"-c": (0, '{"dist": null, "torchvision": null}\n')})
    assert ip.probe_torch("py", run) is None
    run, _ = fake_runner({})  # the venv's python does not exist yet
    assert ip.probe_torch("/nowhere/bin/python", run) is None
    run, _ = fake_runner({"-c": (0, '{"dist": "2.14.1", "torchvision": null, "error": "OSError: libcudnn.so.9"}\n')})
    assert ip.probe_torch("py", run).error == "OSError: libcudnn.so.9"


def test_probe_torch_of_this_python_is_the_real_one():
    import torch

    info = ip.probe_torch(sys.executable)
    assert info.label == torch.__version__ and info.cuda == torch.version.cuda
    assert info.available == torch.cuda.is_available() and info.error is None


# --- the verdict on torch --------------------------------------------------------------------------------------


def test_torch_verdicts():
    assert cb.torch_verdict(CPU_TORCH, None) == cb.TorchVerdict(False)  # no GPU: nothing to complain about
    assert cb.torch_verdict(KAGGLE_TORCH, driver()).usable
    newer = cb.torch_verdict(CPU_TORCH, driver((12, 4)))
    assert newer.wrong_build and "2.14.1+cu130" in newer.problem and "13.0" in newer.problem and "12.4" in newer.problem
    cpu_only = cb.torch_verdict(TorchInfo("2.14.1+cpu", "2.14.1+cpu", None), driver())
    assert cpu_only.wrong_build and "CPU-only" in cpu_only.problem
    same = cb.torch_verdict(TorchInfo("2.14.1", "2.14.1+cu130", "13.0"), driver((13, 0)))
    assert not same.wrong_build and "sees no GPU" in same.problem
    assert cb.torch_verdict(CPU_TORCH, driver(), {"CUDA_VISIBLE_DEVICES": ""}).problem is None  # hidden on purpose
    old = cb.torch_verdict(CPU_TORCH, driver((11, 4)))
    assert not old.wrong_build and "11.4" in old.problem
    assert "update the NVIDIA driver" in cb.torch_fix("py", driver((11, 4)), TESTED)


# --- the plans -------------------------------------------------------------------------------------------------


def test_cpu_machine_installs_the_tested_set():
    plan = ip.make_plan(facts(None, None))
    assert plan.key == "cpu" and plan.cuda is None
    assert [s.argv for s in plan.steps] == [
        ("py", "-m", "pip", "install", "-r", "requirements.txt", "-c", "constraints.txt")
    ]
    # a GPU the user opts out of: the same
    assert ip.make_plan(facts(driver(), CPU_TORCH, PAWPULAR_GPU="0")).steps == plan.steps


def test_fresh_cuda12_machine_gets_cu126_torch_and_cu12_rapids():
    plan = ip.make_plan(facts(driver((12, 4)), None))
    torch_step, rest = plan.steps
    assert torch_step.argv == (
        "py",
        "-m",
        "pip",
        "install",
        "torch==2.14.1+cu126",
        "torchvision==0.29.2+cu126",
        "--index-url",
        "https://download.pytorch.org/whl/cu126",
    )
    assert rest.env == {"PAWPULAR_CUDA": "12"}
    assert rest.argv[4:] == (
        "-r",
        "requirements-gpu.txt",
        "torch==2.14.1+cu126",
        "torchvision==0.29.2+cu126",
        "--extra-index-url",
        "https://pypi.nvidia.com",
    )
    assert plan.key == "gpu cu12"
    assert rest.shell().startswith("PAWPULAR_CUDA=12 py -m pip install -r requirements-gpu.txt")


def test_cuda13_torch_on_a_cuda12_driver_is_replaced():
    """The issue's bug: the registry's torch (a CUDA 13 build) on a CUDA 12 driver sees no GPU."""
    plan = ip.make_plan(facts(driver((12, 2)), CPU_TORCH))
    assert "https://download.pytorch.org/whl/cu126" in plan.steps[0].argv
    assert any("built for CUDA 13.0" in n and "12.2" in n for n in plan.notes)


def test_fresh_cuda13_machine_and_newer_drivers_get_cu130():
    for cuda in ((13, 0), (13, 2), (14, 1)):
        plan = ip.make_plan(facts(driver(cuda, version="580.65.06"), None))
        assert plan.cuda == 13 and plan.steps[0].argv[-1] == "https://download.pytorch.org/whl/cu130"
        assert plan.steps[0].argv[4] == "torch==2.14.1+cu130" and plan.steps[1].env == {"PAWPULAR_CUDA": "13"}


def test_a_torch_that_uses_the_gpu_is_kept_and_pinned():
    """Kaggle: the image's torch works; the plan must not touch it, and RAPIDS follows torch's CUDA major."""
    plan = ip.make_plan(facts(driver((12, 6)), KAGGLE_TORCH))
    (step,) = plan.steps
    assert not any("download.pytorch.org" in a for a in step.argv)
    assert "torch==2.6.0+cu124" in step.argv and "torchvision==0.21.0+cu124" in step.argv
    assert step.env == {"PAWPULAR_CUDA": "12"}
    # a CUDA 12 torch that works under a CUDA 13 driver: kept, and RAPIDS for CUDA 12 to match it
    plan = ip.make_plan(facts(driver((13, 0)), KAGGLE_TORCH))
    assert len(plan.steps) == 1 and plan.steps[0].env == {"PAWPULAR_CUDA": "12"}
    # also on a CPU install (PAWPULAR_GPU=0): constraints.txt would replace it, so it is not applied
    (cpu_step,) = ip.make_plan(facts(driver(), KAGGLE_TORCH, PAWPULAR_GPU="0")).steps
    assert "constraints.txt" not in cpu_step.argv and "torch==2.6.0+cu124" in cpu_step.argv


def test_right_build_that_sees_no_gpu_is_kept_with_a_warning():
    torch = TorchInfo("2.14.1", "2.14.1+cu130", "13.0", available=False, torchvision="0.29.2")
    plan = ip.make_plan(facts(driver((13, 0)), torch))
    assert len(plan.steps) == 1 and "torch==2.14.1" in plan.steps[0].argv
    assert any(n.startswith("WARNING") and "sees no GPU" in n for n in plan.notes)


def test_overrides():
    assert ip.make_plan(facts(driver((13, 0)), None, PAWPULAR_CUDA="12")).cuda == 12
    with pytest.raises(ip.PlanError, match="PAWPULAR_CUDA"):
        ip.make_plan(facts(driver(), None, PAWPULAR_CUDA="11"))
    with pytest.raises(ip.PlanError, match="PAWPULAR_GPU"):
        ip.make_plan(facts(None, None, PAWPULAR_GPU="yes"))
    # a GPU install without a driver (building an image elsewhere) must be told the CUDA major
    with pytest.raises(ip.PlanError, match="PAWPULAR_CUDA=12 or 13"):
        ip.make_plan(facts(None, None, PAWPULAR_GPU="1"))
    plan = ip.make_plan(facts(None, None, PAWPULAR_GPU="1", PAWPULAR_CUDA="13"))
    assert plan.key == "gpu cu13" and len(plan.steps) == 2
    mirror = ip.make_plan(facts(driver(), None, PAWPULAR_TORCH_INDEX="https://mirror.example/whl/cu126/"))
    assert (
        mirror.steps[0].argv[-1] == "https://mirror.example/whl/cu126/"
        and "torch==2.14.1+cu126" in mirror.steps[0].argv
    )
    assert ip.plan_key(facts(driver(), None, PAWPULAR_TORCH_INDEX="https://mirror.example/whl/cu126")) != "gpu cu12"


def test_rapids_left_out_where_it_cannot_run():
    p100 = driver((12, 4), GpuInfo(0, "Tesla P100-PCIE-16GB", 16384, (6, 0)))
    plan = ip.make_plan(facts(p100, None))
    assert "requirements-gpu.txt" not in plan.steps[-1].argv and "requirements.txt" in plan.steps[-1].argv
    assert "https://download.pytorch.org/whl/cu126" in plan.steps[0].argv  # torch still gets the GPU build
    assert any("compute capability 7.0" in n and "P100" in n for n in plan.notes)
    v100_cu13 = driver((13, 0), GpuInfo(0, "Tesla V100-SXM2-16GB", 16160, (7, 0)))
    assert "requirements-gpu.txt" not in ip.make_plan(facts(v100_cu13, None)).steps[-1].argv
    assert "requirements-gpu.txt" in ip.make_plan(facts(v100_cu13, None, PAWPULAR_CUDA="12")).steps[-1].argv
    assert cb.rapids_blocker(12, driver((12, 0))) is not None  # RAPIDS for CUDA 12 needs a 12.2 driver


def test_too_old_driver_falls_back_to_the_cpu_set_loudly():
    plan = ip.make_plan(facts(driver((11, 4), version="470.82.01"), None))
    assert plan.key == "cpu" and "constraints.txt" in plan.steps[0].argv
    assert any(n.startswith("WARNING") and "update the NVIDIA driver" in n for n in plan.notes)


def test_execute_runs_steps_in_order_and_stops_at_a_failure(tmp_path):
    plan = ip.make_plan(facts(driver(), None))
    seen = []

    def run(argv, env, cwd):
        seen.append((argv, env.get("PAWPULAR_CUDA"), cwd))
        return 1 if len(seen) == 2 else 0

    assert ip.execute(plan, tmp_path, quiet=True, run=run) == 1
    assert len(seen) == 2 and seen[0][1] is None and seen[1][1] == "12" and seen[0][2] == str(tmp_path)
    assert seen[0][0][4:6] == ["-q", "--disable-pip-version-check"]


# --- the files the plans name ------------------------------------------------------------------------------------


def requirement_lines(name: str) -> list[str]:
    lines = [ln.split("#")[0].strip() for ln in (REPO / name).read_text().splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("-")]


def test_requirements_are_lower_bounds_and_constraints_pin_them_within_bounds():
    tested = ip.read_tested(REPO)
    reqs = [Requirement(ln) for ln in requirement_lines("requirements.txt")]
    assert {"torch", "torchvision", "timm"} <= {r.name for r in reqs}
    for r in reqs:
        assert not any(s.operator == "==" for s in r.specifier), (
            f"{r} is an exact pin: it would replace a working torch"
        )
        version = tested.get(r.name.lower().replace("_", "-"))
        assert version is not None, f"{r.name} has no tested version in constraints.txt"
        assert r.specifier.contains(version, prereleases=True), f"constraints.txt pins {r.name}=={version} outside {r}"
    assert tested["torch"] == "2.14.1" and tested["torchvision"] == "0.29.2"


def test_requirements_gpu_names_rapids_through_pawpular_cuda():
    lines = requirement_lines("requirements-gpu.txt")
    assert lines == [f"{name}-cu${{PAWPULAR_CUDA}}{cb.RAPIDS_SPEC}" for name in cb.RAPIDS_PACKAGES]
    assert "-r requirements.txt" in (REPO / "requirements-gpu.txt").read_text().splitlines()


@pytest.mark.parametrize("cuda", ["12", None])
def test_pip_expands_pawpular_cuda_in_requirements_gpu(cuda):
    """pip itself reads the file: with PAWPULAR_CUDA it asks for cuml-cu12 (and finds nothing: no index), without
    it the line is an invalid requirement."""
    env = {k: v for k, v in os.environ.items() if k != "PAWPULAR_CUDA"} | ({"PAWPULAR_CUDA": cuda} if cuda else {})
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--no-deps",
            "--no-index",
            "--isolated",
            "--disable-pip-version-check",
            "-r",
            "requirements-gpu.txt",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert p.returncode != 0
    if cuda:
        assert "Invalid requirement" not in p.stderr and "No matching distribution" in p.stderr
    else:
        assert "Invalid requirement: 'cuml-cu${PAWPULAR_CUDA}" in p.stderr


# --- the script, as run.sh runs it -----------------------------------------------------------------------------


def run_script(*args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ip.ENV_KEYS}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd="/", env=base | env, capture_output=True, text=True)


@pytest.mark.skipif(ip.read_driver() is not None, reason="this machine has an NVIDIA driver")
def test_script_on_this_cpu_machine():
    """Run as a plain file (not -I): its folder's select.py must not shadow the standard library's."""
    p = run_script("--python", sys.executable)
    assert p.returncode == 0, p.stderr
    assert f"{sys.executable} -m pip install -r requirements.txt -c constraints.txt" in p.stdout
    assert run_script("--key").stdout.strip() == "cpu"
    gpu = run_script("--python", sys.executable, PAWPULAR_GPU="1", PAWPULAR_CUDA="12")
    assert gpu.returncode == 0 and "torch==2.14.1+cu126 torchvision==0.29.2+cu126 --index-url" in gpu.stdout
    assert run_script("--key", PAWPULAR_GPU="1", PAWPULAR_CUDA="13").stdout.strip() == "gpu cu13"
    bad = run_script("--key", PAWPULAR_GPU="1")
    assert bad.returncode == 2 and "PAWPULAR_CUDA=12 or 13" in bad.stderr
