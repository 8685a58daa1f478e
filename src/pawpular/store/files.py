"""Writing files so that a kill never leaves half of one, and digests that say whether a file changed.

Every artifact is written to a temporary file in its own folder, fsync'd, and moved into place with one
``os.replace`` (a *commit*). A run killed at any instant leaves the previous file or the new one, never a mix;
the stage manifests (``store/manifest.py``) make a stage's files valid together. Every commit, removal and folder
swap goes through ``_commit_point``, where the fault-injection tests kill the process at the k-th one:

    PAWPULAR_FAULT_KILL_AT=k     SIGKILL this process just before its k-th commit (1-based)
    PAWPULAR_FAULT_LOG=FILE      append "k op path" for every commit (how many there are to sweep)

``torch.save`` output is made byte-stable (saved through memory: a file name is not stored inside the zip), so
the same weights give the same digest and a retrain that changes nothing invalidates nothing downstream.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import io
import json
import os
import shutil
import signal
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import ArtifactError, MissingArtifact, as_read_error, as_write_error  # noqa: F401 (re-exported)

# Every temporary name this project makes: ``.{name}.pawpular-{tag}.tmp`` beside ``name``. The lock's sweep
# removes only names of this pattern, never a user's own ``.*.tmp``.
TEMP_MARK = ".pawpular-"
TEMP_GLOB = f".*{TEMP_MARK}*.tmp"
_commits = 0


def temp_path(path: str | Path, tag: str) -> Path:
    """The project's temporary name for ``path`` (beside it): ``.{name}.pawpular-{tag}.tmp``."""
    path = Path(path)
    return path.with_name(f".{path.name}{TEMP_MARK}{tag}.tmp")


def is_temp_name(name: str) -> bool:
    return name.startswith(".") and TEMP_MARK in name and name.endswith(".tmp")


def _commit_point(op: str, path: Path) -> None:
    """Count a commit; the fault-injection hook kills the process here (see the module docstring)."""
    global _commits
    _commits += 1
    log = os.environ.get("PAWPULAR_FAULT_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{_commits} {op} {path}\n")
    if os.environ.get("PAWPULAR_FAULT_KILL_AT") == str(_commits):
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened for fsync
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARK}", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
            with open(tmp_path, "rb+") as f:  # data on disk before the rename makes it visible
                os.fsync(f.fileno())
        except OSError as e:  # disk full, quota, I/O error: name the file being written, not the temporary one
            if e.errno is None:
                raise
            raise as_write_error(e, path) from None
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual mode
        _commit_point("replace", path)
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_json_object(path: str | Path) -> dict:
    """A JSON file pawpular wrote as an object (weights.json, best_params.json, timings.json ...); anything else
    (not JSON, a list, a number) is an ArtifactError naming the file: it is not the file pawpular wrote."""
    try:
        value = read_json(path)
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(
            f"{path}: not valid JSON ({e}): damaged, not the file pawpular wrote; rerun the stage that writes it"
        ) from None
    if not isinstance(value, dict):
        raise ArtifactError(
            f"{path}: holds a JSON {type(value).__name__}, not an object: damaged, not the file "
            "pawpular wrote; rerun the stage that writes it"
        )
    return value


def safetensors_bytes(tensors: dict, meta: dict, framework: str = "np") -> bytes:
    """A safetensors file of ``tensors`` (numpy arrays, or torch tensors with framework="pt") and ``meta`` as one
    JSON metadata entry: safetensors writes several entries in a random order; one keeps a rerun's bytes equal."""
    import importlib

    save = importlib.import_module(f"safetensors.{'torch' if framework == 'pt' else 'numpy'}").save
    return save(tensors, metadata={"pawpular": json.dumps(meta, sort_keys=True)})


def read_safetensors(path: str | Path, framework: str, what: str, fmt: str) -> tuple[dict, dict]:
    """(metadata, tensors) of a file of ``safetensors_bytes`` whose metadata says ``format: fmt``; anything else (a
    truncated file, a pickle, another format) is an ArtifactError naming the file and ``what`` it should be."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework=framework) as f:
            meta = json.loads((f.metadata() or {}).get("pawpular", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        raise ArtifactError(f"{path}: not {what} ({type(e).__name__}: {e})") from None
    if meta.get("format") != fmt:
        raise ArtifactError(f"{path}: not {what} of this version (format {meta.get('format')!r}, expected {fmt!r})")
    return meta, tensors


def write_parquet(df: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def write_csv(df: Any, path: str | Path, **kwargs: Any) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, **kwargs)


def torch_bytes(obj: Any) -> bytes:
    """``torch.save`` through memory: the same tensors give the same bytes (a file save records its name)."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_torch(obj: Any, path: str | Path) -> None:
    write_bytes(path, torch_bytes(obj))


def link_or_copy(src: str | Path, dst: str | Path) -> None:
    """``dst`` becomes a hard link to ``src`` (a copy where links are not possible), atomically."""
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def remove(path: str | Path) -> bool:
    """Delete a file (a commit: the fault hook counts it); True if there was one."""
    path = Path(path)
    if not path.exists():
        return False
    _commit_point("unlink", path)
    path.unlink()
    return True


def remove_tree(path: str | Path) -> bool:
    """Delete a folder: renamed aside first (one commit), so a kill never leaves half of it under its name."""
    path = Path(path)
    if not path.exists():
        return False
    trash = temp_path(path, f"trash-{os.getpid()}")
    _commit_point("rename", path)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)
    return True


def sweep_temp_files(folder: str | Path) -> int:
    """Remove what killed writers of this project left (its temporary names only: ``TEMP_GLOB``, never a user's
    own ``.*.tmp``); only done while holding the lock."""
    n = 0
    for tmp in sorted(Path(folder).rglob(TEMP_GLOB), key=lambda p: -len(p.parts)):
        if not is_temp_name(tmp.name):
            continue
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        n += 1
    return n


_RENAME_EXCHANGE = 2


def swap_dirs(new: Path, target: Path) -> None:
    """Put folder ``new`` in place of ``target`` so that ``target`` is always the old whole or the new whole.

    Linux's renameat2(RENAME_EXCHANGE) swaps the two names in one step; elsewhere ``target`` is first renamed
    aside (``recover_swap`` puts it back if a kill falls between the two renames). The old folder is deleted.
    """
    old = temp_path(target, "old")
    if not target.exists():
        _commit_point("rename", target)
        os.replace(new, target)
        return
    _commit_point("exchange", target)
    if _exchange(new, target):
        shutil.rmtree(new, ignore_errors=True)  # `new` now holds the old contents
        return
    shutil.rmtree(old, ignore_errors=True)
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def recover_swap(target: Path) -> None:
    """After a kill between the two renames of ``swap_dirs``'s fallback: the old folder comes back."""
    old = temp_path(target, "old")
    if old.is_dir() and not target.exists():
        os.replace(old, target)


def _exchange(a: Path, b: Path) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.EXDEV):  # file system without it
        return False
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(b))


# ---------------------------------------------------------------------------------------------------------------
# Digests


_digests: dict[tuple, str] = {}


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    """A content hash of a file (blake2b, 128 bits): changes when its bytes do. Memoized per process on the file's
    stat (path, size, mtime, inode, ctime: a rewrite changes one of them), so a stage chain hashes each file once."""
    path = Path(path)
    try:
        st = path.stat()
        if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) or stat.S_ISFIFO(st.st_mode):  # /dev/zero: no end
            from .errors import UsageError

            raise UsageError(f"{path}: is {NOT_REGULAR}: pawpular reads only regular files")
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
        if key not in _digests:
            h = hashlib.blake2b(digest_size=16)
            with open(path, "rb") as f:
                while block := f.read(chunk):
                    h.update(block)
            _digests[key] = h.hexdigest()
    except FileNotFoundError:
        raise
    except OSError as e:  # permission, I/O error, a folder: a read that failed, named as one
        if e.errno is None:
            raise
        raise as_read_error(e, path) from None
    return _digests[key]


NOT_REGULAR = "not a regular file (a device, pipe or socket)"


def not_a_file(path: str | Path) -> str | None:
    """Why ``path`` is no regular file to read, in words for a message ("not found", "is a folder, not a file",
    "is a symbolic link that loops", "is a broken symbolic link", "is not a regular file ..."); None when it is one."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a symbolic link that loops (it points, through links, back to itself)"
        if p.is_symlink():
            return f"is a broken symbolic link (to {os.readlink(p)}, which does not exist)"
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            from .path_faults import in_the_way, what_it_is

            if (above := in_the_way(p.parent)) is not None:  # never "not found" when a file is in the way
                return f"is under {above}, which is {what_it_is(above)}"
            return "not found"
        return f"cannot be read ({(e.strerror or str(e)).lower()})"
    if stat.S_ISDIR(st.st_mode):
        return "is a folder, not a file"
    return None if stat.S_ISREG(st.st_mode) else f"is {NOT_REGULAR}"


def not_a_folder(path: str | Path) -> str | None:
    """Why ``path`` is no folder, in the words of ``not_a_file`` ("does not exist", "is a file, not a folder" ...);
    None when it is one."""
    why = not_a_file(path)
    if why == "is a folder, not a file":
        return None
    return "is a file, not a folder" if why is None else "does not exist" if why == "not found" else why


def digest_or_none(path: str | Path) -> str | None:
    """``file_digest``, or None for a missing or unreadable file."""
    try:
        return file_digest(path)
    except OSError:
        return None


def value_digest(*parts: Any) -> str:
    """A hash of values (numbers, strings, lists, dicts, numpy arrays, pandas tables), not of how they were stored."""
    import numpy as np
    import pandas as pd

    h = hashlib.blake2b(digest_size=16)

    def feed(x: Any) -> None:
        if isinstance(x, pd.DataFrame):
            h.update(json.dumps([list(map(str, x.columns)), list(map(str, x.dtypes))]).encode())
            for c in x.columns:
                feed(x[c].to_numpy())
        elif isinstance(x, np.ndarray):
            if x.dtype == object:
                h.update("\x1f".join(map(str, x.tolist())).encode())
            else:
                h.update(f"{x.dtype.str}{x.shape}".encode())
                h.update(np.ascontiguousarray(x).tobytes())
        else:
            h.update(json.dumps(x, sort_keys=True, default=str).encode())
        h.update(b"\x1e")

    for p in parts:
        feed(p)
    return h.hexdigest()


def sqlite_damage(path: Path) -> str | None:
    """Why the SQLite file at ``path`` is not a usable database (not SQLite, corrupt), or None (fine, empty or
    absent). Read-only: opened with ``mode=ro`` and checked with ``PRAGMA quick_check``."""
    import sqlite3

    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return None
    with open(path, "rb") as f:
        if f.read(16) != b"SQLite format 3\x00":
            return "not an SQLite database"
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=60)
        try:
            verdict = conn.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.DatabaseError as e:
        return f"corrupt ({e})"
    return None if verdict == "ok" else f"corrupt ({verdict})"
