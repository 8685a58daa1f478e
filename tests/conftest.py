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
    from pawpular.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("comp") / "small", n_train=120, n_test=16, seed=3)


@pytest.fixture
def competition_copy(small_competition, tmp_path) -> Path:
    """A private copy of the small competition that a test may break."""
    return Path(shutil.copytree(small_competition, tmp_path / "comp"))


@pytest.fixture
def make_cfg(tmp_path):
    """Build a Config for a data folder with `--set`-style overrides; outputs go under tmp_path."""
    from pawpular.config import load_config

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
    from pawpular.synthetic import DEFAULT_N_TEST, DEFAULT_N_TRAIN, make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("comp") / "default", DEFAULT_N_TRAIN, DEFAULT_N_TEST, seed=0)
