"""What a user can fix, as opposed to a bug: the project's error types and the OS errors of known reads and writes.

Every error the project raises for something a user can fix is a ``PawpularError`` (``ConfigError``,
``DataError``, ``ArtifactError``, ``SubmissionError``, ``StudyStorageError``, ``ExperimentLocked``,
``UsageError`` ...); each also keeps its old built-in base (ValueError, RuntimeError, FileNotFoundError), so code
that caught those still does. The command line prints a ``PawpularError`` as one line and exits 2. An OS error at a
place where the project reads or writes a named file is a ``ReadError`` / ``WriteError`` (the line says which).
Anything else is a bug: the command line prints its traceback and says what to put in a report.
"""

from __future__ import annotations

import errno
import os


class PawpularError(Exception):
    """A problem the user can fix; its message names the file, row, Id, config key or command at fault."""


class UsageError(PawpularError, ValueError):
    """A command asked to do what it refuses: write onto its inputs, replace a folder it did not make, a flag out
    of range."""


class ConfigError(PawpularError, ValueError):
    """A config file or override that does not fit the schema; ``keys`` names the settings at fault."""

    def __init__(self, message: str, keys: tuple[str, ...] = ()):
        super().__init__(message)
        self.keys = keys


class ArtifactError(PawpularError, RuntimeError):
    """An artifact that is missing, damaged or stale for what is asked; the message names it and what to run."""


class MissingArtifact(ArtifactError, FileNotFoundError):
    """A file a command needs is not there (an earlier stage or an export has not written it)."""


class ReadError(OSError):
    """The system refused a read of a named file (permission, I/O error ...): ``OSError(errno, strerror, path)``."""


class WriteError(OSError):
    """The system refused a write of a named file or folder (no space, read-only, not a directory ...)."""


def reason(e: OSError) -> str:
    """An OS error's reason in lower case, as the command line prints it: 'no space left on device'."""
    if e.errno is None:
        return str(e)
    return "no space left on device" if e.errno == errno.ENOSPC else os.strerror(e.errno).lower()


def as_read_error(e: OSError, path: object) -> ReadError:
    return ReadError(e.errno, e.strerror, str(path))


def as_write_error(e: OSError, path: object) -> WriteError:
    return WriteError(e.errno, e.strerror, str(path))


def env_number(name: str, default: float, kind: type = int, minimum: float | None = 0) -> float:
    """An environment knob read as a number (``kind``, at least ``minimum`` unless None); unset or empty gives
    ``default``. Anything else is a UsageError naming the variable and its value."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or (minimum is not None and value < minimum) or value != value:  # NaN is no number either
        bound = f" >= {minimum:g}" if minimum is not None else ""
        raise UsageError(
            f"environment variable {name}={raw!r}: expected {'an integer' if kind is int else 'a number'}"
            f"{bound}; unset it or give one"
        )
    return value
