"""The config's checks: types (with the key named), unknown keys (with "did you mean"), ranges and cross-field
rules, all at load time, so a bad value fails before any work and says which setting is wrong.

``config.load_config`` calls ``build`` (types, unknown keys) and ``validate`` (values), and prefixes the error with
where the value came from: the ``--set`` item, or the config file.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union, get_args, get_origin

from ..store.artifacts import is_name_part
from ..store.errors import ConfigError

if TYPE_CHECKING:
    from .schema import Config


def _finite(value: Any, key: str) -> Any:
    """``value`` unless it is (or holds, in a list or mapping) a NaN or infinite number: ConfigError naming the key."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key '{key}': must be a finite number, got {value!r}", (key.split("[")[0],))
    if isinstance(value, dict):
        for k, v in value.items():
            _finite(v, f"{key}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _finite(v, f"{key}[{i}]")
    return value


def _check(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` converted to ``tp`` (finite, where a number) or raise ConfigError naming ``key``."""
    return _finite(_convert(value, tp, key), key)


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}': expected {_name(tp)}, got {value!r}", (key,))
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"config key '{key}': must be one of {list(get_args(tp))}, got {value!r}", (key,))
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected a boolean, got {value!r}", (key,))
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}", (key,))
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}", (key,))
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}", (key,))
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}", (key,))
    if tp is list or origin is list:
        if isinstance(value, list):
            return value
        raise ConfigError(f"config key '{key}': expected a list, got {value!r}", (key,))
    raise ConfigError(f"config key '{key}': unsupported type {tp}", (key,))


def _name(tp: Any) -> str:
    return " or ".join(getattr(a, "__name__", str(a)) for a in get_args(tp)) or str(tp)


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every setting's dotted key (sections too)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        keys.append(f"{prefix}{f.name}")
        if dataclasses.is_dataclass(hints[f.name]):
            keys += all_keys(hints[f.name], f"{prefix}{f.name}.")
    return keys


def unknown_key_message(key: str, known: list[str]) -> str:
    near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"unknown config key '{key}'" + (
        f" (did you mean '{near[0]}'?)" if near else "; `pawpular config keys` lists them"
    )


def build(cls: type, data: dict, prefix: str = "") -> Any:
    """``cls`` from ``data``, every value type-checked; unknown keys and wrong types name the key."""
    if not isinstance(data, dict):
        section = prefix.rstrip(".") or "<root>"
        raise ConfigError(f"config section '{section}': expected a mapping, got {data!r}", (section,))
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        keys = [f"{prefix}{u}" for u in unknown]
        known = [f"{prefix}{k}" for k in all_keys(cls)]
        more = f" (and {keys[1:]})" if keys[1:] else ""
        raise ConfigError(unknown_key_message(keys[0], known) + more, tuple(keys))
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check(value, tp, f"{prefix}{name}")
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Values: ranges and rules between settings


Rule = tuple[tuple[str, ...], Callable[["Config"], bool], str]


def _positive(key: str) -> Rule:
    return (key,), lambda c: _get(c, key) > 0, "must be > 0"


def _at_least(key: str, low: float) -> Rule:
    return (key,), lambda c: _get(c, key) >= low, f"must be >= {low:g}"


def _get(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


_NAME = (
    "must be a plain name (it becomes a path part: a separator, '..', an absolute path or surrounding spaces "
    "would leave its folder)"
)
RULES: list[Rule] = [
    ((("folds.n_folds",), lambda c: c.folds.n_folds >= 2, "must be >= 2 (a fold needs other folds to train on)")),
    ((("folds.holdout",), lambda c: 0 <= c.folds.holdout < 0.5, "must be in [0, 0.5): a fraction of train.csv")),
    ((("folds.hash_threshold",), lambda c: 0 <= c.folds.hash_threshold <= 64, "must be in 0..64 (bits of the hash)")),
    ((("model.img_size",), lambda c: c.model.img_size is None or c.model.img_size > 0, "must be > 0 or null")),
    ((("model.drop_rate",), lambda c: 0 <= c.model.drop_rate < 1, "must be in [0, 1)")),
    _positive("train.epochs"),
    _positive("train.batch_size"),
    _positive("train.lr"),
    _positive("train.accum_steps"),
    ((("train.head_lr",), lambda c: c.train.head_lr is None or c.train.head_lr > 0, "must be > 0 or null")),
    _at_least("train.weight_decay", 0),
    _at_least("train.warmup_epochs", 0),
    _at_least("train.mixup_alpha", 0),
    _at_least("train.patience", 0),
    (
        (
            ("train.patience", "train.checkpoint"),
            lambda c: c.train.patience == 0 or c.train.checkpoint == "best",
            "early stopping chooses the last epoch on the fold's own validation rows: with train.checkpoint: last "
            "set train.patience: 0 (or train.checkpoint: best, whose scores are all optimistic)",
        )
    ),
    _at_least("train.num_workers", 0),
    _at_least("train.grad_clip", 0),
    (
        (
            ("train.folds", "folds.n_folds"),
            lambda c: (
                c.train.folds is None
                or (
                    all(isinstance(k, int) and not isinstance(k, bool) for k in c.train.folds)
                    and set(c.train.folds) <= set(range(c.folds.n_folds))
                    and len(set(c.train.folds)) == len(c.train.folds)
                )
            ),
            "train.folds must list distinct folds in 0..folds.n_folds-1",
        )
    ),
    _positive("embed.batch_size"),
    _at_least("embed.num_workers", 0),
    (
        (
            ("embed.compress",),
            lambda c: _compress_ok(c.embed.compress),
            "must be none, int8, bf16 or prune:<fraction in (0, 1)>",
        )
    ),
    _positive("svr.n_trials"),
    _positive("svr.c_min"),
    _positive("svr.max_kernel_gb"),
    _at_least("svr.workers", 1),
    _at_least("svr.epsilon", 0),
    _positive("svr.epsilon_min"),
    ((("svr.c_min", "svr.c_max"), lambda c: c.svr.c_min < c.svr.c_max, "svr.c_min must be < svr.c_max")),
    (
        (
            ("svr.epsilon_min", "svr.epsilon_max"),
            lambda c: c.svr.epsilon_min < c.svr.epsilon_max,
            "svr.epsilon_min must be < svr.epsilon_max",
        )
    ),
    (
        (
            ("svr.gamma",),
            lambda c: c.svr.gamma in ("scale", "auto") or (isinstance(c.svr.gamma, float) and c.svr.gamma > 0),
            "must be 'scale', 'auto' or a number > 0",
        )
    ),
    _positive("svr.gamma_min"),
    (
        (
            ("svr.gamma_min", "svr.gamma_max"),
            lambda c: c.svr.gamma_min < c.svr.gamma_max,
            "svr.gamma_min must be < svr.gamma_max (multiples of svr.gamma's width)",
        )
    ),
    (
        (
            ("svr.gamma", "svr.tune_gamma"),
            lambda c: not (c.svr.tune_gamma and isinstance(c.svr.gamma, float)),
            "a fixed svr.gamma (a number) is not tuned: set svr.tune_gamma=false to keep it, or svr.gamma=scale "
            "to tune multiples of 'scale' in [svr.gamma_min, svr.gamma_max]",
        )
    ),
    (
        (
            ("svr.features",),
            lambda c: bool(c.svr.features) and all(isinstance(n, str) and n for n in c.svr.features),
            "must list embedding sets, e.g. [model]",
        )
    ),
    (
        (
            ("svr.target_clip",),
            lambda c: _clip_ok(c.svr.target_clip),
            "must be null or [low, high] with low < high, e.g. [1, 85]",
        )
    ),
    (
        (
            ("model.output", "embed.source"),
            lambda c: c.model.output == "pooled" or c.embed.source == "pretrained",
            "model.output: logits needs embed.source: pretrained (a fine-tuned model has no classifier to read)",
        )
    ),
    _at_least("select.starts", 1),
    (
        (
            ("select.budget_hours", "select.test_images"),
            lambda c: (
                (c.select.budget_hours is None) == (c.select.test_images is None)
                and (c.select.budget_hours is None or (c.select.budget_hours > 0 and c.select.test_images > 0))
            ),
            "select.budget_hours and select.test_images go together, both > 0 "
            "(e.g. --budget-hours 9 --test-images 6800)",
        )
    ),
    ((("experiment",), lambda c: is_name_part(c.experiment), _NAME)),
    ((("svr.features",), lambda c: all(is_name_part(n) for n in c.svr.features), _NAME)),
    (
        (
            ("embed.backbones",),
            lambda c: all(
                is_name_part(b["name"])
                for b in c.embed.backbones
                if isinstance(b, dict) and b.get("name") not in (None, "")
            ),
            _NAME,
        )
    ),
    (
        (
            ("ensemble.experiments",),
            lambda c: all(is_name_part(Path(str(e)).name) for e in c.ensemble.experiments),
            "each must be an experiment folder whose own name is a plain name (the blend and an export name it so); "
            "'..' or '/' would leave its folder",
        )
    ),
    *(
        ((key,), lambda c, key=key: 0 <= _get(c, key) < 2**32, "must be in 0 .. 2**32-1 (a random seed)")
        for key in ("seed", "folds.seed", "svr.seed")
    ),
    _at_least("ensemble.min_improvement", 0),
    (
        (
            ("ensemble.heads",),
            lambda c: bool(c.ensemble.heads) and set(c.ensemble.heads) <= {"nn", "svr", *_extra_heads(c)},
            "must list heads among nn, svr and the names of svr.heads",
        )
    ),
    (
        (
            ("tracking",),
            lambda c: all(b in ("tensorboard", "wandb") for b in c.tracking),
            "must list tracking backends among tensorboard, wandb (e.g. [tensorboard])",
        )
    ),
]


def _clip_ok(clip: Any) -> bool:
    numbers = isinstance(clip, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in clip)
    return clip is None or (numbers and len(clip) == 2 and clip[0] < clip[1])


def compress_spec(spec: str) -> tuple[str, float]:
    """``embed.compress`` read: ('none'|'int8'|'bf16'|'prune', fraction), or ValueError naming the setting.
    Plain string work (the config checks use it; ``model/compress.py`` applies it)."""
    spec = (spec or "none").strip()
    if spec in ("none", "int8", "bf16"):
        return spec, 0.0
    if spec.startswith("prune:"):
        try:
            frac = float(spec.split(":", 1)[1])
        except ValueError:
            frac = -1.0
        if 0.0 < frac < 1.0:
            return "prune", frac
    raise ConfigError(
        f"embed.compress: expected none, int8, bf16 or prune:<fraction in (0, 1)>, got {spec!r}", ("embed.compress",)
    )


def _compress_ok(spec: str) -> bool:
    try:
        compress_spec(spec)
    except ValueError:
        return False
    return True


def _extra_heads(cfg: Config) -> list:
    """The names svr.heads declares (checked in svr_heads.heads)."""
    return [h.get("name") for h in cfg.svr.heads if isinstance(h, dict)]


def validate(cfg: Config) -> None:
    """Every rule of RULES; the first broken one raises ConfigError naming its settings and their values. Then
    the embedding sets: ``svr.features`` names each set once, and only sets the config makes; a logits set has a
    classifier."""
    for keys, ok, message in RULES:
        if not ok(cfg):
            values = ", ".join(f"{k}={_get(cfg, k)!r}" for k in keys)
            raise ConfigError(f"{values}: {message}" if len(keys) == 1 else f"{message} (got {values})", keys)
    from .set_checks import check_features, check_logits

    check_features(cfg)
    check_logits(cfg)
