"""Shared fixtures: a small embedded competition built once per test session, and config helpers."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# torch's threads, in the tests and in every command they start (read when torch loads): the cores shared out
# between pytest-xdist's workers (PYTEST_XDIST_WORKER_COUNT), since workers each using every core slow each other
# down; 2 in a single process, as before.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // _WORKERS)) if _WORKERS > 1 else "2")

REPO = Path(__file__).resolve().parents[1]


SHARED = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def small_competition(tmp_path_factory) -> Path:
    """A 120-train / 16-test synthetic competition, one for the session's workers (read-only: copy it before
    breaking it)."""
    from pawpular.data.synthetic import make_synthetic

    def build(folder: Path) -> None:
        make_synthetic(folder / "small", n_train=120, n_test=16, seed=3)

    return built_once(tmp_path_factory, "small_competition", build) / "small"


@pytest.fixture
def competition_copy(small_competition, tmp_path) -> Path:
    """A private copy of the small competition that a test may break."""
    return Path(shutil.copytree(small_competition, tmp_path / "comp"))


@pytest.fixture
def make_cfg(tmp_path):
    """Build a Config for a data folder with `--set`-style overrides; outputs go under tmp_path."""
    from pawpular.config.schema import load_config

    def _make(data_dir: Path, *overrides: str, config: str | None = None, out: Path | None = None):
        return load_config(config, list(overrides), data_dir=str(data_dir), output_dir=str(out or tmp_path / "exp"))

    return _make


def shared_or_skip(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: the shared real-data folder is not beside this checkout")
    return path


@pytest.fixture(scope="session")
def default_competition(tmp_path_factory) -> Path:
    """The synthetic competition at its default size (what `./run.sh` uses)."""
    from pawpular.data.synthetic import DEFAULT_N_TEST, DEFAULT_N_TRAIN, make_synthetic

    def build(folder: Path) -> None:
        make_synthetic(folder / "default", DEFAULT_N_TRAIN, DEFAULT_N_TEST, seed=0)

    return built_once(tmp_path_factory, "default_competition", build) / "default"


# --- one real, tiny run of the whole pipeline, shared by the report, notebook and fault tests ------------------

CONFIG = REPO / "configs" / "default.yaml"
FROZEN = REPO / "configs" / "frozen_svr.yaml"
TINY = ["folds.n_folds=3", "train.epochs=2", "train.num_workers=0", "embed.num_workers=0", "svr.n_trials=8"]


def config_args(config: Path, data: Path, out: Path, *settings: str) -> list[str]:
    """CLI arguments (after the command): ``config`` on ``data`` into ``out``, each setting a ``--set``."""
    return ["--config", str(config), "--data", str(data), "--output", str(out)] + [
        a for s in settings for a in ("--set", s)
    ]


def tiny_args(data: Path, out: Path, *extra: str) -> list[str]:
    """CLI arguments (after the command) for the tiny config (plus ``extra`` settings) on ``data``, into ``out``."""
    return config_args(CONFIG, data, out, *TINY, *extra)


def frozen_args(data: Path, out: Path, *extra: str) -> list[str]:
    """The same for configs/frozen_svr.yaml, the frozen recipe (no model of its own: see test_frozen.TINY_MODEL)."""
    return config_args(FROZEN, data, out, *TINY, *extra)


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    """The command that runs ``args`` (``-m pawpular.cli train ...``, or a script and its arguments) in ``nproc``
    processes under torchrun on this machine (gloo on a CPU)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def fault_commits(log: Path) -> list[tuple[int, str]]:
    """(k, path) of each file commit a run listed under ``PAWPULAR_FAULT_LOG``: a rerun under
    ``PAWPULAR_FAULT_KILL_AT=k`` is SIGKILLed at the k-th (``files._commit_point``)."""
    rows = (line.split(maxsplit=2) for line in log.read_text().splitlines()) if log.is_file() else ()
    return [(int(k), path) for k, _, path in rows]


@contextlib.contextmanager
def commits_counted(log: Path) -> Iterator[None]:
    """A command run in this process within the block lists its file commits in ``log``, counted from 1 as a fresh
    process counts them (``fault_commits`` reads them back)."""
    from pawpular.store import files

    with pytest.MonkeyPatch.context() as m:
        m.setattr(files, "_commits", 0)
        m.setenv("PAWPULAR_FAULT_LOG", str(log))
        yield


def _sigint_default() -> None:  # a test run in the background inherits SIGINT ignored: a terminal's child has it
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def popen_cli(argv: list[str], env: dict[str, str], **kwargs) -> subprocess.Popen:
    """Start a command as a terminal would, for the Ctrl-C tests: SIGINT at its default, stdout and stderr piped as
    text (``start_new_session=True`` in ``kwargs`` gives it and its workers a process group of their own)."""
    pipe = subprocess.PIPE
    return subprocess.Popen(argv, stdout=pipe, stderr=pipe, text=True, env=env, preexec_fn=_sigint_default, **kwargs)


def built_once(tmp_path_factory, name: str, build) -> Path:
    """``build(folder)`` run once per test session, whichever pytest-xdist worker asks first (the others wait for it
    and get the same folder): for what its tests only read, and costs more than a test. The folder is in the
    session's temporary root, which the workers share."""
    import fcntl

    root = tmp_path_factory.getbasetemp()
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root  # pytest-N/, above each popen-gwK/
    folder, done = root / "built-once" / name, root / "built-once" / f".{name}.done"
    folder.parent.mkdir(exist_ok=True)
    with open(root / "built-once" / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a worker that failed half-way
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


def run_stages(stages: tuple[str, ...] | list[str], args: list[str]) -> None:
    """Run each stage through the CLI in this process, each one asserted to succeed."""
    from pawpular.cli import main as cli

    for stage in stages:
        assert cli.main([stage, *args]) == 0, stage


def build_run(comp: Path, out: Path, *extra: str) -> Path:
    """A finished experiment folder from the real pipeline (tiny config: 10-30 s), built once per session."""
    from pawpular.cli import main as cli

    if not (out / "submission.csv").is_file():
        assert cli.main(["all", *tiny_args(comp, out, *extra)]) == 0
    return out


def adopt_folds(cfg, folds) -> None:
    """Write ``folds`` (Id, fold) as the experiment's folds.csv with the folds stage's manifest, as if the stage
    had made them (tests that need a particular split: round-robin folds, planted embeddings)."""
    from pawpular.runner import Context
    from pawpular.stages import folds as folds_stage
    from pawpular.store import artifacts, manifest
    from pawpular.store.files import write_csv

    write_csv(folds, artifacts.folds_csv(cfg.out))
    plan = folds_stage.plan(Context(cfg))
    manifest.commit(
        artifacts.manifest(cfg.out, "folds"),
        cfg.out,
        manifest.Record(plan.config, plan.inputs),
        [artifacts.folds_csv(cfg.out)],
    )


def plant_finished(out: Path, folder: Path) -> None:
    """Mark planted files in ``folder`` (e.g. embeddings written by a test) as a finished unit of work."""
    from pawpular.store import manifest

    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != "manifest.json")
    manifest.commit(folder / "manifest.json", out, manifest.Record({}, {}), files)


def make_partial(run: Path, dest: Path) -> Path:
    """The run as it stood before `svr`: train (and embed) finished, no svr/, ensemble/ or submission."""
    import json

    if dest.is_dir():
        return dest
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("svr", "ensemble", "submission.csv", "report.html"))
    timings = json.loads((dest / "timings.json").read_text())
    (dest / "timings.json").write_text(json.dumps({k: v for k, v in timings.items() if k not in ("svr", "ensemble")}))
    return dest


def session_run(tmp_path_factory, comp: Path, name: str, *extra: str) -> Path:
    """``build_run`` once per session (``built_once``), and this worker's own copy of it, ``name`` in its temporary
    folder: the tests that use it write into it (reports, locks), and a copy takes milliseconds where the run takes
    10-15 s. The copy is what a run made there leaves: its embedding sets in the shared cache beside it
    (``.embeddings``), its emb/ files hard links into that cache, and its config.yaml naming the copy."""
    built = built_once(tmp_path_factory, name, lambda folder: build_run(comp, folder / "exp", *extra)) / "exp"
    mine = tmp_path_factory.getbasetemp() / name
    if not mine.is_dir():
        cache, my_cache = built.parent / ".embeddings", mine.parent / ".embeddings"
        shutil.copytree(cache, my_cache, dirs_exist_ok=True)
        cached = {(p.stat().st_dev, p.stat().st_ino): my_cache / p.relative_to(cache) for p in cache.rglob("*")}

        def copy(src: str, dst: str) -> None:
            found = os.stat(src)
            linked = cached.get((found.st_dev, found.st_ino)) if found.st_nlink > 1 else None
            os.link(linked, dst) if linked else shutil.copy2(src, dst)

        shutil.copytree(built, mine, copy_function=copy)
        config, line = mine / "config.yaml", f"output_dir: {built}\n"
        assert line in config.read_text(), f"{config} does not name the folder it was built in"
        config.write_text(config.read_text().replace(line, f"output_dir: {mine}\n"))
    return mine


@pytest.fixture(scope="session")
def experiment_run(small_competition, tmp_path_factory) -> Path:
    return session_run(tmp_path_factory, small_competition, "report_run")


@pytest.fixture(scope="session")
def holdout_run(small_competition, tmp_path_factory) -> Path:
    """The tiny run with a holdout (folds.holdout=0.2): holdout predictions and a holdout RMSE in weights.json."""
    return session_run(tmp_path_factory, small_competition, "holdout_run", *HOLDOUT)


HOLDOUT = ["folds.holdout=0.2"]


@pytest.fixture
def run(experiment_run, tmp_path) -> Path:
    """A copy of the finished tiny run, this test's own to change."""
    return Path(shutil.copytree(experiment_run, tmp_path / "run"))


@pytest.fixture(scope="module")
def art(experiment_run, tmp_path_factory) -> Path:
    """The tiny run exported, shared by a module's tests (which only read it)."""
    import pawpular

    return pawpular.export(experiment_run, tmp_path_factory.mktemp("export") / "art")


@pytest.fixture(scope="session")
def partial_run(experiment_run, tmp_path_factory) -> Path:
    return make_partial(experiment_run, tmp_path_factory.getbasetemp() / "report_partial")


@pytest.fixture(scope="session")
def test_only(small_competition, tmp_path_factory) -> Path:
    """The competition folder as a Kaggle notebook sees it at inference: test.csv, sample_submission.csv, test/."""
    root = tmp_path_factory.mktemp("kaggle") / "competition"
    shutil.copytree(small_competition / "test", root / "test")
    for name in ("test.csv", "sample_submission.csv"):
        shutil.copy(small_competition / name, root / name)
    return root
