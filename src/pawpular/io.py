"""Atomic file writes, the experiment lock, and small table helpers shared by every stage.

Every artifact goes to a temporary file in the same folder and is moved into place with ``os.replace``: a run
killed mid-write leaves the previous file or none, never half of one.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pandas as pd


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:  # data on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual mode
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    """A content hash of a file (for cache keys): changes exactly when its bytes do."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def write_parquet(df: pd.DataFrame, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def write_csv(df: pd.DataFrame, path: str | Path, **kwargs: Any) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, **kwargs)


def save_torch(obj: Any, path: str | Path) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


class ExperimentLocked(RuntimeError):
    pass


@contextlib.contextmanager
def experiment_lock(folder: str | Path, stage: str) -> Iterator[None]:
    """Stop two runs writing the same experiment at once.

    The lock is a file created with O_EXCL holding the owner's pid and host. A lock whose process is gone (a run
    that was killed) is stale and taken over, so a SIGKILL never blocks the rerun that resumes it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / ".lock"
    me = {"pid": os.getpid(), "host": socket.gethostname(), "stage": stage}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = json.loads(lock.read_text() or "{}")
            except (OSError, ValueError):
                owner = {}
            if owner.get("pid") == me["pid"] and owner.get("host") == me["host"]:
                yield  # re-entrant: `pawpular all` holds the lock while each stage runs
                return
            if owner.get("host") == me["host"] and not _alive(owner.get("pid")):
                lock.unlink(missing_ok=True)  # stale: its process was killed
                continue
            raise ExperimentLocked(
                f"{folder} is being written by another run (pid {owner.get('pid')} on {owner.get('host')}, "
                f"stage {owner.get('stage')}); wait for it, or delete {lock} if that run is gone"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        _sweep_temp_files(folder)
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)
        return


def _sweep_temp_files(folder: Path) -> None:
    """Remove temporary files that a killed run left mid-write (only done while holding the lock)."""
    for tmp in folder.rglob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
