"""The fine-tuning loop's parts: loaders, seeding, optimizer, schedule, one epoch, and the resume state.

Loss is BCEWithLogits on Pawpularity/100 (prediction = sigmoid(logit) x 100). Every epoch reseeds python / numpy /
torch, the DataLoader generator and the augmentations from (seed, fold, epoch, rank), and ``last.pt`` carries
every RNG state (and the GradScaler's), so on a CPU a resumed run ends with the same weights as an uninterrupted
one. Precision and memory format are the stage's ``inference.Policy`` (fp16 adds a GradScaler, on any device).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from ..config.schema import TrainConfig
from ..logs.progress import Progress
from ..machine.distributed import Dist
from ..store.errors import PawpularError
from .finetune import POSITION_TERMS
from .inference import DTYPES

log = logging.getLogger("pawpular")


class LossNotFinite(PawpularError, FloatingPointError):
    """Training diverged: the loss became NaN or infinite (``step``: the batch of the epoch, 1-based; 0 unknown)."""

    def __init__(self, message: str, step: int = 0, value: float = float("nan")):
        super().__init__(message)
        self.step, self.value = step, value


DIVERGED_HINT = (
    "lower train.lr (and train.head_lr), raise train.warmup_epochs, keep train.grad_clip > 0, or on a "
    "GPU try train.amp: false"
)


def _base_dataset(ds: Any) -> Any:
    while isinstance(ds, Subset):
        ds = ds.dataset
    return ds


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32  # the loader's generator sets this per worker and epoch
    random.seed(seed)
    np.random.seed(seed)
    _base_dataset(torch.utils.data.get_worker_info().dataset).transform.set_random_seed(seed)


def train_loader(ds: Dataset, tc: TrainConfig, device: str, dist: Dist) -> DataLoader:
    """Shuffled batches (this rank's share under DDP); the last partial batch dropped when there is a full one."""
    sampler, shuffle = None, True
    if dist.enabled:
        sampler, shuffle = DistributedSampler(ds, dist.world, dist.rank, shuffle=True, drop_last=True), False
    per_rank = len(ds) // dist.world
    return DataLoader(
        ds,
        batch_size=tc.batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=tc.num_workers,
        pin_memory=device == "cuda",
        drop_last=per_rank > tc.batch_size,
        worker_init_fn=_seed_worker,
        generator=torch.Generator(),
    )


def seed_epoch(seed: int, loader: DataLoader, rank: int) -> None:
    """Reseed every source of randomness for one epoch so a resumed epoch replays exactly."""
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + 7919 * rank)
    loader.generator.manual_seed(seed + 7919 * rank)
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(seed)
    if loader.num_workers == 0:  # augmentations run in this process
        _base_dataset(loader.dataset).transform.set_random_seed(seed + rank)


def make_optimizer(model: nn.Module, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW; the head may have its own lr; no weight decay on biases, norms and position terms."""
    groups: dict[tuple[float, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr = tc.head_lr if (tc.head_lr and name.startswith("head.")) else tc.lr
        decay = p.ndim >= 2 and name.split(".")[-1] not in POSITION_TERMS
        groups.setdefault((lr, decay), []).append(p)
    return torch.optim.AdamW(
        [
            {"params": ps, "lr": lr, "weight_decay": tc.weight_decay if decay else 0.0}
            for (lr, decay), ps in groups.items()
        ]
    )


def make_scheduler(
    optimizer: torch.optim.Optimizer, tc: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup then cosine decay to zero, stepped once per optimizer step."""
    total = max(1, tc.epochs * steps_per_epoch)
    warmup = min(total - 1, int(round(tc.warmup_epochs * steps_per_epoch)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _to_device(
    batch: dict, device: torch.device, channels_last: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    image = batch["image"].to(device, non_blocking=True, memory_format=fmt)
    meta = torch.as_tensor(batch["meta"]).to(device, non_blocking=True).float()
    target = torch.as_tensor(batch["target"]).to(device, non_blocking=True).float()
    return image, meta, target


def _mixup(alpha: float, image: torch.Tensor, meta: torch.Tensor, target: torch.Tensor) -> tuple:
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(image.shape[0]).to(image.device)
    return tuple(lam * t + (1 - lam) * t[perm] for t in (image, meta, target))


def _optimizer_step(
    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, scheduler: Any, grad_clip: float
) -> None:
    """After the last batch of an accumulation: clip the (unscaled) gradients, step, update the scaler, zero the
    gradients and advance the schedule (it counts optimizer steps)."""
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[dict],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    tc: TrainConfig,
    *,
    precision: str = "fp32",
    channels_last: bool = False,
    ddp: nn.Module | None = None,
    frozen_backbone: nn.Module | None = None,
    desc: str = "",
    show: bool = True,
    on_step: Any = None,
) -> float:
    """One pass over ``loader`` (dicts of image, meta, target in [0, 1]); returns the mean BCE loss.

    ``model`` is what runs forward (maybe compiled / DDP-wrapped; ``ddp`` is the DDP wrapper for no_sync during
    gradient accumulation). ``precision`` / ``channels_last``: the stage's policy. ``frozen_backbone`` is kept in
    eval mode (linear probe). ``on_step(i, loss, lr, images)`` is called after each batch with numbers already
    computed (tracking: it changes nothing).
    """
    from .inference import autocast

    model.train()
    if frozen_backbone is not None:
        frozen_backbone.eval()
    criterion = nn.BCEWithLogitsLoss()
    n = len(loader)  # type: ignore[arg-type]
    total, seen = 0.0, 0
    optimizer.zero_grad(set_to_none=True)
    bar = Progress(loader, desc, total=n, unit="img", scale=tc.batch_size, quiet=not show)
    for i, batch in enumerate(bar):
        image, meta, target = _to_device(batch, device, channels_last)
        if tc.mixup_alpha > 0:
            image, meta, target = _mixup(tc.mixup_alpha, image, meta, target)
        step_now = (i + 1) % tc.accum_steps == 0 or i + 1 == n
        sync = ddp.no_sync() if ddp is not None and not step_now else contextlib.nullcontext()
        with sync:
            with autocast(device.type, precision):
                logits = model(image, meta)
            loss = criterion(logits.float(), target)
            if ddp is None and not torch.isfinite(loss):  # under DDP the epoch's mean says it, on every rank at once
                raise LossNotFinite(f"the loss became {loss.item()} at step {i + 1}", i + 1, loss.item())
            scaler.scale(loss / tc.accum_steps).backward()
        if step_now:
            _optimizer_step(optimizer, scaler, scheduler, tc.grad_clip)
        batch_loss = loss.item()
        total += batch_loss * image.shape[0]
        seen += image.shape[0]
        bar.set(loss=f"{total / seen:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        if on_step is not None:
            on_step(i, batch_loss, optimizer.param_groups[0]["lr"], image.shape[0])
    return total / max(seen, 1)


def grad_scaler(precision: str, device_type: str = "cuda") -> torch.amp.GradScaler:
    """fp16 needs one (its range underflows small gradients); on the device the model trains on."""
    return torch.amp.GradScaler(device_type, enabled=DTYPES[precision] == torch.float16)


# ---------------------------------------------------------------------------------------------------------------
# Resume state (last.pt)


@dataclass
class FoldState:
    """What last.pt carries besides model/optimizer/scheduler/scaler/RNG states."""

    epoch: int = 0  # epochs finished
    best_rmse: float = float("inf")
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped: bool = False
    history: list = field(default_factory=list)
    epoch_preds: list = field(default_factory=list)  # validation predictions after each epoch (the nested choice)


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, key, *rest = state["numpy"]
    np.random.set_state((name, key.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    saved = state["cuda"] if torch.cuda.is_available() else []
    fits = min(len(saved), torch.cuda.device_count()) if saved else 0
    if fits < len(saved):  # saved on a machine with more GPUs (a T4x2 run resumed on one): restore what fits
        log.warning(
            "resume: last.pt holds the RNG states of %d GPUs, this machine has %d: restoring the first %d",
            len(saved),
            fits,
            fits,
        )
    for i in range(fits):
        torch.cuda.set_rng_state(saved[i], i)


@dataclass
class Trainer:
    """The live objects of one fold's training, saved to and restored from last.pt together."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler

    def save(self, path: Path, state: FoldState, best_pred: np.ndarray, key: str) -> None:
        from ..store.files import save_torch

        save_torch(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": rng_state(),
                "state": asdict(state),
                "best_pred": torch.from_numpy(best_pred),
                "resume_key": key,
            },
            path,
        )

    def restore(self, path: Path, key: str) -> tuple[FoldState, np.ndarray] | None:
        """The saved (state, best predictions) when ``path`` was written for ``key``; None otherwise."""
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a damaged last.pt: start the fold afresh
            return None
        if ckpt.get("resume_key") != key:
            return None
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        return FoldState(**ckpt["state"]), ckpt["best_pred"].numpy()
