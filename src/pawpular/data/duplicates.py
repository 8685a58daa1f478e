"""Exact and near-duplicate photos: a 64-bit DCT perceptual hash and groups of hashes within a few bits.

Used by the folds stage (a duplicate group never straddles a split) and by ``notebooks/01_eda.ipynb``. Reads
photos; writes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy.fft import dctn

from .images import image_path, load_image
from .tables import ID, read_id_csv


def phash(path: Path) -> int:
    """64-bit perceptual hash: signs of the low-frequency DCT of a 32x32 grayscale thumbnail versus their median.

    Robust to resizing and re-encoding, and (unlike a 9x8 difference hash, which matched dozens of unrelated
    drawings in the synthetic set) it separates similar but distinct photos.
    """
    im = Image.fromarray(load_image(path, min_side=64)).convert("L").resize((32, 32), Image.BILINEAR)
    coef = dctn(np.asarray(im, dtype=np.float64), norm="ortho")[:8, :8].ravel()
    bits = coef > np.median(coef[1:])
    return int(np.packbits(bits).view(">u8")[0])


def duplicate_groups(hashes: np.ndarray, threshold: int) -> np.ndarray:
    """Connected components of 'hash distance <= threshold'; returns a group label per image."""
    n = len(hashes)
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    h = hashes.astype(np.uint64)
    for start in range(0, n, 1024):  # blocks keep memory at 1024 x n
        dist = np.bitwise_count(h[start : start + 1024, None] ^ h[None, :])
        for a, b in zip(*np.nonzero(dist <= threshold), strict=False):
            a += start
            if a < b:
                ra, rb = find(a), find(b)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(i) for i in range(n)])


def image_hashes(root: Path, ids: list[str], workers: int = 8) -> np.ndarray:
    with ThreadPoolExecutor(workers) as pool:
        return np.array(list(pool.map(lambda i: phash(image_path(root, "train", i)), ids)), dtype=np.uint64)


def group_table(ids: Sequence[str], hashes: np.ndarray, groups: np.ndarray) -> pd.DataFrame:
    """Id, group, hash of every photo in a group of two or more."""
    sizes = pd.Series(groups).value_counts()
    keep = pd.Series(groups).map(sizes).to_numpy() > 1
    return pd.DataFrame({ID: np.asarray(ids)[keep], "group": groups[keep], "hash": [f"{h:016x}" for h in hashes[keep]]})


def find_duplicates(
    data: str | Path, ids: Sequence[str], saved: str | Path | None = None, threshold: int = 4
) -> pd.DataFrame:
    """Id, group of every photo in a duplicate group: the folds stage's ``duplicates.csv`` (``saved``) when it
    covers these Ids, else computed here with the same hash."""
    if saved is not None and Path(saved).is_file():
        dups = read_id_csv(saved)[[ID, "group"]]
        if dups[ID].isin(set(ids)).all():  # else it belongs to another competition folder: recompute
            return dups
    hashes = image_hashes(Path(data), list(ids))
    return group_table(ids, hashes, duplicate_groups(hashes, threshold))[[ID, "group"]]
