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
import math
import time

import numpy as np
import pandas as pd
import torch

from .. import artifacts, manifest, nested
from ..errors import ConfigError
from ..data import ID, TARGET
from ..dataset import eval_dataset, train_dataset
from ..distributed import torch_device
from ..files import digest_or_none, remove, save_torch, write_csv, write_parquet
from ..finetune import export_state_dict, setup_finetune
from ..inference import Policy, run_backbone
from ..metrics import rmse
from ..models import build_model, check_buildable, data_config, load_checkpoint
from ..splits import HOLDOUT, fold_ids, read_folds
from ..tracking import StepMeter
from ..training import (DIVERGED_HINT, FoldState, LossNotFinite, Trainer, grad_scaler, make_optimizer, make_scheduler,
                        seed_epoch, train_loader, train_one_epoch)
from . import Plan, Result

log = logging.getLogger("pawpular")
SUMMARY = "fine-tune the backbone + head on every fold (BCE on target/100); OOF and test predictions"
HELP = __doc__
IMAGES = True
DISTRIBUTED = True  # under torchrun every rank takes part (rank 0 writes)
FOLD_FILES = ("best.pt", "metrics.csv", "oof.parquet", "test.parquet")


def check(ctx) -> None:
    """Before anything changes: model.kwargs timm rejects, or a model.pretrained that is no weight file."""
    check_buildable(ctx.cfg.model)


def settings(cfg) -> dict:
    """The settings a fold's weights depend on (not: workers, which folds to run, epoch checkpoints)."""
    tc = {k: v for k, v in dataclasses.asdict(cfg.train).items() if k not in ("num_workers", "folds", "save_every_epoch")}
    # model.output is the frozen embeddings' (no fold trains on it); model.square at its default leaves the key as
    # it was before the setting existed
    model = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k != "output" and (k, v) != ("square", "squash")}
    return {"model": model, "train": tc, "seed": cfg.seed}


def plan(ctx) -> Plan:
    inputs = {**ctx.file_inputs([artifacts.folds_csv(ctx.out)]),
              **ctx.data_inputs("train.csv", "test.csv", images=True)}
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
            log.info("fold %d: already trained (%s); skipping (--overwrite retrains)", fold,
                     artifacts.train_fold_dir(cfg.out, fold))
            continue
        if not cfg.overwrite and _weights_current(ctx, fold, v):
            log.info("fold %d: %s (%s); its weights still hold: predicting again", fold, v.state, v.why())
            FoldRun(ctx, folds, fold, policy).repredict()
        else:
            if v.state != manifest.MISSING:
                log.info("fold %d: %s (%s): training it again", fold, v.state, v.why())
            FoldRun(ctx, folds, fold, policy).run()
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


class FoldRun:
    """One fold: build -> resume -> epochs -> finish. Rank 0 writes; the others train in step with it."""

    def __init__(self, ctx, folds: pd.DataFrame, fold: int, policy: Policy):
        self.ctx, self.cfg, self.fold, self.policy = ctx, ctx.cfg, fold, policy
        self.dir = artifacts.train_fold_dir(ctx.out, fold)
        p = fold_plan(ctx, fold)
        self.key = manifest.key_of(p.config, p.inputs)  # last.pt resumes only a run with this key
        train = ctx.comp.train
        is_val, held = (folds["fold"] == fold).to_numpy(), (folds["fold"] == HOLDOUT).to_numpy()
        self.trn_df = train[~is_val & ~held].reset_index(drop=True)
        self.val_df = train[is_val].reset_index(drop=True)
        self.holdout_df = train[held].reset_index(drop=True)
        self.seed = self.cfg.seed + 1000 * fold
        self.dev = torch_device(ctx.device, ctx.dist)

    def run(self) -> None:
        if self.ctx.dist.main:
            manifest.clear(self.dir / "manifest.json")
        self.build()
        state, best_pred = self.resume()
        self.ctx.dist.barrier()
        state, best_pred = self.epochs(state, best_pred)
        self.finish(best_pred, state.epoch_preds if len(state.epoch_preds) == state.epoch else None)

    def repredict(self) -> None:
        """Keep best.pt (and metrics.csv); recompute the fold's predictions with today's TTA and test set."""
        if self.ctx.dist.main:
            manifest.clear(self.dir / "manifest.json")
        model, self.data_cfg = load_checkpoint(artifacts.best_checkpoint(self.cfg.out, self.fold), self.dev)
        self.finish(self.predict(model, eval_dataset(self.val_df, self.ctx.comp.root / "train", self.data_cfg)))

    def build(self) -> None:
        cfg, tc = self.cfg, self.cfg.train
        torch.manual_seed(self.seed)
        model = build_model(cfg.model)
        self.data_cfg = data_config(cfg.model, model.backbone)
        with torch.no_grad():  # start the head at the mean target: the first epochs need not learn the offset
            p = float(np.clip(self.trn_df[TARGET].mean() / 100, 0.01, 0.99))
            model.head.bias.fill_(math.log(p / (1 - p)))
        setup_finetune(model, cfg.model.finetune)
        model.to(self.dev)
        if self.policy.channels_last:
            model.to(memory_format=torch.channels_last)
        root = self.ctx.comp.root / "train"
        self.train_ds = train_dataset(self.trn_df, root, self.data_cfg)
        self.val_ds = eval_dataset(self.val_df, root, self.data_cfg)
        self.loader = train_loader(self.train_ds, tc, self.ctx.device, self.ctx.dist)
        optimizer = make_optimizer(model, tc)
        self.steps = math.ceil(len(self.loader) / tc.accum_steps)
        self.trainer = Trainer(model, optimizer, make_scheduler(optimizer, tc, self.steps),
                               grad_scaler(self.policy.precision, self.dev.type))

    def resume(self) -> tuple[FoldState, np.ndarray]:
        last = artifacts.last_checkpoint(self.cfg.out, self.fold)
        if last.is_file() and not self.cfg.overwrite:
            restored = self.trainer.restore(last, self.key)
            if restored is not None and restored[0].epoch > 0 and restored[0].best_epoch == 0:
                log.warning("fold %d: %s holds no epoch with a finite score; starting the fold afresh", self.fold, last)
                self.build()  # its weights were loaded: build the fold's start again
            elif restored is not None:
                state = restored[0]
                log.info("fold %d: resuming after epoch %d of %d (best val RMSE %.4f at epoch %d)", self.fold,
                         state.epoch, self.cfg.train.epochs, state.best_rmse, state.best_epoch)
                return restored
            else:
                log.warning("fold %d: %s was written for other settings or data; starting the fold afresh", self.fold,
                            last)
        if self.ctx.dist.main:  # a fresh start: stale files must not look like this run's
            for f in (*FOLD_FILES, "holdout.parquet", "epochs.parquet", "last.pt"):
                remove(self.dir / f)
        return FoldState(), np.zeros(0)

    def epochs(self, state: FoldState, best_pred: np.ndarray) -> tuple[FoldState, np.ndarray]:
        cfg, tc, dist = self.cfg, self.cfg.train, self.ctx.dist
        model = self.trainer.model
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.local_rank] if self.ctx.device == "cuda" else None) if dist.enabled else None
        forward = torch.compile(ddp or model) if tc.compile else (ddp or model)
        how = [str(self.dev), self.policy.precision] + ["channels_last"] * self.policy.channels_last + \
            ["compiled"] * tc.compile
        log.info("fold %d: %d train / %d val images, input %s, %d steps/epoch, %d epochs, %s", self.fold,
                 len(self.train_ds), len(self.val_ds), self.data_cfg["input_size"], self.steps, tc.epochs,
                 ", ".join(how))
        while state.epoch < tc.epochs and not state.stopped:
            epoch, t0 = state.epoch, time.time()
            seed_epoch(self.seed + epoch, self.loader, dist.rank)
            meter = StepMeter(self.ctx.tracker, self.fold, epoch, len(self.loader), dist.world)
            try:
                loss = train_one_epoch(forward, self.loader, self.trainer.optimizer, self.trainer.scheduler,
                                       self.trainer.scaler, self.dev, tc, precision=self.policy.precision,
                                       channels_last=self.policy.channels_last, ddp=ddp,
                                       frozen_backbone=model.backbone if cfg.model.finetune == "head" else None,
                                       desc=f"fold {self.fold} epoch {epoch + 1}/{tc.epochs}", show=dist.main,
                                       on_step=meter if self.ctx.tracker.enabled else None)
            except LossNotFinite as e:
                self.diverged(epoch, e.value, e.step)
            loss = dist.mean(loss, self.dev)
            if not math.isfinite(loss):
                self.diverged(epoch, loss)
            pred = self.predict(model, self.val_ds)
            best_pred = self.end_epoch(state, epoch, loss, pred, best_pred, time.time() - t0)
        if state.stopped:
            log.info("fold %d: early stop after epoch %d (no improvement for %d epochs)", self.fold, state.epoch,
                     tc.patience)
        self.ctx.tracker.log({"best/epoch": state.best_epoch, "best/val_rmse": state.best_rmse}, self.fold, axis="fold")
        self.ctx.tracker.summary({f"fold{self.fold}/best_epoch": state.best_epoch,
                                  f"fold{self.fold}/best_val_rmse": state.best_rmse})
        return state, best_pred

    def diverged(self, epoch: int, value: float, step: int = 0) -> None:
        """The loss became NaN / inf: say where and what to change (best.pt holds the last finite epoch's best)."""
        where = f"epoch {epoch + 1} step {step}" if step else f"epoch {epoch + 1}"
        what = "NaN" if math.isnan(value) else "infinite"
        raise LossNotFinite(f"fold {self.fold}: the loss became {what} at {where} (train.lr={self.cfg.train.lr:g}); "
                            f"{DIVERGED_HINT}", step, value)

    def end_epoch(self, state: FoldState, epoch: int, loss: float, pred: np.ndarray, best_pred: np.ndarray,
                  seconds: float) -> np.ndarray:
        """Score the epoch, keep the best, write best.pt / metrics.csv / last.pt (rank 0), call the test hook."""
        tc, model = self.cfg.train, self.trainer.model
        val_rmse = rmse(pred, self.val_df[TARGET].to_numpy())
        if not math.isfinite(val_rmse):  # the weights diverged though the loss still looked finite
            raise LossNotFinite(f"fold {self.fold}: the validation predictions became NaN at epoch {epoch + 1} "
                                f"(train.lr={tc.lr:g}); {DIVERGED_HINT}")
        state.epoch = epoch + 1
        improved = val_rmse < state.best_rmse
        if improved:
            state.best_rmse, state.best_epoch, state.bad_epochs, best_pred = val_rmse, epoch + 1, 0, pred
        else:
            state.bad_epochs += 1
        state.stopped = tc.patience > 0 and state.bad_epochs >= tc.patience
        lr = self.trainer.optimizer.param_groups[0]["lr"]
        # No timings in metrics.csv: a resumed run writes the same bytes as an uninterrupted one (they are logged).
        state.history.append({"epoch": epoch + 1, "train_loss": loss, "val_rmse": val_rmse, "lr": lr})
        state.epoch_preds.append(np.asarray(pred, float).tolist())
        if self.ctx.dist.main:
            if improved:
                save_torch({"model": export_state_dict(model), "model_cfg": dataclasses.asdict(self.cfg.model),
                            "data_cfg": self.data_cfg, "epoch": epoch + 1, "val_rmse": val_rmse},
                           artifacts.best_checkpoint(self.cfg.out, self.fold))
            write_csv(pd.DataFrame(state.history), artifacts.fold_metrics(self.cfg.out, self.fold))
            if tc.save_every_epoch:
                self.trainer.save(artifacts.last_checkpoint(self.cfg.out, self.fold), state, best_pred, self.key)
        log.info("fold %d epoch %d/%d: train_loss %.4f val_rmse %.4f lr %.2e (%.1fs)%s", self.fold, epoch + 1,
                 tc.epochs, loss, val_rmse, lr, seconds, " *" if improved else "")
        self.ctx.tracker.log({"val/rmse": val_rmse, "train/epoch_loss": loss}, epoch + 1, f"fold{self.fold}", "epoch")
        self.ctx.dist.barrier()
        hook = self.ctx.hooks.get("on_epoch_end")
        if hook is not None:
            hook(self.fold, epoch, model)
        return best_pred

    def predict(self, model: torch.nn.Module, ds) -> np.ndarray:
        return run_backbone(model, ds, self.dev, self.policy, batch_size=self.cfg.embed.batch_size,
                            num_workers=self.cfg.train.num_workers, pred_tta=self.cfg.train.tta_hflip,
                            dist=self.ctx.dist).pred

    def finish(self, best_pred: np.ndarray, epoch_preds: list | None = None) -> None:
        """The best checkpoint's test and holdout predictions; the fold's files, then its manifest (rank 0).
        ``epoch_preds``: every epoch's validation predictions (epochs.parquet); None keeps the file there is."""
        out, comp = self.cfg.out, self.ctx.comp
        best_model, _ = load_checkpoint(artifacts.best_checkpoint(out, self.fold), self.dev)
        test_pred = self.predict(best_model, eval_dataset(comp.test, comp.root / "test", self.data_cfg))
        held = len(self.holdout_df) > 0
        held_pred = self.predict(best_model, eval_dataset(self.holdout_df, comp.root / "train", self.data_cfg)) if held else None
        if self.ctx.dist.main:
            write_parquet(pd.DataFrame({ID: comp.test[ID], "pred": test_pred}), self.dir / "test.parquet")
            if held:
                write_parquet(pd.DataFrame({ID: self.holdout_df[ID], "pred": held_pred}), self.dir / "holdout.parquet")
            write_parquet(pd.DataFrame({ID: self.val_df[ID], "fold": self.fold, "pred": best_pred}), self.dir / "oof.parquet")
            epochs = artifacts.epoch_preds(out, self.fold)
            if epoch_preds is not None:
                write_parquet(pd.DataFrame({ID: self.val_df[ID], **{f"epoch_{e + 1}": p for e, p in
                                                                    enumerate(epoch_preds)}}), epochs)
            remove(artifacts.last_checkpoint(out, self.fold))
            files = [self.dir / f for f in FOLD_FILES] + ([self.dir / "holdout.parquet"] if held else [])
            files += [epochs] if epochs.is_file() else []
            p = fold_plan(self.ctx, self.fold)
            manifest.commit(self.dir / "manifest.json", out, manifest.Record(p.config, p.inputs, info={
                "policy": self.policy.to_dict(), "device": self.ctx.device,
                "weights_key": weights_key(self.ctx, self.fold)}), files)
        self.ctx.dist.barrier()


def combine(ctx, folds: pd.DataFrame, known: list[int]) -> list:
    """train/{oof,test,holdout}.parquet from the fold files; logs the per-fold scores. Returns every output."""
    out, comp = ctx.out, ctx.comp
    oofs = [pd.read_parquet(artifacts.fold_preds(out, k, "oof")) for k in known]
    oof = folds.loc[folds["fold"] != HOLDOUT, [ID]].merge(pd.concat(oofs, ignore_index=True), on=ID, how="left",
                                                          validate="one_to_one")
    assert oof["pred"].notna().all(), "every fold-assigned train Id has exactly one OOF prediction"
    tables = {"oof": oof, "test": _mean_over_folds(out, known, "test", comp.test[ID])}
    if (folds["fold"] == HOLDOUT).any():
        tables["holdout"] = _mean_over_folds(out, known, "holdout", folds.loc[folds["fold"] == HOLDOUT, ID])
    for split, table in tables.items():
        write_parquet(table, artifacts.preds(out, "nn", split))
    target = comp.train.set_index(ID)[TARGET]
    rows = [{"fold": k, "n": len(o), "val_rmse": rmse(o["pred"], target.loc[o[ID]])} for k, o in zip(known, oofs)]
    rows.append({"fold": "all", "n": len(oof), "val_rmse": rmse(oof["pred"], target.loc[oof[ID]])})
    log.info("train: validation RMSE by fold (target std %.3f)\n%s", float(comp.train[TARGET].std(ddof=0)),
             pd.DataFrame(rows).to_string(index=False, float_format=lambda x: f"{x:.4f}"))
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
        log.info("train: no nested score (folds %s kept no per-epoch predictions: trained by an older version)",
                 [k for k, p in zip(known, paths) if not p.is_file()])
        return []
    tables = [pd.read_parquet(p) for p in paths]
    curves = [[rmse(t[c], target.loc[t[ID]]) for c in t.columns if c != ID] for t in tables]
    epochs = nested.epoch_choice(curves)
    table = pd.concat([pd.DataFrame({ID: t[ID], "fold": k, "pred": t[f"epoch_{e}"]})
                       for k, t, e in zip(known, tables, epochs)], ignore_index=True)
    write_parquet(table, artifacts.nested_preds(out, "nn"))
    log.info("train: nested RMSE %.4f (epochs %s, each chosen on the other folds' mean validation curve; %.2fs); the "
             "OOF RMSE %.4f of each fold's own best epoch is optimistic", rmse(table["pred"], target.loc[table[ID]]),
             ", ".join(map(str, epochs)), time.time() - t0, optimistic)
    return [*paths, artifacts.nested_preds(out, "nn")]


def _mean_over_folds(out, known: list[int], split: str, ids: pd.Series) -> pd.DataFrame:
    parts = [pd.read_parquet(artifacts.fold_preds(out, k, split)).set_index(ID)["pred"] for k in known]
    return pd.DataFrame({ID: ids.to_numpy(), "pred": pd.concat(parts, axis=1).mean(axis=1).loc[ids].to_numpy()})
