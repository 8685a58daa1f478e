"""A path the user gave (or the output tree under it) that is the wrong kind of thing: one line naming it.

    check_output_path(path, flag, folder=True)   before any work: ``path`` (a folder, or a file when
                                                  ``folder=False``) and every folder above it can be made there
    register(*paths)                              the paths a command was given (its output tree included)
    in_the_way(path), what_it_is(path)            the file or dangling link where a folder is needed, in words
    describe(e)                                   an OS error of a registered path that a file, a folder or a
                                                  dangling symbolic link in the way explains: its one line, else None

A file where the output tree needs a folder (``.embeddings``, ``emb/<set>``, ``svr/fold0``, ``ensemble``), a
folder where it needs a file, or a symbolic link to nothing is something the user can move away; ``describe``
says so only after it has found that file, folder or link on disk under a path the command was given: the same
error outside those paths, or with nothing of the kind in the way, still reaches the user as a bug (traceback).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from .errors import UsageError

_roots: set[str] = set()  # absolute paths (not resolved: a dangling link stays itself) the command was given


def register(*paths: str | Path | None) -> None:
    """Note paths the command writes under (its --output, --to, --out, the shared embedding cache ...)."""
    for p in paths:
        if p is not None and str(p) != "":
            _roots.add(os.path.abspath(os.fsdecode(p)))


def _registered(path: Path) -> bool:
    p = os.path.abspath(path)
    return any(p == r or p.startswith(r.rstrip(os.sep) + os.sep) for r in _roots)


def what_it_is(path: Path) -> str:
    """What ``path`` (no folder) is, said as why it cannot be one."""
    if path.is_symlink() and not path.exists():
        return f"a symbolic link to {os.readlink(path)}, which does not exist"
    return "a file, not a folder"


def in_the_way(path: Path) -> Path | None:
    """``path`` or the nearest folder above it that exists and is no folder (a file, a dangling link), or None."""
    for p in (path, *path.parents):
        if os.path.lexists(p):
            return None if p.is_dir() else p
    return None


def check_output_path(path: str | Path, flag: str, folder: bool = True) -> None:
    """Refuse (UsageError, before any work) an output path that cannot be made: a file or a dangling symbolic link
    above it, itself a dangling link, a file where a folder is asked for (``folder``) or a folder where a file is."""
    path, other = Path(path), flag.split()[-1]  # "choose another --to"
    if path.is_symlink() and not path.exists():
        raise UsageError(f"{flag} {path}: is {what_it_is(path)}; remove the link or choose another {other}")
    if (above := in_the_way(path.parent)) is not None:
        raise UsageError(f"{flag} {path}: {above} is {what_it_is(above)}; move it away or choose another {other}")
    if folder and path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path}: is a file, not a folder; choose another {other}")
    if not folder and path.is_dir():
        raise UsageError(f"{flag} {path}: is a folder, not a file; give a file name")


def describe(e: OSError) -> str | None:
    """One line for an OS error that a file, folder or dangling link in the way of a registered path explains."""
    if e.errno not in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return None
    for name in (e.filename, e.filename2):
        if name is None or not isinstance(name, (str, bytes, os.PathLike)):
            continue
        path = Path(os.fsdecode(name))
        if not _registered(path):
            continue
        if e.errno == errno.EISDIR:
            if path.is_dir():
                return f"cannot write {path}: it is a folder, not a file; move it away"
            continue
        if (found := in_the_way(path)) is not None:
            where = "it" if found == path else str(found)
            return f"cannot write {path}: {where} is {what_it_is(found)}; move it away or choose another output folder"
    return None
