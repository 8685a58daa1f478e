"""Training throughput: our loop (``pawpular.training.train_one_epoch``: bf16 or fp16 autocast on GPU, channels_last, optional
torch.compile, grad clipping, per-step schedule) against a plain fp32 PyTorch loop, same model, image size and batch.

    python bench/train_throughput.py [--config configs/default.yaml] [--steps 20] [--rounds 3] [--set model.name=...]

Reads the config (model and train sections); writes nothing. Batches are random tensors already on the device,
so this measures the training step, not JPEG decoding. The two loops alternate for ``--rounds`` rounds and the
best round of each counts (shared machines are noisy). Prints images/s of both and their ratio.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

from pawpular.backend import resolve_device
from pawpular.config import load_config
from pawpular.finetune import setup_finetune
from pawpular.inference import precision_for
from pawpular.models import build_model, data_config
from pawpular.training import grad_scaler, make_optimizer, make_scheduler, train_one_epoch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_epoch(model: nn.Module, batches: list[dict], optimizer: torch.optim.Optimizer) -> float:
    """The textbook loop: fp32, contiguous tensors, no clipping, no schedule."""
    criterion = nn.BCEWithLogitsLoss()
    model.train()
    loss = torch.zeros(())
    for b in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(b["image"], b["meta"]), b["target"])
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=20, help="training steps per round (default %(default)s)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=None, help="default: train.batch_size")
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"])
    args = p.parse_args()

    cfg = load_config(args.config, args.overrides, device=args.device)
    tc = cfg.train
    if args.batch_size:
        tc.batch_size = args.batch_size
    device = torch.device(resolve_device(cfg.device))
    torch.manual_seed(cfg.seed)
    ours = build_model(cfg.model, pretrained=False)
    _, c, h, w = (0, *data_config(cfg.model, ours.backbone)["input_size"])
    plain = copy.deepcopy(ours).to(device)
    setup_finetune(ours, cfg.model.finetune)
    ours.to(device)
    if tc.channels_last:
        ours.to(memory_format=torch.channels_last)
    forward: nn.Module = torch.compile(ours) if tc.compile else ours

    g = torch.Generator().manual_seed(0)
    batches = [{"image": torch.randn(tc.batch_size, c, h, w, generator=g).to(device),
                "meta": torch.randint(0, 2, (tc.batch_size, 12), generator=g).float().to(device),
                "target": torch.rand(tc.batch_size, generator=g).to(device)} for _ in range(args.steps)]
    opt_ours = make_optimizer(ours, tc)
    sched = make_scheduler(opt_ours, tc, steps_per_epoch=args.steps * (args.rounds + 1))
    precision = precision_for(device.type, tc.amp)
    scaler = grad_scaler(precision)
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=tc.lr)

    def run_ours() -> None:
        train_one_epoch(forward, batches, opt_ours, sched, scaler, device, tc, precision=precision, show=False)

    def run_plain() -> None:
        plain_epoch(plain, batches, opt_plain)

    for fn in (run_ours, run_plain):  # warmup: allocator, cuDNN autotune, compile
        fn()
    best = {"ours": float("inf"), "plain": float("inf")}
    for _ in range(args.rounds):
        for name, fn in (("ours", run_ours), ("plain", run_plain)):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - t0)
    n = args.steps * tc.batch_size
    ours_ips, plain_ips = n / best["ours"], n / best["plain"]
    what = f"{cfg.model.name} {c}x{h}x{w}, batch {tc.batch_size}, finetune {cfg.model.finetune}"
    extras = ", ".join(f for f, on in ((f"{precision} autocast", precision != "fp32"), ("channels_last", tc.channels_last),
                                       ("compile", tc.compile)) if on) or "fp32"
    print(f"device {device} ({torch.cuda.get_device_name(0) if device.type == 'cuda' else 'CPU'}); {what}")
    print(f"ours  ({extras}): {ours_ips:9.1f} images/s")
    print(f"plain (fp32):{'':>{max(0, len(extras) - 3)}} {plain_ips:9.1f} images/s")
    print(f"ratio ours/plain: {ours_ips / plain_ips:.2f}x")


if __name__ == "__main__":
    main()
