"""The embedded competition: a synthetic PetFinder with the real layout, drawn procedurally, no downloads.

    pawpular make-synthetic --out input/synthetic [--n-train 1000] [--n-test 100] [--seed 0]

Writes ``train.csv``, ``test.csv``, ``sample_submission.csv``, ``train/{Id}.jpg`` and ``test/{Id}.jpg``.

Each photo is a drawn "pet" (cat or dog) whose visible attributes set the 12 flags: a plain, uncluttered
background for ``Subject Focus``, drawn eyes for ``Eyes``, a face for ``Face``, a large pet for ``Near``, a
tilted pet with motion lines for ``Action``, a collar for ``Accessory``, several pets for ``Group``, a grid of
photos for ``Collage``, a person for ``Human``, fence bars for ``Occlusion``, text for ``Info`` and a Gaussian
blur for ``Blur``. The target depends a little on the flags and more on what only the image shows (warmth of
the scene, fur colour, pet size, species, eye size), so an image model can beat a metadata-only model. It is
mapped by rank onto the real target's quantile function (integers 1-100, mean 38, std 20.6, right-skewed with
a spike at 100); flag frequencies follow the real ones. About 1% of the photos are exact or near duplicates of
another one, as in the real data. The same seed gives byte-identical CSVs and images.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ..store.errors import UsageError
from ..store.files import remove_tree, swap_dirs, temp_path, write_csv, write_text
from ..store.path_faults import check_output_path
from .synthetic_draw import Pet, jpeg_bytes, render
from .tables import ID, META_COLS, TARGET

DEFAULT_N_TRAIN = 1000
MARKER = ".pawpular-synthetic.json"  # written last into the folder: the files make-synthetic wrote there
DEFAULT_N_TEST = 100

# Percentiles 0..100 of the real train.csv Pawpularity (9,912 rows): its quantile function.
REAL_QUANTILES = np.array(
    [
        1,
        3,
        4,
        8,
        10,
        12,
        13,
        15,
        16,
        17,
        18,
        18,
        19,
        20,
        20,
        21,
        21,
        22,
        22,
        23,
        23,
        23,
        24,
        24,
        25,
        25,
        25,
        26,
        26,
        26,
        27,
        27,
        27,
        28,
        28,
        28,
        28,
        29,
        29,
        29,
        30,
        30,
        30,
        31,
        31,
        31,
        32,
        32,
        32,
        33,
        33,
        34,
        34,
        34,
        35,
        35,
        36,
        36,
        36,
        37,
        37,
        38,
        38,
        39,
        39.04,
        40,
        41,
        41,
        42,
        42,
        43,
        43,
        44,
        45,
        46,
        46,
        47,
        48,
        49,
        50,
        51,
        52,
        53,
        55,
        56,
        57,
        59,
        60,
        63,
        64,
        66,
        69,
        72,
        75,
        79,
        83.45,
        89,
        98,
        100,
        100,
        100,
    ],
    dtype=np.float64,
)
# Real flag frequencies (train.csv). Eyes is drawn given Face (no eyes without a face): 0.773 / 0.904.
FLAG_P = {
    "Subject Focus": 0.028,
    "Face": 0.904,
    "Near": 0.862,
    "Action": 0.010,
    "Accessory": 0.068,
    "Group": 0.129,
    "Collage": 0.050,
    "Human": 0.166,
    "Occlusion": 0.172,
    "Info": 0.061,
    "Blur": 0.070,
}
P_EYES_GIVEN_FACE = 0.773 / 0.904
# How the flags move popularity (latent units; the image-only part has unit-scale weights on 5 factors).
FLAG_EFFECT = {
    "Subject Focus": 0.3,
    "Eyes": 0.25,
    "Face": 0.2,
    "Near": 0.25,
    "Action": 0.3,
    "Accessory": 0.35,
    "Group": 0.35,
    "Collage": -0.3,
    "Human": 0.25,
    "Occlusion": -0.35,
    "Info": -0.3,
    "Blur": -0.5,
}
NOISE_SD = 0.4
DUPLICATE_FRACTION = 0.01


def _sample_pet(rng: np.random.Generator, seed: int) -> Pet:
    flags = {k: int(rng.random() < p) for k, p in FLAG_P.items()}
    flags["Eyes"] = int(flags["Face"] == 1 and rng.random() < P_EYES_GIVEN_FACE)
    side = int(rng.integers(128, 225))
    aspect = float(np.exp(rng.uniform(-0.35, 0.35)))  # portrait to landscape
    return Pet(
        flags={k: flags[k] for k in META_COLS},
        warm=float(rng.random()),
        fur=float(rng.random()),
        size=float(rng.random()),
        dog=bool(rng.random() < 0.5),
        eye=float(rng.random()),
        width=max(96, int(side * np.sqrt(aspect))),
        height=max(96, int(side / np.sqrt(aspect))),
        seed=seed,
    )


def _image_score(p: Pet) -> float:
    """The part of popularity only the photo shows."""
    return 1.3 * p.warm + 1.1 * p.fur + 0.7 * p.size + 0.35 * p.dog + 0.5 * p.eye * p.flags["Eyes"]


def _meta_score(p: Pet) -> float:
    return sum(FLAG_EFFECT[k] * v for k, v in p.flags.items())


# -------------------------------------------------------------------------------------------------------------
# The competition


def _calibrate(latent: np.ndarray) -> np.ndarray:
    """Map a latent score by rank onto the real target's quantile function -> integers in [1, 100]."""
    ranks = np.argsort(np.argsort(latent, kind="stable"), kind="stable")
    q = (ranks + 0.5) / len(latent) * 100.0
    return np.clip(np.round(np.interp(q, np.arange(101), REAL_QUANTILES)), 1, 100).astype(int)


def _listed(folder: Path) -> set[str] | None:
    """The files the marker in ``folder`` says make-synthetic wrote, or None without a readable marker."""
    try:
        files = json.loads((folder / MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return set(files) if isinstance(files, list) else None


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MARKER}


def check_target(out: Path) -> None:
    """make-synthetic replaces only its own output: ``out`` is new, empty, or a folder its marker lists whole."""
    check_output_path(out, "make-synthetic --out")  # a file, or a file or dangling link above it
    if not out.is_dir() or not any(out.iterdir()):
        return
    listed = _listed(out)
    if listed is None:
        raise UsageError(
            f"make-synthetic --out {out}: not empty and not written by make-synthetic (no {MARKER}): "
            "it replaces only its own output; choose a new or empty folder"
        )
    if extra := sorted(_files(out) - listed):
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        raise UsageError(
            f"make-synthetic --out {out}: holds files make-synthetic did not write ({', '.join(extra[:3])}"
            f"{more}): replacing it would remove them; move them out or choose another --out"
        )


def _staging(out: Path) -> Path:
    """A fresh staging folder beside ``out`` holding the marker; a killed run's leftover (marked) is removed."""
    tmp = temp_path(out, "partial")
    if tmp.exists():
        if _listed(tmp) is None:
            raise UsageError(f"{tmp} exists and was not made by make-synthetic: remove it or choose another --out")
        shutil.rmtree(tmp)
    (tmp / "train").mkdir(parents=True)
    (tmp / "test").mkdir()
    write_text(tmp / MARKER, json.dumps({"written_by": "pawpular make-synthetic", "files": []}))
    return tmp


def make_synthetic(
    out_dir: str | Path, n_train: int = DEFAULT_N_TRAIN, n_test: int = DEFAULT_N_TEST, seed: int = 0
) -> Path:
    """Write the synthetic competition to ``out_dir`` and return it. It replaces only a folder it wrote itself
    (``MARKER`` lists the files); a non-empty folder it did not make is refused (UsageError)."""
    if n_train < 20 or n_test < 1:
        raise UsageError(f"make-synthetic needs n_train >= 20 and n_test >= 1, got {n_train} and {n_test}")
    out = Path(os.path.abspath(out_dir))  # `--out ..` names the parent: checked like any folder
    check_target(out)
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    ids = [rng.bytes(16).hex() for _ in range(n)]
    pets = [_sample_pet(rng, seed=int(rng.integers(2**62))) for _ in range(n)]
    # Duplicates: some train photos repeat another train photo, byte for byte or re-encoded smaller.
    n_dup = max(1, int(round(DUPLICATE_FRACTION * n_train)))
    src = rng.choice(n_train, size=2 * n_dup, replace=False)
    duplicate_of = {
        int(b): (int(a), bool(k % 2)) for k, (a, b) in enumerate(zip(src[:n_dup], src[n_dup:], strict=False))
    }
    for b, (a, _) in duplicate_of.items():
        pets[b] = pets[a]
    latent = np.array([_image_score(p) for p in pets]) / 1.0 + np.array([_meta_score(p) for p in pets])
    latent = latent + rng.normal(0, NOISE_SD, n)
    target = _calibrate(latent[:n_train])

    tmp = _staging(out)
    try:
        _write(tmp, ids, pets, duplicate_of, target, n_train, n_test, seed)
        swap_dirs(tmp, out)  # the folder appears whole or not at all; the old one (ours, checked) is removed
    except BaseException:  # Ctrl-C, SIGTERM, a full disk: no partial folder is left beside --out
        remove_tree(tmp)
        raise
    return Path(out_dir)


def _write(tmp: Path, ids: list, pets: list, duplicate_of: dict, target, n_train: int, n_test: int, seed: int) -> None:
    """The photos, the CSVs and last the marker listing them, into the staging folder ``tmp``."""
    cache: dict[int, bytes] = {}
    for i, (id_, p) in enumerate(zip(ids, pets, strict=False)):
        split = "train" if i < n_train else "test"
        if i in duplicate_of:
            a, exact = duplicate_of[i]
            data = cache.get(a) or jpeg_bytes(render(p), 90)
            if not exact:  # near duplicate: resized and re-encoded at another quality
                im = Image.open(io.BytesIO(data))
                data = jpeg_bytes(im.resize((int(im.width * 0.85), int(im.height * 0.85)), Image.BILINEAR), 75)
        else:
            data = jpeg_bytes(render(p), 90)
        cache[i] = data
        (tmp / split / f"{id_}.jpg").write_bytes(data)

    flags = pd.DataFrame([p.flags for p in pets], columns=META_COLS)
    train = pd.concat([pd.DataFrame({ID: ids[:n_train]}), flags.iloc[:n_train].reset_index(drop=True)], axis=1)
    train[TARGET] = target
    test = pd.concat([pd.DataFrame({ID: ids[n_train:]}), flags.iloc[n_train:].reset_index(drop=True)], axis=1)
    sample = pd.DataFrame({ID: ids[n_train:], TARGET: 38.0})
    write_csv(train, tmp / "train.csv")
    write_csv(test, tmp / "test.csv")
    write_csv(sample, tmp / "sample_submission.csv")
    meta = {"written_by": "pawpular make-synthetic", "n_train": n_train, "n_test": n_test, "seed": seed}
    write_text(tmp / MARKER, json.dumps({**meta, "files": sorted(_files(tmp))}, indent=1))


def baseline_scores(data_dir: str | Path, n_folds: int = 5, seed: int = 0) -> dict[str, float]:
    """Cross-validated RMSE of three simple baselines: the mean, ridge on the 12 flags, ridge on tiny thumbnails.

    Used to check the embedded competition: the image-only model must beat the metadata-only model, and both
    must beat the mean.
    """
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from .images import load_image

    root = Path(data_dir)
    train = pd.read_csv(root / "train.csv", dtype={ID: str})
    y = train[TARGET].to_numpy(float)
    thumbs = []
    for id_ in train[ID]:
        im = Image.fromarray(load_image(root / "train" / f"{id_}.jpg")).resize((8, 8), Image.BILINEAR)
        a = np.asarray(im, np.float32) / 255.0
        thumbs.append(np.concatenate([a.ravel(), a.reshape(-1, 3).mean(0), a.reshape(-1, 3).std(0)]))
    cv = KFold(n_folds, shuffle=True, random_state=seed)

    def rmse(x: np.ndarray) -> float:
        model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 13)))
        return float(np.sqrt(np.mean((cross_val_predict(model, x, y, cv=cv) - y) ** 2)))

    return {
        "mean": float(y.std()),
        "metadata": rmse(train[META_COLS].to_numpy(np.float32)),
        "image": rmse(np.stack(thumbs)),
    }
