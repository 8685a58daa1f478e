"""`pawpular train`: fine-tune a timm backbone + head on every fold; out-of-fold and test predictions.

Reads   cfg.data (the competition: train.csv, test.csv, images), cfg.out/folds.csv (Id, fold)
Writes  cfg.out/train/fold{k}/best.pt        best epoch by validation RMSE (SSF merged: a plain PawModel)
        cfg.out/train/fold{k}/last.pt        resume state after each epoch; removed when the fold is done
        cfg.out/train/fold{k}/metrics.csv    epoch, train_loss, val_rmse, lr, seconds
        cfg.out/train/fold{k}/oof.parquet    Id, fold, pred   (the best epoch's validation predictions)
        cfg.out/train/fold{k}/test.parquet   Id, pred         (best.pt on test, hflip TTA per train.tta_hflip)
        cfg.out/train/{oof,test}.parquet     every train Id once / mean over folds (once every fold is done)
Run     pawpular train --config configs/default.yaml [--set train.epochs=3] [--overwrite]
        torchrun --nproc_per_node N -m pawpular.cli train --config ...   DistributedDataParallel, rank 0 writes

Loss is BCEWithLogits on Pawpularity/100; predictions are sigmoid(logit) * 100. A fold whose best.pt and
prediction files exist is skipped (unless --overwrite); a fold with a last.pt resumes after its last finished
epoch. Every epoch reseeds python/numpy/torch, the DataLoader generator and the augmentations from
(seed, fold, epoch, rank), so on CPU a resumed run ends with the same weights as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from . import artifacts
from .backend import resolve_device
from .config import Config, ConfigError, TrainConfig, config_hash
from .data import ID, TARGET, Competition, PetDataset, build_transform, eval_dataset, read_competition
from .folds import read_folds
from .io import save_torch, write_csv, write_parquet
from .metrics import rmse
from .models import POSITION_TERMS, PawModel, build_model, data_config, export_state_dict, load_checkpoint, setup_finetune

log = logging.getLogger("pawpular")
EpochCallback = Callable[[int, int, PawModel], None]


# ---------------------------------------------------------------------------------------------------------------
# Distributed (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them everything is single-process)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


def init_distributed(device: str) -> tuple[Dist, bool]:
    """(Dist, whether this call started the process group): gloo on CPU, nccl on GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), False
    dist = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device == "cuda":
        torch.cuda.set_device(dist.local_rank)
    started = not torch.distributed.is_initialized()
    if started:
        torch.distributed.init_process_group("nccl" if device == "cuda" else "gloo")
    log.info("DDP: rank %d of %d (local rank %d, %s)", dist.rank, dist.world, dist.local_rank,
             torch.distributed.get_backend())
    if not dist.main:  # one voice: progress and summaries come from rank 0
        log.setLevel(logging.WARNING)
    return dist, started


# ---------------------------------------------------------------------------------------------------------------
# Data


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32  # the loader's generator sets this per worker and epoch
    random.seed(seed)
    np.random.seed(seed)
    ds = torch.utils.data.get_worker_info().dataset
    while isinstance(ds, Subset):
        ds = ds.dataset
    ds.transform.set_random_seed(seed)


def make_loader(ds: Dataset, tc: TrainConfig, train: bool, device: str, dist: Dist) -> DataLoader:
    sampler, shuffle = None, train
    if train and dist.enabled:
        sampler, shuffle = DistributedSampler(ds, dist.world, dist.rank, shuffle=True, drop_last=True), False
    per_rank = len(ds) // dist.world if train else len(ds)
    return DataLoader(ds, batch_size=tc.batch_size if train else tc.batch_size * 2, shuffle=shuffle,
                      sampler=sampler, num_workers=tc.num_workers, pin_memory=device == "cuda",
                      drop_last=train and per_rank > tc.batch_size, worker_init_fn=_seed_worker,
                      generator=torch.Generator())


def seed_epoch(seed: int, loader: DataLoader, rank: int) -> None:
    """Reseed every source of randomness for one epoch so a resumed epoch replays exactly."""
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + 7919 * rank)
    loader.generator.manual_seed(seed + 7919 * rank)
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(seed)
    if loader.num_workers == 0:  # augmentations run in this process
        ds = loader.dataset
        while isinstance(ds, Subset):
            ds = ds.dataset
        ds.transform.set_random_seed(seed + rank)


# ---------------------------------------------------------------------------------------------------------------
# The loop


def amp_dtype(device: str, amp: bool) -> torch.dtype | None:
    """bf16 on a GPU that has it, else fp16 (with a GradScaler); None (fp32) on CPU or with amp off."""
    if device != "cuda" or not amp:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def make_optimizer(model: nn.Module, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW; the head may have its own lr; no weight decay on biases, norms and position terms."""
    groups: dict[tuple[float, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr = tc.head_lr if (tc.head_lr and name.startswith("head.")) else tc.lr
        decay = p.ndim >= 2 and name.split(".")[-1] not in POSITION_TERMS
        groups.setdefault((lr, decay), []).append(p)
    return torch.optim.AdamW([{"params": ps, "lr": lr, "weight_decay": tc.weight_decay if decay else 0.0}
                              for (lr, decay), ps in groups.items()])


def make_scheduler(optimizer: torch.optim.Optimizer, tc: TrainConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup then cosine decay to zero, stepped once per optimizer step."""
    total = max(1, tc.epochs * steps_per_epoch)
    warmup = min(total - 1, int(round(tc.warmup_epochs * steps_per_epoch)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _to_device(batch: dict, device: torch.device, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    image = batch["image"].to(device, non_blocking=True, memory_format=fmt)
    meta = torch.as_tensor(batch["meta"]).to(device, non_blocking=True).float()
    target = torch.as_tensor(batch["target"]).to(device, non_blocking=True).float()
    return image, meta, target


def train_one_epoch(model: nn.Module, loader: Iterable[dict], optimizer: torch.optim.Optimizer, scheduler: Any,
                    scaler: torch.amp.GradScaler, device: torch.device, tc: TrainConfig, *,
                    dtype: torch.dtype | None = None, ddp: nn.Module | None = None,
                    frozen_backbone: nn.Module | None = None, desc: str = "", show: bool = True) -> float:
    """One pass over ``loader`` (dicts of image, meta, target in [0, 1]); returns the mean BCE loss.

    ``model`` is what runs forward (maybe compiled / DDP-wrapped; ``ddp`` is the DDP wrapper for no_sync during
    gradient accumulation). ``frozen_backbone`` is kept in eval mode (linear probe).
    """
    from tqdm.auto import tqdm

    model.train()
    if frozen_backbone is not None:
        frozen_backbone.eval()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    criterion = nn.BCEWithLogitsLoss()
    n = len(loader)  # type: ignore[arg-type]
    total, seen = 0.0, 0
    bar = tqdm(loader, desc=desc, total=n, leave=False, disable=None if show else True, mininterval=1.0)
    optimizer.zero_grad(set_to_none=True)
    for i, batch in enumerate(bar):
        image, meta, target = _to_device(batch, device, tc.channels_last)
        if tc.mixup_alpha > 0:
            lam = float(torch.distributions.Beta(tc.mixup_alpha, tc.mixup_alpha).sample())
            perm = torch.randperm(image.shape[0]).to(device)
            image = lam * image + (1 - lam) * image[perm]
            meta = lam * meta + (1 - lam) * meta[perm]
            target = lam * target + (1 - lam) * target[perm]
        step_now = (i + 1) % tc.accum_steps == 0 or i + 1 == n
        sync = ddp.no_sync() if ddp is not None and not step_now else contextlib.nullcontext()
        with sync:
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                logits = model(image, meta)
            loss = criterion(logits.float(), target)
            scaler.scale(loss / tc.accum_steps).backward()
        if step_now:
            if tc.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        total += loss.item() * image.shape[0]
        seen += image.shape[0]
        bar.set_postfix(loss=f"{total / seen:.4f}", refresh=False)
    return total / max(seen, 1)


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable[dict], device: str | torch.device, tta_hflip: bool = False,
            channels_last: bool = False, amp: bool = True) -> np.ndarray:
    """Pawpularity (0-100) for every item of ``loader``, in order; ``tta_hflip`` averages with the mirror image.

    On a GPU with ``amp`` the forward runs under bf16 (fp16 where bf16 is missing) autocast.
    """
    device = torch.device(device)
    dtype = amp_dtype(device.type, amp)
    model.eval()
    out = []
    for batch in loader:
        image, meta, _ = _to_device(batch, device, channels_last)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            prob = torch.sigmoid(model(image, meta).float())
            if tta_hflip:
                prob = (prob + torch.sigmoid(model(image.flip(3), meta).float())) / 2
        out.append((prob * 100).cpu().double().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def predict_dataset(model: nn.Module, ds: Dataset, device: torch.device, tc: TrainConfig, dist: Dist) -> np.ndarray:
    """predict() over a whole dataset; under DDP each rank takes every world-th item and the parts are gathered."""
    if not dist.enabled:
        return predict(model, make_loader(ds, tc, False, device.type, dist), device, tc.tta_hflip, tc.channels_last, tc.amp)
    idx = np.arange(dist.rank, len(ds), dist.world)
    part = predict(model, make_loader(Subset(ds, idx.tolist()), tc, False, device.type, dist), device,
                   tc.tta_hflip, tc.channels_last, tc.amp)
    parts: list = [None] * dist.world
    torch.distributed.all_gather_object(parts, (idx, part))
    pred = np.empty(len(ds))
    for i, p in parts:
        pred[i] = p
    return pred


# ---------------------------------------------------------------------------------------------------------------
# One fold


@dataclass
class FoldState:
    """What last.pt carries besides model/optimizer/scheduler/scaler/RNG states."""

    epoch: int = 0  # epochs finished
    best_rmse: float = float("inf")
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped: bool = False
    history: list = field(default_factory=list)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, key, *rest = state["numpy"]
    np.random.set_state((name, key.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fold_done(out: Path, fold: int) -> bool:
    d = artifacts.train_fold_dir(out, fold)
    return all((d / f).is_file() for f in ("best.pt", "oof.parquet", "test.parquet"))


def _resume_key(cfg: Config, fold: int, val_ids: list[str]) -> str:
    tc = {k: v for k, v in dataclasses.asdict(cfg.train).items() if k not in ("num_workers", "folds", "save_every_epoch")}
    return config_hash(cfg.model, tc, cfg.seed, fold, val_ids)


def train_fold(cfg: Config, comp: Competition, folds: pd.DataFrame, fold: int, device: str, dist: Dist,
               on_epoch_end: EpochCallback | None = None) -> None:
    """Train one fold (resuming from last.pt when it matches) and write its files (rank 0)."""
    tc, fold_dir = cfg.train, artifacts.train_fold_dir(cfg.out, fold)
    best_path, last_path = artifacts.best_checkpoint(cfg.out, fold), artifacts.last_checkpoint(cfg.out, fold)
    seed = cfg.seed + 1000 * fold
    dev = torch.device(f"cuda:{dist.local_rank}" if device == "cuda" else "cpu")
    is_val = (folds["fold"] == fold).to_numpy()
    trn_df, val_df = comp.train[~is_val].reset_index(drop=True), comp.train[is_val].reset_index(drop=True)
    resume_key = _resume_key(cfg, fold, val_df[ID].tolist())

    torch.manual_seed(seed)
    model = build_model(cfg.model)
    dcfg = data_config(cfg.model, model.backbone)
    with torch.no_grad():  # start the head at the mean target: the first epochs need not learn the offset
        p = float(np.clip(trn_df[TARGET].mean() / 100, 0.01, 0.99))
        model.head.bias.fill_(math.log(p / (1 - p)))
    setup_finetune(model, cfg.model.finetune)
    model.to(dev)
    if tc.channels_last:
        model.to(memory_format=torch.channels_last)

    size, mean, std = dcfg["input_size"][1], dcfg["mean"], dcfg["std"]
    min_side = max(dcfg["input_size"][1:])
    train_ds = PetDataset(trn_df, comp.root / "train", build_transform(size, mean, std, train=True), min_side)
    val_ds = eval_dataset(val_df, comp.root / "train", dcfg)
    train_loader = make_loader(train_ds, tc, True, device, dist)
    optimizer = make_optimizer(model, tc)
    steps_per_epoch = math.ceil(len(train_loader) / tc.accum_steps)
    scheduler = make_scheduler(optimizer, tc, steps_per_epoch)
    dtype = amp_dtype(device, tc.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)

    state, best_pred = FoldState(), np.zeros(0)
    if last_path.is_file() and not cfg.overwrite:
        ckpt = torch.load(last_path, map_location="cpu", weights_only=True)
        if ckpt.get("resume_key") == resume_key:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            scaler.load_state_dict(ckpt["scaler"])
            _set_rng_state(ckpt["rng"])
            state, best_pred = FoldState(**ckpt["state"]), ckpt["best_pred"].numpy()
            log.info("fold %d: resuming after epoch %d of %d (best val RMSE %.4f at epoch %d)", fold, state.epoch,
                     tc.epochs, state.best_rmse, state.best_epoch)
        else:
            log.warning("fold %d: %s was written with another config or folds; starting the fold afresh", fold, last_path)
    if state.epoch == 0 and dist.main:  # a fresh start: stale files must not make a killed run look finished
        for f in ("best.pt", "oof.parquet", "test.parquet", "metrics.csv"):
            (fold_dir / f).unlink(missing_ok=True)
    dist.barrier()

    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dist.local_rank] if device == "cuda" else None) \
        if dist.enabled else None
    forward: nn.Module = ddp or model
    if tc.compile:
        forward = torch.compile(forward)
    log.info("fold %d: %d train / %d val images, input %s, %d steps/epoch, %d epochs, %s%s", fold, len(train_ds),
             len(val_ds), dcfg["input_size"], steps_per_epoch, tc.epochs, dev,
             f", {dtype}".replace("torch.", "") if dtype else "")

    while state.epoch < tc.epochs and not state.stopped:
        epoch, t0 = state.epoch, time.time()
        seed_epoch(seed + epoch, train_loader, dist.rank)
        loss = train_one_epoch(forward, train_loader, optimizer, scheduler, scaler, dev, tc, dtype=dtype, ddp=ddp,
                               frozen_backbone=model.backbone if cfg.model.finetune == "head" else None,
                               desc=f"fold {fold} epoch {epoch + 1}/{tc.epochs}", show=dist.main)
        if dist.enabled:  # mean train loss over ranks, so every rank logs and records the same number
            t = torch.tensor([loss], device=dev)
            torch.distributed.all_reduce(t)
            loss = float(t.item()) / dist.world
        pred = predict_dataset(model, val_ds, dev, tc, dist)
        val_rmse = rmse(pred, val_df[TARGET].to_numpy())
        state.epoch = epoch + 1
        improved = val_rmse < state.best_rmse
        if improved:
            state.best_rmse, state.best_epoch, state.bad_epochs, best_pred = val_rmse, epoch + 1, 0, pred
        else:
            state.bad_epochs += 1
        state.stopped = tc.patience > 0 and state.bad_epochs >= tc.patience
        lr = optimizer.param_groups[0]["lr"]
        state.history.append({"epoch": epoch + 1, "train_loss": loss, "val_rmse": val_rmse, "lr": lr,
                              "seconds": round(time.time() - t0, 2)})
        if dist.main:
            if improved:
                save_torch({"model": export_state_dict(model), "model_cfg": dataclasses.asdict(cfg.model),
                            "data_cfg": dcfg, "epoch": epoch + 1, "val_rmse": val_rmse}, best_path)
            write_csv(pd.DataFrame(state.history), fold_dir / "metrics.csv")
            if tc.save_every_epoch:
                save_torch({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": _rng_state(),
                            "state": dataclasses.asdict(state), "best_pred": torch.from_numpy(best_pred),
                            "resume_key": resume_key}, last_path)
        log.info("fold %d epoch %d/%d: train_loss %.4f val_rmse %.4f lr %.2e (%.1fs)%s", fold, epoch + 1, tc.epochs,
                 loss, val_rmse, lr, time.time() - t0, " *" if improved else "")
        dist.barrier()
        if on_epoch_end is not None:
            on_epoch_end(fold, epoch, model)
    if state.stopped:
        log.info("fold %d: early stop after epoch %d (no improvement for %d epochs)", fold, state.epoch, tc.patience)

    best_model, _ = load_checkpoint(best_path, dev)
    if tc.channels_last:
        best_model.to(memory_format=torch.channels_last)
    test_ds = eval_dataset(comp.test, comp.root / "test", dcfg)
    test_pred = predict_dataset(best_model, test_ds, dev, tc, dist)
    if dist.main:
        write_parquet(pd.DataFrame({ID: comp.test[ID], "pred": test_pred}), fold_dir / "test.parquet")
        write_parquet(pd.DataFrame({ID: val_df[ID], "fold": fold, "pred": best_pred}), fold_dir / "oof.parquet")
        last_path.unlink(missing_ok=True)
    dist.barrier()


# ---------------------------------------------------------------------------------------------------------------
# The stage


def combine(cfg: Config, comp: Competition, folds: pd.DataFrame) -> pd.DataFrame | None:
    """Write train/oof.parquet and train/test.parquet once every fold is done; return the per-fold score table."""
    all_folds = sorted(folds["fold"].unique().tolist())
    done = [k for k in all_folds if fold_done(cfg.out, k)]
    if not done:
        return None
    oofs = [pd.read_parquet(artifacts.train_fold_dir(cfg.out, k) / "oof.parquet") for k in done]
    target = comp.train.set_index(ID)[TARGET]
    rows = [{"fold": k, "n": len(o), "val_rmse": rmse(o["pred"], target.loc[o[ID]])} for k, o in zip(done, oofs)]
    missing = sorted(set(all_folds) - set(done))
    if missing:
        log.info("folds %s not trained yet: train/oof.parquet and train/test.parquet not written", missing)
        return pd.DataFrame(rows)
    oof = comp.train[[ID]].merge(pd.concat(oofs, ignore_index=True), on=ID, how="left", validate="one_to_one")
    assert oof["pred"].notna().all(), "every train Id has exactly one OOF prediction"
    tests = [pd.read_parquet(artifacts.train_fold_dir(cfg.out, k) / "test.parquet").set_index(ID)["pred"] for k in done]
    test = pd.DataFrame({ID: comp.test[ID], "pred": pd.concat(tests, axis=1).mean(axis=1).loc[comp.test[ID]].to_numpy()})
    write_parquet(oof, artifacts.preds(cfg.out, "train", "oof"))
    write_parquet(test, artifacts.preds(cfg.out, "train", "test"))
    rows.append({"fold": "all", "n": len(oof), "val_rmse": rmse(oof["pred"], comp.train[TARGET])})
    return pd.DataFrame(rows)


def run(cfg: Config, on_epoch_end: EpochCallback | None = None) -> Path:
    """Train every fold of folds.csv (or only ``cfg.train.folds``); return the ``train/`` folder.

    ``on_epoch_end(fold, epoch, model)`` is called after each epoch's files are written (tests use it to stop
    a run mid-fold).
    """
    t0 = time.time()
    device = resolve_device(cfg.device)
    dist, started = init_distributed(device)
    try:
        comp = read_competition(cfg.data)
        folds = read_folds(cfg.out, comp.train)
        known = sorted(folds["fold"].unique().tolist())
        todo = known if cfg.train.folds is None else list(cfg.train.folds)
        if set(todo) - set(known):
            raise ConfigError(f"train.folds: {sorted(set(todo) - set(known))} not in folds.csv (folds {known})")
        for fold in todo:
            if fold_done(cfg.out, fold) and not cfg.overwrite:
                log.info("fold %d: already trained (%s); skipping (--overwrite retrains)", fold,
                         artifacts.train_fold_dir(cfg.out, fold))
                continue
            train_fold(cfg, comp, folds, fold, device, dist, on_epoch_end)
        table = combine(cfg, comp, folds) if dist.main else None
        if table is not None:
            std = float(comp.train[TARGET].std(ddof=0))
            log.info("train: validation RMSE by fold (target std %.3f)\n%s", std,
                     table.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
        log.info("train: done in %.1fs -> %s", time.time() - t0, cfg.out / "train")
    finally:
        if started:
            torch.distributed.destroy_process_group()
    return cfg.out / "train"
