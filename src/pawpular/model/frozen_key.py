"""What identifies a frozen backbone's embeddings (its cache key), without torch: the stage computes it to skip
work (and to judge a set current: ``embed.stale_sets``, which select asks), and `pawpular runs` recomputes it to
say whether a frozen set is still its config's (a weight file replaced since). Both read this one definition.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ..config.schema import ModelConfig

RANDOM_INIT_SEED = 0  # `pretrained: none`: the seeded random init that makes test runs reproducible


def pretrained_source(model_cfg: ModelConfig) -> str:
    """What identifies a frozen backbone's weights: the file's bytes, or the hub name / the seeded random init."""
    from ..store.files import file_digest

    p = model_cfg.pretrained
    if p == "none":
        return f"none:seed{RANDOM_INIT_SEED}"
    return p if p == "hub" else file_digest(Path(p)) if Path(p).is_file() else p


def frozen_description(model_cfg: ModelConfig) -> dict:
    """The settings that decide a frozen backbone's embeddings (its cache key), less the head's."""
    desc = {
        k: v
        for k, v in dataclasses.asdict(model_cfg).items()
        if k not in ("finetune", "drop_rate", "use_meta") and (k, v) not in (("output", "pooled"), ("square", "squash"))
    }  # defaults: keys as before they existed
    return {**desc, "weights": pretrained_source(model_cfg)}


def weights_gone(weights: str) -> str | None:
    """A weight file (``pretrained``) that is not there, shown with where a relative path was looked for (the
    working directory); None when it is there or the set has none (``none``, ``hub``)."""
    if weights in ("none", "hub") or Path(weights).is_file():
        return None
    return weights if Path(weights).is_absolute() else f"{weights} (looked for at {os.path.abspath(weights)})"


def stale(model_cfg: ModelConfig, name: str, recorded: str | None) -> str | None:
    """Why the frozen set ``name``, recorded with key ``recorded``, is not what ``model_cfg`` makes now (its
    weight file gone or other bytes, or other settings); None when it is, or when nothing was recorded."""
    from ..store.manifest import key_of

    if recorded is None:
        return None
    if gone := weights_gone(model_cfg.pretrained):
        return f"the weight file of {name} is missing: {gone}"
    if key_of(frozen_description(model_cfg), {}) != recorded:
        return f"frozen backbone {name} changed (its weight file {model_cfg.pretrained} or its settings)"
    return None


def change(config: dict, name: str, recorded: str | None) -> str | None:
    """``stale`` for a config.yaml as read (`pawpular runs`), for a set with a weight file only: a set without one
    (``none``, ``hub``) and an entry that cannot be read are judged by the stage's config alone. Each weight file
    is hashed once per process (``files.file_digest``)."""
    from ..config.checks import build
    from ..config.schema import BackboneConfig, backbone_model_config

    sets = (config.get("embed") or {}).get("backbones") or []
    entry = next((b for b in sets if isinstance(b, dict) and b.get("name") == name), None)
    weights = entry.get("pretrained") if entry else None
    if not isinstance(weights, str) or weights in ("none", "hub"):
        return None
    if gone := weights_gone(weights):
        return f"the weight file of {name} is missing: {gone}"
    try:
        model_cfg = backbone_model_config(build(BackboneConfig, entry))
    except (ValueError, TypeError):
        return None
    return stale(model_cfg, name, recorded)
