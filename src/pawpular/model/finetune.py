"""Fine-tuning modes (``model.finetune``): which parameters train, and SSF adapters merged away for saving.

full  every parameter trains.
fpt   "frozen pretrained transformer": attention and MLP weights frozen; norm scales/biases, the patch
      embedding (a CNN's stem), position terms (Swin relative_position_bias_table, ViT pos_embed / cls_token)
      and the head train.
ssf   backbone frozen; a learnable per-channel scale (init 1) and shift (init 0) after each Linear, Conv2d and
      LayerNorm. They are merged into the preceding layer (W' = diag(s) W, b' = s*b + t), so saved weights are a
      plain timm state dict with the original parameter count.
head  linear probe: only the head trains.

  setup_finetune(model, "ssf")      # freeze / add adapters in place; returns (trainable, total)
  state = export_state_dict(model)  # SSF merged in: a plain PawModel state dict
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..store.errors import ConfigError
from .models import PawModel

log = logging.getLogger("pawpular")

# Parameter names (last component) that are position terms: they train in `fpt` and get no weight decay.
POSITION_TERMS = (
    "relative_position_bias_table",
    "pos_embed",
    "cls_token",
    "reg_token",
    "dist_token",
    "absolute_pos_embed",
)


def _is_norm(module: nn.Module) -> bool:
    if isinstance(
        module, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    ):
        return True
    return "norm" in type(module).__name__.lower() and any(True for _ in module.parameters(recurse=False))


def fpt_trainable_names(model: PawModel) -> set[str]:
    """Names (in ``model``) of the parameters that train in ``fpt`` mode."""
    names = {f"head.{n}" for n, _ in model.head.named_parameters()}
    for mname, module in model.backbone.named_modules():
        if _is_norm(module):
            names |= {f"backbone.{mname}.{n}".replace("..", ".") for n, _ in module.named_parameters(recurse=False)}
    for n, _ in model.backbone.named_parameters():
        if n.startswith(("patch_embed.", "stem.")) or n.split(".")[-1] in POSITION_TERMS:
            names.add(f"backbone.{n}")
    return names


def setup_finetune(model: PawModel, mode: str) -> tuple[int, int]:
    """Freeze / adapt ``model`` for ``mode`` in place; log and return (trainable, total) parameter counts."""
    if mode == "full":
        model.requires_grad_(True)
    elif mode == "head":
        model.backbone.requires_grad_(False)
    elif mode == "fpt":
        keep = fpt_trainable_names(model)
        for name, p in model.named_parameters():
            p.requires_grad_(name in keep)
    elif mode == "ssf":
        model.backbone.requires_grad_(False)
        add_ssf(model)
    else:
        raise ConfigError(f"model.finetune must be full, fpt, ssf or head, got {mode!r}")
    total = count_parameters(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info(
        "finetune %s: %s of %s parameters trainable (%.2f%%)",
        mode,
        f"{trainable:,}",
        f"{total:,}",
        100.0 * trainable / max(total, 1),
    )
    return trainable, total


class SSF(nn.Module):
    """Per-channel scale and shift of a layer's output along ``dim`` (-1 for Linear/LayerNorm, 1 for Conv2d)."""

    def __init__(self, channels: int, dim: int, shift: bool):
        super().__init__()
        self.dim = dim
        self.scale = nn.Parameter(torch.ones(channels))
        self.shift = nn.Parameter(torch.zeros(channels)) if shift else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.ndim
        shape[self.dim] = -1
        x = x * self.scale.view(shape).to(x.dtype)
        return x if self.shift is None else x + self.shift.view(shape).to(x.dtype)


def _ssf_target(module: nn.Module) -> tuple[int, int, bool] | None:
    """(channels, channel dim, has bias) for a layer SSF can follow and later merge into, else None."""
    from timm.layers import LayerNorm2d

    if isinstance(module, nn.Linear):
        return module.out_features, -1, module.bias is not None
    if isinstance(module, nn.Conv2d):
        return module.out_channels, 1, module.bias is not None
    if isinstance(module, nn.LayerNorm) and module.elementwise_affine and len(module.normalized_shape) == 1:
        dim = 1 if isinstance(module, LayerNorm2d) or type(module).__name__.startswith("LayerNorm2d") else -1
        return module.normalized_shape[0], dim, module.bias is not None
    return None


def _apply_ssf(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
    return module.ssf(out)


def has_ssf(model: nn.Module) -> bool:
    return any(isinstance(m, SSF) for m in model.modules())


def add_ssf(model: PawModel) -> int:
    """Attach an SSF adapter after every Linear / Conv2d / LayerNorm of the backbone; return how many.

    Each adapter is a child ``ssf`` of its layer applied by a forward hook, so the backbone keeps its structure
    (state dict keys gain ``.ssf.scale`` / ``.ssf.shift``, which export_state_dict merges away). A layer without
    bias gets a scale only: there is nothing to merge a shift into without changing the architecture.
    """
    if has_ssf(model):
        return sum(isinstance(m, SSF) for m in model.modules())
    device = next(model.backbone.parameters()).device
    targets = [(m, t) for _, m in model.backbone.named_modules() if (t := _ssf_target(m)) is not None]
    for module, (channels, dim, has_bias) in targets:
        module.ssf = SSF(channels, dim, shift=has_bias).to(device)
        module.ssf_hook = module.register_forward_hook(_apply_ssf)  # its handle: merge_ssf removes it
    return len(targets)


@torch.no_grad()
def export_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict on CPU with any SSF adapters merged in: always a plain PawModel state dict.

    Merge: W' = diag(s) W (per output channel for Conv2d), b' = s * b + t; LayerNorm likewise on weight and bias.
    """
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items() if ".ssf." not in k}
    for name, module in model.named_modules():
        if not isinstance(module, SSF):
            continue
        layer = name[: -len(".ssf")]
        s = module.scale.detach().float().cpu()
        w = state[f"{layer}.weight"]
        state[f"{layer}.weight"] = (w.float() * s.view(-1, *[1] * (w.ndim - 1))).to(w.dtype)
        bias = state.get(f"{layer}.bias")
        if bias is not None:
            t = module.shift.detach().float().cpu()
            state[f"{layer}.bias"] = (bias.float() * s + t).to(bias.dtype)
    return state


def merge_ssf(model: PawModel) -> PawModel:
    """Fold the SSF adapters into their layers and remove them: same outputs, the original architecture."""
    if not has_ssf(model):
        return model
    state = export_state_dict(model)
    for module in list(model.modules()):
        if isinstance(getattr(module, "ssf", None), SSF):
            del module.ssf
            module.ssf_hook.remove()
            del module.ssf_hook
    model.load_state_dict(state, strict=True)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
