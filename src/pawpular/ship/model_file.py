"""The model file that ships (``pawpular export``, read by predict): a PawModel's weights as safetensors, its
settings as JSON metadata - data, never code to unpickle.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..config.schema import ModelConfig
from ..model.models import PawModel, build_model

MODEL_FORMAT = "pawpular-model/1"


def model_file_bytes(state: dict[str, torch.Tensor], model_cfg: dict, data_cfg: dict) -> bytes:
    """A PawModel's state dict as a safetensors file, with its ModelConfig, data config and the versions of torch
    and timm that made it in the metadata."""
    from ..model.models import import_timm
    from ..store.files import safetensors_bytes

    timm = import_timm()
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}  # no shared storage
    meta = {
        "format": MODEL_FORMAT,
        "model_cfg": model_cfg,
        "data_cfg": data_cfg,
        "torch": torch.__version__,
        "timm": timm.__version__,
    }
    return safetensors_bytes(tensors, meta, "pt")


def load_model_file(path: str | Path, device: str | torch.device = "cpu") -> tuple[PawModel, dict]:
    """Rebuild a PawModel from a file of ``model_file_bytes`` (no pretrained download) in eval mode, and its data
    config. A state dict that does not fit the architecture as this timm builds it is an error naming both timm
    versions (timm renames parameters between releases)."""
    from ..model.models import import_timm
    from ..store.files import ArtifactError, read_safetensors

    timm = import_timm()
    meta, state = read_safetensors(path, "pt", "a model file", MODEL_FORMAT)
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    model_cfg = ModelConfig(**{k: v for k, v in meta["model_cfg"].items() if k in names})
    data_cfg = dict(meta["data_cfg"])
    data_cfg["input_size"] = tuple(data_cfg["input_size"])
    model = build_model(model_cfg, pretrained=False)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        made = meta.get("timm")
        hint = (
            f"it was made with timm {made} and this is timm {timm.__version__}, which names or shapes the "
            f"parameters of {model_cfg.name} otherwise: pip install timm=={made}"
            if made != timm.__version__
            else "the file does not match its own settings"
        )
        raise ArtifactError(
            f"{path}: the weights do not fit {model_cfg.name}: {hint} ({str(e).splitlines()[0][:200]})"
        ) from None
    return model.to(device).eval(), data_cfg
