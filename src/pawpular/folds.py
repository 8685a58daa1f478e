"""Stage 1, folds: k-fold split stratified on the binned target.

    pawpular folds --config configs/default.yaml

Reads ``train.csv`` (and the train images when ``folds.group_duplicates``); writes ``output/<experiment>/folds.csv``
(``Id,fold``) and ``duplicates.csv`` (``Id,group,hash`` for every photo that has an exact or near duplicate).

The target is cut into Sturges' rule bins (``ceil(log2 n) + 1``) and ``StratifiedKFold`` keeps each bin's share in
every fold. With ``group_duplicates``, photos whose perceptual hashes (64-bit DCT pHash) differ in at most
``hash_threshold`` bits form one group and ``StratifiedGroupKFold`` keeps each group in one fold, so a duplicate
never sits on both sides of a split and flatters the validation score.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy.fft import dctn
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from . import artifacts
from .config import Config
from .data import ID, TARGET, DataError, Problem, image_path, load_image, read_competition
from .io import write_csv

log = logging.getLogger("pawpular")


def sturges_bins(y: np.ndarray) -> np.ndarray:
    """Equal-width bins of the target, their number by Sturges' rule."""
    n_bins = int(np.ceil(np.log2(len(y)) + 1))
    return pd.cut(y, bins=n_bins, labels=False).astype(int)


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
        block = h[start:start + 1024, None] ^ h[None, :]
        dist = np.bitwise_count(block)
        for a, b in zip(*np.nonzero(dist <= threshold)):
            a += start
            if a < b:
                ra, rb = find(a), find(b)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(i) for i in range(n)])


def make_folds(train: pd.DataFrame, n_folds: int, seed: int, groups: np.ndarray | None = None) -> np.ndarray:
    """Fold index per row of ``train``; deterministic in ``seed``."""
    y = train[TARGET].to_numpy(float)
    bins = sturges_bins(y)
    fold = np.full(len(train), -1, dtype=int)
    if groups is None:
        splits = StratifiedKFold(n_folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), bins)
    else:
        splits = StratifiedGroupKFold(n_folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), bins, groups)
    for k, (_, val) in enumerate(splits):
        fold[val] = k
    assert (fold >= 0).all()
    return fold


def image_hashes(root: Path, ids: list[str], workers: int = 8) -> np.ndarray:
    with ThreadPoolExecutor(workers) as pool:
        return np.array(list(pool.map(lambda i: phash(image_path(root, "train", i)), ids)), dtype=np.uint64)


def run(cfg: Config) -> Path:
    comp = read_competition(cfg.data)  # images: checked up front by the CLI, decoded once more by the hashes
    train = comp.train
    groups = None
    if cfg.folds.group_duplicates:
        hashes = image_hashes(comp.root, train[ID].tolist())
        groups = duplicate_groups(hashes, cfg.folds.hash_threshold)
        sizes = pd.Series(groups).value_counts()
        dup = sizes[sizes > 1]
        log.info("duplicates: %d groups holding %d photos (pHash distance <= %d)", len(dup), int(dup.sum()), cfg.folds.hash_threshold)
        in_group = pd.Series(groups).map(sizes).to_numpy() > 1
        write_csv(pd.DataFrame({ID: train[ID][in_group], "group": groups[in_group], "hash": [f"{h:016x}" for h in hashes[in_group]]}),
                  cfg.out / "duplicates.csv")
    fold = make_folds(train, cfg.folds.n_folds, cfg.folds.seed, groups)
    folds = pd.DataFrame({ID: train[ID], "fold": fold})
    path = artifacts.folds_csv(cfg.out)
    write_csv(folds, path)
    summary = train.assign(fold=fold).groupby("fold")[TARGET].agg(["size", "mean", "std"]).round(2)
    log.info("folds (%d, seed %d):\n%s", cfg.folds.n_folds, cfg.folds.seed, summary.to_string())
    return path


def read_folds(out: Path, train: pd.DataFrame) -> pd.DataFrame:
    """folds.csv (Id, fold) checked against train.csv: every train Id exactly once."""
    path = artifacts.folds_csv(out)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `pawpular folds` first")
    folds = pd.read_csv(path, dtype={ID: str})
    problems = [Problem("folds.csv", "columns", f"missing column '{c}'") for c in (ID, "fold") if c not in folds]
    if not problems:
        ids, known = set(folds[ID]), set(train[ID])
        problems += [Problem("folds.csv", f"Id {i}", "train Id without a fold") for i in sorted(known - ids)[:20]]
        problems += [Problem("folds.csv", f"Id {i}", "not in train.csv") for i in sorted(ids - known)[:20]]
        problems += [Problem("folds.csv", f"Id {i}", "listed more than once")
                     for i in sorted(folds[ID][folds[ID].duplicated()])[:20]]
    if problems:
        raise DataError(problems)
    return train[[ID]].merge(folds[[ID, "fold"]], on=ID, how="left")
