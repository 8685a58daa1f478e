"""Decoding photos robustly: whatever a competition folder holds becomes an upright HxWx3 uint8 RGB array.

Handles PNG (or anything PIL reads) named .jpg, grayscale, CMYK, 16-bit, alpha and EXIF orientation; decodes
huge JPEGs at a reduced DCT scale. Reads image files; writes nothing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError

# 8000 x 8000 photos are legitimate; PIL's default bomb guard (89 MP) would warn. Refuse only the absurd.
Image.MAX_IMAGE_PIXELS = 200_000_000


class ImageDecodeError(ValueError):
    """A photo that cannot be used; the message names its path (and Id where known)."""


def image_path(root: str | Path, split: str, id_: str) -> Path:
    return Path(root) / split / f"{id_}.jpg"


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit or float grayscale: rescale to 8 bits
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if im.mode == "RGB":
        return im
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, RGBX ...


def load_image(path: str | Path, min_side: int | None = None) -> np.ndarray:
    """Decode any photo to an HxWx3 uint8 RGB array, upright.

    Handles PNG (or anything PIL reads) named .jpg, grayscale, CMYK, 16-bit, alpha and EXIF orientation. With
    ``min_side``, large JPEGs are decoded at a reduced DCT scale that still keeps both sides >= min_side, which
    makes an 8000x8000 photo cost about as much as a small one.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            if min_side and im.format == "JPEG":
                im.draft("RGB", (min_side, min_side))
            im = ImageOps.exif_transpose(im)
            rgb = _to_rgb(im)
            arr = np.asarray(rgb)
    except FileNotFoundError:
        raise ImageDecodeError(f"{path}: image file missing") from None
    except UnidentifiedImageError:
        size = path.stat().st_size if path.exists() else 0
        reason = "empty file (0 bytes)" if size == 0 else "not an image PIL can read"
        raise ImageDecodeError(f"{path}: {reason}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageDecodeError(f"{path}: cannot be decoded ({e})") from None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageDecodeError(f"{path}: decoded to an unusable shape {arr.shape}")
    return arr


def check_image(path: Path) -> str | None:
    """The reason ``path`` is unusable, or None."""
    if not path.is_file():
        return "image file missing"
    if path.stat().st_size == 0:
        return "empty file (0 bytes)"
    try:
        load_image(path, min_side=64)
    except ImageDecodeError as e:
        return str(e).split(": ", 1)[1]
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
