"""Decoding photos robustly: whatever a competition folder holds becomes an upright HxWx3 uint8 RGB array.

Handles PNG (or anything PIL reads) named .jpg, grayscale, CMYK, 16-bit, alpha and EXIF orientation; decodes
huge JPEGs at a reduced DCT scale. Reads image files; writes nothing.

Memory: a photo is refused from its header, before any pixel is decoded, when it would decode to more than
``PAWPULAR_MAX_PIXELS`` pixels (default 100 million; a JPEG counts at the DCT scale it is decoded at). One decode
holds at most ``PEAK_BYTES_PER_PIXEL`` bytes per decoded pixel at its peak (``bench/decode_memory.py`` measures
it per image mode), and ``PixelBudget`` lets threads decode together only while their pixels fit in one cap, so
check-data's decoding holds at most ``PAWPULAR_MAX_PIXELS x PEAK_BYTES_PER_PIXEL`` bytes however many threads
and however large the photos. An environment variable rather than a config key: check-data and predict run
without an experiment config, and DataLoader workers inherit it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError

from ..store.errors import PawpularError, UsageError, reason

MAX_PIXELS_ENV = "PAWPULAR_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 100_000_000
PEAK_BYTES_PER_PIXEL = 12  # the worst mode measured by bench/decode_memory.py (RGBA and 16-bit PNGs), rounded up
# Our cap replaces PIL's bomb guard: it judges the pixels actually decoded (a huge JPEG decodes at 1/8 scale) and
# its message names the file and the setting.
Image.MAX_IMAGE_PIXELS = None


class ImageDecodeError(PawpularError, ValueError):
    """A photo that cannot be used; the message names its path (and Id where known)."""


def max_pixels() -> int:
    """The cap on decoded pixels per photo: ``PAWPULAR_MAX_PIXELS`` (an integer > 0), default 100 million."""
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(float(raw))
    except ValueError:
        value = 0
    if value <= 0:
        raise UsageError(f"{MAX_PIXELS_ENV}={raw!r}: expected a number of pixels > 0, e.g. 100000000")
    return value


class PixelBudget:
    """Decoded pixels in flight across threads, at most ``limit``: a photo waits until the others leave room."""

    def __init__(self, limit: int):
        self.limit, self.used, self._cond = limit, 0, threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        pixels = min(pixels, self.limit)  # never more than the cap: a photo over it was refused already
        with self._cond:
            self._cond.wait_for(lambda: self.used + pixels <= self.limit)
            self.used += pixels
        try:
            yield
        finally:
            with self._cond:
                self.used -= pixels
                self._cond.notify_all()


def image_path(root: str | Path, split: str, id_: str) -> Path:
    return Path(root) / split / f"{id_}.jpg"


_STRIP_PIXELS = 1 << 20  # pixels copied out of PIL per step: whole-image tobytes() would cost 2x the image


def _strips(im: Image.Image) -> Iterator[tuple[int, int, np.ndarray]]:
    """(first row, last row, pixels) of ``im`` in strips of about a million pixels."""
    w, h = im.size
    step = max(1, _STRIP_PIXELS // max(w, 1))
    for top in range(0, h, step):
        bottom = min(h, top + step)
        yield top, bottom, np.asarray(im.crop((0, top, w, bottom)))


def _converted(im: Image.Image, mode: str) -> Image.Image:
    """``im`` in ``mode``; a converted copy closes ``im`` at once, so the two are never held longer than needed."""
    if im.mode == mode:
        return im
    out = im.convert(mode)
    im.close()  # frees its pixels (the caller's `with` closing it again is harmless)
    return out


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    """HxWx3 uint8 RGB from any mode, strip by strip into one array (memory: see PEAK_BYTES_PER_PIXEL); ``im`` is
    used up (closed once converted).

    16-bit and float grayscale are rescaled to 8 bits (float in [0, 1] as such); alpha is composited over white;
    every other mode goes through PIL's RGB conversion (CMYK, palette, YCbCr, 1-bit ...).
    """
    w, h = im.size
    out = np.empty((h, w, 3), np.uint8)
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        top_value = im.getextrema()[1]
        # 16-bit: its full range; float in [0, 1] (the usual convention): to 0..255, not to black; else 8 or 16 bits
        hi = 65535.0 if im.mode.startswith("I;16") or top_value > 255 else 255.0
        hi = 1.0 if im.mode == "F" and top_value <= 1 else hi
        for top, bottom, a in _strips(im):
            v = np.clip(a.astype(np.float32) * np.float32(255.0 / hi) + np.float32(0.5), 0, 255).astype(np.uint8)
            out[top:bottom] = v[..., None]
        return out
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = _converted(im, "RGBA")
        for top, bottom, a in _strips(im):
            alpha = a[..., 3:].astype(np.uint16)
            out[top:bottom] = ((a[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
        return out
    if im.mode == "L":
        for top, bottom, a in _strips(im):
            out[top:bottom] = a[..., None]
        return out
    im = _converted(im, "RGB")
    for top, bottom, a in _strips(im):
        out[top:bottom] = a
    return out


def _refuse_huge(path: Path, im: Image.Image, header: tuple[int, int]) -> int:
    """The pixels ``im`` decodes to, or ImageDecodeError when over the cap (from the header: nothing decoded)."""
    w, h = im.size
    cap = max_pixels()
    if w * h > cap:
        scaled = f" (decoded at {w}x{h})" if (w, h) != tuple(header) else ""
        raise ImageDecodeError(
            f"{path}: {header[0]}x{header[1]} pixels{scaled}, {w * h / 1e6:.0f} million to decode, "
            f"over the cap of {cap / 1e6:g} million ({MAX_PIXELS_ENV}); refused before decoding"
        )
    return w * h


@contextlib.contextmanager
def _opened(path: Path, min_side: int | None) -> Iterator[tuple[Image.Image, int]]:
    """The photo opened (its header read, a JPEG's DCT scale chosen, nothing decoded) and the pixels it decodes
    to; over ``max_pixels()`` it is refused here. Errors opening it, or decoding it in the block, become
    ImageDecodeError naming the file."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise ImageDecodeError(f"{path}: image file missing") from None
    except OSError as e:
        raise ImageDecodeError(f"{path}: cannot be read ({reason(e)})") from None
    try:
        with f, Image.open(f) as im:
            header = im.size
            if min_side and im.format == "JPEG":
                im.draft("RGB", (min_side, min_side))
            yield im, _refuse_huge(path, im, header)
    except UnidentifiedImageError:
        size = path.stat().st_size if path.exists() else 0
        why = "empty file (0 bytes)" if size == 0 else "not an image PIL can read"
        raise ImageDecodeError(f"{path}: {why}") from None
    except ImageDecodeError:
        raise
    except OSError as e:
        if e.errno is not None:  # the system failed the read (I/O error ...), not the format
            raise ImageDecodeError(f"{path}: cannot be read ({reason(e)})") from None
        raise ImageDecodeError(f"{path}: cannot be decoded ({e})") from None
    except (SyntaxError, ValueError) as e:
        raise ImageDecodeError(f"{path}: cannot be decoded ({e})") from None


def decoded_pixels(path: str | Path, min_side: int | None = None) -> int:
    """How many pixels ``load_image(path, min_side)`` would decode, from the header; ImageDecodeError over the cap."""
    with _opened(Path(path), min_side) as (_, pixels):
        return pixels


def load_image(path: str | Path, min_side: int | None = None) -> np.ndarray:
    """Decode any photo to an HxWx3 uint8 RGB array, upright.

    Handles PNG (or anything PIL reads) named .jpg, grayscale, CMYK, 16-bit, alpha and EXIF orientation. With
    ``min_side``, large JPEGs are decoded at a reduced DCT scale that still keeps both sides >= min_side, which
    makes an 8000x8000 photo cost about as much as a small one. A photo over ``max_pixels()`` is refused from its
    header, before any pixel is decoded.
    """
    path = Path(path)
    with _opened(path, min_side) as (im, _):
        ImageOps.exif_transpose(im, in_place=True)
        arr = _to_rgb_array(im)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageDecodeError(f"{path}: decoded to an unusable shape {arr.shape}")
    return arr


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Hand memory freed by a decode back to the system now (glibc keeps it in per-thread arenas: with 8 threads
    check-data's peak would grow by up to 8 photos' worth); nothing where there is no glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def check_image(path: Path, budget: PixelBudget | None = None) -> str | None:
    """The reason ``path`` is unusable, or None. An OS error (permission, I/O) is a reason too, not a crash.

    With ``budget`` the decode waits for room in it, and holds its room until its memory is given back."""
    try:
        if not path.is_file():
            return "not a file" if path.exists() else "image file missing"
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        pixels = decoded_pixels(path, min_side=64)
        with budget.hold(pixels) if budget else contextlib.nullcontext():
            load_image(path, min_side=64)  # the array is dropped at once
            if budget and pixels >= 1_000_000:
                release_freed_memory()
    except ImageDecodeError as e:
        return str(e).split(": ", 1)[1]
    except OSError as e:
        return f"cannot be read ({reason(e)})"
    return None


def image_sizes(root: str | Path, ids: Sequence[str], split: str = "train") -> pd.DataFrame:
    """Id, width, height, aspect (width/height) from the image headers, EXIF rotation applied; nothing decoded."""
    rows = []
    for id_ in ids:
        with Image.open(image_path(root, split, id_)) as im:
            w, h = im.size
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated by 90 degrees: exif_transpose swaps sides
                w, h = h, w
        rows.append((id_, w, h))
    sizes = pd.DataFrame(rows, columns=["Id", "width", "height"])
    sizes["aspect"] = sizes["width"] / sizes["height"]
    return sizes
