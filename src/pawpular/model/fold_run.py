"""One fold of stage 2 (train): build the model, resume from ``last.pt``, train epoch by epoch, then write the
checkpoint the fold ships (``train.checkpoint``: the last epoch, or the epoch best on its own validation rows), its
predictions and manifest. stages/train.py decides which folds run and combines
them; the epoch loop's pieces (optimizer, schedule, one epoch) are in model/training.py.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from ..data.dataset import eval_dataset, train_dataset
from ..data.splits import HOLDOUT
from ..data.tables import ID, TARGET
from ..logs.tracking import StepMeter
from ..machine.distributed import torch_device
from ..scores.metrics import rmse
from ..store import artifacts, manifest
from ..store.files import remove, save_torch, write_csv, write_parquet
from .finetune import export_state_dict, setup_finetune
from .inference import Policy, run_backbone
from .models import build_model, data_config, load_checkpoint
from .training import (
    DIVERGED_HINT,
    FoldState,
    LossNotFinite,
    Trainer,
    grad_scaler,
    make_optimizer,
    make_scheduler,
    seed_epoch,
    train_loader,
    train_one_epoch,
)

if TYPE_CHECKING:
    from ..stages import Plan

log = logging.getLogger("pawpular")
FOLD_FILES = ("best.pt", "metrics.csv", "oof.parquet", "test.parquet")


def shipped_epoch(path) -> int:
    """The epoch a fold's best.pt was saved at (memory-mapped: the weights are not read)."""
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"])


class FoldRun:
    """One fold: build -> resume -> epochs -> finish. Rank 0 writes; the others train in step with it."""

    def __init__(self, ctx, folds: pd.DataFrame, fold: int, policy: Policy, plan: Plan, weights_key: str):
        """``plan``: the fold's (stages/train.py ``fold_plan``); ``weights_key``: what its weights depend on."""
        self.ctx, self.cfg, self.fold, self.policy = ctx, ctx.cfg, fold, policy
        self.plan, self.weights_key = plan, weights_key
        self.dir = artifacts.train_fold_dir(ctx.out, fold)
        self.key = manifest.key_of(plan.config, plan.inputs)  # last.pt resumes only a run with this key
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
        """Keep best.pt (and metrics.csv); recompute the fold's predictions with today's TTA and test set. The
        per-epoch predictions (epochs.parquet) describe the old recipe and no checkpoint of those epochs is kept:
        they are removed, so no nested score is built from them."""
        if self.ctx.dist.main:
            manifest.clear(self.dir / "manifest.json")
            remove(artifacts.epoch_preds(self.cfg.out, self.fold))
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
        self.trainer = Trainer(
            model,
            optimizer,
            make_scheduler(optimizer, tc, self.steps),
            grad_scaler(self.policy.precision, self.dev.type),
        )

    def resume(self) -> tuple[FoldState, np.ndarray]:
        last = artifacts.last_checkpoint(self.cfg.out, self.fold)
        if last.is_file() and not self.cfg.overwrite:
            restored = self.trainer.restore(last, self.key)
            if restored is not None and restored[0].epoch > 0 and restored[0].best_epoch == 0:
                log.warning("fold %d: %s holds no epoch with a finite score; starting the fold afresh", self.fold, last)
                self.build()  # its weights were loaded: build the fold's start again
            elif restored is not None:
                state = restored[0]
                log.info(
                    "fold %d: resuming after epoch %d of %d (best val RMSE %.4f at epoch %d)",
                    self.fold,
                    state.epoch,
                    self.cfg.train.epochs,
                    state.best_rmse,
                    state.best_epoch,
                )
                return restored
            else:
                log.warning(
                    "fold %d: %s was written for other settings or data; starting the fold afresh", self.fold, last
                )
        if self.ctx.dist.main:  # a fresh start: stale files must not look like this run's
            for f in (*FOLD_FILES, "holdout.parquet", "epochs.parquet", "last.pt"):
                remove(self.dir / f)
        return FoldState(), np.zeros(0)

    def epochs(self, state: FoldState, best_pred: np.ndarray) -> tuple[FoldState, np.ndarray]:
        tc, dist = self.cfg.train, self.ctx.dist
        model = self.trainer.model
        ddp = (
            torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[dist.local_rank] if self.ctx.device == "cuda" else None
            )
            if dist.enabled
            else None
        )
        forward = torch.compile(ddp or model) if tc.compile else (ddp or model)
        how = (
            [str(self.dev), self.policy.precision]
            + ["channels_last"] * self.policy.channels_last
            + ["compiled"] * tc.compile
        )
        log.info(
            "fold %d: %d train / %d val images, input %s, %d steps/epoch, %d epochs, %s",
            self.fold,
            len(self.train_ds),
            len(self.val_ds),
            self.data_cfg["input_size"],
            self.steps,
            tc.epochs,
            ", ".join(how),
        )
        while state.epoch < tc.epochs and not state.stopped:
            epoch, t0 = state.epoch, time.time()
            loss = self.train_epoch(forward, ddp, epoch)
            pred = self.predict(model, self.val_ds)
            best_pred = self.end_epoch(state, epoch, loss, pred, best_pred, time.time() - t0)
        if state.stopped:
            log.info(
                "fold %d: early stop after epoch %d (no improvement for %d epochs)", self.fold, state.epoch, tc.patience
            )
        self.ctx.tracker.log({"best/epoch": state.best_epoch, "best/val_rmse": state.best_rmse}, self.fold, axis="fold")
        self.ctx.tracker.summary(
            {f"fold{self.fold}/best_epoch": state.best_epoch, f"fold{self.fold}/best_val_rmse": state.best_rmse}
        )
        return state, best_pred

    def train_epoch(self, forward, ddp, epoch: int) -> float:
        """One epoch of training; its loss, the mean over ranks. A loss that is not finite raises (``diverged``)."""
        cfg, tc, dist, model = self.cfg, self.cfg.train, self.ctx.dist, self.trainer.model
        seed_epoch(self.seed + epoch, self.loader, dist.rank)
        meter = StepMeter(self.ctx.tracker, self.fold, epoch, len(self.loader), dist.world)
        try:
            loss = train_one_epoch(
                forward,
                self.loader,
                self.trainer.optimizer,
                self.trainer.scheduler,
                self.trainer.scaler,
                self.dev,
                tc,
                precision=self.policy.precision,
                channels_last=self.policy.channels_last,
                ddp=ddp,
                frozen_backbone=model.backbone if cfg.model.finetune == "head" else None,
                desc=f"fold {self.fold} epoch {epoch + 1}/{tc.epochs}",
                show=dist.main,
                on_step=meter if self.ctx.tracker.enabled else None,
            )
        except LossNotFinite as e:
            self.diverged(epoch, e.value, e.step)
        loss = dist.mean(loss, self.dev)
        if not math.isfinite(loss):
            self.diverged(epoch, loss)
        return loss

    def diverged(self, epoch: int, value: float, step: int = 0) -> None:
        """The loss became NaN / inf: say where and what to change (best.pt holds the last finite epoch's best)."""
        where = f"epoch {epoch + 1} step {step}" if step else f"epoch {epoch + 1}"
        what = "NaN" if math.isnan(value) else "infinite"
        raise LossNotFinite(
            f"fold {self.fold}: the loss became {what} at {where} (train.lr={self.cfg.train.lr:g}); {DIVERGED_HINT}",
            step,
            value,
        )

    def end_epoch(
        self, state: FoldState, epoch: int, loss: float, pred: np.ndarray, best_pred: np.ndarray, seconds: float
    ) -> np.ndarray:
        """Score the epoch; write best.pt (the checkpoint the fold ships: at the last epoch, or at each new own best,
        by ``train.checkpoint``), metrics.csv and last.pt (rank 0); call the test hook."""
        tc, model = self.cfg.train, self.trainer.model
        val_rmse = rmse(pred, self.val_df[TARGET].to_numpy())
        if not math.isfinite(val_rmse):  # the weights diverged though the loss still looked finite
            raise LossNotFinite(
                f"fold {self.fold}: the validation predictions became NaN at epoch {epoch + 1} "
                f"(train.lr={tc.lr:g}); {DIVERGED_HINT}"
            )
        state.epoch = epoch + 1
        improved = val_rmse < state.best_rmse
        if improved:
            state.best_rmse, state.best_epoch, state.bad_epochs = val_rmse, epoch + 1, 0
        else:
            state.bad_epochs += 1
        # the epoch the fold ships: the schedule's last (no choice made on any rows), or its own best (optimistic)
        ships = epoch + 1 == tc.epochs if tc.checkpoint == "last" else improved
        if ships or tc.checkpoint == "last":  # best_pred: the shipped epoch's predictions, or the latest epoch's
            best_pred = pred
        state.stopped = tc.patience > 0 and state.bad_epochs >= tc.patience
        lr = self.trainer.optimizer.param_groups[0]["lr"]
        # No timings in metrics.csv: a resumed run writes the same bytes as an uninterrupted one (they are logged).
        state.history.append({"epoch": epoch + 1, "train_loss": loss, "val_rmse": val_rmse, "lr": lr})
        state.epoch_preds.append(np.asarray(pred, float).tolist())
        if self.ctx.dist.main:
            if ships:
                save_torch(
                    {
                        "model": export_state_dict(model),
                        "model_cfg": dataclasses.asdict(self.cfg.model),
                        "data_cfg": self.data_cfg,
                        "epoch": epoch + 1,
                        "val_rmse": val_rmse,
                    },
                    artifacts.best_checkpoint(self.cfg.out, self.fold),
                )
            write_csv(pd.DataFrame(state.history), artifacts.fold_metrics(self.cfg.out, self.fold))
            if tc.save_every_epoch:
                self.trainer.save(artifacts.last_checkpoint(self.cfg.out, self.fold), state, best_pred, self.key)
        log.info(
            "fold %d epoch %d/%d: train_loss %.4f val_rmse %.4f lr %.2e (%.1fs)%s",
            self.fold,
            epoch + 1,
            tc.epochs,
            loss,
            val_rmse,
            lr,
            seconds,
            " *" if improved else "",
        )
        self.ctx.tracker.log({"val/rmse": val_rmse, "train/epoch_loss": loss}, epoch + 1, f"fold{self.fold}", "epoch")
        self.ctx.dist.barrier()
        hook = self.ctx.hooks.get("on_epoch_end")
        if hook is not None:
            hook(self.fold, epoch, model)
        return best_pred

    def predict(self, model: torch.nn.Module, ds) -> np.ndarray:
        return run_backbone(
            model,
            ds,
            self.dev,
            self.policy,
            batch_size=self.cfg.embed.batch_size,
            num_workers=self.cfg.train.num_workers,
            pred_tta=self.cfg.train.tta_hflip,
            dist=self.ctx.dist,
        ).pred

    def finish(self, best_pred: np.ndarray, epoch_preds: list | None = None) -> None:
        """The shipped checkpoint's test and holdout predictions; the fold's files, then its manifest (rank 0).
        ``epoch_preds``: every epoch's validation predictions (epochs.parquet); None keeps the file there is."""
        out, comp = self.cfg.out, self.ctx.comp
        shipped = shipped_epoch(artifacts.best_checkpoint(out, self.fold))
        best_model, _ = load_checkpoint(artifacts.best_checkpoint(out, self.fold), self.dev)
        test_pred = self.predict(best_model, eval_dataset(comp.test, comp.root / "test", self.data_cfg))
        held = len(self.holdout_df) > 0
        held_pred = (
            self.predict(best_model, eval_dataset(self.holdout_df, comp.root / "train", self.data_cfg))
            if held
            else None
        )
        if self.ctx.dist.main:
            write_parquet(pd.DataFrame({ID: comp.test[ID], "pred": test_pred}), self.dir / "test.parquet")
            if held:
                write_parquet(pd.DataFrame({ID: self.holdout_df[ID], "pred": held_pred}), self.dir / "holdout.parquet")
            write_parquet(
                pd.DataFrame({ID: self.val_df[ID], "fold": self.fold, "pred": best_pred}), self.dir / "oof.parquet"
            )
            epochs = artifacts.epoch_preds(out, self.fold)
            if epoch_preds is not None:
                write_parquet(
                    pd.DataFrame({ID: self.val_df[ID], **{f"epoch_{e + 1}": p for e, p in enumerate(epoch_preds)}}),
                    epochs,
                )
            remove(artifacts.last_checkpoint(out, self.fold))
            files = [self.dir / f for f in FOLD_FILES] + ([self.dir / "holdout.parquet"] if held else [])
            files += [epochs] if epochs.is_file() else []
            p = self.plan
            manifest.commit(
                self.dir / "manifest.json",
                out,
                manifest.Record(
                    p.config,
                    p.inputs,
                    info={
                        "policy": self.policy.to_dict(),
                        "device": self.ctx.device,
                        "weights_key": self.weights_key,
                        "shipped_epoch": shipped,
                    },
                ),
                files,
            )
        self.ctx.dist.barrier()
