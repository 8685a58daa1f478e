"""Benchmark: the inference compression settings (``embed.compress``) on one backbone, measured in one run.

    python bench/compress.py                                       # ViT-S/16, 224 px, 500 synthetic train images
    python bench/compress.py --n-images 200 --img-size 112         # quick run, about a minute on 2 cores
    python bench/compress.py --checkpoint output/default/train/fold0/best.pt   # a fine-tuned fold model instead
    python bench/compress.py --model convnext_tiny --pretrained input/weights/convnext_tiny.safetensors

Reads ``--data`` (default ``input/synthetic``: the first ``--n-images`` train images and their targets) and the
model: a timm backbone built like ``embed.backbones`` (``--model``, ``--kwargs``, ``--pretrained``, default random
weights) or a ``train/fold{k}/best.pt``. Writes nothing; prints one table.

For each setting (``--settings``, default ``none,int8,prune:0.3,prune:0.6,bf16``) the same base model is copied and
compressed by ``pawpular.model.compress.compress_model`` (what ``embed`` and ``predict`` do), then:

- img/s: pooled embeddings (``model.embed``) of the same images in the same batches, decoded and resized once
  beforehand, so the forward pass alone is timed; ``--warmup`` batches run first and are not timed. With
  ``--rounds`` > 1 the settings take turns and each keeps its best round (a shared machine is noisy).
- OOF RMSE: the SVR head on those embeddings alone (no flags): the same stratified folds for every setting, the
  stage's standardization and gamma='scale' (``svr.make_fold``), C from the same fixed log grid as
  ``pawpular select`` (``select.tune_c``), epsilon 0.1.
- corr: Pearson correlation with the uncompressed embeddings, per embedding dimension across images (what the
  SVR sees after per-column standardization), averaged over dimensions; "min" is the worst dimension.
- size: ``torch.save`` of the state dict (as ``export`` writes it), and the same bytes zlib-compressed: unstructured
  pruning leaves the dense file as large as before; only a compressed or sparse format gains from the zeros.
- zeros: the fraction of zero weights in the Linear/Conv2d layers pruning acts on (``compress._prunable``; "-"
  for int8, whose Linear layers are no longer Linear).

Why a ViT-S/16 at 224 px by default: almost all its FLOPs are in large Linear layers (384 -> 1,152 / 1,536), which
is what int8 dynamic quantization and bf16 act on. The tiny Swin of configs/default.yaml (24-dim tokens, 64 px)
is dominated by per-layer overhead, so any ratio measured on it says little about the models one would compress.
Its weights are random (no downloads), which is fine for speed, size and agreement with the uncompressed model;
the OOF RMSE of random features is only a sanity check. Pass ``--pretrained`` or ``--checkpoint`` for real scores.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import logging
import os
import platform
import time
import zlib

import numpy as np
import pandas as pd
import torch

from pawpular.config.checks import compress_spec as parse
from pawpular.config.schema import ModelConfig
from pawpular.data.dataset import eval_dataset
from pawpular.data.splits import make_folds
from pawpular.data.tables import TARGET, read_competition
from pawpular.model.compress import _prunable, compress_model
from pawpular.model.inference import input_dtype
from pawpular.model.models import build_model, data_config, load_checkpoint
from pawpular.stages import select
from pawpular.svr import head as svr_head

SETTINGS = "none,int8,prune:0.3,prune:0.6,bf16"


def load_model(args: argparse.Namespace) -> tuple[torch.nn.Module, dict, str]:
    """The base model in eval mode, its data config and a one-line description."""
    if args.checkpoint:
        model, data_cfg = load_checkpoint(args.checkpoint, "cpu")
        return model, data_cfg, f"checkpoint {args.checkpoint}"
    mcfg = ModelConfig(
        name=args.model, kwargs=json.loads(args.kwargs), pretrained=args.pretrained, img_size=args.img_size
    )
    model = build_model(mcfg, pretrained=True).eval()
    return model, data_config(mcfg, model.backbone), f"{args.model} {args.kwargs} (weights: {args.pretrained})"


def load_images(args: argparse.Namespace, data_cfg: dict) -> tuple[torch.Tensor, pd.DataFrame]:
    """The first ``--n-images`` train images, decoded and transformed as ``embed`` does, as one tensor."""
    comp = read_competition(args.data)
    train = comp.train.iloc[: args.n_images].reset_index(drop=True)
    ds = eval_dataset(train, comp.root / "train", data_cfg)
    return torch.stack([ds[i]["image"] for i in range(len(ds))]), train


@torch.inference_mode()
def embed_timed(model: torch.nn.Module, images: torch.Tensor, batch_size: int, warmup: int) -> tuple[np.ndarray, float]:
    """(embeddings [N, D] float32, seconds for all N images after ``warmup`` untimed batches)."""
    dtype = input_dtype(model)
    batches = [images[i : i + batch_size].to(dtype) for i in range(0, len(images), batch_size)]
    for b in batches[:warmup]:
        model.embed(b)
    t0 = time.perf_counter()
    out = [model.embed(b).float() for b in batches]
    seconds = time.perf_counter() - t0
    return torch.cat(out).numpy(), seconds


def dim_correlation(ref: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """(mean, min) over dimensions of the Pearson r across images; dimensions constant in ``ref`` are skipped."""
    a = ref - ref.mean(0)
    b = other - other.mean(0)
    den = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    keep = (a * a).sum(0) > 1e-12 * max(float((a * a).sum(0).max()), 1e-30)
    r = np.where(den > 0, (a * b).sum(0) / np.where(den > 0, den, 1), 0.0)[keep]
    return float(r.mean()), float(r.min())


def model_size(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of torch.save(state_dict), the same bytes zlib-compressed)."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    raw = buf.getvalue()
    return len(raw), len(zlib.compress(raw, 1))


def zero_fraction(model: torch.nn.Module) -> float | None:
    """Fraction of exact zeros in the Linear/Conv2d weights pruning acts on (None once int8 replaced them)."""
    params = [getattr(m, name) for m, name in _prunable(model)]
    if not params:
        return None
    zeros = sum(int((p == 0).sum()) for p in params)
    return zeros / sum(p.numel() for p in params)


def svr_oof(x: np.ndarray, y: np.ndarray, fold_of: np.ndarray) -> tuple[float, float]:
    """(OOF RMSE, C) of the SVR head on ``x``: same folds, same C grid for every setting."""
    folds = [svr_head.make_fold(k, x, y, fold_of, "scale", "cpu") for k in sorted(np.unique(fold_of))]
    svr_head.attach_kernels(folds)
    return select.tune_c(folds, y, select.c_grid(0.1, 100.0), 0.1, "cpu")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="input/synthetic")
    p.add_argument("--n-images", type=int, default=500)
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--kwargs", default="{}", help="JSON constructor arguments for timm.create_model")
    p.add_argument("--pretrained", default="none", help="none | hub | a local .safetensors / .pth / .bin")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--checkpoint", default=None, help="a train/fold{k}/best.pt instead of --model")
    p.add_argument("--settings", default=SETTINGS)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--warmup", type=int, default=2, help="untimed batches before each timed pass")
    p.add_argument("--rounds", type=int, default=2, help="timed passes per setting, taken in turns; best counts")
    p.add_argument("--n-folds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    for s in settings:
        parse(s)  # a typo fails before minutes of work
    if "none" not in settings:
        settings.insert(0, "none")  # the reference for every ratio
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    base, data_cfg, what = load_model(args)
    t0 = time.perf_counter()
    images, train = load_images(args, data_cfg)
    print(
        f"model: {what}; {sum(p.numel() for p in base.parameters()):,} parameters; "
        f"input {tuple(data_cfg['input_size'])}"
    )
    print(
        f"data: {len(images)} images of {args.data} (decoded in {time.perf_counter() - t0:.1f}s, not timed); "
        f"batch {args.batch_size}, warm-up {args.warmup} batches, {args.rounds} round(s); torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    )

    models = {s: compress_model(copy.deepcopy(base), s, "cpu") for s in settings}
    emb: dict[str, np.ndarray] = {}
    secs: dict[str, float] = {s: float("inf") for s in settings}
    for _ in range(args.rounds):
        for s in settings:
            e, seconds = embed_timed(models[s], images, args.batch_size, args.warmup)
            emb.setdefault(s, e)
            secs[s] = min(secs[s], seconds)

    y = train[TARGET].to_numpy(np.float64)
    fold_of = make_folds(train, args.n_folds, args.seed)
    rows = []
    for s in settings:
        finite = bool(np.isfinite(emb[s]).all())
        rmse, c = svr_oof(emb[s], y, fold_of) if finite else (float("nan"), float("nan"))
        corr, corr_min = dim_correlation(emb["none"], emb[s]) if finite else (float("nan"), float("nan"))
        size, zipped = model_size(models[s])
        rows.append(
            {
                "setting": s,
                "img/s": len(images) / secs[s],
                "OOF RMSE": rmse,
                "C": c,
                "corr": corr,
                "corr min": corr_min,
                "MB": size / 2**20,
                "MB zlib": zipped / 2**20,
                "zeros": None if parse(s)[0] == "int8" else zero_fraction(models[s]),
            }
        )
    ref = rows[0]
    print(
        f"\nembeddings: {emb['none'].shape[1]} dims; SVR: {args.n_folds} stratified folds, C grid "
        f"{', '.join(f'{c:.3g}' for c in select.c_grid(0.1, 100.0))} (+ refinement), epsilon 0.1; "
        f"predicting the mean: RMSE {float(np.std(y)):.3f}\n"
    )
    print(
        f"{'setting':<10} {'img/s':>7} {'x none':>7} {'OOF RMSE':>9} {'diff':>7} {'C':>7} {'corr':>7} "
        f"{'corr min':>8} {'MB':>7} {'x none':>7} {'MB zlib':>8} {'zeros':>6}"
    )
    for r in rows:
        zeros = "-" if r["zeros"] is None else f"{r['zeros']:.0%}"
        print(
            f"{r['setting']:<10} {r['img/s']:7.1f} {r['img/s'] / ref['img/s']:7.2f} {r['OOF RMSE']:9.3f} "
            f"{r['OOF RMSE'] - ref['OOF RMSE']:+7.3f} {r['C']:7.3g} {r['corr']:7.4f} {r['corr min']:8.4f} "
            f"{r['MB']:7.1f} {r['MB'] / ref['MB']:7.2f} {r['MB zlib']:8.1f} {zeros:>6}"
        )


if __name__ == "__main__":
    main()
