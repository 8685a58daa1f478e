"""Stage 3, embed: frozen-backbone embeddings of every train and test image, cached as parquet.

    pawpular embed --config configs/default.yaml

Reads ``folds.csv``, each fold's ``train/fold{k}/best.pt`` (or, with ``embed.source: pretrained``, the frozen
pretrained backbone of ``model``) and the images; writes ``emb/fold{k}/{train,test}.parquet`` (``Id`` +
``e0..e{D-1}`` float32, every train and every test image) and ``emb/fold{k}/meta.json``. Each extra entry of
``embed.backbones`` (a frozen pretrained model from a local weight file) writes ``emb/<name>/``. A frozen backbone
with ``pretrained: none`` gets a seeded random init (``build_frozen``), the same in every process.

Embeddings are the pooled pre-logit features (``forward_features`` + ``forward_head(pre_logits=True)``),
optionally averaged with those of the horizontally flipped image. On a GPU with cuDF the tables are written
through cuDF (``backend.write_table``); the files are the same either way.

The cache key of a folder is a hash of the checkpoint's bytes (or the backbone config and its weight file), the
bytes of every image, the transform (input size, mean, std, TTA) and the compression setting. A rerun with the
same key skips the work and says so; any change recomputes that folder only.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from . import artifacts, backend
from .compress import compress_model, input_dtype
from .config import BackboneConfig, Config, ModelConfig, _build, config_hash
from .data import ID, Competition, PetDataset, eval_dataset, image_path, read_competition
from .folds import read_folds
from .io import file_digest, read_json, write_json

log = logging.getLogger("pawpular")


def images_digest(comp: Competition) -> str:
    """One hash over every train and test image's Id and bytes: any changed photo changes it."""
    h = hashlib.blake2b(digest_size=16)
    for split, df in (("train", comp.train), ("test", comp.test)):
        for id_ in df[ID]:
            h.update(f"{split}/{id_}:".encode())
            h.update(file_digest(image_path(comp.root, split, id_)).encode())
    return h.hexdigest()


@torch.inference_mode()
def embed_dataset(model: torch.nn.Module, dataset: PetDataset, device: str, batch_size: int, num_workers: int,
                  tta_hflip: bool, desc: str = "embed") -> np.ndarray:
    """Embeddings [N, D] float32 in dataset order."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         pin_memory=device == "cuda", persistent_workers=False)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    out = []
    dtype = input_dtype(model)
    for batch in tqdm(loader, desc=desc, leave=False, disable=None):
        x = batch["image"].to(device, dtype=dtype, non_blocking=True)
        if device == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with amp:
            e = model.embed(x).float()
            if tta_hflip:
                e = (e + model.embed(torch.flip(x, dims=[3])).float()) / 2
        out.append(e.cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def embedding_table(ids: list[str], emb: np.ndarray) -> pd.DataFrame:
    """The on-disk layout of embeddings: ``Id`` + ``e0..e{D-1}``."""
    cols = {f"e{j}": emb[:, j] for j in range(emb.shape[1])}
    return pd.DataFrame({ID: ids, **cols})


def _is_cached(folder: Path, key: str, overwrite: bool) -> bool:
    meta = folder / "meta.json"
    if overwrite or not meta.is_file():
        return False
    try:
        same = read_json(meta).get("key") == key
    except ValueError:
        return False
    return same and all((folder / f"{s}.parquet").is_file() for s in ("train", "test"))


def _write(folder: Path, comp: Competition, model, data_cfg: dict, key: str, info: dict, cfg: Config, device: str) -> None:
    t0 = time.time()
    tables = {}
    for split, df in (("train", comp.train), ("test", comp.test)):
        ds = eval_dataset(df, comp.root / split, data_cfg)
        emb = embed_dataset(model, ds, device, cfg.embed.batch_size, cfg.embed.num_workers, cfg.embed.tta_hflip,
                            desc=f"{folder.name}/{split}")
        tables[split] = embedding_table(ds.ids, emb)
    for split, table in tables.items():
        backend.write_table(table, folder / f"{split}.parquet", cfg.device)
    seconds = time.time() - t0
    n = sum(len(t) for t in tables.values())
    write_json(folder / "meta.json", {"key": key, "dim": int(tables["train"].shape[1] - 1), "images": n,
                                      "seconds": round(seconds, 2), "images_per_s": round(n / max(seconds, 1e-9), 1), **info})
    log.info("%s: %d images -> %d-dim embeddings in %.1fs (%.0f img/s)", folder, n, tables["train"].shape[1] - 1,
             seconds, n / max(seconds, 1e-9))


def _transform_key(data_cfg: dict, cfg: Config) -> dict:
    return {"input_size": list(data_cfg["input_size"]), "mean": list(data_cfg["mean"]), "std": list(data_cfg["std"]),
            "tta_hflip": cfg.embed.tta_hflip, "compress": cfg.embed.compress}


# The random init of a frozen backbone with `pretrained: none` is drawn from this seed, in a forked RNG: every
# process (embed now, predict later, a rerun with --overwrite) builds the same weights, so test embeddings come
# from the model whose train embeddings the SVR was fit on, and the cache key names one set of weights.
RANDOM_INIT_SEED = 0


def _pretrained_source(model_cfg: ModelConfig) -> str:
    """What identifies a frozen backbone's weights: the file's bytes, or the hub name / the seeded random init."""
    p = model_cfg.pretrained
    if p == "none":
        return f"none:seed{RANDOM_INIT_SEED}"
    return p if p == "hub" else file_digest(Path(p)) if Path(p).is_file() else p


def build_frozen(model_cfg: ModelConfig) -> torch.nn.Module:
    """A frozen backbone's PawModel with its weights: from its file / the hub, or the seeded random init."""
    from .models import build_model

    if model_cfg.pretrained != "none":
        return build_model(model_cfg, pretrained=True)
    with torch.random.fork_rng(devices=[]):  # leaves the caller's RNG stream as it was
        torch.manual_seed(RANDOM_INIT_SEED)
        return build_model(model_cfg, pretrained=True)


def _embed_frozen(model_cfg: ModelConfig, folder: Path, comp: Competition, img_key: str, cfg: Config, device: str) -> str:
    """Embeddings of a frozen pretrained backbone into ``folder``; returns 'cached' or 'computed'."""
    from .models import build_model, data_config

    if model_cfg.pretrained == "none":
        log.warning("%s: backbone %s has random weights (pretrained: none): fine for tests, useless for a score",
                    folder.name, model_cfg.name)
    desc = {k: v for k, v in dataclasses.asdict(model_cfg).items() if k not in ("finetune", "drop_rate", "use_meta")}
    probe = build_model(model_cfg, pretrained=False)
    data_cfg = data_config(model_cfg, probe.backbone)
    key = config_hash(desc, _pretrained_source(model_cfg), img_key, _transform_key(data_cfg, cfg))
    if _is_cached(folder, key, cfg.overwrite):
        return "cached"
    model = build_frozen(model_cfg)
    model = compress_model(model.to(device).eval(), cfg.embed.compress, device)
    _write(folder, comp, model, data_cfg, key, {"source": "pretrained", "model": model_cfg.name}, cfg, device)
    return "computed"


def backbone_configs(cfg: Config) -> list[BackboneConfig]:
    """``embed.backbones`` checked against BackboneConfig (unknown keys are errors that name them)."""
    out = []
    for i, item in enumerate(cfg.embed.backbones):
        b = _build(BackboneConfig, item, f"embed.backbones[{i}].")
        if not b.name or not b.model:
            raise ValueError(f"embed.backbones[{i}]: 'name' and 'model' are required")
        if b.name.startswith("fold") or b.name == "model":
            raise ValueError(f"embed.backbones[{i}]: name {b.name!r} is reserved")
        out.append(b)
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def run(cfg: Config) -> Path:
    from .models import load_checkpoint, read_checkpoint

    device = backend.resolve_device(cfg.device)
    comp = read_competition(cfg.data)
    folds = read_folds(cfg.out, comp.train)
    img_key = images_digest(comp)
    status: dict[str, str] = {}

    for b in backbone_configs(cfg):
        mcfg = ModelConfig(name=b.model, kwargs=b.kwargs, pretrained=b.pretrained, img_size=b.img_size)
        status[b.name] = _embed_frozen(mcfg, artifacts.emb_dir(cfg.out, backbone=b.name), comp, img_key, cfg, device)

    fold_ids = sorted(folds["fold"].unique().tolist())
    if cfg.embed.source == "pretrained":
        # One frozen backbone serves every fold: compute once, hard-link into each fold's folder.
        first = artifacts.emb_dir(cfg.out, fold=fold_ids[0])
        status["fold*"] = _embed_frozen(cfg.model, first, comp, img_key, cfg, device)
        for k in fold_ids[1:]:
            for name in ("train.parquet", "test.parquet", "meta.json"):
                _link_or_copy(first / name, artifacts.emb_dir(cfg.out, fold=k) / name)
    else:
        for k in fold_ids:
            ckpt = artifacts.best_checkpoint(cfg.out, k)
            if not ckpt.is_file():
                raise FileNotFoundError(f"{ckpt} not found: run `pawpular train` first (or set embed.source: pretrained)")
            folder = artifacts.emb_dir(cfg.out, fold=k)
            _, _, data_cfg = read_checkpoint(ckpt)  # the cache key needs no model
            key = config_hash(file_digest(ckpt), img_key, _transform_key(data_cfg, cfg))
            if _is_cached(folder, key, cfg.overwrite):
                status[f"fold{k}"] = "cached"
                continue
            model = compress_model(load_checkpoint(ckpt, device)[0], cfg.embed.compress, device)
            _write(folder, comp, model, data_cfg, key, {"source": "finetuned", "checkpoint": str(ckpt)}, cfg, device)
            status[f"fold{k}"] = "computed"

    cached = [k for k, v in status.items() if v == "cached"]
    if cached:
        log.info("embeddings unchanged, reused from cache: %s", ", ".join(cached))
    log.info("embed summary: %s", ", ".join(f"{k}={v}" for k, v in status.items()))
    return cfg.out / "emb"
