"""The experiment lock: one writer per experiment folder, that can neither wedge nor race.

The lock is an OS advisory lock (``flock``) on ``<experiment>/.lock``, held for the command's life: the kernel
drops it when the process ends, however it ends, so a killed run never blocks the rerun and a corrupt, empty or
foreign lock file means nothing by itself. The file also records the owner (pid, host, command) for the message
a second writer gets. After taking the lock we check that the path still names the file we locked (a releaser
may have unlinked it in between) and retry if not; release unlinks the file only while we still hold it.
Re-entrant within one process: ``pawpular all`` holds it while each stage takes it again. ``interruptible()``
turns SIGTERM into an exception like Ctrl-C, so the lock is released and temp files swept on the way out.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import PawpularError
from .files import sweep_temp_files

LOCK_NAME = ".lock"
log = logging.getLogger("pawpular")
_held: dict[str, list] = {}  # resolved lock path -> [fd, depth]


class ExperimentLocked(PawpularError, RuntimeError):
    """Another live process is writing this experiment folder."""


def _owner(path: Path) -> dict:
    try:
        owner = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _try_lock(path: Path) -> int | None:
    """An fd holding the flock on the file now at ``path``, or None if a live process holds it."""
    for _ in range(100):
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder released and unlinked it under us: lock the new file
    raise ExperimentLocked(f"{path}: could not take the lock (it keeps being replaced)")


@contextlib.contextmanager
def experiment_lock(
    folder: str | Path, command: str, *, name: str = LOCK_NAME, sweep: bool = True, reader: bool = False
) -> Iterator[None]:
    """Hold ``folder``'s lock for the block; sweep temporary files of killed writers once it is ours.

    ``name``/``sweep=False``: a lock for one output file in a folder that is not ours (predict's --out).
    ``reader``: a command that only reads the folder (export) reads a read-only one (an earlier run attached as a
    read-only dataset) without the lock: no run can write there either.
    """
    folder = Path(folder)
    if reader and folder.is_dir() and not os.access(folder, os.W_OK):
        log.info("%s is read-only: %s reads it without taking its lock", folder, command)
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    key = str(path.resolve())
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    fd = _try_lock(path)
    if fd is None:
        owner = _owner(path)
        who = (
            f"pid {owner.get('pid')} on {owner.get('host')}, stage {owner.get('command')}"
            if owner.get("pid")
            else "a process that has not written its name yet"
        )
        what = folder if name == LOCK_NAME else folder / name.removeprefix(".").removesuffix(".lock")
        raise ExperimentLocked(f"{what} is being written by another run ({who}); wait for it to finish")
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    _held[key] = [fd, 1]
    try:
        if sweep:
            sweep_temp_files(folder)
        yield
    finally:
        del _held[key]
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(path).st_ino:  # still our file: nobody else's lock is removed
                os.unlink(path)
        os.close(fd)  # releases the flock


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or Ctrl-C): the lock is released on the way out and the run can be resumed."""


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Turn SIGTERM into an exception (like Ctrl-C), so every ``finally`` runs: locks released, temp files gone."""

    def on_term(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM never interrupts the cleanup
        raise Interrupted(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread (e.g. inside a notebook's worker): nothing to install
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
