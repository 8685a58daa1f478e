"""``pawpular export``: one folder holding everything offline inference needs, and nothing of the training data.

Reads   a finished experiment: its manifests (what made each file, each model's inference policy), the settings,
        ensemble/weights.json, train/fold{k}/best.pt, svr/fold{k}/head.safetensors, frozen backbones' weights;
        the experiments of ensemble.experiments too
Writes  ARTIFACTS/manifest.json                  library versions, models and their policies, weights, digests
        ARTIFACTS/src/pawpular/                  this package's source (importable with no install): it is code
        ARTIFACTS/inference.ipynb                a Kaggle notebook that runs predict and fails loudly
        ARTIFACTS/experiments/<name>/config.yaml the settings that made the shipped models (no password)
        ARTIFACTS/experiments/<name>/train/fold{k}/model.safetensors   a fold's fine-tuned model
        ARTIFACTS/experiments/<name>/backbones/<set>/model.safetensors a frozen backbone, as embed built it
        ARTIFACTS/experiments/<name>/svr/fold{k}/head.safetensors      a fold's SVR head as arrays
Run     pawpular export --output output/default --to artifacts/default [--overwrite]

Everything but the source is data: models and SVR heads are safetensors (tensors, settings as JSON metadata),
settings YAML and JSON; nothing is a pickle, so nothing runs code when it is loaded. A compressed embedder
(embed.compress) travels as the weights it was compressed from, with the setting: predict applies the same
(deterministic) compression. Each model carries the inference policy its own manifest recorded.

Only a current experiment is exported: every stage up to the ensemble must be done (``pawpular status``), else
the error names the stage to run. The folder is built beside the target and swapped in with one rename, so the
target is always the old export whole or the new one whole; an existing non-empty target needs --overwrite
and must be an earlier export (``guards.check_export_target``: never the experiment or a folder above it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

from .. import __version__
from ..config import heads as svr_heads
from ..config.schema import Config, backbone_configs, backbone_model_config, load_config, save_config
from ..store import artifacts, manifest
from ..store.files import (
    ArtifactError,
    MissingArtifact,
    file_digest,
    read_json,
    recover_swap,
    remove_tree,
    swap_dirs,
    temp_path,
    write_bytes,
    write_json,
    write_text,
)
from . import versions
from .predictor import FORMAT, check_weights, manifest_digest

log = logging.getLogger("pawpular")


def check_current(cfg: Config) -> None:
    """Every stage up to the ensemble done, or ArtifactError naming the first that is not and what to run."""
    from ..runner import Context, chain, upstream

    for name, v in chain(Context(cfg, read_only=True), [*upstream(cfg, "ensemble"), "ensemble"]).items():
        if not v.done:
            raise ArtifactError(
                f"cannot export {cfg.out}: {name} is {v.state} ({v.why()}): run `pawpular {name}` "
                f"(or `pawpular all`) first"
            )
    for _, folder in artifacts.blend_members(cfg.out, cfg.ensemble.experiments)[1:]:
        for stage in ("train", "svr"):
            record = manifest.read(artifacts.manifest(folder, stage))
            if record is not None and (bad := manifest.damaged_outputs(record, folder)):
                raise ArtifactError(f"cannot export: {folder} (ensemble.experiments): {'; '.join(bad[:3])}")


def export(out: Path, to: Path, overwrite: bool = False, data: str | None = None) -> Path:
    """Copy what inference needs from experiment ``out`` into ``to``; returns ``to``."""
    from ..store.guards import check_export_target
    from ..store.lock import experiment_lock

    out, to = Path(out), Path(to)
    if not artifacts.config_yaml(out).is_file() or not artifacts.weights_json(out).is_file():
        raise MissingArtifact(
            f"{out} has no config.yaml or ensemble/weights.json: run the pipeline to the ensemble first"
        )
    recover_swap(to)
    check_export_target(out, to, overwrite)  # never the experiment; --overwrite replaces only an earlier export

    with experiment_lock(out, "export", reader=True):  # no stage rewrites the experiment while it is read
        return _export(out, to, load_config(artifacts.config_yaml(out), output_dir=str(out), data_dir=data))


def _export(out: Path, to: Path, cfg: Config) -> Path:
    check_current(cfg)
    weights = read_json(artifacts.weights_json(out))["weights"]
    members = artifacts.blend_members(out, cfg.ensemble.experiments)
    staging = temp_path(to, "partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _stage(out, to, staging, members, weights)
        to.parent.mkdir(parents=True, exist_ok=True)
        swap_dirs(staging, to)
    except BaseException:  # a refusal (or a failure, or Ctrl-C) leaves no partial folder beside the target
        remove_tree(staging)
        raise
    size = sum(p.stat().st_size for p in to.rglob("*") if p.is_file()) / 2**20
    log.info("exported %s -> %s (%.1f MiB)", out, to, size)
    return to


def _stage(out: Path, to: Path, staging: Path, members: list, weights: dict) -> None:
    """The whole export in ``staging``: each member's models, predict's own weight check, the source copy, the
    notebook, and last the manifest."""
    models = {}
    for prefix, folder in members:
        name = prefix.rstrip("/") or out.resolve().name
        models[name] = _export_experiment(folder, artifacts.export_experiment(staging, name), prefix, weights)
    check_weights({"weights": weights, "experiments": models})  # predict's own check, before anything is swapped in
    shutil.copytree(
        Path(__file__).resolve().parents[1],
        artifacts.export_source(staging) / "pawpular",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    from .notebook import kaggle_notebook

    write_text(artifacts.inference_notebook(staging), kaggle_notebook(to.name))
    _write_manifest(staging, out.resolve().name, models, weights)


def _write_manifest(staging: Path, main: str, models: dict, weights: dict) -> None:
    """Every file of the folder with its digest (models, heads, settings, the source copy, the notebook), and the
    manifest's own digest over all of it: predict verifies both before it uses anything."""
    files = {artifacts.relative(staging, p): file_digest(p) for p in sorted(staging.rglob("*")) if p.is_file()}
    found = {
        "format": FORMAT,
        "pawpular": __version__,
        "versions": versions.installed(),
        "main": main,
        "experiments": models,
        "weights": weights,
        "files": files,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    found = json.loads(json.dumps(found, default=str))  # as it will read back
    write_json(artifacts.export_manifest(staging), {**found, "digest": manifest_digest(found)})


def _export_experiment(folder: Path, dst: Path, prefix: str, weights: dict) -> dict:
    """Write one experiment's used models into ``dst``; return its entry of the artifact manifest."""
    ecfg = load_config(artifacts.config_yaml(folder))
    heads = svr_heads.heads(ecfg)
    used = {h: float(weights.get(f"{prefix}{h}", 0.0)) for h in dict.fromkeys([*artifacts.HEADS, *heads])}
    folds = list(range(ecfg.folds.n_folds))
    shipped = {name: {"sets": list(s.features), "use_meta": s.use_meta} for name, s in heads.items() if used[name] > 0}
    svr_sets = list(dict.fromkeys(n for h in shipped.values() for n in h["sets"]))
    finetuned = artifacts.MODEL_SET in svr_sets and ecfg.embed.source == "finetuned"
    records = manifest.unit_records(folder)
    nn, embeddings = {}, {}
    for k in folds:
        if used["nn"] > 0 or finetuned:
            _write_fold_model(folder, dst, k)
        if used["nn"] > 0:
            nn[str(k)] = _nn_entry(records, k)
        if finetuned:
            embeddings[artifacts.fold_name(k)] = _embedding_entry(records, artifacts.fold_name(k))
        for name in shipped:
            _copy(artifacts.svr_head(folder, k, name), artifacts.svr_head(dst, k, name))
    for name, model_cfg in _frozen_sets(ecfg, svr_sets):
        _write_frozen_model(model_cfg, artifacts.exported_model(dst, backbone=name))
        unit = name if name != artifacts.MODEL_SET else artifacts.fold_name(folds[0])  # linked: one per fold
        embeddings[name] = _embedding_entry(records, unit)
    ecfg.output_dir, ecfg.data_dir, ecfg.svr.storage, ecfg.ensemble.experiments = "", "", None, []
    save_config(ecfg, artifacts.config_yaml(dst))
    return {
        "prefix": prefix,
        "folds": folds,
        "weights": used,
        "svr_sets": svr_sets,
        "svr_heads": shipped,
        "nn": nn,
        "embeddings": embeddings,
    }


def _nn_entry(records: dict, fold: int) -> dict:
    """How fold ``fold``'s NN predictions were made: its own manifest's policy and TTA."""
    record = records.get(f"train/{artifacts.fold_name(fold)}")
    if record is None or "policy" not in record.info:
        raise ArtifactError(
            f"train/{artifacts.fold_name(fold)}: no manifest recording its inference policy: run "
            "`pawpular train` (it re-predicts with the same weights)"
        )
    return {"policy": record.info["policy"], "tta_hflip": bool(record.config["train"]["tta_hflip"])}


def _embedding_entry(records: dict, unit: str) -> dict:
    """How embedding set ``unit`` (emb/<unit>) was made: its policy, compression and TTA, from its manifest."""
    record = records.get(f"emb/{unit}")
    if record is None or "policy" not in record.info:
        raise ArtifactError(f"emb/{unit}: no manifest recording its inference policy: run `pawpular embed`")
    e = record.config["embed"]
    return {"policy": record.info["policy"], "compress": e["compress"], "tta_hflip": bool(e["tta_hflip"])}


def _frozen_sets(ecfg: Config, svr_sets: list[str]) -> list[tuple[str, object]]:
    """(set name, ModelConfig) of the frozen backbones the SVR reads: embed.backbones, and model.* with
    embed.source: pretrained."""
    frozen = [(b.name, backbone_model_config(b)) for b in backbone_configs(ecfg) if b.name in svr_sets]
    if artifacts.MODEL_SET in svr_sets and ecfg.embed.source == "pretrained":
        frozen.append((artifacts.MODEL_SET, ecfg.model))
    return frozen


def _write_fold_model(folder: Path, dst: Path, fold: int) -> None:
    """A fold's best.pt as a model file (safetensors: weights, and its settings as metadata)."""
    from ..model.models import read_checkpoint
    from .model_file import model_file_bytes

    ckpt, _, data_cfg = read_checkpoint(artifacts.best_checkpoint(folder, fold))
    write_bytes(artifacts.exported_model(dst, fold), model_file_bytes(ckpt["model"], ckpt["model_cfg"], data_cfg))


def _write_frozen_model(model_cfg, path: Path) -> None:
    """A frozen backbone as embed builds it (its weight file, or the seeded random init), as a model file."""
    from ..model.models import build_frozen, data_config
    from .model_file import model_file_bytes

    model = build_frozen(model_cfg)
    shipped = dataclasses.replace(model_cfg, pretrained="none")  # the weights are in the file
    write_bytes(
        path, model_file_bytes(model.state_dict(), dataclasses.asdict(shipped), data_config(model_cfg, model.backbone))
    )


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)
