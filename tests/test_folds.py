"""Folds: every Id once, balanced sizes and targets, duplicates kept together, deterministic."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd

from pawpular.api import run_config
from pawpular.data.duplicates import duplicate_groups
from pawpular.data.splits import sturges_bins
from pawpular.data.tables import TARGET, read_competition
from pawpular.store import artifacts


def _run(make_cfg, data, *overrides, out=None):
    cfg = make_cfg(data, *overrides, out=out)
    path = run_config("folds", cfg)
    return cfg, pd.read_csv(path, dtype={"Id": str})


def test_folds_cover_every_id_once_balanced(make_cfg, default_competition):
    cfg, f = _run(make_cfg, default_competition, "folds.group_duplicates=false")
    train = read_competition(default_competition).train
    assert sorted(f["Id"]) == sorted(train["Id"]) and not f["Id"].duplicated().any()
    sizes = f["fold"].value_counts()
    assert sorted(sizes.index) == [0, 1, 2, 3, 4] and sizes.max() - sizes.min() <= 1
    means = train.merge(f, on="Id").groupby("fold")[TARGET].mean()
    assert (means - train[TARGET].mean()).abs().max() < 2.0
    assert f["fold"].tolist() == pd.read_csv(artifacts.folds_csv(cfg.out))["fold"].tolist()


def test_duplicate_groups_are_never_split(make_cfg, default_competition, tmp_path):
    cfg, f = _run(make_cfg, default_competition, out=tmp_path / "g")
    dups = pd.read_csv(artifacts.duplicates_csv(cfg.out), dtype={"Id": str}).merge(f, on="Id")
    assert dups["group"].nunique() >= 8  # the planted exact and near duplicates are found
    assert (dups.groupby("group")["fold"].nunique() == 1).all()
    sizes = f["fold"].value_counts()
    assert sizes.max() - sizes.min() <= 0.02 * len(f)


def test_folds_are_deterministic(make_cfg, small_competition, tmp_path):
    _, a = _run(make_cfg, small_competition, out=tmp_path / "a")
    _, b = _run(make_cfg, small_competition, out=tmp_path / "b")
    _, c = _run(make_cfg, small_competition, "folds.seed=1", out=tmp_path / "c")
    assert a.equals(b) and not a.equals(c)


def test_duplicate_grouping_unit():
    h = np.array([0b1111, 0b1110, 0xFFFF0000, 0xFFFF0001, 0x0F0F0F0F0F0F], dtype=np.uint64)
    g = duplicate_groups(h, threshold=1)
    assert g[0] == g[1] and g[2] == g[3] and len({g[0], g[2], g[4]}) == 3


def test_sturges_bins():
    y = np.arange(1, 1001, dtype=float)
    assert sturges_bins(y).max() + 1 == int(np.ceil(np.log2(1000) + 1)) == 11


def test_folds_on_broken_data_writes_nothing(competition_copy, tmp_path):
    df = pd.read_csv(competition_copy / "train.csv")
    df.loc[3, TARGET] = 250
    df.to_csv(competition_copy / "train.csv", index=False)
    out = tmp_path / "exp"
    r = subprocess.run(
        [sys.executable, "-m", "pawpular", "folds", "--data", str(competition_copy), "--output", str(out)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "Pawpularity 250 outside [1, 100]" in r.stderr
    assert not artifacts.folds_csv(out).exists() and not (out / "config.yaml").exists()
    assert not out.exists() or not any(p.name != ".lock" for p in out.iterdir())
