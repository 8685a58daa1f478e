"""Atomic writes, byte-stable checkpoints and the experiment lock."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pawpular.files import atomic_path, write_text as atomic_write_text
from pawpular.lock import ExperimentLocked, experiment_lock


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
    code = ("import os, signal, sys; from pawpular.files import atomic_path\n"
            f"with atomic_path({str(path)!r}) as t:\n"
            "    t.write_text('partial'); os.kill(os.getpid(), signal.SIGKILL)\n")
    r = subprocess.run([sys.executable, "-c", code])
    assert r.returncode == -9
    assert path.read_text() == "complete"
    leftovers = list(path.parent.glob(".*.tmp"))
    assert len(leftovers) == 1  # the killed writer's temp file, never the real name
    with experiment_lock(tmp_path / "exp", "svr"):
        pass
    assert not list(path.parent.glob(".*.tmp"))


def test_second_run_is_refused_with_a_clear_message(tmp_path):
    code = ("import time, sys; from pawpular.lock import experiment_lock\n"
            f"with experiment_lock({str(tmp_path)!r}, 'train'):\n"
            "    print('locked', flush=True); time.sleep(30)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ExperimentLocked, match=rf"being written by another run \(pid {holder.pid}.*stage train"):
            with experiment_lock(tmp_path, "embed"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with experiment_lock(tmp_path, "embed"):  # the killed holder's lock is stale: taken over
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".lock").exists()


def test_lock_is_reentrant_within_one_process(tmp_path):
    with experiment_lock(tmp_path, "all"):
        with experiment_lock(tmp_path, "folds"):
            assert (tmp_path / ".lock").exists()
        assert (tmp_path / ".lock").exists()  # the inner stage does not release the outer lock
    assert not (tmp_path / ".lock").exists()
