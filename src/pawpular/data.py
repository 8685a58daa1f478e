"""The competition's data contract: read and validate the CSVs and images, decode photos robustly, the dataset.

Layout (exactly Kaggle's)::

    DIR/train.csv               Id, 12 metadata flags, Pawpularity
    DIR/test.csv                Id, 12 metadata flags
    DIR/sample_submission.csv   Id, Pawpularity
    DIR/train/{Id}.jpg, DIR/test/{Id}.jpg

``pawpular check-data --data DIR`` lists every problem with its file, line or Id and reason, and exits 2.
"""
from __future__ import annotations

import difflib
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError

ID = "Id"
TARGET = "Pawpularity"
META_COLS = [
    "Subject Focus", "Eyes", "Face", "Near", "Action", "Accessory",
    "Group", "Collage", "Human", "Occlusion", "Info", "Blur",
]
TRAIN_COLS = [ID, *META_COLS, TARGET]
TEST_COLS = [ID, *META_COLS]
SUBMISSION_COLS = [ID, TARGET]
_ID_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
# 8000 x 8000 photos are legitimate; PIL's default bomb guard (89 MP) would warn. Refuse only the absurd.
Image.MAX_IMAGE_PIXELS = 200_000_000


class DataError(ValueError):
    """The competition folder breaks the contract; ``problems`` lists each one."""

    def __init__(self, problems: list["Problem"]):
        self.problems = problems
        head = "\n".join(f"  {p}" for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{len(problems)} data problem(s):\n{head}{more}")


class ImageDecodeError(ValueError):
    pass


@dataclass(frozen=True)
class Problem:
    file: str
    where: str  # "line 7", "Id abc", "columns"
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.where}: {self.reason}"


@dataclass
class Competition:
    root: Path
    train: pd.DataFrame
    test: pd.DataFrame
    sample: pd.DataFrame

    def image_path(self, split: str, id_: str) -> Path:
        return image_path(self.root, split, id_)


def image_path(root: str | Path, split: str, id_: str) -> Path:
    return Path(root) / split / f"{id_}.jpg"


# -------------------------------------------------------------------------------------------------------------
# Images


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


# -------------------------------------------------------------------------------------------------------------
# CSVs


def _read_csv(path: Path, problems: list[Problem]) -> pd.DataFrame | None:
    if not path.is_file():
        problems.append(Problem(path.name, "file", f"missing (expected at {path})"))
        return None
    try:
        return pd.read_csv(path, dtype={ID: str}, keep_default_na=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        problems.append(Problem(path.name, "file", f"cannot be parsed as CSV: {str(e).strip()}"))
        return None


def _check_columns(df: pd.DataFrame, expected: list[str], file: str, problems: list[Problem]) -> bool:
    cols = list(df.columns)
    missing = [c for c in expected if c not in cols]
    extra = [c for c in cols if c not in expected]
    for c in missing:
        near = difflib.get_close_matches(c, extra, n=1, cutoff=0.6)
        hint = f" (found '{near[0]}': columns are case- and space-sensitive)" if near else ""
        problems.append(Problem(file, "columns", f"missing column '{c}'{hint}"))
    for c in extra:
        if not difflib.get_close_matches(c, missing, n=1, cutoff=0.6):
            problems.append(Problem(file, "columns", f"unexpected column '{c}'"))
    return not missing


def _fmt(v: object) -> str:
    """A cell value as the user typed it: 3, 0.5, 'yes' (no numpy reprs)."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return repr(v)


def _line(i: int) -> str:
    return f"line {i + 2}"  # header is line 1


def _check_ids(df: pd.DataFrame, file: str, problems: list[Problem]) -> None:
    ids = df[ID]
    for i in np.flatnonzero(ids.isna().to_numpy()):
        problems.append(Problem(file, _line(i), "empty Id"))
    for i, v in ids.items():
        if isinstance(v, str) and not _ID_RE.match(v):
            problems.append(Problem(file, _line(i), f"Id {v!r} has characters not allowed in a file name"))
    dup = ids[ids.duplicated(keep=False) & ids.notna()]
    for v, rows in dup.groupby(dup).groups.items():
        problems.append(Problem(file, f"Id {v}", f"duplicated on {', '.join(_line(r) for r in rows)}"))


def _check_flags(df: pd.DataFrame, file: str, problems: list[Problem]) -> None:
    for c in META_COLS:
        col = pd.to_numeric(df[c], errors="coerce")
        bad = ~col.isin([0, 1])
        for i in np.flatnonzero(bad.to_numpy()):
            problems.append(Problem(file, f"{_line(i)} (Id {df[ID].iloc[i]})", f"'{c}' must be 0 or 1, got {_fmt(df[c].iloc[i])}"))


def _check_target(df: pd.DataFrame, file: str, problems: list[Problem]) -> None:
    col = pd.to_numeric(df[TARGET], errors="coerce")
    for i in np.flatnonzero(col.isna().to_numpy()):
        raw = df[TARGET].iloc[i]
        what = "missing (NaN)" if pd.isna(raw) else f"not a number: {_fmt(raw)}"
        problems.append(Problem(file, f"{_line(i)} (Id {df[ID].iloc[i]})", f"Pawpularity {what}"))
    out = col.notna() & ((col < 1) | (col > 100))
    for i in np.flatnonzero(out.to_numpy()):
        problems.append(Problem(file, f"{_line(i)} (Id {df[ID].iloc[i]})", f"Pawpularity {col.iloc[i]:g} outside [1, 100]"))


def _check_sample_ids(test: pd.DataFrame, sample: pd.DataFrame, problems: list[Problem]) -> None:
    t, s = set(test[ID].dropna()), set(sample[ID].dropna())
    problems += [Problem("sample_submission.csv", f"Id {v}", "in test.csv but not in sample_submission.csv") for v in sorted(t - s)]
    problems += [Problem("sample_submission.csv", f"Id {v}", "not in test.csv") for v in sorted(s - t)]


def check_competition(root: str | Path, images: bool = True, workers: int = 8) -> tuple[list[Problem], Competition | None]:
    """Check every rule of the contract; return (problems, competition-or-None)."""
    root = Path(root)
    problems: list[Problem] = []
    if not root.is_dir():
        return [Problem(str(root), "folder", "competition folder does not exist")], None
    train = _read_csv(root / "train.csv", problems)
    test = _read_csv(root / "test.csv", problems)
    sample = _read_csv(root / "sample_submission.csv", problems)
    ok = {}
    for name, df, cols in (("train.csv", train, TRAIN_COLS), ("test.csv", test, TEST_COLS), ("sample_submission.csv", sample, SUBMISSION_COLS)):
        ok[name] = df is not None and _check_columns(df, cols, name, problems)
        if df is not None and ok[name] and len(df) == 0:
            problems.append(Problem(name, "file", "has no rows"))
            ok[name] = False
    if test is not None and TARGET in test.columns:
        problems.append(Problem("test.csv", "columns", "must not contain the target 'Pawpularity'"))
    for name, df in (("train.csv", train), ("test.csv", test), ("sample_submission.csv", sample)):
        if ok[name]:
            _check_ids(df, name, problems)
    if ok["train.csv"]:
        _check_flags(train, "train.csv", problems)
        _check_target(train, "train.csv", problems)
    if ok["test.csv"]:
        _check_flags(test, "test.csv", problems)
    if ok["test.csv"] and ok["sample_submission.csv"]:
        _check_sample_ids(test, sample, problems)
    if ok["train.csv"] and ok["test.csv"]:
        for v in sorted(set(train[ID].dropna()) & set(test[ID].dropna())):
            problems.append(Problem("test.csv", f"Id {v}", "also in train.csv"))
    if images:
        for name, df, split in (("train.csv", train, "train"), ("test.csv", test, "test")):
            if ok[name]:
                problems += _check_images(root, split, df[ID].dropna().tolist(), workers)
    if problems:
        return problems, None
    return [], Competition(root, _typed_train(train), _typed_test(test), sample)


def _check_images(root: Path, split: str, ids: list[str], workers: int) -> list[Problem]:
    folder = root / split
    if not folder.is_dir():
        return [Problem(f"{split}/", "folder", f"image folder missing: {len(ids)} images expected as {split}/<Id>.jpg")]
    paths = [image_path(root, split, i) for i in ids]
    with ThreadPoolExecutor(workers) as pool:  # PIL releases the GIL while decoding
        reasons = list(pool.map(check_image, paths))
    return [Problem(f"{split}/{i}.jpg", f"Id {i}", r) for i, r in zip(ids, reasons) if r]


def _typed_train(df: pd.DataFrame) -> pd.DataFrame:
    out = df[TRAIN_COLS].copy()
    out[META_COLS] = out[META_COLS].astype(np.int8)
    out[TARGET] = out[TARGET].astype(np.float32)
    return out.reset_index(drop=True)


def _typed_test(df: pd.DataFrame) -> pd.DataFrame:
    out = df[TEST_COLS].copy()
    out[META_COLS] = out[META_COLS].astype(np.int8)
    return out.reset_index(drop=True)


def read_competition(root: str | Path, images: bool = False) -> Competition:
    """The validated competition, or DataError listing every problem. Stages call this before anything else."""
    problems, comp = check_competition(root, images=images)
    if problems:
        raise DataError(problems)
    assert comp is not None
    return comp


# -------------------------------------------------------------------------------------------------------------
# Dataset and transforms


def build_transform(img_size: int, mean: tuple, std: tuple, train: bool):
    """albumentations pipelines: train = crop, flips, affine, colour jitter; eval = resize."""
    import albumentations as A
    from albumentations.pytorch import ToTensorV2

    tail = [A.Normalize(mean=mean, std=std), ToTensorV2()]
    if not train:
        return A.Compose([A.Resize(img_size, img_size), *tail])
    return A.Compose([
        A.RandomResizedCrop(size=(img_size, img_size), scale=(0.75, 1.0), ratio=(0.8, 1.25)),
        A.HorizontalFlip(p=0.5),
        A.Affine(rotate=(-10, 10), translate_percent=(-0.05, 0.05), scale=(0.95, 1.05), p=0.5),
        A.ColorJitter(brightness=0.15, contrast=0.15, saturation=0.15, hue=0.02, p=0.5),
        *tail,
    ])


def eval_dataset(df: pd.DataFrame, image_dir: str | Path, data_cfg: dict) -> "PetDataset":
    """Images as a model sees them at inference: resized to its input size, its normalization."""
    size = data_cfg["input_size"][1]
    transform = build_transform(size, data_cfg["mean"], data_cfg["std"], train=False)
    return PetDataset(df, image_dir, transform, min_side=max(data_cfg["input_size"][1:]))


class PetDataset:
    """Images (+ metadata flags, + target/100 when present) for a table with an ``Id`` column.

    Items are dicts: ``image`` (CxHxW float tensor), ``meta`` (12 floats), ``target`` (Pawpularity/100, or -1 when
    unknown) and ``index`` (row position). A photo that fails to decode raises ImageDecodeError naming its Id and
    path, which the DataLoader re-raises in the main process.
    """

    def __init__(self, df: pd.DataFrame, image_dir: str | Path, transform, min_side: int | None = None):
        self.ids = df[ID].astype(str).tolist()
        self.meta = df[META_COLS].to_numpy(np.float32)
        self.target = (df[TARGET].to_numpy(np.float32) / 100.0) if TARGET in df.columns else np.full(len(df), -1.0, np.float32)
        self.image_dir = Path(image_dir)
        self.transform = transform
        self.min_side = min_side

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        path = self.image_dir / f"{self.ids[i]}.jpg"
        try:
            img = load_image(path, self.min_side)
        except ImageDecodeError as e:
            raise ImageDecodeError(f"Id {self.ids[i]}: {e}") from None
        image = self.transform(image=img)["image"]
        return {"image": image, "meta": self.meta[i], "target": self.target[i], "index": i}


def read_test_set(root: str | Path, images: bool = True, workers: int = 8) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``test.csv`` and ``sample_submission.csv`` (and the test images) checked alone: what inference needs.

    A Kaggle notebook's competition folder may hold a hidden test set and no usable training data; ``predict``
    reads only these. Raises DataError listing every problem.
    """
    root = Path(root)
    problems: list[Problem] = []
    if not root.is_dir():
        raise DataError([Problem(str(root), "folder", "competition folder does not exist")])
    test = _read_csv(root / "test.csv", problems)
    sample = _read_csv(root / "sample_submission.csv", problems)
    ok_t = test is not None and _check_columns(test, TEST_COLS, "test.csv", problems)
    ok_s = sample is not None and _check_columns(sample, SUBMISSION_COLS, "sample_submission.csv", problems)
    if ok_t:
        _check_ids(test, "test.csv", problems)
        _check_flags(test, "test.csv", problems)
    if ok_s:
        _check_ids(sample, "sample_submission.csv", problems)
    if ok_t and ok_s:
        _check_sample_ids(test, sample, problems)
    if ok_t and images:
        problems += _check_images(root, "test", test[ID].dropna().tolist(), workers)
    if problems:
        raise DataError(problems)
    return _typed_test(test), sample


def _stat_fingerprint(root: Path, comp: Competition) -> str:
    """Cheap fingerprint (name, size, mtime) of the CSVs and every image: changes when any file does."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    paths = [root / n for n in ("train.csv", "test.csv", "sample_submission.csv")]
    paths += [image_path(root, "train", i) for i in comp.train[ID]] + [image_path(root, "test", i) for i in comp.test[ID]]
    for p in paths:
        st = p.stat()
        h.update(f"{p.relative_to(root)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


def ensure_valid(root: str | Path, out: str | Path) -> Competition:
    """Full contract check (images decoded) before a stage reads images, skipped when nothing changed since the
    last successful check of this experiment (recorded in ``out/.data_check.json``). Raises DataError."""
    import json

    from .io import atomic_write_text

    root, record = Path(root), Path(out) / ".data_check.json"
    comp = read_competition(root, images=False)
    try:
        fingerprint = _stat_fingerprint(root, comp)
    except FileNotFoundError:
        fingerprint = None  # a missing image: the full check below names it
    if fingerprint and record.is_file():
        try:
            if json.loads(record.read_text()).get(str(root.resolve())) == fingerprint:
                return comp
        except ValueError:
            pass
    problems = _check_images(root, "train", comp.train[ID].tolist(), 8) + _check_images(root, "test", comp.test[ID].tolist(), 8)
    if problems:
        raise DataError(problems)
    atomic_write_text(record, json.dumps({str(root.resolve()): fingerprint}))
    return comp
