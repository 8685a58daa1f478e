"""The adversarial tests' tools (tests/test_adversarial.py): snapshots of folders, the CLI's output, hostile
photos, and a pixel budget that reports what is in flight."""

from __future__ import annotations

import contextlib
import hashlib
import struct
import time
import zlib
from pathlib import Path

from pawpular.cli import main as cli
from pawpular.data.images import PixelBudget


def tree(folder: Path) -> dict[str, str]:
    """Every file (its digest) and folder under ``folder``, hidden ones included."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(Path(folder).rglob("*"))
    }


def run_cli(capsys, *args) -> tuple[int, str]:
    """The CLI's exit code and what it printed (stderr, then stdout)."""
    capsys.readouterr()
    code, captured = cli.main([str(a) for a in args]), capsys.readouterr()
    return code, captured.err + captured.out


def fails_to_read(path: str) -> int | None:
    """The errno reading ``path`` fails with, or None."""
    try:
        Path(path).read_bytes()
    except OSError as e:
        return e.errno
    return None


def one_line(text: str) -> bool:
    """One ``error:`` line and no traceback."""
    lines = [x for x in text.strip().splitlines() if x.startswith("error:")]
    return len(lines) == 1 and "Traceback" not in text


# Run in a fresh process: check-data on argv[1]; prints its exit code, its peak memory above the start (MiB, from
# VmHWM: the process's own since exec, where ru_maxrss would carry over the parent's) and the seconds it took.
PEAK_OF_CHECK_DATA = """
import sys, time
def peak_kib():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
from pawpular.cli.main import main as cli_main
import pawpular.data.tables, pawpular.data.images
base, t0 = peak_kib(), time.time()
code = cli_main(["check-data", "--data", sys.argv[1]])
print("RESULT", code, (peak_kib() - base) / 1024, time.time() - t0)
"""


def png_bomb(path: Path, w: int, h: int) -> None:
    """A valid 8-bit grayscale PNG of w x h black pixels: a few hundred KB that decode to w*h bytes and more."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    z = zlib.compressobj(9)
    rows = b"\x00" * (w + 1) * 1000  # filter byte + a row of zeros, a thousand rows at a time
    idat = b"".join([z.compress(rows) for _ in range(h // 1000)] + [z.flush()])
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )


def watched_budget(in_flight: list[int]) -> type[PixelBudget]:
    """A PixelBudget that appends the pixels in flight each time a photo enters it, and keeps the photo there
    50 ms (long enough for every thread of the pool to arrive)."""

    class Watched(PixelBudget):
        @contextlib.contextmanager
        def hold(self, pixels: int):
            with super().hold(pixels):
                in_flight.append(self.used)
                time.sleep(0.05)
                yield

    return Watched
