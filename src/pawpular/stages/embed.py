"""Stage 3, embed: frozen-backbone embeddings of every train and test image, cached as parquet.

Reads   folds/folds.csv, each fold's train/fold{k}/best.pt (or, with embed.source: pretrained, the frozen
        pretrained backbone of model.*), each backbone of embed.backbones, and the photos
Writes  emb/fold{k}/{train,test}.parquet   Id + e0..e{D-1} float32 (every train and test image); + manifest.json;
                                           only when svr.features lists "model" (the folds' own backbones)
        emb/<backbone>/{train,test}.parquet  a frozen backbone of embed.backbones, shared by every fold
Needs   pawpular train (embed.source: finetuned, with "model" in svr.features) or nothing more than folds
        (embed.source: pretrained, or only frozen backbones of embed.backbones in svr.features)
Keys    embed.source, embed.tta_hflip, embed.compress, embed.precision, embed.channels_last, embed.backbones,
        embed.batch_size
Run     pawpular embed --config configs/default.yaml
        torchrun --nproc_per_node N -m pawpular.cli embed ...   images sharded over ranks, rank 0 writes

Embeddings are the pooled pre-logit features (``forward_features`` + ``forward_head(pre_logits=True)``), or with
``output: logits`` (a frozen set) the outputs of its weight file's own classifier, averaged with the mirror image's
with hflip TTA, computed by ``inference.run_backbone`` (the path predict uses). One pass gives both kinds: a frozen
backbone of embed.backbones with a weight file (not ``pretrained: none``) and no embed.compress is run once with
its classifier, and the set of the other kind (the same entry but for ``output``) is written to the shared cache
too, so listing both kinds, or asking for the other kind later in any experiment, embeds nothing more (a file
without a classifier gives the pooled set alone). Each folder
has a manifest keyed on its checkpoint's bytes (or the frozen backbone's settings and weight file), every photo,
the transform, TTA and compression: a rerun with the same key says "cached"; any change recomputes that folder.
A set is computed once for every experiment under the same output root (``embedding_cache``: the files are hard
links into <output root>/.embeddings/<key>/): a second experiment with the same backbones embeds nothing
("reused"). On a GPU with cuDF the tables are written through cuDF (``backend.write_table``); the files hold the
same values.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config.schema import ModelConfig, backbone_configs, backbone_model_config
from ..data.dataset import eval_dataset
from ..data.splits import written_fold_ids
from ..machine import backend
from ..machine.distributed import torch_device
from ..model.compress import compress_model
from ..model.frozen_key import weights_gone
from ..model.inference import Policy, run_backbone
from ..model.models import (
    PretrainedWeightsError,
    build_frozen,
    build_model,
    check_buildable,
    data_config,
    frozen_description,
    load_checkpoint,
    read_checkpoint,
)
from ..scores import budget
from ..store import artifacts, embedding_cache, manifest
from ..store.errors import ConfigError
from ..store.files import ArtifactError, MissingArtifact, file_digest
from ..svr.head import embedding_table
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
        log.warning(
            "embed.source: pretrained is deprecated (it still works): list the frozen backbone under "
            "embed.backbones ({name: NAME, model: ..., pretrained: ...}) and NAME in svr.features instead"
        )
        check_buildable(cfg.model)
    for i, b in enumerate(backbone_configs(cfg)):
        try:
            check_buildable(backbone_model_config(b))
        except ConfigError as e:
            raise ConfigError(f"embed.backbones[{i}] ({b.name}): {_as_set_key(str(e))}", ("embed.backbones",)) from None


def _as_set_key(message: str) -> str:
    """A model check's message with the key named as an ``embed.backbones`` entry names it (kwargs, model,
    pretrained), not as the ``model:`` section does."""
    for key, own in (("model.kwargs", "kwargs"), ("model.name", "model"), ("model.pretrained", "pretrained")):
        if message.startswith(key):
            return own + message[len(key) :]
    return message


@dataclass
class EmbeddingSet:
    """One embedding folder: a fold's fine-tuned checkpoint or a frozen backbone (``model_cfg``)."""

    name: str
    folder: Path
    checkpoint: Path | None = None
    model_cfg: ModelConfig | None = None
    listed: bool = False  # a frozen backbone of embed.backbones (its other output kind can come from its pass)

    def data_cfg(self) -> dict:
        if self.checkpoint is not None:
            key = file_digest(self.checkpoint)
            if key not in _DATA_CFGS:  # a swin_large best.pt is 0.8 GB: read it once per process
                _, model_cfg, _DATA_CFGS[key] = read_checkpoint(self.checkpoint)
                _NAMES[key] = model_cfg.name
            return _DATA_CFGS[key]
        key = repr(dataclasses.asdict(self.model_cfg))
        if key not in _DATA_CFGS:  # building a random-init model to ask timm costs seconds: once per process
            _DATA_CFGS[key] = data_config(self.model_cfg, build_model(self.model_cfg, pretrained=False).backbone)
        return _DATA_CFGS[key]

    def backbone(self) -> str:
        """The timm model that made the set (a checkpoint's own, as it was trained)."""
        if self.checkpoint is None:
            return self.model_cfg.name
        self.data_cfg()
        return _NAMES[file_digest(self.checkpoint)]


_DATA_CFGS: dict[str, dict] = {}
_NAMES: dict[str, str] = {}  # checkpoint digest -> its timm model name


def units(ctx) -> list[EmbeddingSet]:
    cfg, out = ctx.cfg, ctx.out
    found = [
        EmbeddingSet(b.name, artifacts.emb_dir(out, backbone=b.name), model_cfg=backbone_model_config(b), listed=True)
        for b in backbone_configs(cfg)
    ]
    # as written: a stale folds.csv is the folds stage's verdict, not a data error
    return found + (fold_units(ctx) if wants_fold_embeddings(cfg) else [])


def fold_units(ctx) -> list[EmbeddingSet]:
    """The folds' own sets (the SVR's set "model"): each fold's fine-tuned checkpoint, or ``model`` frozen."""
    cfg, out = ctx.cfg, ctx.out
    finetuned = cfg.embed.source == "finetuned"
    return [
        EmbeddingSet(
            f"fold{k}",
            artifacts.emb_dir(out, fold=k),
            checkpoint=artifacts.best_checkpoint(out, k) if finetuned else None,
            model_cfg=None if finetuned else cfg.model,
        )
        for k in written_fold_ids(out)
    ]


def stale_sets(ctx, names: list[str]) -> dict[str, tuple[str, str]]:
    """Why each finished set of ``names`` (embed.backbones names; "model": the folds' own sets) is not what the
    config and data make now, and the command that refreshes it, as ``status`` judges the embed stage (whose
    inputs are its sets'): a set's record against ``unit_plan`` (``manifest.verdict``, what makes it "cached" in
    ``run``) and, for "model" fine-tuned, the stages it reads (``runner.chain``: train stale, partial or gone). A
    set whose record holds no inputs (planted by hand) is taken as it is. Writes nothing (photo digests read as
    cached)."""
    from ..runner import chain, fix_command

    ctx = dataclasses.replace(ctx, read_only=True)
    sets = {u.name: [u] for u in units(ctx) if u.listed}  # the frozen sets of embed.backbones
    sets[artifacts.MODEL_SET] = fold_units(ctx)
    found: dict[str, tuple[str, str]] = {}
    for name in names:
        recorded = [u for u in sets.get(name, []) if (r := manifest.read(u.folder / "manifest.json")) and r.inputs]
        if recorded and name == artifacts.MODEL_SET and ctx.cfg.embed.source == "finetuned":
            if bad := [(u, v) for u, v in chain(ctx, ["folds", "train"]).items() if not v.done]:
                u, v = bad[0]
                found[name] = (f"upstream {u} is {v.state}: {v.why(2)}", fix_command(ctx.cfg, u, v))
                continue
        for unit in recorded:
            p = unit_plan(ctx, unit)
            v = manifest.verdict(unit.folder / "manifest.json", ctx.out, p.config, p.inputs)
            if not v.done:
                found[name] = (f"{artifacts.relative(ctx.out, unit.folder)}: {v.why(2)}", "`pawpular embed`")
                break
    return found


def unit_plan(ctx, unit: EmbeddingSet) -> Plan:
    e = ctx.cfg.embed
    config = {
        "embed": {
            "tta_hflip": e.tta_hflip,
            "compress": e.compress,
            "precision": e.precision,
            "channels_last": e.channels_last,
        }
    }
    if unit.checkpoint is not None:
        inputs = ctx.file_inputs([unit.checkpoint])
        try:
            transform = unit.data_cfg() if unit.checkpoint.is_file() else None
        except ArtifactError:  # a damaged best.pt: the checkpoint's digest already says it changed
            transform = None
    else:
        inputs = {"frozen backbone": manifest.key_of(frozen_description(unit.model_cfg), {}), **_weights_gone(unit)}
        transform = unit.data_cfg()
    config["derived"] = {"transform": _jsonable(transform)}
    return Plan(config, {**inputs, **ctx.data_inputs("train.csv", "test.csv", images=True)})


def _weights_gone(unit: EmbeddingSet) -> dict[str, str]:
    """A frozen set's weight file that is not there, as an input of its own (``manifest.GONE``): the verdict names
    the file and where it was looked for (a relative path is read from the working directory), not only that the
    backbone changed. Nothing when the file is there, so a run's record is the same."""
    gone = weights_gone(unit.model_cfg.pretrained)
    return {f"weight file of {unit.name}: {gone}": manifest.GONE} if gone else {}


def _jsonable(d: dict | None) -> dict | None:
    return None if d is None else {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def plan(ctx) -> Plan:
    plans = {u.name: unit_plan(ctx, u) for u in units(ctx)}
    e = ctx.cfg.embed
    config = {
        "embed": {
            "source": e.source,
            "tta_hflip": e.tta_hflip,
            "compress": e.compress,
            "precision": e.precision,
            "channels_last": e.channels_last,
            "backbones": e.backbones,
        }
    }
    if e.source == "pretrained":
        config["model"] = dataclasses.asdict(ctx.cfg.model)
    inputs = {f"{name}: {k}": v for name, p in plans.items() for k, v in p.inputs.items() if not k.startswith("data:")}
    return Plan(config, {**inputs, **ctx.data_inputs("train.csv", "test.csv", images=True)})


def run(ctx) -> Result:
    cfg = ctx.cfg
    policy = Policy.for_run(ctx.device, cfg.embed.precision, cfg.embed.channels_last)
    status: dict[str, str] = {}
    outputs: list[Path] = []
    fresh: set[str] = set()  # cache entries this run computed: a set's other kind, from the set's own pass
    for unit in units(ctx):
        p = unit_plan(ctx, unit)
        path = unit.folder / "manifest.json"
        key = embedding_cache.cache_key(p.config, p.inputs, policy.to_dict())
        if manifest.verdict(path, ctx.out, p.config, p.inputs).done and not cfg.overwrite:
            status[unit.name] = "cached"
        else:
            if unit.checkpoint is not None and not unit.checkpoint.is_file():
                raise MissingArtifact(
                    f"{unit.checkpoint} not found: run `pawpular train` first "
                    "(or list frozen backbones under embed.backbones)"
                )
            if ctx.dist.main:
                manifest.clear(path)
            status[unit.name] = embedding_cache.provide(
                ctx,
                unit.folder,
                p.config,
                p.inputs,
                policy.to_dict(),
                lambda u=unit: _compute_kinds(ctx, u, policy, fresh),
                lambda table, dst: backend.write_table(table, dst, ctx.device),
                fresh=key in fresh,
            )
            if key in fresh:
                status[unit.name] = "computed (one pass with its other kind)"
        outputs += [unit.folder / f"{s}.parquet" for s in artifacts.SPLITS] + [path]  # its record: never done without
    cached = [k for k, v in status.items() if v == "cached"]
    if cached:
        log.info("embeddings unchanged since this experiment made them: %s", ", ".join(cached))
    log.info("embed summary: %s", ", ".join(f"{k}={v}" for k, v in status.items()))
    # what the files are, not how this run went: each set's own policy (its manifest's)
    records = {u: r for u, r in manifest.unit_records(cfg.out).items() if u.startswith("emb/")}
    info = {
        "policies": {u: p for u, p in manifest.policies(cfg.out).items() if u.startswith("emb/")},
        "cache": {u: r.info["cache"] for u, r in records.items() if r.info.get("cache")},
    }  # the shared sets used
    return Result(outputs, info, cached=all(v == "cached" for v in status.values()))


def other_kind(ctx, unit: EmbeddingSet) -> EmbeddingSet | None:
    """The set of the other output kind that ``unit``'s pass can give too: a listed frozen backbone with a weight
    file, embedded uncompressed (pruning or int8 would treat its classifier as one more layer)."""
    m = unit.model_cfg
    if not unit.listed or m is None or m.pretrained == "none" or ctx.cfg.embed.compress != "none":
        return None
    kind = "logits" if m.output == "pooled" else "pooled"
    other = _same_but_output(m, kind)
    for b in backbone_configs(ctx.cfg):  # a listed set of the other kind (its own num_classes) is the one to give
        listed = backbone_model_config(b)
        if listed.output == kind and _same_but_output(listed, "pooled") == _same_but_output(m, "pooled"):
            other = listed
    return EmbeddingSet(f"{unit.name} ({kind})", unit.folder, model_cfg=other)


def _same_but_output(m: ModelConfig, output: str) -> ModelConfig:
    """``m`` as a set of kind ``output``: a pooled set's kwargs hold no num_classes (its build sets 0)."""
    kwargs = {k: v for k, v in m.kwargs.items() if output == "logits" or k != "num_classes"}
    return dataclasses.replace(m, output=output, kwargs=kwargs)


def _compute_kinds(ctx, unit: EmbeddingSet, policy: Policy, fresh: set[str]) -> tuple[dict, dict]:
    """``_compute`` of ``unit``, and where one pass gives its other kind, that set stored in the shared cache (its
    key added to ``fresh``)."""
    other = other_kind(ctx, unit)
    classifier = unit.model_cfg if other is None or unit.model_cfg.output == "logits" else other.model_cfg
    if other is not None:
        try:
            model = build_frozen(classifier)
        except PretrainedWeightsError as e:  # the file has no classifier: the pooled set alone
            log.info("%s: no logits from this pass (%s)", unit.name, str(e).splitlines()[0])
            other, model = None, None
    tables, info, extra = _compute(ctx, unit, policy, model if other is not None else None)
    if other is not None:
        p = unit_plan(ctx, other)
        kind = other.model_cfg.output
        info_other = {**info, "output": kind, "dim": int(extra.get("dim", 0))}
        embedding_cache.store(
            ctx,
            p.config,
            p.inputs,
            policy.to_dict(),
            extra["tables"],
            lambda table, dst: backend.write_table(table, dst, ctx.device),
            info_other,
        )
        fresh.add(embedding_cache.cache_key(p.config, p.inputs, policy.to_dict()))
    return tables, info


def _compute(ctx, unit: EmbeddingSet, policy: Policy, both: Any = None) -> tuple[dict, dict, dict]:
    """The set's tables ({split: table}) and what its manifest says of them, on every rank; with ``both`` (the
    backbone built with its classifier) also the other kind's tables from the same pass ({"tables", "dim"})."""
    cfg, comp = ctx.cfg, ctx.comp
    dev = torch_device(ctx.device, ctx.dist)
    if unit.checkpoint is not None:
        model, data_cfg = load_checkpoint(unit.checkpoint, dev)
    else:
        model, data_cfg = (both if both is not None else build_frozen(unit.model_cfg)).to(dev).eval(), unit.data_cfg()
    model = compress_model(model, cfg.embed.compress, ctx.device)
    logits_first = unit.model_cfg is not None and unit.model_cfg.output == "logits"
    t0, tables, others = time.time(), {}, {}
    for split, df in (("train", comp.train), ("test", comp.test)):
        ds = eval_dataset(df, comp.root / split, data_cfg)
        emb = run_backbone(
            model,
            ds,
            dev,
            policy,
            batch_size=cfg.embed.batch_size,
            num_workers=cfg.embed.num_workers,
            emb_tta=cfg.embed.tta_hflip,
            both=both is not None,
            dist=ctx.dist,
            desc=f"{unit.name}/{split}",
        )
        if both is None:
            tables[split] = embedding_table(ds.ids, emb.emb)
        else:  # pooled and logits of one pass: the unit's kind, and the other for the shared cache
            mine, other = (emb.logits, emb.emb) if logits_first else (emb.emb, emb.logits)
            tables[split], others[split] = embedding_table(ds.ids, mine), embedding_table(ds.ids, other)
    seconds, n = time.time() - t0, sum(len(t) for t in tables.values())
    log.info(
        "%s: %d images -> %d-dim embeddings%s in %.1fs (%.0f img/s)",
        unit.folder,
        n,
        tables["train"].shape[1] - 1,
        f" (and {others['train'].shape[1] - 1}-dim of the other kind, one pass)" if others else "",
        seconds,
        n / max(seconds, 1e-9),
    )
    output = unit.model_cfg.output if unit.model_cfg is not None else "pooled"
    extra = {"tables": others, "dim": others["train"].shape[1] - 1} if others else {}
    return (
        tables,
        {
            "policy": policy.to_dict(),
            "device": ctx.device,
            "dim": int(tables["train"].shape[1] - 1),
            "images": n,
            "source": "finetuned" if unit.checkpoint else "frozen",
            "backbone": unit.backbone(),
            "output": output,
            "square": data_cfg.get("square", "squash"),
            # the inference budget (select --budget-hours): measured here, decoding and TTA included
            "images_per_second": round(n / max(seconds, 1e-9), 2),
            "machine": budget.machine_name(ctx.device),
        },
        extra,
    )
