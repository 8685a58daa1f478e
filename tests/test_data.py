"""The data contract: every bad input gives its own specific error; odd but valid photos decode correctly."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import shared_or_skip
from PIL import Image

from pawpular.data.images import ImageDecodeError, load_image
from pawpular.data.tables import META_COLS, TARGET, check_competition, read_competition


def _edit_csv(path: Path, fn) -> None:
    df = pd.read_csv(path, dtype={"Id": str})
    df = fn(df)
    df.to_csv(path, index=False)


def _problems(root: Path, images: bool = True) -> list[str]:
    problems, comp = check_competition(root, images=images)
    assert (comp is None) == bool(problems)
    return [str(p) for p in problems]


def test_valid_competition_has_no_problems(small_competition):
    assert _problems(small_competition) == []
    comp = read_competition(small_competition, images=True)
    assert len(comp.train) == 120 and len(comp.test) == 16
    assert comp.train[TARGET].between(1, 100).all()


def _first_id(root: Path, split: str = "train") -> str:
    return pd.read_csv(root / f"{split}.csv", dtype={"Id": str})["Id"].iloc[0]


CSV_CASES = {
    "renamed column": (
        "train.csv",
        lambda d: d.rename(columns={"Subject Focus": "SubjectFocus"}),
        "train.csv: columns: missing column 'Subject Focus' (found 'SubjectFocus'",
    ),
    "extra column": ("train.csv", lambda d: d.assign(Breed=1), "train.csv: columns: unexpected column 'Breed'"),
    "duplicate Id": ("train.csv", lambda d: pd.concat([d, d.iloc[[5]]]), "duplicated on line 7, line 122"),
    "flag not binary": (
        "train.csv",
        lambda d: d.assign(**{"Blur": [2] + list(d["Blur"][1:])}),
        "train.csv: line 2 (Id {id}): 'Blur' must be 0 or 1, got 2",
    ),
    "target NaN": (
        "train.csv",
        lambda d: d.assign(Pawpularity=[np.nan] + list(d[TARGET][1:])),
        "train.csv: line 2 (Id {id}): Pawpularity missing (NaN)",
    ),
    "target 0": (
        "train.csv",
        lambda d: d.assign(Pawpularity=[0] + list(d[TARGET][1:])),
        "train.csv: line 2 (Id {id}): Pawpularity 0 outside [1, 100]",
    ),
    "target 101": (
        "train.csv",
        lambda d: d.assign(Pawpularity=[101] + list(d[TARGET][1:])),
        "Pawpularity 101 outside [1, 100]",
    ),
    "target text": (
        "train.csv",
        lambda d: d.assign(Pawpularity=["high"] + list(d[TARGET][1:])),
        "Pawpularity not a number: 'high'",
    ),
    "target in test": (
        "test.csv",
        lambda d: d.assign(Pawpularity=50),
        "test.csv: columns: must not contain the target",
    ),
    "sample Ids differ": (
        "sample_submission.csv",
        lambda d: d.iloc[1:],
        "in test.csv but not in sample_submission.csv",
    ),
    "bad Id characters": (
        "test.csv",
        lambda d: d.assign(Id=["../evil"] + list(d["Id"][1:])),
        "has characters not allowed",
    ),
}


@pytest.mark.parametrize("case", sorted(CSV_CASES))
def test_csv_problem_is_named(competition_copy, case):
    file, fn, expected = CSV_CASES[case]
    first = _first_id(competition_copy, file.split(".")[0] if file != "sample_submission.csv" else "test")
    _edit_csv(competition_copy / file, fn)
    problems = _problems(competition_copy, images=False)
    assert any(expected.format(id=first) in p for p in problems), problems


def test_a_column_error_does_not_hide_the_rest_of_the_file(competition_copy):
    """Old: a renamed column hid every other problem of train.csv until it was fixed: one pass lists them all."""
    first = _first_id(competition_copy)

    def break_it(d: pd.DataFrame) -> pd.DataFrame:
        d = d.rename(columns={"Subject Focus": "SubjectFocus"})
        d.loc[0, "Blur"] = 7
        d.loc[1, TARGET] = 250
        return d

    _edit_csv(competition_copy / "train.csv", break_it)
    problems = _problems(competition_copy, images=False)
    assert any("missing column 'Subject Focus'" in p for p in problems)
    assert f"train.csv: line 2 (Id {first}): 'Blur' must be 0 or 1, got 7" in problems
    assert any("Pawpularity 250 outside [1, 100]" in p for p in problems)


def test_missing_csv_and_unparseable_csv(competition_copy):
    (competition_copy / "test.csv").unlink()
    (competition_copy / "train.csv").write_bytes(b"\xff\xfe\x00garbage\x00")
    problems = _problems(competition_copy, images=False)
    assert any(p.startswith("test.csv: file: missing") for p in problems)
    assert any(p.startswith("train.csv: file: cannot be parsed") for p in problems)


IMAGE_CASES = {
    "missing": (lambda p: p.unlink(), "image file missing"),
    "zero bytes": (lambda p: p.write_bytes(b""), "empty file (0 bytes)"),
    "random bytes": (lambda p: p.write_bytes(np.random.default_rng(0).bytes(5000)), "not an image PIL can read"),
    "truncated JPEG": (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 3]), "cannot be decoded"),
}


@pytest.mark.parametrize("case", sorted(IMAGE_CASES))
def test_bad_image_is_rejected_with_its_id(competition_copy, case):
    id_ = _first_id(competition_copy, "test")
    fn, reason = IMAGE_CASES[case]
    fn(competition_copy / "test" / f"{id_}.jpg")
    problems = _problems(competition_copy)
    assert len(problems) == 1  # only that photo, nothing else
    assert problems[0].startswith(f"test/{id_}.jpg: Id {id_}: ") and reason in problems[0]


def test_missing_image_folder_is_one_clear_problem(competition_copy):
    import shutil

    shutil.rmtree(competition_copy / "train")
    assert _problems(competition_copy) == [
        "train/: folder: image folder missing: 120 images expected as train/<Id>.jpg"
    ]


# --- odd but valid photos --------------------------------------------------------------------------------------


def _save(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _gradient(w: int = 40, h: int = 24) -> np.ndarray:
    x = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
    x[..., 1] = np.linspace(0, 255, h)[:, None]
    return x.astype(np.uint8)


def test_png_named_jpg_grayscale_cmyk_and_16bit(tmp_path):
    rgb = Image.fromarray(_gradient())
    cases = {
        "png.jpg": _save(rgb, "PNG"),
        "gray.jpg": _save(rgb.convert("L")),
        "cmyk.jpg": _save(rgb.convert("CMYK")),
        "rgba.jpg": _save(rgb.convert("RGBA"), "PNG"),
    }
    a16 = (np.linspace(0, 65535, 40 * 24).reshape(24, 40)).astype(np.uint16)
    cases["16bit.jpg"] = _save(Image.fromarray(a16), "PNG")
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        arr = load_image(tmp_path / name)
        assert arr.shape == (24, 40, 3) and arr.dtype == np.uint8, name
    assert np.abs(load_image(tmp_path / "png.jpg").astype(int) - _gradient()).max() == 0
    g16 = load_image(tmp_path / "16bit.jpg")[..., 0].astype(int)
    assert g16.min() <= 1 and g16.max() >= 254  # rescaled to the full 8-bit range, not clipped to white


def test_exif_rotation_is_applied(tmp_path):
    img = Image.fromarray(_gradient(40, 24))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    (tmp_path / "rot.jpg").write_bytes(_save(img, exif=exif))
    arr = load_image(tmp_path / "rot.jpg")
    assert arr.shape == (40, 24, 3)  # upright: width and height swapped


def test_tiny_and_huge_images(tmp_path):
    (tmp_path / "tiny.jpg").write_bytes(_save(Image.new("RGB", (1, 1), (200, 10, 10))))
    assert load_image(tmp_path / "tiny.jpg").shape == (1, 1, 3)
    huge = Image.new("RGB", (8000, 8000), (10, 120, 200))
    (tmp_path / "huge.jpg").write_bytes(_save(huge, quality=50))
    arr = load_image(tmp_path / "huge.jpg", min_side=224)  # DCT-scaled decode: 1000x1000, not 64 MP
    assert min(arr.shape[:2]) >= 224 and max(arr.shape[:2]) <= 1000


def test_dataset_error_names_the_id(competition_copy):
    import albumentations as A

    from pawpular.data.dataset import PetDataset

    comp = read_competition(competition_copy)
    id_ = comp.train["Id"].iloc[3]
    (competition_copy / "train" / f"{id_}.jpg").write_bytes(b"not a jpeg")
    ds = PetDataset(comp.train, competition_copy / "train", A.Compose([A.Resize(32, 32)]))
    with pytest.raises(ImageDecodeError, match=f"Id {id_}"):
        ds[3]


# --- the real competition CSVs ------------------------------------------------------------------------------------


def test_real_petfinder_csvs_pass_the_csv_checks():
    root = shared_or_skip("petfinder")
    comp = read_competition(root, images=False)
    assert len(comp.train) == 9912 and list(comp.train.columns[1:13]) == META_COLS
    assert comp.train[TARGET].mean() == pytest.approx(38.04, abs=0.01)
    problems = _problems(root, images=True)  # images are not shipped: said plainly, once per folder
    assert problems == [
        "train/: folder: image folder missing: 9912 images expected as train/<Id>.jpg",
        "test/: folder: image folder missing: 8 images expected as test/<Id>.jpg",
    ]


def test_check_data_cli_exit_codes(small_competition, competition_copy):
    ok = subprocess.run(
        [sys.executable, "-m", "pawpular", "check-data", "--data", str(small_competition)],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0 and "valid (120 train, 16 test" in ok.stdout
    _edit_csv(competition_copy / "train.csv", lambda d: d.assign(Eyes=3))
    bad = subprocess.run(
        [sys.executable, "-m", "pawpular", "check-data", "--data", str(competition_copy)],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "120 problem(s)" in bad.stderr and "'Eyes' must be 0 or 1, got 3" in bad.stderr
