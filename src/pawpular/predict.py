"""Export an experiment for offline inference, and predict from the exported folder.

    pawpular export --output output/default --to artifacts/default
    pawpular predict --artifacts artifacts/default --data input/petfinder --out submission.csv [--estimate 6800]

``export`` copies everything inference needs, and nothing of the training data, into one folder::

    ARTIFACTS/manifest.json                     versions, models, ensemble weights
    ARTIFACTS/src/pawpular/                     this package's source (importable with no install)
    ARTIFACTS/experiments/<name>/config.yaml    each blended experiment's resolved config
    ARTIFACTS/experiments/<name>/train/fold{k}/best.pt
    ARTIFACTS/experiments/<name>/svr/fold{k}/model.pkl
    ARTIFACTS/experiments/<name>/backbones/<backbone>/<weight file>   frozen backbones of a multi-backbone SVR

``predict`` reads only ``test.csv``, ``sample_submission.csv`` and ``test/`` (no training data, no network),
recomputes every blended head's test predictions exactly as the pipeline did (same transforms, TTA and
compression), applies the ensemble weights and writes a validated ``submission.csv``. Models with weight 0 are
skipped. ``--estimate N`` times the work on a few test images and prints the expected run time for N images,
to check Kaggle's 9-hour limit before submitting.
"""
from __future__ import annotations

import json
import logging
import pickle
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import __version__, artifacts, backend
from .config import Config, load_config, save_config
from .data import ID, read_test_set
from .data import eval_dataset
from .embed import embedding_table
from .io import read_json, write_json

log = logging.getLogger("pawpular")
KAGGLE_LIMIT_H = 9.0


# -------------------------------------------------------------------------------------------------------------
# Export


def _experiments(out: Path, cfg: Config) -> dict[str, tuple[str, Path]]:
    """name -> (model-name prefix used in weights.json, experiment folder)."""
    exps = {out.name: ("", out)}
    for e in cfg.ensemble.experiments:
        exps[Path(e).name] = (Path(e).name + "/", Path(e))
    return exps


def export(out: Path, to: Path) -> Path:
    """Copy what inference needs from experiment folder ``out`` into ``to`` (created whole, or not at all)."""
    out, to = Path(out), Path(to)
    if not (out / "config.yaml").is_file() or not (out / "ensemble" / "weights.json").is_file():
        raise FileNotFoundError(f"{out} has no config.yaml or ensemble/weights.json: run the pipeline to the ensemble first")
    cfg = load_config(out / "config.yaml")
    weights = read_json(out / "ensemble" / "weights.json")["weights"]
    tmp = to.with_name(to.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    models = {}
    for name, (prefix, folder) in _experiments(out, cfg).items():
        ecfg = load_config(folder / "config.yaml")
        dst = tmp / "experiments" / name
        used = {h: weights.get(f"{prefix}{h}", 0.0) for h in ("nn", "svr")}
        folds = sorted(int(p.name[4:]) for p in (folder / "train").glob("fold*") if (p / "best.pt").is_file())
        if (used["nn"] > 0 or (used["svr"] > 0 and ecfg.embed.source == "finetuned")) and not folds:
            raise FileNotFoundError(f"{folder}/train has no fold checkpoints to export")
        svr_on_model = used["svr"] > 0 and "model" in ecfg.svr.features
        compressed = ecfg.embed.compress != "none"
        for k in folds:
            if used["nn"] > 0 or (svr_on_model and not compressed):
                _copy(artifacts.best_checkpoint(folder, k), artifacts.best_checkpoint(dst, k))
            if svr_on_model and compressed:  # the embedding model travels compressed (what the SVR was fit on)
                _export_compressed_fold(folder, dst, k, ecfg.embed.compress)
        if used["svr"] > 0:
            for p in sorted((folder / "svr").glob("fold*/model.pkl")):
                _copy(p, dst / p.relative_to(folder))
            ecfg = _export_backbones(ecfg, dst)
        ecfg.output_dir, ecfg.data_dir = "", ""
        save_config(ecfg, dst / "config.yaml")
        models[name] = {"prefix": prefix, "folds": folds, "weights": used}
    package = Path(__file__).resolve().parent
    shutil.copytree(package, tmp / "src" / "pawpular", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    import timm

    write_json(tmp / "manifest.json", {
        "format": 1, "pawpular": __version__, "torch": torch.__version__, "timm": timm.__version__,
        "main": out.name, "experiments": models, "weights": weights,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    })
    if to.exists():
        shutil.rmtree(to)
    tmp.rename(to)
    size = sum(p.stat().st_size for p in to.rglob("*") if p.is_file()) / 2**20
    log.info("exported %s -> %s (%.1f MiB)", out, to, size)
    return to


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)


def compressed_embedder(exp_dir: Path, fold: int | None = None, backbone: str | None = None) -> Path:
    """Where an exported, already compressed embedding model lives."""
    return (exp_dir / "backbones" / backbone if backbone else artifacts.train_fold_dir(exp_dir, fold)) / "embed_compressed.pt"


def _export_compressed_fold(folder: Path, dst: Path, fold: int, spec: str) -> None:
    from .compress import compress_model, save_compressed
    from .models import build_model, read_checkpoint

    ckpt, model_cfg, data_cfg = read_checkpoint(artifacts.best_checkpoint(folder, fold))
    model = build_model(model_cfg, pretrained=False)
    model.load_state_dict(ckpt["model"], strict=True)
    save_compressed(compress_model(model.eval(), spec, "cpu"), spec, ckpt["model_cfg"], data_cfg, compressed_embedder(dst, fold))


def _export_backbones(ecfg: Config, dst: Path) -> Config:
    """Frozen backbones of the SVR: their compressed models, or copies of their weight files (relative paths)."""
    import dataclasses

    from .compress import compress_model, save_compressed
    from .config import ModelConfig
    from .embed import backbone_configs, build_frozen
    from .models import data_config

    items = []
    for b, raw in zip(backbone_configs(ecfg), ecfg.embed.backbones):
        item = dict(raw)
        if b.name not in ecfg.svr.features:
            continue
        if ecfg.embed.compress != "none":
            mcfg = ModelConfig(name=b.model, kwargs=b.kwargs, pretrained=b.pretrained, img_size=b.img_size)
            model = build_frozen(mcfg).eval()
            data_cfg = data_config(mcfg, model.backbone)
            save_compressed(compress_model(model, ecfg.embed.compress, "cpu"), ecfg.embed.compress,
                            dataclasses.asdict(mcfg), data_cfg, compressed_embedder(dst, backbone=b.name))
            item["pretrained"] = "none"  # the weights travel inside the compressed model
        elif b.pretrained not in ("none", "hub") and Path(b.pretrained).is_file():
            rel = Path("backbones") / b.name / Path(b.pretrained).name
            _copy(Path(b.pretrained), dst / rel)
            item["pretrained"] = str(rel)
        items.append(item)
    ecfg.embed.backbones = items
    return ecfg


# -------------------------------------------------------------------------------------------------------------
# Predict


def _loader(test: pd.DataFrame, data: Path, data_cfg: dict, batch_size: int, workers: int, device: str):
    ds = eval_dataset(test, data / "test", data_cfg)
    return ds, torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                                           pin_memory=device == "cuda")


def _experiment_preds(exp_dir: Path, info: dict, test: pd.DataFrame, data: Path, device: str) -> dict[str, np.ndarray]:
    """Test predictions of one exported experiment's used heads: {'nn': [...], 'svr': [...]}."""
    from .compress import compress_model, load_compressed
    from .config import ModelConfig
    from .embed import backbone_configs, build_frozen, embed_dataset
    from .models import data_config, load_checkpoint
    from .train import predict as nn_predict

    cfg = load_config(exp_dir / "config.yaml")
    use_nn, use_svr = info["weights"]["nn"] > 0, info["weights"]["svr"] > 0
    bs, workers = cfg.embed.batch_size, cfg.embed.num_workers
    frozen: dict[str, pd.DataFrame] = {}
    if use_svr:  # fold-independent frozen backbones: once
        for b in backbone_configs(cfg):
            if b.name not in cfg.svr.features:
                continue
            packed = compressed_embedder(exp_dir, backbone=b.name)
            if packed.is_file():  # exported already compressed (embed.compress)
                model, data_cfg = load_compressed(packed, device)
            else:
                path = b.pretrained if b.pretrained in ("none", "hub") else str(exp_dir / b.pretrained)
                mcfg = ModelConfig(name=b.model, kwargs=b.kwargs, pretrained=path, img_size=b.img_size)
                model = compress_model(build_frozen(mcfg).to(device).eval(), cfg.embed.compress, device)
                data_cfg = data_config(mcfg, model.backbone)
            ds, dl = _loader(test, data, data_cfg, bs, workers, device)
            frozen[b.name] = embedding_table(ds.ids, embed_dataset(model, ds, device, bs, workers, cfg.embed.tta_hflip))
    nn_preds, svr_preds = [], []
    for k in info["folds"]:
        packed = compressed_embedder(exp_dir, k)
        if use_nn or not packed.is_file():
            model, data_cfg = load_checkpoint(artifacts.best_checkpoint(exp_dir, k), device)
            ds, dl = _loader(test, data, data_cfg, bs, workers, device)
        one_pass = (use_nn and use_svr and "model" in cfg.svr.features and not packed.is_file()
                    and cfg.embed.compress == "none" and cfg.train.tta_hflip == cfg.embed.tta_hflip)
        if one_pass:
            pred, emb = nn_and_embeddings(model, dl, device, cfg.train.tta_hflip)
            nn_preds.append(pred)
            svr_preds.append(_svr_fold(exp_dir, k, cfg, dict(frozen, model=embedding_table(ds.ids, emb)), test))
            continue
        if use_nn:
            nn_preds.append(nn_predict(model, dl, device, cfg.train.tta_hflip, cfg.train.channels_last and device == "cuda"))
        if use_svr and "model" in cfg.svr.features:
            if packed.is_file():  # exported already compressed (embed.compress)
                emb_model, data_cfg = load_compressed(packed, device)
                ds, dl = _loader(test, data, data_cfg, bs, workers, device)
            else:
                emb_model = compress_model(model, cfg.embed.compress, device)
            frozen_k = dict(frozen, model=embedding_table(ds.ids, embed_dataset(emb_model, ds, device, bs, workers, cfg.embed.tta_hflip)))
            svr_preds.append(_svr_fold(exp_dir, k, cfg, frozen_k, test))
    if use_svr and "model" not in cfg.svr.features:
        folds = sorted(int(p.parent.name[4:]) for p in (exp_dir / "svr").glob("fold*/model.pkl"))
        svr_preds = [_svr_fold(exp_dir, k, cfg, frozen, test) for k in folds]
    out = {}
    if use_nn:
        out["nn"] = np.mean(nn_preds, axis=0)
    if use_svr:
        out["svr"] = np.mean(svr_preds, axis=0)
    return out


@torch.inference_mode()
def nn_and_embeddings(model, loader, device: str, tta_hflip: bool) -> tuple[np.ndarray, np.ndarray]:
    """NN-head predictions (0-100) and embeddings from ONE backbone pass per image (and its mirror with TTA).

    The same arithmetic as ``train.predict`` and ``embed.embed_dataset`` (CPU results are identical), at half
    the cost of running both: what matters under Kaggle's time limit.
    """
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    preds, embs = [], []
    model.eval()
    for batch in loader:
        x = batch["image"].to(device, non_blocking=True)
        meta = batch["meta"].to(device, non_blocking=True)
        if device == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with amp:
            e = model.embed(x)
            prob = torch.sigmoid(model.head_logits(e, meta).float())
            emb = e.float()
            if tta_hflip:
                e2 = model.embed(x.flip(3))
                prob = (prob + torch.sigmoid(model.head_logits(e2, meta).float())) / 2
                emb = (emb + e2.float()) / 2
        preds.append((prob * 100).cpu().double().numpy())
        embs.append(emb.cpu().numpy())
    return np.concatenate(preds), np.concatenate(embs).astype(np.float32)


def _svr_fold(exp_dir: Path, fold: int, cfg: Config, sets: dict[str, pd.DataFrame], test: pd.DataFrame) -> np.ndarray:
    from .svr import assemble_features

    with open(artifacts.svr_model(exp_dir, fold), "rb") as f:
        head = pickle.load(f)
    features = assemble_features(sets, test, cfg)
    return np.asarray(head.predict(features), dtype=np.float64)


def predict(artifacts_dir: Path, data: Path, out: Path, device: str = "auto", estimate: int | None = None) -> Path:
    """Write ``out`` (a validated submission.csv) from an exported folder and a competition's test set."""
    from .ensemble import write_submission

    artifacts_dir, data, out = Path(artifacts_dir), Path(data), Path(out)
    manifest_path = artifacts_dir / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found: is {artifacts_dir} a folder written by `pawpular export`?")
    manifest = json.loads(manifest_path.read_text())
    device = backend.resolve_device(device)
    test, sample = read_test_set(data)
    n_total = len(test)
    if estimate is not None:
        test = test.iloc[: min(len(test), 32)].reset_index(drop=True)
    t0 = time.time()
    columns = {}
    for name, info in manifest["experiments"].items():
        for head, pred in _experiment_preds(artifacts_dir / "experiments" / name, info, test, data, device).items():
            columns[f"{info['prefix']}{head}"] = pred
    seconds = time.time() - t0
    if estimate is not None:
        per_image = seconds / max(len(test), 1)
        hours = per_image * estimate / 3600
        verdict = "within" if hours < KAGGLE_LIMIT_H else "OVER"
        msg = (f"estimate: {per_image * 1000:.1f} ms/image measured on {len(test)} images ({device}); "
               f"{estimate} images -> {hours * 60:.1f} min ({verdict} Kaggle's {KAGGLE_LIMIT_H:g} h limit; "
               "model loading counted per measured batch, so this is an upper bound)")
        log.info(msg)
        print(msg)
        return artifacts_dir
    weights = manifest["weights"]
    blend = sum(weights[m] * columns[m] for m in columns)
    write_submission(pd.DataFrame({ID: test[ID], "pred": blend}), sample, out)
    log.info("predict: %d test images, %s in %.1fs -> %s", n_total, ", ".join(f"{m} x {weights[m]:.3f}" for m in columns), seconds, out)
    return out
