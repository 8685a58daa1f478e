"""Stage 2, train: fine-tune a timm backbone + head on every fold; out-of-fold, holdout and test predictions.

Reads   the competition (train.csv, test.csv, photos), folds/folds.csv
Writes  train/fold{k}/best.pt       best epoch by validation RMSE (SSF merged: a plain PawModel)
        train/fold{k}/last.pt       resume state after each epoch; removed when the fold is done
        train/fold{k}/metrics.csv   epoch, train_loss, val_rmse, lr
        train/fold{k}/{oof,test,holdout}.parquet   the best epoch's predictions (holdout with folds.holdout)
        train/fold{k}/epochs.parquet   the validation predictions after every epoch
        train/{oof,test,holdout}.parquet   every fold-assigned train Id once / means over folds
        train/nested.parquet   fold k's predictions at the epoch best on the other folds' mean validation curve
Needs   pawpular folds
Keys    model.name, model.pretrained, model.finetune (full | fpt | ssf | head), model.img_size, model.use_meta;
        train.epochs, train.lr, train.head_lr, train.batch_size, train.accum_steps, train.precision, train.amp,
        train.channels_last, train.compile, train.tta_hflip, train.patience, train.folds (only these folds);
        `pawpular config keys` lists every setting
Run     pawpular train --config configs/default.yaml [--set train.epochs=3] [--set train.folds=[0,1]]
        torchrun --nproc_per_node N -m pawpular.cli train --config ...   DistributedDataParallel, rank 0 writes

Each fold has its own manifest keyed on the model / train settings, the seed, the fold and the data: a finished
fold with the same key is skipped, a changed lr or model retrains it, and ``last.pt`` resumes only a run with
the same key. ``train.folds`` trains some folds only (spread over machines); the stage is then partial.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import pandas as pd

from .. import artifacts, manifest, nested
from ..data import ID, TARGET
from ..errors import ConfigError
from ..files import digest_or_none, remove, write_parquet
from ..fold_run import FOLD_FILES, FoldRun
from ..inference import Policy
from ..metrics import rmse
from ..models import check_buildable
from ..splits import HOLDOUT, fold_ids, read_folds
from . import Plan, Result

log = logging.getLogger("pawpular")
SUMMARY = "fine-tune the backbone + head on every fold (BCE on target/100); OOF and test predictions"
HELP = __doc__
IMAGES = True
DISTRIBUTED = True  # under torchrun every rank takes part (rank 0 writes)


def check(ctx) -> None:
    """Before anything changes: model.kwargs timm rejects, or a model.pretrained that is no weight file."""
    check_buildable(ctx.cfg.model)


def settings(cfg) -> dict:
    """The settings a fold's weights depend on (not: workers, which folds to run, epoch checkpoints)."""
    tc = {
        k: v for k, v in dataclasses.asdict(cfg.train).items() if k not in ("num_workers", "folds", "save_every_epoch")
    }
    # model.output is the frozen embeddings' (no fold trains on it); model.square at its default leaves the key as
    # it was before the setting existed
    model = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k != "output" and (k, v) != ("square", "squash")}
    return {"model": model, "train": tc, "seed": cfg.seed}


def plan(ctx) -> Plan:
    inputs = {
        **ctx.file_inputs([artifacts.folds_csv(ctx.out)]),
        **ctx.data_inputs("train.csv", "test.csv", images=True),
    }
    return Plan(settings(ctx.cfg), inputs)


def fold_plan(ctx, fold: int) -> Plan:
    base = plan(ctx)
    return Plan({**base.config, "derived": {"fold": fold}}, base.inputs)


def weights_key(ctx, fold: int) -> str:
    """What a fold's weights depend on: its plan less what only changes predictions (TTA, the test set)."""
    config = fold_plan(ctx, fold).config
    config = {**config, "train": {k: v for k, v in config["train"].items() if k != "tta_hflip"}}
    inputs = {k: v for k, v in plan(ctx).inputs.items() if k not in ("data:test.csv", "data:test photos")}
    return manifest.key_of(config, inputs)


def _weights_current(ctx, fold: int, v: manifest.Verdict) -> bool:
    """A stale or damaged fold whose best.pt is intact and was trained on the same settings and data."""
    if v.record is None or v.record.info.get("weights_key") != weights_key(ctx, fold):
        return False
    best = artifacts.best_checkpoint(ctx.out, fold)
    return v.record.outputs.get(artifacts.relative(ctx.out, best)) == digest_or_none(best)


def partial(ctx) -> str | None:
    done = [k for k in range(ctx.cfg.folds.n_folds) if _fold_verdict(ctx, k).done]
    return f"folds {', '.join(map(str, done))} of {ctx.cfg.folds.n_folds} trained" if done else None


def _fold_verdict(ctx, fold: int) -> manifest.Verdict:
    p = fold_plan(ctx, fold)
    return manifest.verdict(artifacts.train_fold_dir(ctx.out, fold) / "manifest.json", ctx.out, p.config, p.inputs)


def run(ctx) -> Result:
    cfg = ctx.cfg
    folds = read_folds(cfg.out, ctx.comp.train, cfg.folds)
    known = fold_ids(folds)
    todo = known if cfg.train.folds is None else list(cfg.train.folds)
    if set(todo) - set(known):
        raise ConfigError(f"train.folds: {sorted(set(todo) - set(known))} not in folds.csv (folds {known})")
    policy = Policy.for_run(ctx.device, cfg.train.precision, cfg.train.channels_last, cfg.train.amp)
    ran = 0
    for fold in todo:
        v = _fold_verdict(ctx, fold)
        if v.done and not cfg.overwrite:
            log.info(
                "fold %d: already trained (%s); skipping (--overwrite retrains)",
                fold,
                artifacts.train_fold_dir(cfg.out, fold),
            )
            continue
        if not cfg.overwrite and _weights_current(ctx, fold, v):
            log.info("fold %d: %s (%s); its weights still hold: predicting again", fold, v.state, v.why())
            FoldRun(ctx, folds, fold, policy, fold_plan(ctx, fold), weights_key(ctx, fold)).repredict()
        else:
            if v.state != manifest.MISSING:
                log.info("fold %d: %s (%s): training it again", fold, v.state, v.why())
            FoldRun(ctx, folds, fold, policy, fold_plan(ctx, fold), weights_key(ctx, fold)).run()
        ran += 1
    complete = all(_fold_verdict(ctx, k).done for k in known) if ctx.dist.main else False
    outputs = combine(ctx, folds, known) if complete else []
    # Each fold's own policy (its manifest's): folds trained earlier or elsewhere keep theirs
    info = {"folds": known, "policies": {u: p for u, p in manifest.policies(cfg.out).items() if u.startswith("train/")}}
    return Result(outputs, info, complete=complete, cached=ran == 0 and complete)


def remove_leftovers(ctx) -> None:
    """A done fold needs no last.pt: a kill between its manifest and the removal leaves one (GBs for big models)."""
    for fold in range(ctx.cfg.folds.n_folds):
        if _fold_verdict(ctx, fold).done:
            remove(artifacts.last_checkpoint(ctx.out, fold))


def combine(ctx, folds: pd.DataFrame, known: list[int]) -> list:
    """train/{oof,test,holdout}.parquet from the fold files; logs the per-fold scores. Returns every output."""
    out, comp = ctx.out, ctx.comp
    oofs = [pd.read_parquet(artifacts.fold_preds(out, k, "oof")) for k in known]
    oof = folds.loc[folds["fold"] != HOLDOUT, [ID]].merge(
        pd.concat(oofs, ignore_index=True), on=ID, how="left", validate="one_to_one"
    )
    assert oof["pred"].notna().all(), "every fold-assigned train Id has exactly one OOF prediction"
    tables = {"oof": oof, "test": _mean_over_folds(out, known, "test", comp.test[ID])}
    if (folds["fold"] == HOLDOUT).any():
        tables["holdout"] = _mean_over_folds(out, known, "holdout", folds.loc[folds["fold"] == HOLDOUT, ID])
    for split, table in tables.items():
        write_parquet(table, artifacts.preds(out, "nn", split))
    target = comp.train.set_index(ID)[TARGET]
    rows = [
        {"fold": k, "n": len(o), "val_rmse": rmse(o["pred"], target.loc[o[ID]])}
        for k, o in zip(known, oofs, strict=False)
    ]
    rows.append({"fold": "all", "n": len(oof), "val_rmse": rmse(oof["pred"], target.loc[oof[ID]])})
    log.info(
        "train: validation RMSE by fold (target std %.3f)\n%s",
        float(comp.train[TARGET].std(ddof=0)),
        pd.DataFrame(rows).to_string(index=False, float_format=lambda x: f"{x:.4f}"),
    )
    # each fold's own manifest too: a fold whose record is removed or replaced leaves the stage damaged, not done
    files = [artifacts.train_fold_dir(out, k) / f for k in known for f in (*FOLD_FILES, "manifest.json")]
    files += [artifacts.fold_preds(out, k, "holdout") for k in known if "holdout" in tables]
    files += [artifacts.preds(out, "nn", s) for s in tables]
    return files + nested_epochs(out, known, target, rows[-1]["val_rmse"])


def nested_epochs(out, known: list[int], target: pd.Series, optimistic: float) -> list:
    """train/nested.parquet: each fold's validation predictions at the epoch that is best on the other folds' mean
    validation curve (the best epoch of each fold is chosen on its own rows: its OOF RMSE is optimistic)."""
    t0 = time.time()
    paths = [artifacts.epoch_preds(out, k) for k in known]
    remove(artifacts.nested_preds(out, "nn"))
    if not all(p.is_file() for p in paths):
        log.info(
            "train: no nested score (folds %s kept no per-epoch predictions: trained by an older version)",
            [k for k, p in zip(known, paths, strict=False) if not p.is_file()],
        )
        return []
    tables = [pd.read_parquet(p) for p in paths]
    curves = [[rmse(t[c], target.loc[t[ID]]) for c in t.columns if c != ID] for t in tables]
    epochs = nested.epoch_choice(curves)
    table = pd.concat(
        [
            pd.DataFrame({ID: t[ID], "fold": k, "pred": t[f"epoch_{e}"]})
            for k, t, e in zip(known, tables, epochs, strict=False)
        ],
        ignore_index=True,
    )
    write_parquet(table, artifacts.nested_preds(out, "nn"))
    log.info(
        "train: nested RMSE %.4f (epochs %s, each chosen on the other folds' mean validation curve; %.2fs); the "
        "OOF RMSE %.4f of each fold's own best epoch is optimistic",
        rmse(table["pred"], target.loc[table[ID]]),
        ", ".join(map(str, epochs)),
        time.time() - t0,
        optimistic,
    )
    return [*paths, artifacts.nested_preds(out, "nn")]


def _mean_over_folds(out, known: list[int], split: str, ids: pd.Series) -> pd.DataFrame:
    parts = [pd.read_parquet(artifacts.fold_preds(out, k, split)).set_index(ID)["pred"] for k in known]
    return pd.DataFrame({ID: ids.to_numpy(), "pred": pd.concat(parts, axis=1).mean(axis=1).loc[ids].to_numpy()})
