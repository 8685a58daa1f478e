"""Fault suite: SIGKILL each long stage at a random point, rerun, and get exactly what an uninterrupted run gets.

Also: stale caches are invalidated by exactly what they depend on, and the same config and seed give the same
folds, SVR predictions and ensemble weights. The runs that are killed, and the one compared with the session's run
for determinism, are the real CLI in child processes; the others (the reruns after a kill included) run it in this
process (a child costs 4-6 s of imports). All on a small embedded competition; on CPU the math is deterministic,
so outputs are compared bitwise.
"""

from __future__ import annotations

import logging
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, tiny_args
from PIL import Image

pytestmark = pytest.mark.slow

# Every file whose content a resumed run must reproduce.
OUTPUTS = [
    "folds/folds.csv",
    "train/oof.parquet",
    "train/test.parquet",
    "emb/fold0/train.parquet",
    "emb/fold2/test.parquet",
    "svr/oof.parquet",
    "svr/test.parquet",
    "ensemble/oof.parquet",
    "submission.csv",
]


def _cli(*args: str, data: Path, out: Path, extra: list[str] | None = None) -> list[str]:
    return [sys.executable, "-m", "pawpular", *args, *tiny_args(data, out), *(extra or [])]


def _run(*args: str, data: Path, out: Path, extra: list[str] | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(_cli(*args, data=data, out=out, extra=extra), capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _run_here(caplog, *args: str, data: Path, out: Path, extra: list[str] | None = None) -> str:
    """The same command in this process; what it logged."""
    from pawpular.cli import main as cli

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pawpular"):
        assert cli.main([*args, *tiny_args(data, out), *(extra or [])]) == 0
    return caplog.text


def _kill_when(
    stage: str, data: Path, out: Path, ready, delay: float, extra: list[str] | None = None
) -> tuple[int, str]:
    """Start `pawpular STAGE`; once ``ready()`` holds, wait ``delay`` seconds and SIGKILL it. (returncode, log)"""
    proc = subprocess.Popen(
        _cli(stage, data=data, out=out, extra=extra),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        cwd=REPO,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    deadline = time.time() + 300
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reader.join(5)
    return proc.returncode, "".join(lines)


def _complete_trials(db: Path) -> int:
    import sqlite3

    if not db.is_file():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.1) as con:
            return con.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0]
    except sqlite3.Error:
        return 0


def _same(a: Path, b: Path, name: str) -> None:
    if name.endswith(".parquet"):
        x, y = pd.read_parquet(a / name), pd.read_parquet(b / name)
        pd.testing.assert_frame_equal(x, y, check_exact=True, obj=name)
    else:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.fixture(scope="module")
def reference(small_competition, experiment_run):
    """The small competition and the session's uninterrupted run of the whole pipeline (same tiny config)."""
    return small_competition, experiment_run


@pytest.mark.parametrize("stage", ["train", "embed", "svr"])
def test_killed_stage_resumes_to_identical_outputs(reference, tmp_path, stage, caplog):
    """Kill at a random point after the stage has made progress worth keeping, rerun, compare bitwise."""
    data, ref = reference
    out = tmp_path / "exp"
    # the stages before the one killed as the uninterrupted run made them (the same tiny config): copied, not rerun
    later = {"train": ["train", "emb"], "embed": ["emb"], "svr": []}[stage]
    skip = shutil.ignore_patterns(*later, "svr", "ensemble", "submission.csv", "report.html", "timings.json")
    shutil.copytree(ref, out, ignore=skip)
    rng = random.Random(f"{stage}-kill")
    extra: list[str] = []
    if stage == "train":  # mid-fold of a random fold, right after its first epoch checkpoint (whatever the speed)
        fold = rng.randrange(3)
        ready, delay = (lambda: (out / f"train/fold{fold}/last.pt").is_file()), 0.0
    elif stage == "embed":  # mid-way through the folds, fold 0 already cached
        ready, delay = (lambda: (out / "emb/fold0/manifest.json").is_file()), rng.uniform(0.0, 0.5)
    else:  # mid-study: a longer study, compared with its own uninterrupted twin
        extra = ["--set", "svr.n_trials=60"]
        k = rng.randint(10, 45)
        ready, delay = (lambda: _complete_trials(out / "svr" / "study.db") >= k), 0.0
        twin = Path(shutil.copytree(out, tmp_path / "twin"))
        _run_here(caplog, "svr", data=data, out=twin, extra=extra)
        _run_here(caplog, "ensemble", data=data, out=twin, extra=extra)
        ref = twin
    code, log = _kill_when(stage, data, out, ready, delay, extra)
    assert code == -signal.SIGKILL, f"{stage} finished before the SIGKILL:\n{log[-2000:]}"
    assert not (out / "submission.csv").exists()
    folder = {"train": "train", "embed": "emb", "svr": "svr"}[stage]
    kept = sorted(str(p.relative_to(out)) for p in out.glob(f"{folder}/**/*") if p.is_file())
    trials = _complete_trials(out / "svr" / "study.db")
    print(f"{stage}: SIGKILL {delay:.2f}s after progress; kept {kept}; complete trials {trials}")
    err = _run_here(caplog, "all", data=data, out=out, extra=extra)  # resumes what was killed, runs the rest
    for name in OUTPUTS:
        _same(ref, out, name)
    assert not list(out.rglob(".*.tmp")) and not (out / ".lock").exists()
    if stage == "train":
        assert "resuming after epoch" in err  # continued from last.pt rather than starting over
    if stage == "embed":
        assert "fold0=cached" in err
    if stage == "svr":
        assert 0 < trials < 60 and f"({60 - trials} new" in err


def test_changed_image_invalidates_exactly_its_dependents(reference, tmp_path, caplog):
    data, ref = reference
    data2 = Path(shutil.copytree(data, tmp_path / "data"))
    out = Path(shutil.copytree(ref, tmp_path / "exp"))
    test_ids = pd.read_csv(data2 / "test.csv", dtype={"Id": str})["Id"]
    victim = test_ids.iloc[0]
    path = data2 / "test" / f"{victim}.jpg"
    Image.open(path).convert("RGB").transpose(Image.Transpose.ROTATE_180).save(path, quality=90)
    train_before = (out / "train" / "fold0" / "best.pt").stat().st_mtime_ns
    err = _run_here(caplog, "all", data=data2, out=out)
    assert "fold0=computed" in err  # the image digest changed: embeddings recomputed
    assert (out / "train" / "fold0" / "best.pt").stat().st_mtime_ns == train_before  # training not redone
    for name in ("emb/fold0/test.parquet", "svr/test.parquet", "ensemble/test.parquet"):
        a, b = pd.read_parquet(ref / name).set_index("Id"), pd.read_parquet(out / name).set_index("Id")
        changed = (a != b).any(axis=1)
        assert changed.loc[victim], f"{name}: the changed photo's row did not change"
        if name.startswith("emb"):
            assert not changed.drop(victim).any(), f"{name}: other photos' embeddings changed too"


def test_unchanged_rerun_reuses_everything_and_transform_change_recomputes(reference, tmp_path, caplog):
    data, ref = reference
    out = Path(shutil.copytree(ref, tmp_path / "exp"))
    err = _run_here(caplog, "embed", data=data, out=out)
    assert "embed: cached" in err and "=computed" not in err
    err = _run_here(caplog, "embed", data=data, out=out, extra=["--set", "embed.tta_hflip=false"])
    assert "fold0=computed" in err
    a, b = pd.read_parquet(ref / "emb/fold0/train.parquet"), pd.read_parquet(out / "emb/fold0/train.parquet")
    assert not np.allclose(a.drop(columns="Id").to_numpy(), b.drop(columns="Id").to_numpy())


def test_same_config_and_seed_same_results(reference, tmp_path):
    data, ref = reference
    out = tmp_path / "again"
    _run("all", data=data, out=out)
    for name in ("folds/folds.csv", "svr/oof.parquet", "svr/test.parquet", "submission.csv"):
        _same(ref, out, name)
    w1, w2 = (pd.read_json(d / "ensemble" / "weights.json", typ="series")["weights"] for d in (ref, out))
    assert w1 == w2


def test_bad_image_is_rejected_before_any_stage_writes(reference, tmp_path):
    data, _ = reference
    data2 = Path(shutil.copytree(data, tmp_path / "data"))
    victim = pd.read_csv(data2 / "train.csv", dtype={"Id": str})["Id"].iloc[7]
    (data2 / "train" / f"{victim}.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "exp"
    r = subprocess.run(_cli("all", data=data2, out=out), capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and f"train/{victim}.jpg: Id {victim}" in r.stderr
    assert "Traceback" not in r.stderr and not (out / "folds" / "folds.csv").exists()
