"""``pawpular export``: one folder holding everything offline inference needs, and nothing of the training data.

Reads   a finished experiment: its manifests (what made each file, and the settings), ensemble/weights.json,
        train/fold{k}/best.pt, svr/fold{k}/model.pkl, frozen backbones' weight files; ensemble.experiments too
Writes  ARTIFACTS/manifest.json                  versions, models, weights, inference policies, every file's digest
        ARTIFACTS/src/pawpular/                  this package's source (importable with no install)
        ARTIFACTS/inference.ipynb                a Kaggle notebook that runs predict and fails loudly
        ARTIFACTS/experiments/<name>/config.yaml the settings that made the shipped models
        ARTIFACTS/experiments/<name>/train/fold{k}/best.pt, svr/fold{k}/model.pkl, backbones/<set>/...
Run     pawpular export --output output/default --to artifacts/default [--overwrite]

Only a current experiment is exported: every stage up to the ensemble must be done (``pawpular status``), else
the error names the stage to run. The folder is built beside the target and swapped in with one rename, so the
target is always the old export whole or the new one whole; an existing non-empty target needs --overwrite
and must be an earlier export (``guards.check_export_target``: never the experiment or a folder above it).
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path

from . import __version__, artifacts, manifest
from .compress import compress_model, save_compressed
from .config import Config, backbone_configs, backbone_model_config, load_config, save_config
from .files import (ArtifactError, MissingArtifact, file_digest, read_json, recover_swap, swap_dirs, temp_path,
                    write_json, write_text)

log = logging.getLogger("pawpular")


def _experiments(cfg: Config) -> list[tuple[str, str, Path]]:
    """(name, model-name prefix in weights.json, folder) of every blended experiment."""
    return [(cfg.out.name, "", cfg.out)] + [(Path(e).name, Path(e).name + "/", Path(e)) for e in cfg.ensemble.experiments]


def check_current(cfg: Config) -> None:
    """Every stage up to the ensemble done, or ArtifactError naming the first that is not and what to run."""
    from .runner import Context, chain, upstream

    for name, v in chain(Context(cfg), [*upstream(cfg, "ensemble"), "ensemble"]).items():
        if not v.done:
            raise ArtifactError(f"cannot export {cfg.out}: {name} is {v.state} ({v.why()}): run `pawpular {name}` "
                                f"(or `pawpular all`) first")
    for _, _, folder in _experiments(cfg)[1:]:
        for stage in ("train", "svr"):
            record = manifest.read(artifacts.manifest(folder, stage))
            if record is not None and (bad := manifest.damaged_outputs(record, folder)):
                raise ArtifactError(f"cannot export: {folder} (ensemble.experiments): {'; '.join(bad[:3])}")


def export(out: Path, to: Path, overwrite: bool = False, data: str | None = None) -> Path:
    """Copy what inference needs from experiment ``out`` into ``to``; returns ``to``."""
    from .guards import check_export_target
    from .lock import experiment_lock

    out, to = Path(out), Path(to)
    if not artifacts.config_yaml(out).is_file() or not artifacts.weights_json(out).is_file():
        raise MissingArtifact(f"{out} has no config.yaml or ensemble/weights.json: run the pipeline to the ensemble first")
    recover_swap(to)
    check_export_target(out, to, overwrite)  # never the experiment; --overwrite replaces only an earlier export

    with experiment_lock(out, "export"):  # no stage rewrites the experiment while it is read
        return _export(out, to, load_config(artifacts.config_yaml(out), output_dir=str(out), data_dir=data))


def _export(out: Path, to: Path, cfg: Config) -> Path:
    check_current(cfg)
    weights = read_json(artifacts.weights_json(out))["weights"]
    staging = temp_path(to, "partial")
    shutil.rmtree(staging, ignore_errors=True)
    models = {name: _export_experiment(folder, artifacts.export_experiment(staging, name), prefix, weights)
              for name, prefix, folder in _experiments(cfg)}
    shutil.copytree(Path(__file__).resolve().parent, artifacts.export_source(staging) / "pawpular",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    from .notebook import kaggle_notebook

    write_text(artifacts.inference_notebook(staging), kaggle_notebook(to.name))
    _write_manifest(staging, out.name, models, weights)
    to.parent.mkdir(parents=True, exist_ok=True)
    swap_dirs(staging, to)
    size = sum(p.stat().st_size for p in to.rglob("*") if p.is_file()) / 2**20
    log.info("exported %s -> %s (%.1f MiB)", out, to, size)
    return to


def _write_manifest(staging: Path, main: str, models: dict, weights: dict) -> None:
    import timm
    import torch

    files = {str(p.relative_to(staging)): file_digest(p) for p in sorted(staging.rglob("*"))
             if p.is_file() and p.parts[len(staging.parts)] == "experiments"}
    write_json(artifacts.export_manifest(staging), {
        "format": 2, "pawpular": __version__, "torch": torch.__version__, "timm": timm.__version__, "main": main,
        "experiments": models, "weights": weights, "files": files, "created": time.strftime("%Y-%m-%d %H:%M:%S")})


def _policy(folder: Path, stage: str) -> dict:
    record = manifest.read(artifacts.manifest(folder, stage))
    return (record.info.get("policy") if record else None) or {}


def _export_experiment(folder: Path, dst: Path, prefix: str, weights: dict) -> dict:
    """Copy one experiment's used models into ``dst``; return its entry of the artifact manifest."""
    ecfg = load_config(artifacts.config_yaml(folder))
    used = {h: float(weights.get(f"{prefix}{h}", 0.0)) for h in artifacts.HEADS}
    folds = list(range(ecfg.folds.n_folds))
    svr_sets = list(ecfg.svr.features) if used["svr"] > 0 else []
    finetuned = artifacts.MODEL_SET in svr_sets and ecfg.embed.source == "finetuned"
    compressed = ecfg.embed.compress != "none"
    for k in folds:
        if used["nn"] > 0 or (finetuned and not compressed):
            _copy(artifacts.best_checkpoint(folder, k), artifacts.best_checkpoint(dst, k))
        if finetuned and compressed:  # the embedding model travels compressed: what the SVR was fit on
            _export_compressed(folder, dst, ecfg, fold=k)
        if used["svr"] > 0:
            _copy(artifacts.svr_model(folder, k), artifacts.svr_model(dst, k))
    ecfg = _export_frozen(ecfg, dst, svr_sets)
    ecfg.output_dir, ecfg.data_dir = "", ""
    save_config(ecfg, artifacts.config_yaml(dst))
    return {"prefix": prefix, "folds": folds, "weights": used, "nn_policy": _policy(folder, "train"),
            "emb_policy": _policy(folder, "embed"), "svr_sets": svr_sets}


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)


def _export_compressed(folder: Path, dst: Path, ecfg: Config, fold: int | None = None,
                       frozen: tuple[str, object] | None = None) -> None:
    """Save the compressed embedding model of a fold (from best.pt) or of a frozen backbone (name, ModelConfig)."""
    from .models import build_frozen, build_model, data_config, read_checkpoint

    if frozen is None:
        ckpt, model_cfg, data_cfg = read_checkpoint(artifacts.best_checkpoint(folder, fold))
        model = build_model(model_cfg, pretrained=False)
        model.load_state_dict(ckpt["model"], strict=True)
        path, cfg_dict = artifacts.compressed_embedder(dst, fold), ckpt["model_cfg"]
    else:
        name, model_cfg = frozen
        model = build_frozen(model_cfg)
        data_cfg = data_config(model_cfg, model.backbone)
        path, cfg_dict = artifacts.compressed_embedder(dst, backbone=name), dataclasses.asdict(model_cfg)
    save_compressed(compress_model(model.eval(), ecfg.embed.compress, "cpu"), ecfg.embed.compress, cfg_dict, data_cfg, path)


def _export_frozen(ecfg: Config, dst: Path, svr_sets: list[str]) -> Config:
    """Frozen backbones the SVR reads (embed.backbones, and model.* with embed.source: pretrained): their
    compressed models, or copies of their weight files at paths relative to the experiment folder."""
    frozen = [(b.name, backbone_model_config(b), i) for i, b in enumerate(backbone_configs(ecfg)) if b.name in svr_sets]
    if artifacts.MODEL_SET in svr_sets and ecfg.embed.source == "pretrained":
        frozen.append((artifacts.MODEL_SET, ecfg.model, None))
    for name, model_cfg, index in frozen:
        if ecfg.embed.compress != "none":
            _export_compressed(dst, dst, ecfg, frozen=(name, model_cfg))
            shipped = "none"  # the weights travel inside the compressed model
        elif model_cfg.pretrained not in ("none", "hub") and Path(model_cfg.pretrained).is_file():
            rel = artifacts.exported_backbone_weights(Path("."), name, Path(model_cfg.pretrained).name)
            _copy(Path(model_cfg.pretrained), dst / rel)
            shipped = str(rel)
        else:
            shipped = model_cfg.pretrained
        if index is None:
            ecfg.model.pretrained = shipped
        else:
            ecfg.embed.backbones[index] = {**ecfg.embed.backbones[index], "pretrained": shipped}
    return ecfg
