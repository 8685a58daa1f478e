"""The one way a backbone runs over images: train's OOF/test predictions, ``embed``, and ``predict`` all call it.

One precision rule (``Policy.for_run``): ``train.precision`` / ``embed.precision`` ``auto`` is bf16 autocast on a
GPU that has bf16, else fp16 (for train only with ``train.amp``), fp32 on a CPU; an explicit ``fp32 | bf16 | fp16``
is honoured on any device (bf16 on a GPU without native bf16 becomes fp16). channels_last (``*.channels_last``:
auto = on a GPU) is the policy's alone: ``forward_batches`` converts the model and its inputs. One batch size for every
inference pass: ``embed.batch_size``. One TTA rule: with hflip TTA the NN prediction is the mean of
sigmoid(logit) over the image and its mirror, and the embedding the mean of the two embeddings; one pass over the
images serves both, each with its own TTA setting. The policy a stage used is recorded in its manifest and travels
with an export, so ``predict`` computes exactly what the pipeline computed.

Under torchrun the images are sharded over the ranks and gathered once (every rank gets the whole result).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ..machine.distributed import Dist

log = logging.getLogger("pawpular")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Policy:
    """How inference computes: autocast precision (fp32 | bf16 | fp16) and memory format."""

    precision: str = "fp32"
    channels_last: bool = False

    @classmethod
    def for_run(
        cls,
        device: str,
        precision: str = "auto",
        channels_last: bool | str = "auto",
        amp: bool = True,
        bf16: bool | None = None,
    ) -> Policy:
        """The policy a stage runs with on ``device``: ``precision`` auto = ``precision_rule`` (with ``amp``), an
        explicit one as asked on any device, except bf16 on a GPU without native bf16 (fp16, warned once);
        ``channels_last`` auto = on a GPU. ``bf16``: whether the GPU has it (None: ask torch)."""
        bf16 = (device == "cuda" and gpu_has_bf16()) if bf16 is None else bf16
        chosen = resolve_precision(device, precision, amp, bf16)
        if chosen != precision != "auto":
            _warn_once(f"this GPU has no native bf16: precision {precision} runs as {chosen} here")
        return cls(chosen, device == "cuda" if channels_last == "auto" else bool(channels_last))

    @classmethod
    def from_dict(cls, d: dict | None) -> Policy:
        return cls(**d) if d else cls()

    def to_dict(self) -> dict:
        return asdict(self)

    def usable_on(self, device: str, bf16: bool | None = None, native: bool | None = None) -> Policy:
        """This policy as ``device`` can run it (each change logged once: results differ a little).

        A GPU without native bf16 (T4, P100, V100) runs fp16 for bf16; a CPU runs bf16 / fp16 where it has the
        instructions (``cpu_native``: AVX512-BF16 / AMX, AVX512-FP16) and fp32 where it would only emulate them
        (several times slower). channels_last holds on any device. ``bf16`` / ``native``: what the GPU / CPU has
        (None: ask torch / the CPU's flags).
        """
        if device != "cuda":
            native = cpu_native(self.precision) if native is None else native
            if self.precision != "fp32" and not native:
                _warn_once(
                    f"the pipeline ran this model in {self.precision}; this {device} has no {self.precision} "
                    "instructions and runs it in fp32: predictions may differ from the pipeline's in the "
                    "third decimal"
                )
                return Policy("fp32", self.channels_last)
            return self
        bf16 = gpu_has_bf16() if bf16 is None else bf16
        if self.precision == "bf16" and not bf16:
            _warn_once(
                "this GPU has no native bf16: the models made in bf16 run in fp16 here (predictions may "
                "differ from the pipeline's in the third decimal)"
            )
            return Policy("fp16", self.channels_last)
        return self


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning(message)


def gpu_has_bf16() -> bool:
    """Native bf16 on the current GPU (Ampere and newer); emulation does not count."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


CPU_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(w for line in f if line.startswith("flags") for w in line.split(":", 1)[1].split())
    except OSError:
        return frozenset()


def cpu_native(precision: str) -> bool:
    """Whether this CPU computes ``precision`` with its own instructions (bf16: AVX512-BF16 or AMX; fp16:
    AVX512-FP16 or AMX-FP16), rather than emulating it several times slower than fp32."""
    return precision == "fp32" or bool(cpu_flags() & set(CPU_FLAGS[precision]))


def model_device(compress: str, device: str) -> str:
    """Where a model compressed by ``compress`` runs: int8 (dynamic quantization) has CPU kernels only."""
    return "cpu" if (compress or "none").strip() == "int8" else device


def precision_rule(device: str, amp: bool, bf16: bool) -> str:
    """The rule: bf16 on a GPU that has it (``bf16``), else fp16; fp32 on a CPU or with amp off."""
    if device != "cuda" or not amp:
        return "fp32"
    return "bf16" if bf16 else "fp16"


def resolve_precision(device: str, asked: str, amp: bool, bf16: bool) -> str:
    """``*.precision`` on ``device``: auto = ``precision_rule``; an explicit one as asked, except bf16 on a GPU
    without it (``bf16`` False), which runs fp16."""
    if asked == "auto":
        return precision_rule(device, amp, bf16)
    return "fp16" if asked == "bf16" and device == "cuda" and not bf16 else asked


def precision_for(device: str, amp: bool) -> str:
    """``precision_rule`` for this machine's GPU."""
    return precision_rule(device, amp, device == "cuda" and gpu_has_bf16())


def autocast(device_type: str, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=DTYPES[precision])


def input_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype inputs must have: that of the model's first floating-point parameter (bf16-compressed models)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


@dataclass
class Outputs:
    pred: np.ndarray | None = None  # Pawpularity 0-100 (float64), one per image
    emb: np.ndarray | None = None  # pooled pre-logit features [N, D] (float32)
    logits: np.ndarray | None = None  # with ``both``: the classifier's outputs [N, C] (float32), TTA as ``emb``


@torch.inference_mode()
def forward_batches(
    model: torch.nn.Module,
    batches: Iterable[dict],
    device: str | torch.device,
    policy: Policy = Policy(),
    *,
    pred_tta: bool | None = None,
    emb_tta: bool | None = None,
    both: bool = False,
    desc: str = "",
) -> Outputs:
    """Run ``model`` (a PawModel) over ``batches`` (dicts of image, meta) in order.

    ``pred_tta`` / ``emb_tta``: None = not wanted, False = plain, True = averaged with the mirror image.
    ``both`` (a model built with its classifier, ``emb_tta`` set): the pooled features and the classifier's outputs
    from one pass (``PawModel.embed_both``), each averaged with the mirror image's as ``emb_tta`` says.
    """
    from ..logs.progress import progress

    device = torch.device(device)
    model.eval()
    dtype = input_dtype(model)
    fmt = torch.channels_last if policy.channels_last else torch.contiguous_format
    if policy.channels_last:  # the weights in the policy's layout too (a no-op where they have it already)
        model.to(memory_format=fmt)
    preds, embs, logits = [], [], []

    def embed(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return model.embed_both(x) if both else (model.embed(x), None)

    for batch in progress(batches, desc=desc, unit="batch"):
        x = batch["image"].to(device, dtype=dtype, non_blocking=True, memory_format=fmt)
        meta = torch.as_tensor(batch["meta"]).to(device, non_blocking=True).float()
        with autocast(device.type, policy.precision):
            e, e_logits = embed(x)
            flipped, f_logits = embed(x.flip(3)) if (pred_tta or emb_tta) else (None, None)
            if pred_tta is not None:
                prob = torch.sigmoid(model.head_logits(e, meta).float())
                if pred_tta:
                    prob = (prob + torch.sigmoid(model.head_logits(flipped, meta).float())) / 2
                preds.append((prob * 100).cpu().double().numpy())
            if emb_tta is not None:
                emb = e.float() if not emb_tta else (e.float() + flipped.float()) / 2
                embs.append(emb.cpu().numpy())
                if both:
                    out = e_logits.float() if not emb_tta else (e_logits.float() + f_logits.float()) / 2
                    logits.append(out.cpu().numpy())
    return Outputs(
        np.concatenate(preds) if pred_tta is not None else None,
        np.concatenate(embs).astype(np.float32) if emb_tta is not None else None,
        np.concatenate(logits).astype(np.float32) if both and emb_tta is not None else None,
    )


def run_backbone(
    model: torch.nn.Module,
    dataset: Any,
    device: str | torch.device,
    policy: Policy = Policy(),
    *,
    batch_size: int,
    num_workers: int = 0,
    pred_tta: bool | None = None,
    emb_tta: bool | None = None,
    both: bool = False,
    dist: Dist | None = None,
    desc: str = "",
) -> Outputs:
    """``forward_batches`` over a whole dataset (under torchrun: this rank's shard, then gathered)."""
    dist = dist or Dist()
    idx = dist.shard(len(dataset))
    if dist.enabled and not len(idx):  # more ranks than images (Kaggle's 8 test photos): nothing to run here,
        out = Outputs()  # but the gathers are collective: every rank must join them
    else:
        part = dataset if not dist.enabled else torch.utils.data.Subset(dataset, idx.tolist())
        loader = torch.utils.data.DataLoader(
            part,
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            pin_memory=torch.device(device).type == "cuda",
        )
        out = forward_batches(model, loader, device, policy, pred_tta=pred_tta, emb_tta=emb_tta, both=both, desc=desc)
    gathered = Outputs(dist.gather(idx, out.pred, len(dataset)), dist.gather(idx, out.emb, len(dataset)))
    if both:
        gathered.logits = dist.gather(idx, out.logits, len(dataset))
    return gathered


def predict(
    model: torch.nn.Module,
    batches: Iterable[dict],
    device: str | torch.device = "cpu",
    tta_hflip: bool = False,
    policy: Policy = Policy(),
) -> np.ndarray:
    """Pawpularity (0-100) for every item of ``batches``, in order."""
    return forward_batches(model, batches, device, policy, pred_tta=tta_hflip).pred
