"""The embedding sets' part of checking a config on load (``config_checks.validate`` calls it): ``svr.features``
names each set once and only sets the config makes; a logits set keeps its classifier."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..store.errors import ConfigError

if TYPE_CHECKING:
    from .schema import Config


def check_features(cfg: Config) -> None:
    """Each name of ``svr.features`` once, and each a set this config makes: ``model`` (the fine-tuned folds) or
    an ``embed.backbones`` name; checked on load, so a stage that would fail on it changes nothing."""
    features = list(cfg.svr.features)
    if twice := sorted({n for n in features if features.count(n) > 1}):
        raise ConfigError(
            f"svr.features={features!r}: {', '.join(twice)} listed twice: each set's columns would be fitted "
            "twice; list each once",
            ("svr.features",),
        )
    made = ["model"] + [b.get("name") for b in cfg.embed.backbones if isinstance(b, dict)]
    if unknown := [n for n in features if n not in made]:
        raise ConfigError(
            f"svr.features: {', '.join(map(repr, unknown))} is no embedding set of this config: the sets are "
            f"'model' (the fine-tuned folds) and the embed.backbones names ({', '.join(map(str, made[1:])) or 'none'})",
            ("svr.features",),
        )


def check_logits(cfg: Config) -> None:
    """``output: logits`` reads a classifier: ``kwargs`` must not remove it (``num_classes: 0``)."""
    models = [("model", cfg.model.output, cfg.model.kwargs)] + [
        (f"embed.backbones[{i}] ({b.get('name')})", b.get("output"), b.get("kwargs"))
        for i, b in enumerate(cfg.embed.backbones)
        if isinstance(b, dict)
    ]
    for where, output, kwargs in models:
        if output == "logits" and isinstance(kwargs, dict) and kwargs.get("num_classes", 1) in (0, None):
            raise ConfigError(
                f"{where}: output: logits with kwargs num_classes: {kwargs['num_classes']}: that model has no "
                "classifier, so its 'logits' would be pooled features; drop num_classes (the weight file's own "
                "classifier) or use output: pooled",
                ("model.kwargs",) if where == "model" else ("embed.backbones",),
            )
