"""Atomic writes, byte-stable checkpoints and the experiment lock."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pawpular.store.files import atomic_path
from pawpular.store.files import write_text as atomic_write_text
from pawpular.store.lock import ExperimentLocked, experiment_lock


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("killed")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_sigkill_mid_write_leaves_old_file_and_the_sweep_removes_the_temp(tmp_path):
    path = tmp_path / "exp" / "table.parquet"
    atomic_write_text(path, "complete")
    code = (
        "import os, signal, sys; from pawpular.store.files import atomic_path\n"
        f"with atomic_path({str(path)!r}) as t:\n"
        "    t.write_text('partial'); os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    r = subprocess.run([sys.executable, "-c", code])
    assert r.returncode == -9
    assert path.read_text() == "complete"
    leftovers = list(path.parent.glob(".*.tmp"))
    assert len(leftovers) == 1  # the killed writer's temp file, never the real name
    with experiment_lock(tmp_path / "exp", "svr"):
        pass
    assert not list(path.parent.glob(".*.tmp"))


@contextlib.contextmanager
def lock_held_elsewhere(folder: Path) -> Iterator[subprocess.Popen]:
    """Another process holding ``folder``'s lock for stage train until the block ends (then it is killed)."""
    code = (
        "import time, sys; from pawpular.store.lock import experiment_lock\n"
        f"with experiment_lock({str(folder)!r}, 'train'):\n"
        "    print('locked', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_second_run_is_refused_with_a_clear_message(tmp_path):
    with lock_held_elsewhere(tmp_path) as holder:
        with pytest.raises(ExperimentLocked, match=rf"being written by another run \(pid {holder.pid}.*stage train"):
            with experiment_lock(tmp_path, "embed"):
                pass
    with experiment_lock(tmp_path, "embed"):  # the killed holder's lock is stale: taken over
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".lock").exists()


def test_lock_is_reentrant_within_one_process(tmp_path):
    with experiment_lock(tmp_path, "all"):
        with experiment_lock(tmp_path, "folds"):
            assert (tmp_path / ".lock").exists()
        assert (tmp_path / ".lock").exists()  # the inner stage does not release the outer lock
    assert not (tmp_path / ".lock").exists()


@pytest.mark.parametrize("content", [b"", b"garbage{", b"[1, 2]", b'{"pid": "x"}'])
def test_an_empty_or_corrupt_lock_file_blocks_nothing(tmp_path, content):
    """Old: an empty lock (a kill right after creating it, a full disk) blocked every run ("pid None on None");
    [1, 2] was an AttributeError traceback. The OS lock, not the file's content, decides."""
    (tmp_path / ".lock").write_bytes(content)
    with experiment_lock(tmp_path, "train"):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".lock").exists()


def test_release_removes_only_our_own_lock(tmp_path):
    with experiment_lock(tmp_path, "train"):
        other = tmp_path / "other.lock"
        other.write_text('{"pid": 1, "host": "elsewhere", "command": "svr"}')
        os.replace(other, tmp_path / ".lock")  # someone else's lock now has the name
    assert (tmp_path / ".lock").read_text().startswith('{"pid": 1')  # not deleted on our way out


RACE = """
import sys, time
from pawpular.store.lock import ExperimentLocked, experiment_lock
sys.stdin.readline()
try:
    with experiment_lock(sys.argv[1], "train"):
        print("got", flush=True)
        time.sleep(2)
except ExperimentLocked:
    print("refused", flush=True)
"""


def test_racing_writers_get_exactly_one_lock(tmp_path):
    """Old: taking over a stale lock raced, and two writers trained fold 0 at once."""
    (tmp_path / ".lock").write_text('{"pid": 999999, "host": "gone"}')  # a dead run's lock to take over
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACE, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    time.sleep(1.5)  # all started and waiting
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outs == ["got", "refused", "refused", "refused"]


def test_report_and_export_take_the_lock_and_refuse_a_live_writer(experiment_run, tmp_path, capsys):
    from pawpular.cli import main as cli

    with lock_held_elsewhere(experiment_run) as holder:
        for argv in (
            ["report", "--output", str(experiment_run)],
            ["export", "--output", str(experiment_run), "--to", str(tmp_path / "art")],
        ):
            assert cli.main(argv) == 2
            assert f"pid {holder.pid}" in capsys.readouterr().err
    assert not (tmp_path / "art").exists()


def test_torch_checkpoints_are_byte_stable(tmp_path):
    """Old: torch.save stored the temporary file's name inside the zip, so equal weights had other bytes."""
    import torch

    from pawpular.store.files import save_torch

    state = {"w": torch.arange(6.0).reshape(2, 3)}
    save_torch(state, tmp_path / "a" / "best.pt")
    save_torch(state, tmp_path / "b" / "best.pt")
    assert (tmp_path / "a" / "best.pt").read_bytes() == (tmp_path / "b" / "best.pt").read_bytes()
    assert torch.equal(torch.load(tmp_path / "a" / "best.pt", weights_only=True)["w"], state["w"])
