"""Compression for inference (embed and predict): ``compress: none | int8 | prune:<fraction> | bf16``.

- ``int8``: post-training dynamic quantization of every ``nn.Linear`` (weights int8, activations quantized on the
  fly). CPU only; on a Swin almost all the FLOPs are in Linear layers, so this is where a CPU notebook gains most.
- ``prune:<f>``: global magnitude pruning: the fraction ``f`` of backbone Linear/Conv weights with the smallest
  absolute value set to zero (made permanent, so the state dict is a plain one).
- ``bf16``: weights and activations in bfloat16; the GPU setting (tensor cores), also accepted on CPU.

Each is a deterministic function of the weights: ``export`` ships the weights a model was compressed from with
the setting, and ``predict`` applies the same compression (int8 on the CPU, where its kernels are).
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from ..config.checks import compress_spec
from ..store.errors import ConfigError

log = logging.getLogger("pawpular")


def _prunable(model: nn.Module) -> list[tuple[nn.Module, str]]:
    root = getattr(model, "backbone", model)
    return [(m, "weight") for m in root.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def prune_magnitude(model: nn.Module, fraction: float) -> nn.Module:
    from torch.nn.utils import prune

    params = _prunable(model)
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=fraction)
    for module, name in params:
        prune.remove(module, name)
    return model


def quantize_int8(model: nn.Module) -> nn.Module:
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch >= 2.10 flags the quantized-tensor API as deprecated; it still works
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def compress_model(model: nn.Module, spec: str, device: str = "cpu") -> nn.Module:
    """Apply the compression setting to a model in eval mode (returns the model to use)."""
    kind, frac = compress_spec(spec)
    if kind == "none":
        return model
    model = model.eval()
    if kind == "int8":
        if device != "cpu":
            raise ConfigError("embed.compress: int8 (dynamic quantization) runs on CPU only; use bf16 on a GPU")
        model = quantize_int8(model.cpu())
    elif kind == "prune":
        model = prune_magnitude(model, frac)
    elif kind == "bf16":
        from .inference import gpu_has_bf16

        if device == "cuda" and not gpu_has_bf16():  # T4, P100, V100: bf16 weights would be emulated or refused
            log.warning("embed.compress: bf16 on a GPU without native bf16: the weights run in fp16 here")
            return model.to(torch.float16)
        model = model.to(torch.bfloat16)
    log.info("compress: %s", spec)
    return model
