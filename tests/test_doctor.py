"""`pawpular doctor` on faked machines (driver CUDA version, torch build, RAPIDS import outcome) and on this one,
and backend's refusal to fall back to the CPU, or to scikit-learn, silently."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pawpular.cli import doctor
from pawpular.config.schema import load_config
from pawpular.machine import backend
from pawpular.machine.backend import RapidsStatus
from pawpular.machine.install_plan import Driver, GpuInfo, TorchInfo

REPO = Path(__file__).resolve().parents[1]
TESTED = {"torch": "2.14.1", "torchvision": "0.29.2"}
PACKAGES = {"timm": "1.0.31", "albumentations": "2.0.8", "optuna": "5.0.0", "scikit-learn": "1.7.2", "pandas": "2.3.3"}

T4 = GpuInfo(0, "Tesla T4", 15360, (7, 5))
L4 = GpuInfo(0, "NVIDIA L4", 23034, (8, 9))
P100 = GpuInfo(0, "Tesla P100-PCIE-16GB", 16384, (6, 0))
CU124 = TorchInfo("2.6.0+cu124", "2.6.0+cu124", "12.4", True, "0.21.0+cu124")
PYPI_CU130 = TorchInfo("2.14.1", "2.14.1+cu130", "13.0", False, "0.29.2")  # the registry's torch, on a CUDA 12 driver
CPU_BUILD = TorchInfo("2.14.1+cpu", "2.14.1+cpu", None, False, "0.29.2+cpu")
RAPIDS_26_10 = RapidsStatus(True, "26.10.00", "26.10.00", None, ("cuml-cu12", "cudf-cu12"))


def drv(cuda=(12, 4), *gpus: GpuInfo) -> Driver:
    return Driver("550.54.15", cuda, gpus or (T4,))


NO_RAPIDS = RapidsStatus(False)


def facts(torch=None, driver=None, rapids=NO_RAPIDS, env=None) -> doctor.Facts:
    gpus = driver.gpus if torch is not None and torch.available and driver is not None else ()
    return doctor.Facts("3.11.7", "/venv/bin/python", torch, gpus, driver, rapids, PACKAGES, env or {}, TESTED, 4)


def check(f: doctor.Facts, *overrides: str, config: str | None = None) -> doctor.Diagnosis:
    return doctor.diagnose(f, load_config(config, list(overrides)))


# --- verdicts and what runs where ------------------------------------------------------------------------------


def test_cpu_machine_is_fine_and_says_so():
    d = check(facts(PYPI_CU130, None))
    assert d.problems == () and d.device == "cpu"
    assert dict(d.stages) == {
        "train": "CPU, fp32",
        "embed": "CPU, fp32, parquet through pandas",
        "svr": "scikit-learn 1.7.2 on CPU, precomputed kernels (up to svr.max_kernel_gb = 4 GB)",
        "folds, ensemble": "CPU",
    }
    assert dict(check(facts(PYPI_CU130, None), "svr.kernel_cache=plain").stages)["svr"].endswith(
        "refit from features every trial (svr.kernel_cache: plain)"
    )


def test_kaggle_t4_with_rapids_runs_on_the_gpu_in_fp16():
    d = check(facts(CU124, drv((12, 4), T4), RAPIDS_26_10))
    stages = dict(d.stages)
    assert d.problems == () and d.device == "cuda"
    assert stages["train"] == "cuda:0 (Tesla T4), fp16 autocast"  # no bf16 on Turing
    assert stages["embed"] == "cuda:0 (Tesla T4), fp16 autocast, parquet through cuDF"
    assert stages["svr"] == "cuML 26.10.00 on cuda:0, precomputed kernels"
    assert stages["folds, ensemble"] == "CPU"


def test_precision_rule_bf16_fp16_fp32():
    l4 = facts(CU124, drv((12, 4), L4), RAPIDS_26_10)
    assert dict(check(l4).stages)["train"] == "cuda:0 (NVIDIA L4), bf16 autocast"
    assert dict(check(l4, "train.amp=false").stages)["train"] == "cuda:0 (NVIDIA L4), fp32 (train.amp: false)"
    assert dict(check(l4, "device=cpu").stages)["train"] == "CPU, fp32"
    assert doctor.precision("cpu", L4, True) == "fp32"
    # explicit: as asked on any device (bf16 on a T4: fp16); embed's own setting, not train.amp
    assert dict(check(l4, "device=cpu", "train.precision=bf16").stages)["train"] == "CPU, bf16 autocast"
    t4 = dict(check(facts(CU124, drv((12, 4)), RAPIDS_26_10), "train.precision=bf16", "train.amp=false").stages)
    assert t4["train"] == "cuda:0 (Tesla T4), fp16 autocast" and t4["embed"].startswith("cuda:0 (Tesla T4), fp16 ")
    embed = dict(check(l4, "train.amp=false", "embed.precision=fp32").stages)["embed"]
    assert embed.startswith("cuda:0 (NVIDIA L4), fp32,")


def test_cuda13_torch_on_a_cuda12_driver_is_an_error_with_the_fix():
    """The issue's silent CPU run: a GPU the driver lists, a torch built for a newer CUDA."""
    d = check(facts(PYPI_CU130, drv((12, 4))))
    assert d.device == "cpu" and len(d.problems) == 1
    (p,) = d.problems
    assert "Tesla T4" in p.message and "2.14.1+cu130" in p.message and "13.0" in p.message and "12.4" in p.message
    assert "every stage runs on the CPU" in p.message
    assert (
        "/venv/bin/python -m pip install torch==2.14.1+cu126 torchvision==0.29.2+cu126 --index-url "
        "https://download.pytorch.org/whl/cu126" in p.fix
    )


def test_cpu_only_torch_with_a_gpu_is_an_error():
    d = check(facts(CPU_BUILD, drv((13, 0))))
    assert len(d.problems) == 1 and "CPU-only build" in d.problems[0].message
    assert "whl/cu130" in d.problems[0].fix


def test_device_cuda_that_cannot_be_met_is_an_error():
    no_gpu = check(facts(PYPI_CU130, None), "device=cuda")
    assert no_gpu.device == "none" and len(no_gpu.problems) == 1
    assert "device: cuda" in no_gpu.problems[0].message and dict(no_gpu.stages)["train, embed, svr"].startswith("stop")
    wrong = check(facts(PYPI_CU130, drv((12, 4))), "device=cuda")
    assert len(wrong.problems) == 1 and "whl/cu126" in wrong.problems[0].fix


def test_gpus_hidden_on_purpose_are_not_an_error():
    d = check(facts(PYPI_CU130, drv((12, 4)), env={"CUDA_VISIBLE_DEVICES": ""}))
    assert d.problems == () and d.device == "cpu" and any("CUDA_VISIBLE_DEVICES" in n for n in d.notes)


def test_too_old_driver_says_update_the_driver():
    (p,) = check(facts(PYPI_CU130, Driver("470.82.01", (11, 4), (T4,)))).problems
    assert "11.4" in p.message and "update the NVIDIA driver" in p.fix


def test_broken_rapids_is_an_error_and_falls_back():
    broken = RapidsStatus(
        True, error="ImportError: libcuml++.so: cannot open shared object file", dists=("cudf-cu13", "cuml-cu13")
    )
    d = check(facts(CU124, drv((12, 4)), broken))
    assert d.device == "cuda" and len(d.problems) == 1
    (p,) = d.problems
    assert "libcuml++.so" in p.message and "cuml-cu13 need a CUDA 13 driver; this one runs 12.4" in p.message
    # the CUDA 13 wheels go before the CUDA 12 ones come: both provide the `cuml` module
    assert "pip uninstall -y cudf-cu13 cuml-cu13 && /venv/bin/python -m pip install 'cuml-cu12>=26.2,<27'" in p.fix
    same = RapidsStatus(True, error="RuntimeError: CUDA driver error", dists=("cudf-cu12", "cuml-cu12"))
    (q,) = check(facts(CU124, drv((12, 4)), same)).problems
    assert "pip install --force-reinstall 'cuml-cu12>=26.2,<27'" in q.fix
    stages = dict(d.stages)
    assert stages["svr"].startswith("scikit-learn 1.7.2 on CPU") and stages["embed"].endswith("through pandas")


def test_old_cuml_refits_and_missing_rapids_is_a_note():
    old = RapidsStatus(True, "25.10.00", "25.10.00", None, ("cuml-cu12", "cudf-cu12"))
    d = check(facts(CU124, drv(), old))
    assert d.problems == ()
    assert dict(d.stages)["svr"] == (
        "cuML 25.10.00 on cuda:0, refit from features every trial (cuML < 26.02 takes no precomputed kernels)"
    )
    assert any("predates precomputed kernels" in n for n in d.notes)
    none = check(facts(CU124, drv()))
    assert none.problems == () and any("RAPIDS is not installed" in n and "PAWPULAR_CUDA=12" in n for n in none.notes)


def test_rapids_on_a_p100_is_not_used():
    d = check(facts(CU124, drv((12, 4), P100), RAPIDS_26_10))
    assert dict(d.stages)["svr"].startswith("scikit-learn") and any("compute capability 6.0" in n for n in d.notes)


def test_render_full_and_short():
    f = facts(PYPI_CU130, drv((12, 4)))
    d = check(f)
    text = doctor.render(f, d, "configs/default.yaml")
    for expected in (
        "torch            2.14.1+cu130 (built for CUDA 13.0)",
        "550.54.15, runs CUDA 12.4 at most",
        "GPU 0",
        "Tesla T4, 15.0 GiB, compute 7.5, bf16: no",
        "RAPIDS",
        "timm 1.0.31",
        "albumentations 2.0.8",
        "optuna 5.0.0",
        "train:",
        "ERROR:",
        "fix:",
        "exit 1",
    ):
        assert expected in text, expected
    short = doctor.render_short(f, d).splitlines()
    assert len(short) == 3 and short[1].startswith("doctor: ERROR:") and "whl/cu126" in short[2]
    ok = facts(CU124, drv((12, 4), L4), RAPIDS_26_10)
    (line,) = doctor.render_short(ok, check(ok)).splitlines()
    assert "cuda:0 (NVIDIA L4), bf16 autocast" in line and "cuML 26.10.00" in line


def test_main_exit_codes(monkeypatch, capsys):
    monkeypatch.setattr(doctor, "gather_facts", lambda: facts(PYPI_CU130, drv((12, 4))))
    assert doctor.main(["--short"]) == 1
    assert "ERROR" in capsys.readouterr().out
    monkeypatch.setattr(doctor, "gather_facts", lambda: facts(PYPI_CU130, None))
    assert doctor.main(["--config", str(REPO / "configs" / "default.yaml")]) == 0
    assert doctor.main(["--config", "no/such.yaml"]) == 2


def test_doctor_on_this_machine():
    """The real facts: whatever this machine is, the verdict must agree with what torch and nvidia-smi say."""
    import timm
    import torch

    f = doctor.gather_facts()
    assert f.torch is not None and f.torch.label == torch.__version__ and f.torch.cuda == torch.version.cuda
    assert len(f.torch_gpus) == torch.cuda.device_count() and f.packages["timm"] == timm.__version__
    p = subprocess.run([sys.executable, "-m", "pawpular.cli.doctor", "--short"], capture_output=True, text=True)
    lines = p.stdout.strip().splitlines()
    assert 1 <= len(lines) <= 3 and lines[0].startswith(f"doctor: torch {torch.__version__}")
    if f.driver is None:  # a CPU machine: nothing to fix
        assert p.returncode == 0 and "no NVIDIA driver" in lines[0] and "CPU, fp32" in lines[0]
    else:
        assert p.returncode == (1 if check(f).problems else 0)


# --- backend: no silent CPU, no crash on a broken RAPIDS ------------------------------------------------------


@pytest.fixture
def fresh_log(monkeypatch):
    monkeypatch.setattr(backend, "_LOGGED", set())


def test_auto_with_an_unusable_gpu_warns_once_naming_build_and_driver(monkeypatch, caplog, fresh_log):
    import torch

    if torch.cuda.is_available():
        pytest.skip("torch uses a GPU here")
    monkeypatch.setattr(backend.install_plan, "read_driver", lambda: Driver("550.54.15", (11, 8), (T4,)))
    monkeypatch.setattr(torch.version, "cuda", "13.0")  # this machine's torch build, whatever it is
    with caplog.at_level(logging.INFO, logger="pawpular"):
        assert backend.resolve_device.__wrapped__("auto") == "cpu"
        assert backend.resolve_device.__wrapped__("auto") == "cpu"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert torch.__version__ in msg and "11.8" in msg and "Tesla T4" in msg and "fix" in msg.lower()


def test_auto_and_cuda_with_a_too_new_torch(monkeypatch, caplog, fresh_log):
    import torch

    if torch.cuda.is_available():
        pytest.skip("torch uses a GPU here")
    monkeypatch.setattr(backend.install_plan, "read_driver", lambda: drv((12, 4)))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    with pytest.raises(RuntimeError, match=r"device: cuda.*built for CUDA 13.0.*12\.4.*whl/cu126"):
        backend.resolve_device.__wrapped__("cuda")
    with caplog.at_level(logging.WARNING, logger="pawpular"):
        assert backend.resolve_device.__wrapped__("cpu") == "cpu"  # asked for the CPU: nothing to warn about
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_no_driver_no_warning(monkeypatch, caplog, fresh_log):
    import torch

    if torch.cuda.is_available():
        pytest.skip("torch uses a GPU here")
    monkeypatch.setattr(backend.install_plan, "read_driver", lambda: None)
    with caplog.at_level(logging.WARNING, logger="pawpular"):
        assert backend.resolve_device.__wrapped__("auto") == "cpu"
    assert not caplog.records
    with pytest.raises(RuntimeError, match="no NVIDIA driver"):
        backend.resolve_device.__wrapped__("cuda")


@pytest.fixture
def fake_rapids(tmp_path, monkeypatch):
    """Write fake cuml / cudf packages on sys.path; removed (and unimported) afterwards."""

    def write(**sources: str) -> None:
        for name, src in sources.items():
            (tmp_path / name).mkdir()
            (tmp_path / name / "__init__.py").write_text(textwrap.dedent(src))
        monkeypatch.syspath_prepend(str(tmp_path))

    yield write
    for name in ("cuml", "cudf"):
        sys.modules.pop(name, None)


def test_broken_rapids_falls_back_with_one_warning(fake_rapids, caplog):
    fake_rapids(
        cuml="raise ImportError('libcuml++.so: cannot open shared object file')", cudf="__version__ = '26.10.00'"
    )
    status = backend.rapids_status()
    assert status.installed and not status.ok and "libcuml++.so" in status.error
    with caplog.at_level(logging.WARNING, logger="pawpular"):
        assert backend.has_rapids.__wrapped__() is False
    (rec,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "libcuml++.so" in rec.getMessage() and "pip uninstall" in rec.getMessage()


def test_half_a_rapids_is_broken_and_a_whole_one_is_used(fake_rapids, caplog):
    fake_rapids(cuml="__version__ = '26.10.00'")
    assert "cudf not installed" in backend.rapids_status().error
    assert backend.has_rapids.__wrapped__() is False


def test_working_rapids_reports_its_versions(fake_rapids):
    fake_rapids(cuml="__version__ = '26.10.00'", cudf="__version__ = '26.10.01'")
    status = backend.rapids_status()
    assert status.ok and (status.cuml, status.cudf) == ("26.10.00", "26.10.01")
    assert backend.has_rapids.__wrapped__() is True  # no CUDA here: no compute-capability check to fail


def test_no_rapids_is_quietly_absent(caplog):
    if backend.rapids_status().installed:
        pytest.skip("RAPIDS is installed here")
    with caplog.at_level(logging.WARNING, logger="pawpular"):
        assert backend.has_rapids.__wrapped__() is False
    assert not caplog.records
