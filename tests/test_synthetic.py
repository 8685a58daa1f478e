"""The embedded competition: layout, determinism, calibration to the real data, and real image signal."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pawpular.data.synthetic import FLAG_P, baseline_scores, make_synthetic
from pawpular.data.synthetic_draw import Pet, render
from pawpular.data.tables import META_COLS, TARGET, read_competition


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = _digest(make_synthetic(tmp_path / "a", n_train=30, n_test=5, seed=7))
    b = _digest(make_synthetic(tmp_path / "b", n_train=30, n_test=5, seed=7))
    c = _digest(make_synthetic(tmp_path / "c", n_train=30, n_test=5, seed=8))
    assert a == b and len(a) == 3 + 35 + 1  # the CSVs, the photos and the marker make-synthetic owns the folder by
    assert a != c


def test_layout_passes_the_contract(small_competition):
    comp = read_competition(small_competition, images=True)
    assert comp.sample["Id"].tolist() == comp.test["Id"].tolist()
    assert comp.train["Id"].str.fullmatch(r"[0-9a-f]{32}").all()
    sizes = {Image.open(small_competition / "train" / f"{i}.jpg").size for i in comp.train["Id"][:40]}
    assert len(sizes) > 20  # varied sizes and aspect ratios


def test_default_size_is_calibrated_to_the_real_data(default_competition):
    train = pd.read_csv(default_competition / "train.csv")
    y = train[TARGET]
    assert y.mean() == pytest.approx(38.0, abs=3) and y.std() == pytest.approx(20.6, abs=3)
    assert y.skew() > 0.8 and (y == y.round()).all() and y.between(1, 100).all()
    assert (y == 100).mean() > 0.01  # the real data's spike at 100
    for col, p in FLAG_P.items():
        assert train[col].mean() == pytest.approx(p, abs=4 * np.sqrt(p * (1 - p) / len(train)) + 0.005), col
    assert train["Eyes"].mean() == pytest.approx(0.773, abs=0.05)
    assert not ((train["Eyes"] == 1) & (train["Face"] == 0)).any()


def test_image_signal_beats_metadata_signal_beats_the_mean(default_competition):
    scores = baseline_scores(default_competition)
    assert scores["image"] < scores["metadata"] < scores["mean"]
    assert scores["mean"] - scores["image"] > 2 * (scores["mean"] - scores["metadata"])


def test_duplicates_are_planted(default_competition):
    digests = pd.Series(
        {p.stem: hashlib.sha256(p.read_bytes()).hexdigest() for p in (default_competition / "train").glob("*.jpg")}
    )
    assert digests.duplicated().sum() >= 3  # exact copies (near copies are checked by the folds tests)


def _pet(**flags) -> Pet:
    base = {c: 0 for c in META_COLS} | {"Face": 1, "Eyes": 1, "Near": 1}
    return Pet(flags=base | flags, warm=0.5, fur=0.5, size=0.5, dog=True, eye=0.5, width=160, height=128, seed=11)


def _sharpness(img) -> float:
    a = np.asarray(img.convert("L"), float)
    return float(np.abs(np.diff(a, axis=0)).mean() + np.abs(np.diff(a, axis=1)).mean())


def test_flags_are_visible_in_the_photo():
    plain = render(_pet())
    assert _sharpness(render(_pet(Blur=1))) < 0.6 * _sharpness(plain)
    info = np.asarray(render(_pet(Info=1)))
    assert (info[-8:].reshape(-1, 3) > 240).all(1).mean() > 0.5  # a white caption band with text
    assert (info[-8:].reshape(-1, 3) < 40).all(1).any()
    collage = np.asarray(render(_pet(Collage=1)))
    assert (collage[:, 78:82].reshape(-1, 3) > 235).all(1).mean() > 0.9  # the white gutter between tiles
    assert not np.array_equal(np.asarray(render(_pet(Human=1))), np.asarray(plain))
    warm = np.asarray(render(replace(_pet(), warm=1.0)), float).mean()
    cold = np.asarray(render(replace(_pet(), warm=0.0)), float).mean()
    assert warm > cold + 30  # the hidden, image-only factor is really in the pixels


def test_too_small_is_refused(tmp_path):
    with pytest.raises(ValueError, match="n_train >= 20"):
        make_synthetic(tmp_path / "x", n_train=5, n_test=1)
