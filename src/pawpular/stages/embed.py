"""Stage 3, embed: frozen-backbone embeddings of every train and test image, cached as parquet.

Reads   folds/folds.csv, each fold's train/fold{k}/best.pt (or, with embed.source: pretrained, the frozen
        pretrained backbone of model.*), each backbone of embed.backbones, and the photos
Writes  emb/fold{k}/{train,test}.parquet   Id + e0..e{D-1} float32 (every train and test image); + manifest.json;
                                           only when svr.features lists "model" (the folds' own backbones)
        emb/<backbone>/{train,test}.parquet  a frozen backbone of embed.backbones, shared by every fold
Needs   pawpular train (embed.source: finetuned, with "model" in svr.features) or nothing more than folds
        (embed.source: pretrained, or only frozen backbones of embed.backbones in svr.features)
Keys    embed.source, embed.tta_hflip, embed.compress, embed.backbones, embed.batch_size
Run     pawpular embed --config configs/default.yaml
        torchrun --nproc_per_node N -m pawpular.cli embed ...   images sharded over ranks, rank 0 writes

Embeddings are the pooled pre-logit features (``forward_features`` + ``forward_head(pre_logits=True)``), averaged
with the mirror image's with hflip TTA, computed by ``inference.run_backbone`` (the path predict uses). Each folder
has a manifest keyed on its checkpoint's bytes (or the frozen backbone's settings and weight file), every photo,
the transform, TTA and compression: a rerun with the same key says "cached"; any change recomputes that folder.
On a GPU with cuDF the tables are written through cuDF (``backend.write_table``); the files hold the same values.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from .. import artifacts, backend, manifest
from ..compress import compress_model
from ..config import ModelConfig, backbone_configs, backbone_model_config
from ..errors import ConfigError
from ..dataset import eval_dataset
from ..distributed import torch_device
from ..svr_head import embedding_table
from ..files import ArtifactError, MissingArtifact, file_digest, link_or_copy
from ..inference import Policy, run_backbone
from ..models import (build_frozen, build_model, check_buildable, data_config, frozen_description, load_checkpoint,
                      read_checkpoint)
from ..splits import written_fold_ids
from . import Plan, Result, wants_fold_embeddings

log = logging.getLogger("pawpular")
SUMMARY = "embed every image with each fold's backbone (and frozen backbones): parquet tables"
HELP = __doc__
IMAGES = True
DISTRIBUTED = True  # under torchrun every rank takes part (rank 0 writes)


def check(ctx) -> None:
    """Before anything changes: frozen backbones' settings timm rejects, or weight files that are none."""
    cfg = ctx.cfg
    if cfg.embed.source == "pretrained":
        check_buildable(cfg.model)
    for i, b in enumerate(backbone_configs(cfg)):
        try:
            check_buildable(backbone_model_config(b))
        except ConfigError as e:
            raise ConfigError(f"embed.backbones[{i}] ({b.name}): {e}", ("embed.backbones",)) from None


@dataclass
class EmbeddingSet:
    """One embedding folder: a fold's fine-tuned checkpoint or a frozen backbone (``model_cfg``)."""

    name: str
    folder: Path
    checkpoint: Path | None = None
    model_cfg: ModelConfig | None = None

    def data_cfg(self) -> dict:
        if self.checkpoint is not None:
            key = file_digest(self.checkpoint)
            if key not in _DATA_CFGS:  # a swin_large best.pt is 0.8 GB: read it once per process
                _DATA_CFGS[key] = read_checkpoint(self.checkpoint)[2]
            return _DATA_CFGS[key]
        key = repr(dataclasses.asdict(self.model_cfg))
        if key not in _DATA_CFGS:  # building a random-init model to ask timm costs seconds: once per process
            _DATA_CFGS[key] = data_config(self.model_cfg, build_model(self.model_cfg, pretrained=False).backbone)
        return _DATA_CFGS[key]


_DATA_CFGS: dict[str, dict] = {}


def units(ctx) -> list[EmbeddingSet]:
    cfg, out = ctx.cfg, ctx.out
    found = [EmbeddingSet(b.name, artifacts.emb_dir(out, backbone=b.name), model_cfg=backbone_model_config(b))
             for b in backbone_configs(cfg)]
    # as written: a stale folds.csv is the folds stage's verdict, not a data error
    folds = written_fold_ids(out) if wants_fold_embeddings(cfg) else []
    for k in folds:
        if cfg.embed.source == "finetuned":
            found.append(EmbeddingSet(f"fold{k}", artifacts.emb_dir(out, fold=k), checkpoint=artifacts.best_checkpoint(out, k)))
        else:
            found.append(EmbeddingSet(f"fold{k}", artifacts.emb_dir(out, fold=k), model_cfg=cfg.model))
    return found


def unit_plan(ctx, unit: EmbeddingSet) -> Plan:
    e = ctx.cfg.embed
    config = {"embed": {"tta_hflip": e.tta_hflip, "compress": e.compress}}
    if unit.checkpoint is not None:
        inputs = ctx.file_inputs([unit.checkpoint])
        try:
            transform = unit.data_cfg() if unit.checkpoint.is_file() else None
        except ArtifactError:  # a damaged best.pt: the checkpoint's digest already says it changed
            transform = None
    else:
        inputs = {"frozen backbone": manifest.key_of(frozen_description(unit.model_cfg), {})}
        transform = unit.data_cfg()
    config["derived"] = {"transform": _jsonable(transform)}
    return Plan(config, {**inputs, **ctx.data_inputs("train.csv", "test.csv", images=True)})


def _jsonable(d: dict | None) -> dict | None:
    return None if d is None else {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def plan(ctx) -> Plan:
    plans = {u.name: unit_plan(ctx, u) for u in units(ctx)}
    e = ctx.cfg.embed
    config = {"embed": {"source": e.source, "tta_hflip": e.tta_hflip, "compress": e.compress,
                        "backbones": e.backbones}}
    if e.source == "pretrained":
        config["model"] = dataclasses.asdict(ctx.cfg.model)
    inputs = {f"{name}: {k}": v for name, p in plans.items() for k, v in p.inputs.items() if not k.startswith("data:")}
    return Plan(config, {**inputs, **ctx.data_inputs("train.csv", "test.csv", images=True)})


def run(ctx) -> Result:
    cfg = ctx.cfg
    policy = Policy.for_run(ctx.device, cfg.train.amp, cfg.train.channels_last)
    status: dict[str, str] = {}
    outputs: list[Path] = []
    shared: EmbeddingSet | None = None  # embed.source: pretrained: one frozen model serves every fold
    for unit in units(ctx):
        p = unit_plan(ctx, unit)
        path = unit.folder / "manifest.json"
        if manifest.verdict(path, ctx.out, p.config, p.inputs).done and not cfg.overwrite:
            status[unit.name] = "cached"
        elif shared is not None and unit.model_cfg is cfg.model:
            if ctx.dist.main:
                _link_unit(ctx, shared, unit, p)
            status[unit.name] = "linked"
        else:
            if unit.checkpoint is not None and not unit.checkpoint.is_file():
                raise MissingArtifact(f"{unit.checkpoint} not found: run `pawpular train` first "
                                      "(or set embed.source: pretrained)")
            _compute(ctx, unit, p, policy)
            status[unit.name] = "computed"
        if unit.model_cfg is cfg.model:
            shared = shared or unit
        outputs += [unit.folder / f"{s}.parquet" for s in artifacts.SPLITS] + [path]  # its record: never done without
    cached = [k for k, v in status.items() if v == "cached"]
    if cached:
        log.info("embeddings unchanged, reused from cache: %s", ", ".join(cached))
    log.info("embed summary: %s", ", ".join(f"{k}={v}" for k, v in status.items()))
    # what the files are, not how this run went: each set's own policy (its manifest's)
    info = {"policies": {u: p for u, p in manifest.policies(cfg.out).items() if u.startswith("emb/")}}
    return Result(outputs, info, cached=all(v == "cached" for v in status.values()))


def _compute(ctx, unit: EmbeddingSet, plan_: Plan, policy: Policy) -> None:
    cfg, comp = ctx.cfg, ctx.comp
    path = unit.folder / "manifest.json"
    if ctx.dist.main:
        manifest.clear(path)
    dev = torch_device(ctx.device, ctx.dist)
    if unit.checkpoint is not None:
        model, data_cfg = load_checkpoint(unit.checkpoint, dev)
    else:
        model, data_cfg = build_frozen(unit.model_cfg).to(dev).eval(), unit.data_cfg()
    model = compress_model(model, cfg.embed.compress, ctx.device)
    t0, tables = time.time(), {}
    for split, df in (("train", comp.train), ("test", comp.test)):
        ds = eval_dataset(df, comp.root / split, data_cfg)
        emb = run_backbone(model, ds, dev, policy, batch_size=cfg.embed.batch_size, num_workers=cfg.embed.num_workers,
                           emb_tta=cfg.embed.tta_hflip, dist=ctx.dist, desc=f"{unit.name}/{split}").emb
        tables[split] = embedding_table(ds.ids, emb)
    seconds, n = time.time() - t0, sum(len(t) for t in tables.values())
    log.info("%s: %d images -> %d-dim embeddings in %.1fs (%.0f img/s)", unit.folder, n, tables["train"].shape[1] - 1,
             seconds, n / max(seconds, 1e-9))
    if not ctx.dist.main:
        return
    for split, table in tables.items():
        backend.write_table(table, unit.folder / f"{split}.parquet", ctx.device)
    files = [unit.folder / f"{s}.parquet" for s in artifacts.SPLITS]
    manifest.commit(path, ctx.out, manifest.Record(plan_.config, plan_.inputs, info={
        "policy": policy.to_dict(), "device": ctx.device, "dim": int(tables["train"].shape[1] - 1), "images": n,
        "source": "finetuned" if unit.checkpoint else "frozen"}), files)  # no timings: same work, same bytes


def _link_unit(ctx, src: EmbeddingSet, dst: EmbeddingSet, plan_: Plan) -> None:
    """A fold folder of embed.source: pretrained: the first fold's files, hard-linked (they are the same)."""
    path = dst.folder / "manifest.json"
    manifest.clear(path)
    for s in artifacts.SPLITS:
        link_or_copy(src.folder / f"{s}.parquet", dst.folder / f"{s}.parquet")
    record = manifest.read(src.folder / "manifest.json")
    manifest.commit(path, ctx.out, manifest.Record(plan_.config, plan_.inputs, info=record.info if record else {}),
                    [dst.folder / f"{s}.parquet" for s in artifacts.SPLITS])
