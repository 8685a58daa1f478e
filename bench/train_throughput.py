"""Training and embedding throughput by precision and compilation, in one run: fp32 vs bf16 vs fp16 autocast,
eager vs ``torch.compile``, for our training step (``model.training.train_one_epoch``: autocast, GradScaler with
fp16, the policy's memory format, grad clipping, per-step schedule) and for the embedding forward pass that
``embed`` and ``predict`` run (``model.embed`` under autocast, no gradients); plus a plain fp32 PyTorch loop.

    python bench/train_throughput.py [--config configs/default.yaml] [--steps 20] [--rounds 3] [--no-compile]
                                     [--precisions fp32,bf16,fp16] [--set model.name=...]

Reads the config (model and train sections, embed.batch_size); writes nothing. Batches are random tensors already
on the device, so this measures the model, not JPEG decoding. Every variant is built and warmed up (compiled)
first; then the variants alternate for ``--rounds`` rounds and the best round of each counts (shared machines are
noisy). Prints images/s and the ratio to eager fp32, and the CPU's bf16/fp16 instructions (avx512_bf16, amx_bf16,
avx512_fp16, amx_fp16): without them a CPU emulates bf16 and fp16, several times slower than fp32.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from pawpular.config.schema import load_config
from pawpular.machine.backend import resolve_device
from pawpular.model.finetune import setup_finetune
from pawpular.model.inference import CPU_FLAGS, Policy, autocast, cpu_flags
from pawpular.model.models import build_model, data_config
from pawpular.model.training import grad_scaler, make_optimizer, make_scheduler, train_one_epoch


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


@dataclass
class Variant:
    name: str  # "train fp16 compiled", ...
    images: int  # per call of run
    run: Callable[[], None]


def train_variant(
    base: nn.Module, cfg, device: torch.device, batches: list[dict], policy: Policy, compiled: bool, rounds: int
) -> Variant:
    tc = cfg.train
    model = copy.deepcopy(base)
    setup_finetune(model, cfg.model.finetune)
    model.to(device)
    if policy.channels_last:
        model.to(memory_format=torch.channels_last)
    forward: nn.Module = torch.compile(model) if compiled else model
    opt = make_optimizer(model, tc)
    sched = make_scheduler(opt, tc, steps_per_epoch=len(batches) * (rounds + 1))
    scaler = grad_scaler(policy.precision, device.type)

    def run() -> None:
        train_one_epoch(
            forward,
            batches,
            opt,
            sched,
            scaler,
            device,
            tc,
            precision=policy.precision,
            channels_last=policy.channels_last,
            show=False,
        )

    how = "compiled" if compiled else "eager"
    return Variant(f"train {policy.precision} {how}", len(batches) * tc.batch_size, run)


def embed_variant(
    base: nn.Module, device: torch.device, images: list[torch.Tensor], policy: Policy, compiled: bool
) -> Variant:
    model = copy.deepcopy(base).to(device).eval()
    fmt = torch.channels_last if policy.channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    embed = torch.compile(model.embed) if compiled else model.embed

    @torch.inference_mode()
    def run() -> None:
        for x in images:
            with autocast(device.type, policy.precision):
                embed(x.to(memory_format=fmt)).float()

    how = "compiled" if compiled else "eager"
    return Variant(f"embed {policy.precision} {how}", sum(len(x) for x in images), run)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=20, help="training steps (and embedding batches) per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=None, help="default: train.batch_size")
    p.add_argument("--precisions", default="fp32,bf16,fp16")
    p.add_argument(
        "--no-compile", action="store_true", help="eager only (compiling takes about a minute a variant on 2 cores)"
    )
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"])
    args = p.parse_args()

    cfg = load_config(args.config, args.overrides, device=args.device)
    tc = cfg.train
    if args.batch_size:
        tc.batch_size = args.batch_size
    device = torch.device(resolve_device(cfg.device))
    torch.manual_seed(cfg.seed)
    base = build_model(cfg.model, pretrained=False)
    _, c, h, w = (0, *data_config(cfg.model, base.backbone)["input_size"])
    g = torch.Generator().manual_seed(0)
    batches = [
        {
            "image": torch.randn(tc.batch_size, c, h, w, generator=g).to(device),
            "meta": torch.randint(0, 2, (tc.batch_size, 12), generator=g).float().to(device),
            "target": torch.rand(tc.batch_size, generator=g).to(device),
        }
        for _ in range(args.steps)
    ]
    images = [torch.randn(cfg.embed.batch_size, c, h, w, generator=g).to(device) for _ in range(args.steps)]

    variants = []
    for compiled in (False,) if args.no_compile else (False, True):
        for precision in args.precisions.split(","):
            policy = Policy.for_run(device.type, precision, tc.channels_last)
            variants.append(train_variant(base, cfg, device, batches, policy, compiled, args.rounds))
            variants.append(embed_variant(base, device, images, policy, compiled))
    plain = copy.deepcopy(base).to(device)
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=tc.lr)
    variants.append(
        Variant("train fp32 plain loop", len(batches) * tc.batch_size, lambda: plain_epoch(plain, batches, opt_plain))
    )

    warm = {}
    for v in variants:  # warmup: allocator, cuDNN autotune, compilation
        t0 = time.perf_counter()
        v.run()
        warm[v.name] = time.perf_counter() - t0
    best = {v.name: float("inf") for v in variants}
    for _ in range(args.rounds):
        for v in variants:
            _sync(device)
            t0 = time.perf_counter()
            v.run()
            _sync(device)
            best[v.name] = min(best[v.name], time.perf_counter() - t0)
    ips = {v.name: v.images / best[v.name] for v in variants}

    have = sorted(f for fs in CPU_FLAGS.values() for f in fs if f in cpu_flags())
    where = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device {device} ({where}); bf16/fp16 instructions: {', '.join(have) or 'none'}")
    print(
        f"{cfg.model.name} {c}x{h}x{w}, train batch {tc.batch_size}, embed batch {cfg.embed.batch_size}, finetune "
        f"{cfg.model.finetune}, channels_last {Policy.for_run(device.type, 'fp32', tc.channels_last).channels_last}"
    )
    print(f"{'variant':<26} {'images/s':>10} {'x eager fp32':>13} {'first call s':>13}")
    for v in variants:
        ref = ips.get(f"{v.name.split()[0]} fp32 eager", ips[v.name])
        print(f"{v.name:<26} {ips[v.name]:10.1f} {ips[v.name] / ref:12.2f}x {warm[v.name]:13.1f}")


if __name__ == "__main__":
    main()
