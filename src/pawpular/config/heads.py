"""The SVR heads of one experiment: ``svr`` (the ``svr:`` block) and the named heads of ``svr.heads``.

    svr:
      features: [model]                               # the head named svr, as in every config
      heads:                                          # more SVR heads, each the svr block with these keys replaced
        - {name: svr_logits, features: [lite0l, lite1l]}
    ensemble:
      heads: [nn, svr, svr_logits]                    # every head blended by name

Each head is the same code (``stages/svr.py`` runs it once per head, with the head's settings as ``cfg.svr``):
its own Optuna study, its files in its own folder (``svr/`` for ``svr``, ``svr/<name>/`` for the others), its
predictions blended, exported and predicted under its name. A head may replace any key of the svr block
(features, use_meta, target_clip, the C, epsilon and width settings, n_trials, seed, ...) except where the trials
run (storage, workers, kernel_cache, max_kernel_gb: the block's for every head) and heads itself.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..store.errors import ConfigError
from .checks import build, validate

FIRST = "svr"  # the svr block's own head
SHARED = ("heads", "storage", "workers", "kernel_cache", "max_kernel_gb")  # the block's, for every head
RESERVED = ("nn", "svr", "ensemble", "model")


def _check_name(name: Any, i: int, seen: set) -> str:
    from ..store.artifacts import is_name_part

    key = f"svr.heads[{i}].name"
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{key}: every extra SVR head needs a name (e.g. name: svr_logits)", ("svr.heads",))
    if not is_name_part(name) or name.startswith("fold") or name in RESERVED or name in seen:
        why = (
            "is used twice"
            if name in seen
            else f"is reserved ({', '.join(RESERVED)}, fold...)"
            if name in RESERVED or name.startswith("fold")
            else "is not a plain name (it names the folder svr/<name>/: no separator, '..' or spaces)"
        )
        raise ConfigError(f"{key}: {name!r} {why}; choose another name", ("svr.heads",))
    return name


def heads(cfg: Any) -> dict[str, Any]:
    """{head name: its SvrConfig (``heads`` emptied)}: ``svr`` first, then ``svr.heads`` in order; ConfigError
    naming the item for a bad name, an unknown key or a key the heads share."""
    base = dataclasses.replace(cfg.svr, heads=[])
    found, seen = {FIRST: base}, set()
    for i, item in enumerate(cfg.svr.heads):
        if not isinstance(item, dict):
            raise ConfigError(
                f"svr.heads[{i}]: expected a mapping such as {{name: svr_logits, features: [...]}}, got {item!r}",
                ("svr.heads",),
            )
        name = _check_name(item.get("name"), i, seen)
        seen.add(name)
        settings = {k: v for k, v in item.items() if k != "name"}
        if shared := [k for k in settings if k in SHARED]:
            raise ConfigError(
                f"svr.heads[{i}] ({name}): {shared[0]} is the svr block's for every head; set it there",
                ("svr.heads",),
            )
        merged = {**dataclasses.asdict(base), **settings}
        found[name] = build(type(cfg.svr), merged, f"svr.heads[{i}].")
        if not found[name].features:
            raise ConfigError(f"svr.heads[{i}] ({name}): features is empty", ("svr.heads",))
        try:
            validate(with_head(cfg, dataclasses.replace(found[name], heads=cfg.svr.heads)))
        except ConfigError as e:
            raise ConfigError(f"svr.heads[{i}] ({name}): {e}", ("svr.heads",)) from None
    return found


def names(cfg: Any) -> list[str]:
    """Every SVR head's name: ``svr``, then ``svr.heads``' (as declared; checked by ``heads``)."""
    return [FIRST, *(h.get("name") for h in cfg.svr.heads if isinstance(h, dict))]


def all_features(cfg: Any) -> list[str]:
    """The embedding sets any SVR head reads, in first-use order."""
    return list(dict.fromkeys(s for h in heads(cfg).values() for s in h.features))


def with_head(cfg: Any, settings: Any) -> Any:
    """The config with ``settings`` (one head's SvrConfig) as its svr block: what the SVR code reads."""
    return dataclasses.replace(cfg, svr=settings)
