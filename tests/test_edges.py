"""What crash and misuse found, each reproduced: stale fold folders, a mixed embedding folder, damaged files taken
as cached, odd output paths, all-equal targets, bad fold values, temporary-file litter, byte-unstable checkpoints,
and OS errors (a file where a folder should be, a read-only folder, a full disk) that must be one line and leave
nothing half-written.

Each runs the real CLI on a copy of the session's finished tiny run (``experiment_run``); compared bytes are
those of deterministic outputs (CPU training replays exactly).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, fault_commits, tiny_args

from pawpular.cli import main as cli
from pawpular.store import artifacts
from pawpular.store.files import read_json

pytestmark = pytest.mark.slow


def _copy(run: Path, dst: Path) -> Path:
    return Path(shutil.copytree(run, dst))


def _main(*args: str) -> int:
    return cli.main(list(args))


def test_fold_folders_beyond_n_folds_are_removed_and_never_exported(
    experiment_run, small_competition, tmp_path, capsys
):
    run = _copy(experiment_run, tmp_path / "run")
    assert _main("all", *tiny_args(small_competition, run), "--set", "folds.n_folds=2") == 0
    for parent in ("train", "emb", "svr"):
        assert sorted(artifacts.fold_dirs(run / parent)) == [0, 1], parent
    assert _main("export", "--output", str(run), "--to", str(tmp_path / "art")) == 0
    exported = read_json(tmp_path / "art" / "manifest.json")["experiments"]["run"]["folds"]
    assert exported == [0, 1]
    assert not (tmp_path / "art" / "experiments" / "run" / "train" / "fold2").exists()


def _kill_at(k: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PAWPULAR_FAULT_KILL_AT": str(k), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pawpular", *args], capture_output=True, text=True, cwd=REPO, env=env)


def test_embed_killed_under_other_settings_then_rerun_with_the_original_ones(
    experiment_run, small_competition, tmp_path
):
    """Old failure: a folder kept train embeddings of one transform and test embeddings of another, for good."""
    run, probe = _copy(experiment_run, tmp_path / "run"), _copy(experiment_run, tmp_path / "own" / "probe")
    # the other transform's sets are written into the shared cache, then linked: find the commit that would link
    # fold0's test table (train's already linked) on a probe copy under another output root (its own cache),
    # and kill the real run just before it
    log = tmp_path / "commits.log"
    env = {**os.environ, "PAWPULAR_FAULT_LOG": str(log), "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pawpular",
            "embed",
            *tiny_args(small_competition, probe),
            "--set",
            "embed.tta_hflip=false",
        ],
        capture_output=True,
        cwd=REPO,
        env=env,
        check=True,
    )
    target = str(probe / "emb" / "fold0" / "test.parquet")
    (k,) = [k for k, path in fault_commits(log) if path == target]
    r = _kill_at(k, "embed", *tiny_args(small_competition, run), "--set", "embed.tta_hflip=false")
    assert r.returncode == -9
    before = pd.read_parquet(experiment_run / "emb/fold0/train.parquet")
    assert not pd.read_parquet(run / "emb/fold0/train.parquet").equals(before)  # the other transform's, written
    assert _main("embed", *tiny_args(small_competition, run)) == 0
    for split in ("train", "test"):
        for k in range(3):
            name = f"emb/fold{k}/{split}.parquet"
            pd.testing.assert_frame_equal(pd.read_parquet(run / name), pd.read_parquet(experiment_run / name))


@pytest.mark.parametrize(
    "victim, stage",
    [
        ("emb/fold1/test.parquet", "embed"),
        ("train/fold0/best.pt", "train"),
        ("svr/oof.parquet", "svr"),
        ("svr/fold2/head.safetensors", "svr"),
        ("ensemble/weights.json", "ensemble"),
    ],
)
def test_damaged_files_are_recomputed_never_trusted(experiment_run, small_competition, tmp_path, capsys, victim, stage):
    run = _copy(experiment_run, tmp_path / "run")
    path = run / victim
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a truncated copy, a full disk's leftover
    assert _main("status", *tiny_args(small_competition, run)) == 0
    status = capsys.readouterr().out
    assert f"{stage:<9} damaged" in status and victim in status
    assert _main("export", "--output", str(run), "--to", str(tmp_path / "art")) == 2
    err = capsys.readouterr().err
    assert f"{stage} is damaged" in err and victim in err and "run `pawpular" in err
    assert not (tmp_path / "art").exists()
    assert _main("all", *tiny_args(small_competition, run)) == 0
    assert path.read_bytes() == (experiment_run / victim).read_bytes()  # recomputed, the same bytes as before


def test_odd_characters_in_the_output_path(experiment_run, small_competition, tmp_path):
    """Old failure: `?` cut the sqlite URL (study.db written elsewhere) and `%41` crashed."""
    run = _copy(experiment_run, tmp_path / "we?ird %41 #x")
    shutil.rmtree(run / "svr")
    assert _main("svr", *tiny_args(small_competition, run), "--set", "svr.n_trials=3") == 0
    assert (run / "svr" / "study.db").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["we?ird %41 #x"]  # nothing beside the experiment


def test_all_equal_targets_run_to_a_submission_with_a_warning(small_competition, tmp_path, caplog):
    caplog.set_level("INFO", logger="pawpular")
    data = Path(shutil.copytree(small_competition, tmp_path / "data"))
    train = pd.read_csv(data / "train.csv")
    train["Pawpularity"] = 50
    train.to_csv(data / "train.csv", index=False)
    out = tmp_path / "exp"
    assert _main("all", *tiny_args(data, out), "--set", "train.epochs=1") == 0
    sub = pd.read_csv(out / "submission.csv")
    assert sub["Pawpularity"].between(1, 100).all()
    assert read_json(out / "ensemble" / "weights.json")["worse_than_mean"]  # said loudly: nothing to learn
    assert "WARNING" in caplog.text
    assert _main("report", "--output", str(out)) == 0


@pytest.mark.parametrize(
    "value, message", [("7", "got 7"), ("-2", "got -2"), ("", "got nan"), ("1.5", "got 1.5"), ("x", "got 'x'")]
)
def test_bad_fold_values_are_refused_naming_the_row(small_competition, tmp_path, capsys, value, message):
    ids = pd.read_csv(small_competition / "train.csv", dtype={"Id": str})["Id"]
    folds = pd.DataFrame({"Id": ids, "fold": (np.arange(len(ids)) % 3).astype(str)})
    folds.loc[5, "fold"] = value
    path = tmp_path / "my_folds.csv"
    folds.to_csv(path, index=False)
    out = tmp_path / "exp"
    assert _main("folds", *tiny_args(small_competition, out), "--set", f"folds.file={path}") == 2
    err = capsys.readouterr().err
    assert f"my_folds.csv: line 7 (Id {ids[5]})" in err and message in err and "Traceback" not in err
    assert not artifacts.folds_csv(out).exists()
    folds.loc[5, "fold"] = "-1"  # in your own file, -1 marks a holdout row
    folds.to_csv(path, index=False)
    assert _main("folds", *tiny_args(small_competition, out), "--set", f"folds.file={path}") == 0
    assert pd.read_csv(artifacts.folds_csv(out))["fold"].tolist() == folds["fold"].astype(int).tolist()


def test_temporary_litter_and_a_stray_last_pt_are_swept(experiment_run, small_competition, tmp_path):
    run = _copy(experiment_run, tmp_path / "run")
    # what killed writers leave (the project's own temporary names: a user's .*.tmp is never swept)
    litter = [run / ".report.html.pawpular-abc123.tmp", run / "svr" / ".oof.parquet.pawpular-x.tmp"]
    for p in litter:
        p.write_text("half")
    shutil.copy(run / "train" / "fold0" / "best.pt", run / "train" / "fold0" / "last.pt")
    assert _main("report", "--output", str(run), "--data", str(small_competition)) == 0
    assert not any(p.exists() for p in litter)
    assert _main("train", *tiny_args(small_competition, run)) == 0  # cached, and tidied
    assert not (run / "train" / "fold0" / "last.pt").exists()
    sub = tmp_path / "out" / "submission.csv"
    sub.parent.mkdir()
    (sub.parent / ".submission.csv.pawpular-zz.tmp").write_text("half")
    assert _main("export", "--output", str(run), "--to", str(tmp_path / "art")) == 0
    assert (
        _main("predict", "--artifacts", str(tmp_path / "art"), "--data", str(small_competition), "--out", str(sub)) == 0
    )
    assert sorted(p.name for p in sub.parent.iterdir()) == ["submission.csv"]


def test_checkpoints_are_byte_stable_and_an_identical_retrain_invalidates_nothing(
    experiment_run, small_competition, tmp_path, caplog
):
    caplog.set_level("INFO", logger="pawpular")
    run = _copy(experiment_run, tmp_path / "run")
    assert _main("train", *tiny_args(small_competition, run), "--set", "train.folds=[1]", "--overwrite") == 0
    assert (run / "train/fold1/best.pt").read_bytes() == (experiment_run / "train/fold1/best.pt").read_bytes()
    caplog.clear()
    assert _main("all", *tiny_args(small_competition, run)) == 0
    assert "embed: cached" in caplog.text and "svr: cached" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# OS errors: one line, exit 2, nothing half-written


def test_an_output_path_that_is_a_file(small_competition, tmp_path, capsys):
    target = tmp_path / "exp"
    target.write_text("a file, not a folder")
    assert _main("folds", *tiny_args(small_competition, target)) == 2
    assert (
        capsys.readouterr().err.strip() == f"error: --output {target}: is a file, not a folder; choose another --output"
    )


def test_predict_out_a_directory_is_refused_before_the_inference(experiment_run, small_competition, tmp_path, capsys):
    assert _main("export", "--output", str(experiment_run), "--to", str(tmp_path / "art")) == 0
    capsys.readouterr()
    assert (
        _main("predict", "--artifacts", str(tmp_path / "art"), "--data", str(small_competition), "--out", str(tmp_path))
        == 2
    )
    err = capsys.readouterr().err
    assert "is a folder, not a file" in err and "Traceback" not in err and "predict:" not in err  # no inference ran


@pytest.fixture
def tmpfs(tmp_path):
    """A small tmpfs (root can mount one here); skipped with the reason where mounting is not allowed."""
    mounted = []

    def mount(name: str, size_kb: int, read_only: bool = False) -> Path:
        path = tmp_path / name
        path.mkdir()
        opts = f"size={size_kb}k" + (",ro" if read_only else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs to simulate the condition: {r.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_read_only_output_folder(small_competition, tmpfs, capsys):
    ro = tmpfs("ro", 1024, read_only=True)
    assert _main("folds", *tiny_args(small_competition, ro / "exp")) == 2
    assert capsys.readouterr().err.strip() == f"error: cannot write {ro / 'exp'}: read-only file system"


def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(experiment_run, small_competition, tmpfs, capsys):
    disk = tmpfs("disk", 600)
    run = disk / "run"
    shutil.copytree(
        experiment_run,
        run,
        ignore=shutil.ignore_patterns("train", "emb", "svr", "ensemble", "submission.csv", "report.html", "study.db"),
    )
    assert _main("train", *tiny_args(small_competition, run)) == 2  # 3 folds of checkpoints do not fit in 600 KB
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot write {run}/train/fold") and err.endswith(": no space left on device")
    assert "\n" not in err
    assert not list(run.rglob(".*.tmp")) and not (run / "train" / "manifest.json").exists()
