"""Stage 1, folds: k-fold split stratified on the binned target, duplicates kept together, optional holdout.

Reads   train.csv (and the train photos with folds.group_duplicates)
Writes  folds/folds.csv       Id, fold (-1: holdout)
        folds/duplicates.csv  Id, group, hash of every photo with an exact or near duplicate
Run     pawpular folds --config configs/default.yaml [--set folds.n_folds=10] [--set folds.holdout=0.1]
        pawpular folds --set folds.file=my_folds.csv    your own split (Id,fold), checked and copied

The target is cut into Sturges' rule bins and StratifiedKFold keeps each bin's share in every fold. With
group_duplicates, photos whose 64-bit DCT pHashes differ in at most hash_threshold bits form one group and
StratifiedGroupKFold keeps it in one fold, so a duplicate never flatters the validation score. When the folds
change, fold folders of a larger earlier n_folds are removed so nothing downstream can pick them up.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pandas as pd

from ..data.duplicates import duplicate_groups, group_table, image_hashes
from ..data.splits import check_enough_rows, check_folds, make_folds
from ..data.tables import ID, TARGET, read_csv_or_raise
from ..store import artifacts
from ..store.errors import ConfigError
from ..store.files import digest_or_none, not_a_file, remove, write_csv
from ..store.guards import remove_fold_folder
from . import Plan, Result

log = logging.getLogger("pawpular")
SUMMARY = "split train.csv into stratified folds (duplicates kept together; optional holdout)"
HELP = __doc__
IMAGES = True


def plan(ctx) -> Plan:
    fc = ctx.cfg.folds
    if fc.file and (why := not_a_file(fc.file)):  # before its digest: a folder or a device is refused, not read
        raise ConfigError(f"folds.file: {fc.file} {why}; give a CSV of Id,fold", ("folds.file",))
    if fc.file:  # the user's split: its bytes decide, not the split settings
        return Plan(
            {"folds": {"file": fc.file, "n_folds": fc.n_folds, "holdout": fc.holdout}},
            {"folds.file": digest_or_none(fc.file), **ctx.data_inputs("train.csv")},
        )
    return Plan(
        {"folds": dataclasses.asdict(fc)},
        ctx.data_inputs("train.csv", images=("train",) if fc.group_duplicates else ()),
    )


def check(ctx) -> None:
    """Before anything changes: enough rows of train.csv for the folds (and the holdout)."""
    if not ctx.cfg.folds.file:
        check_enough_rows(len(ctx.comp.train), ctx.cfg.folds.n_folds, ctx.cfg.folds.holdout)


def _from_file(ctx) -> Result:
    """folds.file: checked against train.csv and the config (splits.check_folds), then copied as folds.csv."""
    cfg = ctx.cfg
    path = Path(cfg.folds.file)  # a regular file: plan checked it
    folds = check_folds(read_csv_or_raise(path, path.name), ctx.comp.train, cfg.folds, path.name)
    write_csv(folds, artifacts.folds_csv(cfg.out))
    remove(artifacts.duplicates_csv(cfg.out))
    _remove_extra_fold_dirs(cfg.out, cfg.folds.n_folds)
    log.info(
        "folds: %s (%d folds, %d holdout rows) -> %s",
        path,
        cfg.folds.n_folds,
        int((folds["fold"] < 0).sum()),
        artifacts.folds_csv(cfg.out),
    )
    return Result([artifacts.folds_csv(cfg.out)], {"n_folds": cfg.folds.n_folds, "file": str(path)})


def run(ctx) -> Result:
    if ctx.cfg.folds.file:
        return _from_file(ctx)
    cfg, train = ctx.cfg, ctx.comp.train
    outputs, groups = [artifacts.folds_csv(cfg.out)], None
    if cfg.folds.group_duplicates:
        hashes = image_hashes(ctx.comp.root, train[ID].tolist())
        groups = duplicate_groups(hashes, cfg.folds.hash_threshold)
        dups = group_table(train[ID].tolist(), hashes, groups)
        log.info(
            "duplicates: %d groups holding %d photos (pHash distance <= %d)",
            dups["group"].nunique(),
            len(dups),
            cfg.folds.hash_threshold,
        )
        write_csv(dups, artifacts.duplicates_csv(cfg.out))
        outputs.append(artifacts.duplicates_csv(cfg.out))
    else:
        remove(artifacts.duplicates_csv(cfg.out))  # an earlier run's groups do not describe these folds
    fold = make_folds(train, cfg.folds.n_folds, cfg.folds.seed, groups, cfg.folds.holdout)
    write_csv(pd.DataFrame({ID: train[ID], "fold": fold}), artifacts.folds_csv(cfg.out))
    _remove_extra_fold_dirs(cfg.out, cfg.folds.n_folds)
    summary = train.assign(fold=fold).groupby("fold")[TARGET].agg(["size", "mean", "std"]).round(2)
    held = int((fold < 0).sum())
    log.info(
        "folds (%d, seed %d%s):\n%s",
        cfg.folds.n_folds,
        cfg.folds.seed,
        f"; holdout: {held} rows, fold -1" if held else "",
        summary.to_string(),
    )
    return Result(outputs, {"n_folds": cfg.folds.n_folds, "holdout_rows": held})


def _remove_extra_fold_dirs(out, n_folds: int) -> None:
    heads = [artifacts.head_dir(out, h) for h in artifacts.extra_svr_heads(out)]  # svr.heads' own fold folders
    for parent in (out / "train", out / "emb", artifacts.svr_dir(out), *heads):
        for k, folder in artifacts.fold_dirs(parent).items():
            if k >= n_folds:
                log.info("folds: removing %s (n_folds is now %d)", folder, n_folds)
                if kept := remove_fold_folder(folder):
                    log.warning(
                        "folds: kept %s in %s: not written by pawpular (move them, then remove the folder)",
                        ", ".join(kept),
                        folder,
                    )
