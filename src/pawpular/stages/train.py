"""Stage 2, train: fine-tune a timm backbone + head on every fold; out-of-fold, holdout and test predictions.

Reads   the competition (train.csv, test.csv, photos), folds/folds.csv
Writes  train/fold{k}/best.pt       the checkpoint the fold ships (train.checkpoint: last = the schedule's last
                                    epoch; best = the epoch best on its own validation rows); SSF merged
        train/fold{k}/last.pt       resume state after each epoch; removed when the fold is done
        train/fold{k}/metrics.csv   epoch, train_loss, val_rmse, lr
        train/fold{k}/{oof,test,holdout}.parquet   the shipped epoch's predictions (holdout with folds.holdout)
        train/fold{k}/epochs.parquet   the validation predictions after every epoch (removed by a new TTA)
        train/{oof,test,holdout}.parquet   every fold-assigned train Id once / means over folds
        train/shipped.json     the rule, each fold's shipped epoch, and whether the NN's scores can be trusted
        train/nested.parquet   the NN's OOF predictions with no epoch chosen on the fold scored: with checkpoint
                               last, the shipped OOF itself; with best, the epoch best on the other folds' mean
                               curve (not the epoch that ships)
Needs   pawpular folds
Keys    model.name, model.pretrained, model.finetune (full | fpt | ssf | head), model.img_size, model.use_meta;
        train.epochs, train.lr, train.head_lr, train.batch_size, train.accum_steps, train.precision, train.amp,
        train.channels_last, train.compile, train.tta_hflip, train.checkpoint (last | best), train.patience (best
        only), train.folds (only these folds);
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

import numpy as np
import pandas as pd

from ..data.splits import HOLDOUT, fold_ids, read_folds
from ..data.tables import ID, TARGET
from ..model.fold_run import FOLD_FILES, FoldRun, shipped_epoch
from ..model.inference import Policy
from ..model.models import check_buildable
from ..scores import nested
from ..scores.metrics import rmse
from ..store import artifacts, manifest
from ..store.errors import ConfigError
from ..store.files import digest_or_none, remove, write_json, write_parquet
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
    # checkpoint: best (the own-best epoch every version before the setting shipped) leaves the key as it was
    tc = {
        k: v
        for k, v in dataclasses.asdict(cfg.train).items()
        if k not in ("num_workers", "folds", "save_every_epoch") and (k, v) != ("checkpoint", "best")
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
    shipped = {k: _shipped_epoch(ctx, k) for k in known}
    return files + shipped_files(ctx, known, target, oof, shipped)


def _shipped_epoch(ctx, fold: int) -> int:
    """The epoch a done fold ships: its manifest's record, or (a fold an older version trained) its best.pt's."""
    recorded = _fold_verdict(ctx, fold).record.info.get("shipped_epoch")
    return int(recorded) if recorded is not None else shipped_epoch(artifacts.best_checkpoint(ctx.out, fold))


def _epoch_rules(known: list[int], tables: list[pd.DataFrame], target: pd.Series) -> pd.DataFrame:
    """Logs what the own-best epochs and the epochs best on the other folds' mean curve score (from each fold's
    per-epoch validation predictions); returns the latter's predictions (Id, fold, pred)."""
    curves = [[rmse(t[c], target.loc[t[ID]]) for c in t.columns if c != ID] for t in tables]
    by_others = nested.epoch_choice(curves)
    by_own = [int(np.argmin(c)) + 1 for c in curves]
    other = pd.concat(
        [
            pd.DataFrame({ID: t[ID], "fold": k, "pred": t[f"epoch_{e}"]})
            for k, t, e in zip(known, tables, by_others, strict=False)
        ],
        ignore_index=True,
    )
    own = pd.concat([pd.DataFrame({ID: t[ID], "pred": t[f"epoch_{e}"]}) for t, e in zip(tables, by_own, strict=False)])
    log.info(
        "train: per-epoch validation curves (not shipped): each fold's own best epoch (%s) scores %.4f "
        "(optimistic), the epoch best on the other folds' mean curve (%s) %.4f (nested)",
        ", ".join(map(str, by_own)),
        rmse(own["pred"], target.loc[own[ID]]),
        ", ".join(map(str, by_others)),
        rmse(other["pred"], target.loc[other[ID]]),
    )
    return other


def shipped_files(ctx, known: list[int], target: pd.Series, oof: pd.DataFrame, shipped: dict) -> list:
    """train/shipped.json (the rule, each fold's shipped epoch, whether the NN's scores can be trusted) and
    train/nested.parquet: the NN head's predictions with no epoch chosen on the fold they score. With
    ``train.checkpoint: last`` those are the shipped checkpoints' own OOF predictions (no choice was made on any
    rows); with ``best`` each fold's epoch chosen on the other folds' mean validation curve (epochs.parquet), which
    is not the epoch the fold ships: optimistic for what ships."""
    out, rule = ctx.out, ctx.cfg.train.checkpoint
    remove(artifacts.nested_preds(out, "nn"))
    oof_rmse = rmse(oof["pred"], target.loc[oof[ID]])
    write_json(
        artifacts.shipped_json(out),
        {"checkpoint": rule, "epochs": {str(k): e for k, e in shipped.items()}, "trusted": rule == "last"},
    )
    files = [artifacts.shipped_json(out)]
    paths = [artifacts.epoch_preds(out, k) for k in known]
    have_epochs = all(p.is_file() for p in paths)
    other = _epoch_rules(known, [pd.read_parquet(p) for p in paths], target) if have_epochs else None
    files += paths if have_epochs else []
    epochs = ", ".join(f"fold {k}: {e}" for k, e in shipped.items())
    if rule == "last":
        write_parquet(oof[[ID, "fold", "pred"]], artifacts.nested_preds(out, "nn"))
        log.info(
            "train: each fold ships its last epoch (%s): OOF RMSE %.4f, no epoch chosen on any rows (what ships)",
            epochs,
            oof_rmse,
        )
        return [*files, artifacts.nested_preds(out, "nn")]
    log.warning(
        "train: train.checkpoint: best ships each fold's own best epoch (%s): its OOF RMSE %.4f and every score "
        "built on it (the SVR's, the blend's) are optimistic; train.checkpoint: last ships a model whose score "
        "can be trusted",
        epochs,
        oof_rmse,
    )
    if not have_epochs:
        log.info("train: no nested NN score (a fold's per-epoch predictions were removed by a new TTA or are missing)")
        return files
    write_parquet(other, artifacts.nested_preds(out, "nn"))
    return [*files, artifacts.nested_preds(out, "nn")]


def _mean_over_folds(out, known: list[int], split: str, ids: pd.Series) -> pd.DataFrame:
    parts = [pd.read_parquet(artifacts.fold_preds(out, k, split)).set_index(ID)["pred"] for k in known]
    return pd.DataFrame({ID: ids.to_numpy(), "pred": pd.concat(parts, axis=1).mean(axis=1).loc[ids].to_numpy()})
