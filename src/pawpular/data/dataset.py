"""The images as a model sees them: transforms (albumentations for training) and a Dataset of dicts.

Items are dicts: ``image`` (CxHxW float tensor), ``meta`` (12 floats), ``target`` (Pawpularity/100, or -1 when
unknown) and ``index`` (row position). Used by training (``train_dataset``) and by every inference
(``eval_dataset``: resize to the model's input size, its normalization).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pandas as pd

from .images import ImageDecodeError, load_image
from .tables import ID, META_COLS, TARGET

SQUARES = ("squash", "crop")  # how a photo becomes a square input (data_cfg["square"]; absent = squash)


def square_crop(image: np.ndarray, rng: random.Random | None = None) -> np.ndarray:
    """The largest square of ``image``: centred, or at a random offset drawn from ``rng``."""
    h, w = image.shape[:2]
    side = min(h, w)
    if rng is None:
        top, left = (h - side) // 2, (w - side) // 2
    else:
        top, left = rng.randint(0, h - side), rng.randint(0, w - side)
    return image[top : top + side, left : left + side]


class EvalTransform:
    """Inference: the centred square with ``square: crop`` (else the whole photo, squashed), resized to the
    model's input size (bilinear, OpenCV's INTER_LINEAR, as albumentations' Resize), normalized, HWC uint8 -> CHW
    float32 tensor. Plain OpenCV and numpy: ``predict`` (a Kaggle notebook) needs no albumentations, and every
    inference (train's predictions, embed, predict) uses this one function."""

    def __init__(self, img_size: int, mean: tuple, std: tuple, square: str = "squash"):
        if square not in SQUARES:
            raise ValueError(f"square must be one of {SQUARES}, got {square!r}")
        self.size, self.square = int(img_size), square
        self.mean = np.asarray(mean, np.float32) * 255.0
        self.inv_std = 1.0 / (np.asarray(std, np.float32) * 255.0)

    def __call__(self, image: np.ndarray) -> dict:
        import cv2
        import torch

        if self.square == "crop":
            image = square_crop(image)
        if image.shape[:2] != (self.size, self.size):
            image = cv2.resize(image, (self.size, self.size), interpolation=cv2.INTER_LINEAR)
        x = (image.astype(np.float32) - self.mean) * self.inv_std
        return {"image": torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))}


class RandomSquare:
    """Training with ``square: crop``: a random largest square of the photo, then ``augment`` (albumentations).
    The offset comes from Python's ``random``, which torch seeds in every DataLoader worker."""

    def __init__(self, augment):
        self.augment = augment

    def __call__(self, image: np.ndarray) -> dict:
        return self.augment(image=square_crop(image, random.Random(random.getrandbits(64))))


def build_transform(img_size: int, mean: tuple, std: tuple, train: bool, square: str = "squash"):
    """train = albumentations: crop, flips, affine, colour jitter (after a random square with ``square: crop``);
    eval = ``EvalTransform`` (the centred square with ``square: crop``, resize)."""
    if not train:
        return EvalTransform(img_size, mean, std, square)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # its import would ask the network for a newer version
    import albumentations as A
    from albumentations.pytorch import ToTensorV2

    augment = A.Compose(
        [
            A.RandomResizedCrop(size=(img_size, img_size), scale=(0.75, 1.0), ratio=(0.8, 1.25)),
            A.HorizontalFlip(p=0.5),
            A.Affine(rotate=(-10, 10), translate_percent=(-0.05, 0.05), scale=(0.95, 1.05), p=0.5),
            A.ColorJitter(brightness=0.15, contrast=0.15, saturation=0.15, hue=0.02, p=0.5),
            A.Normalize(mean=mean, std=std),
            ToTensorV2(),
        ]
    )
    return RandomSquare(augment) if square == "crop" else augment


def train_dataset(df: pd.DataFrame, image_dir: str | Path, data_cfg: dict) -> PetDataset:
    """Training images: random crops, flips, affine and colour jitter at the model's input size."""
    size = data_cfg["input_size"][1]
    square = data_cfg.get("square", "squash")
    transform = build_transform(size, data_cfg["mean"], data_cfg["std"], train=True, square=square)
    return PetDataset(df, image_dir, transform, min_side=max(data_cfg["input_size"][1:]))


def eval_dataset(df: pd.DataFrame, image_dir: str | Path, data_cfg: dict) -> PetDataset:
    """Images as a model sees them at inference: resized to its input size, its normalization."""
    size = data_cfg["input_size"][1]
    square = data_cfg.get("square", "squash")
    transform = build_transform(size, data_cfg["mean"], data_cfg["std"], train=False, square=square)
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
        self.target = (
            (df[TARGET].to_numpy(np.float32) / 100.0) if TARGET in df.columns else np.full(len(df), -1.0, np.float32)
        )
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
