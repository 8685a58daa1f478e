"""The model: a timm backbone (``num_classes=0``) + a head; building it, its weights, its checkpoints.

Reads ``cfg.model`` (and a local pretrained file or ``train/fold{k}/best.pt`` when asked); writes nothing::

    model = build_model(cfg.model)                  # PawModel, weights per cfg.model.pretrained
    data_cfg = data_config(cfg.model, model.backbone)
    model, data_cfg = load_checkpoint("output/default/train/fold0/best.pt")
    model = build_frozen(model_cfg)                 # a frozen backbone: its weight file, or a seeded random init

Fine-tuning modes (which parameters train; SSF adapters) are in ``model/finetune.py``; the model file that ships, in
``ship/model_file.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config.schema import ModelConfig
from ..data.tables import META_COLS
from ..store.errors import ConfigError
from ..store.files import not_a_file
from .frozen_key import RANDOM_INIT_SEED, frozen_description, pretrained_source  # noqa: F401 (re-exported)

log = logging.getLogger("pawpular")

# The random init of a frozen backbone with `pretrained: none` is drawn from RANDOM_INIT_SEED (frozen_key.py), in a
# forked RNG: every process (embed now, predict later, a rerun with --overwrite) builds the same weights, so test
# embeddings come from the model whose train embeddings the SVR was fit on, and the cache key names one set of
# weights.


class PretrainedWeightsError(ConfigError):
    """``model.pretrained`` names a file that is missing, unreadable, or does not fit the backbone."""


class PawModel(nn.Module):
    """timm backbone -> pooled features (+ 12 metadata flags) -> dropout -> linear -> one logit per image."""

    def __init__(self, backbone: nn.Module, drop_rate: float = 0.1, use_meta: bool = False, logits: bool = False):
        super().__init__()
        self.backbone, self.logits = backbone, logits  # logits: embed() gives the backbone's own classifier outputs
        self.use_meta = use_meta
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(backbone.num_features + (len(META_COLS) if use_meta else 0), 1)

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """Pooled pre-logit features [B, D] (what the SVR stage fits on), or with ``logits`` the classifier's [B, C]."""
        x = self.backbone.forward_features(image)
        return self.backbone.forward_head(x, pre_logits=not self.logits)

    def embed_both(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled pre-logit features, the classifier's outputs) from one ``forward_features``: what ``embed`` gives
        without and with ``logits`` (a backbone built with its classifier)."""
        x = self.backbone.forward_features(image)
        return self.backbone.forward_head(x, pre_logits=True), self.backbone.forward_head(x, pre_logits=False)

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


HUB_HOST = ("huggingface.co", 443)
LOCAL_FILE_HINT = (
    "set model.pretrained to a local .safetensors / .pth file instead: where there is internet, "
    "python -c \"import timm, safetensors.torch as st; m = timm.create_model('{name}', pretrained=True);"
    " st.save_file(m.state_dict(), '{name}.safetensors')\" (see configs/swin_large.yaml)"
)


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket

    try:
        socket.create_connection(HUB_HOST, timeout=timeout).close()
        return True
    except OSError:
        return False


def import_timm():
    """timm, imported without the Weights & Biases client that it loads whenever that is installed (timm's
    ``utils/summary.py``; 0.5-0.7 s of every command that builds a model, where the test requirements install it).
    ``logs/tracking.py`` imports W&B itself when a config asks for it, before or after this."""
    if "timm" not in sys.modules and "wandb" not in sys.modules:
        sys.modules["wandb"] = None  # `import wandb` raises ImportError, which timm's import expects and skips
        try:
            import timm
        finally:
            del sys.modules["wandb"]
    import timm

    return timm


def _create_from_hub(model_cfg: ModelConfig, kwargs: dict) -> nn.Module:
    """timm's download, failing in seconds offline (the hub's own retries take a minute) with the local-file hint.

    Offline, only weights already in the Hugging Face cache can load (hub's offline mode is switched on).
    """
    timm = import_timm()

    online = _hub_reachable()
    if not online:
        os.environ["HF_HUB_OFFLINE"] = "1"
        with contextlib.suppress(ImportError, AttributeError):
            import huggingface_hub.constants as hub_constants

            hub_constants.HF_HUB_OFFLINE = True
    try:
        return timm.create_model(model_cfg.name, pretrained=True, **_classes(model_cfg), **kwargs)
    except (OSError, RuntimeError, ValueError) as e:
        if "Unknown model" in str(e):
            raise ConfigError(f"model.name: {e}") from None
        why = "no internet (huggingface.co unreachable) and not in the local cache" if not online else str(e)[:300]
        raise PretrainedWeightsError(
            f"model.pretrained: hub: cannot get {model_cfg.name}'s weights ({why}); "
            + LOCAL_FILE_HINT.format(name=model_cfg.name)
        ) from None


def _classes(model_cfg: ModelConfig) -> dict:
    """No classifier (pooled features), or with output: logits the model's own (its weight file's)."""
    return {} if model_cfg.output == "logits" else {"num_classes": 0}


def _create_backbone(model_cfg: ModelConfig, hub: bool) -> nn.Module:
    timm = import_timm()

    kwargs = dict(model_cfg.kwargs)
    if model_cfg.output != "logits":  # pooled features whatever classifier kwargs ask for (a YAML anchor shared)
        kwargs.pop("num_classes", None)
    # Transformers are built for their input size (position tables); CNNs take any size and have no img_size.
    sized = _img_size(model_cfg) is not None and "img_size" not in kwargs

    def create(kw: dict) -> nn.Module:
        if hub:
            return _create_from_hub(model_cfg, kw)
        return timm.create_model(model_cfg.name, pretrained=False, **_classes(model_cfg), **kw)

    try:
        try:
            return create({**kwargs, "img_size": model_cfg.img_size} if sized else kwargs)
        except TypeError as e:
            if not (sized and "img_size" in str(e)):
                raise
            return create(kwargs)
    except ConfigError:
        raise
    except Exception as e:
        raise _blame(model_cfg, e) from None


def _blame(model_cfg: ModelConfig, e: Exception) -> Exception:
    """What to raise when timm could not build the model: model.name for an unknown one; model.kwargs when the
    same model builds without them (checked on the meta device: no memory); otherwise the error itself (a bug)."""
    timm = import_timm()

    if "Unknown model" in str(e):
        return ConfigError(f"model.name: {e}", ("model.name",))
    if not model_cfg.kwargs:
        return e
    try:
        with torch.device("meta"):
            timm.create_model(model_cfg.name, pretrained=False, num_classes=0)
    except Exception:  # noqa: BLE001 - it fails without the kwargs too: not theirs to blame
        return e
    return ConfigError(
        f"model.kwargs {model_cfg.kwargs}: timm.create_model({model_cfg.name!r}) rejects them "
        f"({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''})",
        ("model.kwargs",),
    )


def check_buildable(model_cfg: ModelConfig) -> None:
    """Fail now, not minutes into a stage, on model settings timm rejects (built on the meta device: no memory,
    no weights) or a model.pretrained that is no weight file or does not fit (loaded once on the CPU). Models
    that cannot be built on the meta device are left to the real build, which names the same causes."""
    try:
        with torch.device("meta"):
            _create_backbone(model_cfg, hub=False)
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - not buildable on the meta device; the real build reports what is wrong
        pass
    if model_cfg.pretrained not in ("none", "hub"):  # the real load: weights that do not fit refuse here
        load_backbone_weights(_create_backbone(model_cfg, hub=False), model_cfg.pretrained)


def _check_weight_file(path: Path) -> None:
    """``path`` exists and starts like a weight file (safetensors, a torch zip or a pickle), else
    PretrainedWeightsError naming model.pretrained and the file."""
    if why := not_a_file(path):
        where = "" if path.is_absolute() else f" (looked for at {os.path.abspath(path)})"  # from the working dir
        shown = f"not found: {path}{where}" if why == "not found" else f"{path} {why}"
        raise PretrainedWeightsError(
            f"model.pretrained: weight file {shown} (use none, hub, or a path to .safetensors / .pth / .bin)"
        )
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise PretrainedWeightsError(f"model.pretrained: cannot read {path} ({e.strerror or e})") from None
    size = path.stat().st_size
    safetensors = len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < size
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80") or safetensors):
        raise PretrainedWeightsError(
            f"model.pretrained: {path} is not a weight file: neither safetensors nor a torch "
            f".pth / .bin (it starts with {head[:12]!r}); give the weight file itself"
        )


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
    return PawModel(backbone, model_cfg.drop_rate, model_cfg.use_meta, logits=model_cfg.output == "logits")


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
    _check_weight_file(path)
    try:
        state = load_state_dict(str(path), use_ema=True, weights_only=True)
    except Exception as e:  # corrupt file, pickle with unsafe globals, ...
        raise PretrainedWeightsError(f"model.pretrained: cannot read {path}: {e}") from None
    if any(k.startswith("backbone.") for k in state):  # a PawModel checkpoint (our best.pt)
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    filter_fn = getattr(sys.modules.get(type(backbone).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, backbone)
        except Exception as e:
            raise PretrainedWeightsError(
                f"model.pretrained: {path} does not fit {type(backbone).__name__} "
                f"(timm's checkpoint filter failed: {e!r})"
            ) from None
    expected = backbone.state_dict()
    heads = _classifier_prefixes(backbone)
    ignored = _non_persistent_buffers(backbone)
    state = {k: v for k, v in state.items() if (k in expected or not k.startswith(heads)) and k not in ignored}
    # As torch's own strict load: BatchNorm fills a missing num_batches_tracked (converted ResNet/EfficientNet files)
    missing = sorted(k for k in set(expected) - set(state) if not k.endswith(".num_batches_tracked"))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    )
    if missing or unexpected or shapes:

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:12]) + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")

        parts = [
            f"{len(missing)} missing key(s): {show(missing)}" if missing else "",
            f"{len(unexpected)} unexpected key(s): {show(unexpected)}" if unexpected else "",
            f"{len(shapes)} shape mismatch(es) (file vs model): {show(shapes)}" if shapes else "",
        ]
        hint = "; output: logits needs the file's own classifier" if any(k.startswith(heads) for k in missing) else ""
        raise PretrainedWeightsError(
            f"model.pretrained: {path} does not fit {type(backbone).__name__} "
            f"({sum(v.numel() for v in expected.values())} values): " + "; ".join(p for p in parts if p) + hint
        )
    for k in set(expected) - set(state):  # only num_batches_tracked is left: start it at 0, as torch does
        state[k] = torch.zeros_like(expected[k])
    backbone.load_state_dict(state, strict=True)
    log.info("loaded pretrained weights from %s (%d tensors)", path, len(state))


def _non_persistent_buffers(module: nn.Module) -> set[str]:
    """State-dict names of buffers a module keeps out of its state dict (e.g. Swin's relative_position_index,
    which older checkpoints still carry): a file holding them is not wrong."""
    return {name for name, _ in module.named_buffers()} - set(module.state_dict())


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
    square = {"square": model_cfg.square} if model_cfg.square != "squash" else {}  # absent: squash, as before
    return {"input_size": input_size, "mean": tuple(resolved["mean"]), "std": tuple(resolved["std"]), **square}


def read_checkpoint(path: str | Path) -> tuple[dict, ModelConfig, dict]:
    """A saved model file (``best.pt``, a compressed embedder): its dict, ModelConfig and data config."""
    from ..store.files import ArtifactError, MissingArtifact

    path = Path(path)
    if not path.is_file():
        raise MissingArtifact(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign file: name it instead of a zip-reader traceback
        raise ArtifactError(f"{path}: cannot be read as a checkpoint ({type(e).__name__}: {e})") from None
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
# Frozen backbones (embed.source: pretrained, embed.backbones)


def build_frozen(model_cfg: ModelConfig) -> PawModel:
    """A frozen backbone's PawModel with its weights: from its file / the hub, or the seeded random init."""
    if model_cfg.pretrained != "none":
        return build_model(model_cfg, pretrained=True)
    log.warning(
        "backbone %s has random weights (pretrained: none): fine for tests, useless for a score", model_cfg.name
    )
    with torch.random.fork_rng(devices=[]):  # leaves the caller's RNG stream as it was
        torch.manual_seed(RANDOM_INIT_SEED)
        return build_model(model_cfg, pretrained=True)
