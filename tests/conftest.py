"""Shared fixtures: a small embedded competition built once per test session, and config helpers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def small_competition(tmp_path_factory) -> Path:
    """A 120-train / 16-test synthetic competition (read-only: copy it before breaking it)."""
    from pawpular.data.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("comp") / "small", n_train=120, n_test=16, seed=3)


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

    return make_synthetic(tmp_path_factory.mktemp("comp") / "default", DEFAULT_N_TRAIN, DEFAULT_N_TEST, seed=0)


# --- one real, tiny run of the whole pipeline, shared by the report, notebook and fault tests ------------------

CONFIG = REPO / "configs" / "default.yaml"
TINY = ["folds.n_folds=3", "train.epochs=2", "train.num_workers=0", "embed.num_workers=0", "svr.n_trials=8"]


def tiny_args(data: Path, out: Path, *extra: str) -> list[str]:
    """CLI arguments (after the command) for the tiny config (plus ``extra`` settings) on ``data``, into ``out``."""
    return [
        "--config",
        str(CONFIG),
        "--data",
        str(data),
        "--output",
        str(out),
        *[a for s in (*TINY, *extra) for a in ("--set", s)],
    ]


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


@pytest.fixture(scope="session")
def experiment_run(small_competition, tmp_path_factory) -> Path:
    return build_run(small_competition, tmp_path_factory.getbasetemp() / "report_run")


@pytest.fixture(scope="session")
def holdout_run(small_competition, tmp_path_factory) -> Path:
    """The tiny run with a holdout (folds.holdout=0.2): holdout predictions and a holdout RMSE in weights.json."""
    return build_run(small_competition, tmp_path_factory.getbasetemp() / "holdout_run", *HOLDOUT)


HOLDOUT = ["folds.holdout=0.2"]


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
