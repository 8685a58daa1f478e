"""The model: a timm backbone (``num_classes=0``) + a head, pretrained weights, and the fine-tuning modes.

Reads ``cfg.model`` (and a local pretrained file or ``train/fold{k}/best.pt`` when asked); writes nothing.
Used by ``train.py`` (fine-tuning), ``embed.py`` (pooled features) and ``predict.py`` (inference)::

    model = build_model(cfg.model)                  # PawModel, weights per cfg.model.pretrained
    data_cfg = data_config(cfg.model, model.backbone)
    setup_finetune(model, "ssf")                    # freeze / add adapters; returns (trainable, total)
    state = export_state_dict(model)                # SSF merged in: a plain PawModel state dict
    model, data_cfg = load_checkpoint("output/default/train/fold0/best.pt")

Fine-tuning modes (``cfg.model.finetune``):
  full  every parameter trains.
  fpt   "frozen pretrained transformer": attention and MLP weights frozen; norm scales/biases, the patch
        embedding (a CNN's stem), position terms (Swin relative_position_bias_table, ViT pos_embed / cls_token) and the head train.
  ssf   backbone frozen; a learnable per-channel scale (init 1) and shift (init 0) after each Linear, Conv2d and
        LayerNorm. They are merged into the preceding layer (W' = diag(s) W, b' = s*b + t), so saved weights are a
        plain timm state dict with the original parameter count.
  head  linear probe: only the head trains.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import ConfigError, ModelConfig
from .data import META_COLS

log = logging.getLogger("pawpular")

# Parameter names (last component) that are position terms: they train in `fpt`.
POSITION_TERMS = ("relative_position_bias_table", "pos_embed", "cls_token", "reg_token", "dist_token", "absolute_pos_embed")


class PretrainedWeightsError(ConfigError):
    """``model.pretrained`` names a file that is missing, unreadable, or does not fit the backbone."""


class PawModel(nn.Module):
    """timm backbone -> pooled features (+ 12 metadata flags) -> dropout -> linear -> one logit per image."""

    def __init__(self, backbone: nn.Module, drop_rate: float = 0.1, use_meta: bool = False):
        super().__init__()
        self.backbone = backbone
        self.use_meta = use_meta
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(backbone.num_features + (len(META_COLS) if use_meta else 0), 1)

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """Pooled pre-logit features [B, D] (what the SVR stage fits on)."""
        x = self.backbone.forward_features(image)
        return self.backbone.forward_head(x, pre_logits=True)

    def forward(self, image: torch.Tensor, meta: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B]; sigmoid(logit) * 100 is the predicted Pawpularity."""
        return self.head_logits(self.embed(image), meta)

    def head_logits(self, x: torch.Tensor, meta: torch.Tensor | None = None) -> torch.Tensor:
        """The head on pooled features from ``embed``: predict gets logits and embeddings from one pass."""
        if self.use_meta:
            if meta is None:
                raise ValueError("this model was built with use_meta: true; pass the 12 metadata flags")
            x = torch.cat([x, meta.to(x.dtype)], dim=1)
        return self.head(self.head_drop(x)).squeeze(-1)


# ---------------------------------------------------------------------------------------------------------------
# Building and loading


def _img_size(model_cfg: ModelConfig) -> Any:
    """The configured input size: model.img_size or model.kwargs.img_size (they must agree), or None."""
    size, kw = model_cfg.img_size, model_cfg.kwargs.get("img_size")
    if size is not None and kw is not None and tuple(np.atleast_1d(size)) != tuple(np.atleast_1d(kw)):
        raise ConfigError(f"model.img_size ({size}) and model.kwargs.img_size ({kw}) disagree; set one of them")
    return size if size is not None else kw


def _create_backbone(model_cfg: ModelConfig, hub: bool) -> nn.Module:
    import timm

    kwargs = dict(model_cfg.kwargs)
    # Transformers are built for their input size (position tables); CNNs take any size and have no img_size.
    sized = _img_size(model_cfg) is not None and "img_size" not in kwargs
    try:
        try:
            return timm.create_model(model_cfg.name, pretrained=hub, num_classes=0,
                                     **({**kwargs, "img_size": model_cfg.img_size} if sized else kwargs))
        except TypeError as e:
            if not (sized and "img_size" in str(e)):
                raise
            return timm.create_model(model_cfg.name, pretrained=hub, num_classes=0, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ConfigError(f"model.name: {e}") from None
        raise


def build_model(model_cfg: ModelConfig, pretrained: bool = True) -> PawModel:
    """The model of ``model_cfg``; with ``pretrained`` the backbone gets ``model_cfg.pretrained``'s weights.

    ``pretrained: none`` means random weights, ``hub`` timm's download (needs internet), anything else a local
    .safetensors / .pth / .bin file (works offline). ``pretrained=False`` always gives random weights (used when a
    checkpoint is loaded right after).
    """
    source = model_cfg.pretrained
    backbone = _create_backbone(model_cfg, hub=pretrained and source == "hub")
    if pretrained and source not in ("none", "hub"):
        load_backbone_weights(backbone, source)
    return PawModel(backbone, drop_rate=model_cfg.drop_rate, use_meta=model_cfg.use_meta)


def _classifier_prefixes(backbone: nn.Module) -> tuple[str, ...]:
    cls = (getattr(backbone, "pretrained_cfg", None) or {}).get("classifier") or "head"
    return tuple(f"{c}." for c in ((cls,) if isinstance(cls, str) else cls))


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load a local weight file into a timm backbone built with ``num_classes=0``.

    Accepts timm/HF files (.safetensors, .pth, .bin; wrapped in "state_dict"/"model" or not, "module." prefixes)
    and our own ``best.pt``. The model family's own ``checkpoint_filter_fn`` adapts it first (e.g. resizes Swin's
    relative position tables or ViT's pos_embed to this image size). Classifier keys are dropped silently (the head
    is new); anything else missing, unexpected or of another shape raises PretrainedWeightsError listing the keys.
    """
    from timm.models import load_state_dict

    path = Path(path)
    if not path.is_file():
        raise PretrainedWeightsError(f"model.pretrained: weight file not found: {path} (use none, hub, or a path to "
                                     ".safetensors / .pth / .bin)")
    try:
        state = load_state_dict(str(path), use_ema=True, weights_only=True)
    except Exception as e:  # corrupt file, pickle with unsafe globals, ...
        raise PretrainedWeightsError(f"model.pretrained: cannot read {path}: {e}") from None
    if any(k.startswith("backbone.") for k in state):  # a PawModel checkpoint (our best.pt)
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    filter_fn = getattr(sys.modules.get(type(backbone).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, backbone)
        except Exception as e:
            raise PretrainedWeightsError(f"model.pretrained: {path} does not fit {type(backbone).__name__} "
                                         f"(timm's checkpoint filter failed: {e!r})") from None
    expected = backbone.state_dict()
    heads = _classifier_prefixes(backbone)
    state = {k: v for k, v in state.items() if k in expected or not k.startswith(heads)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                    if k in state and state[k].shape != v.shape)
    if missing or unexpected or shapes:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:12]) + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")

        parts = [f"{len(missing)} missing key(s): {show(missing)}" if missing else "",
                 f"{len(unexpected)} unexpected key(s): {show(unexpected)}" if unexpected else "",
                 f"{len(shapes)} shape mismatch(es) (file vs model): {show(shapes)}" if shapes else ""]
        raise PretrainedWeightsError(f"model.pretrained: {path} does not fit {type(backbone).__name__} "
                                     f"({sum(v.numel() for v in expected.values())} values): "
                                     + "; ".join(p for p in parts if p))
    backbone.load_state_dict(state, strict=True)
    log.info("loaded pretrained weights from %s (%d tensors)", path, len(state))


def data_config(model_cfg: ModelConfig, backbone: nn.Module) -> dict:
    """``dict(input_size=(3, H, W), mean, std)`` from the backbone's pretrained config.

    ``model_cfg.img_size`` (or ``img_size`` in kwargs) overrides the size: timm reports the pretrained size
    (224 for a Swin built with img_size=64), which the model would not accept.
    """
    from timm.data import resolve_data_config

    resolved = resolve_data_config(model=backbone)
    size = _img_size(model_cfg)
    if size is None:
        input_size = tuple(resolved["input_size"])
    else:
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        input_size = (resolved["input_size"][0], int(h), int(w))
    return {"input_size": input_size, "mean": tuple(resolved["mean"]), "std": tuple(resolved["std"])}


def read_checkpoint(path: str | Path) -> tuple[dict, ModelConfig, dict]:
    """A saved model file (``best.pt``, a compressed embedder): its dict, ModelConfig and data config."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    model_cfg = ModelConfig(**{k: v for k, v in ckpt["model_cfg"].items() if k in names})
    data_cfg = dict(ckpt["data_cfg"])
    data_cfg["input_size"] = tuple(data_cfg["input_size"])
    return ckpt, model_cfg, data_cfg


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[PawModel, dict]:
    """Rebuild a PawModel from ``best.pt`` (no pretrained download) in eval mode; also its data config."""
    ckpt, model_cfg, data_cfg = read_checkpoint(path)
    model = build_model(model_cfg, pretrained=False)
    model.load_state_dict(ckpt["model"], strict=True)
    return model.to(device).eval(), data_cfg


# ---------------------------------------------------------------------------------------------------------------
# Fine-tuning modes


def _is_norm(module: nn.Module) -> bool:
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)):
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
    log.info("finetune %s: %s of %s parameters trainable (%.2f%%)", mode, f"{trainable:,}", f"{total:,}",
             100.0 * trainable / max(total, 1))
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
        module.register_forward_hook(_apply_ssf)
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
            for key, hook in list(module._forward_hooks.items()):
                if hook is _apply_ssf:
                    del module._forward_hooks[key]
    model.load_state_dict(state, strict=True)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
