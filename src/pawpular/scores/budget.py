"""The inference budget: how long each embedding set takes to compute on the hidden test photos.

``embed`` records in each set's shared cache entry (``embedding_cache``) the images per second it measured where
it made the set (decoding, TTA and compression included) and the machine it ran on. ``select --budget-hours H
--test-images N`` keeps only the combinations of sets whose inference fits: the sum over the sets of N / (images
per second), times the folds for the experiment's own fine-tuned fold backbones ("model": one pass per fold). The
competition allowed 9 hours for about 6,800 hidden photos. ``predict --estimate N`` measures the same on the
machine it runs on, per set.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from pathlib import Path

from ..store import artifacts, embedding_cache
from ..store.errors import ConfigError


def machine_name(device: str) -> str:
    """What the images per second were measured on: the GPU's name, or the CPU's."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu


def set_speed(out: Path, name: str, fold_ids: Sequence[int], finetuned: bool = True) -> tuple[float, int]:
    """(images per second, passes per test photo) of embedding set ``name``: a frozen set runs once, "model"
    once per fold when fine-tuned (each fold's own speed is recorded; their mean is used). ConfigError when no
    speed is recorded (a set made before the setting existed: rerun `pawpular embed --overwrite`)."""
    folds = fold_ids if name == artifacts.MODEL_SET and finetuned else fold_ids[:1]
    speeds = []
    for k in folds:
        folder = artifacts.set_file(out, name, "train", k).parent
        path = folder / "manifest.json"
        record = embedding_cache.entry_record(out, folder)  # measured where the set was made: the entry's record
        ips = record.info.get("images_per_second") if record is not None else None
        if not ips:
            raise ConfigError(
                f"{path}: no images_per_second recorded for set {name!r}, which an inference budget "
                "needs: rerun `pawpular embed --overwrite` to measure it"
            )
        speeds.append(float(ips))
    return sum(speeds) / len(speeds), len(folds)


def inference_hours(speeds: dict[str, tuple[float, int]], names: Sequence[str], test_images: int) -> float:
    """Hours to embed ``test_images`` photos with every set of ``names`` (``speeds`` from ``set_speed``)."""
    return sum(test_images * passes / ips for ips, passes in (speeds[n] for n in dict.fromkeys(names))) / 3600
