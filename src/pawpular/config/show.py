"""Every setting of a config as rows (key, value, default, type): what `pawpular config show` and `keys` print,
the study's password masked."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from ..store.masking import redact_url
from .schema import Config


def describe(cfg: Config) -> list[tuple[str, Any, Any, str]]:
    """(key, value, default, type) of every setting, sections flattened to ``section.key``."""
    rows: list[tuple[str, Any, Any, str]] = []

    def walk(obj: Any, default: Any, prefix: str) -> None:
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            value, base = getattr(obj, f.name), getattr(default, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, base, f"{prefix}{f.name}.")
            else:
                if f"{prefix}{f.name}" == "svr.storage" and isinstance(value, str):
                    value = redact_url(value, "***")  # shown, never the password
                rows.append((f"{prefix}{f.name}", value, base, _type_name(hints[f.name])))

    walk(cfg, Config(), "")
    return rows


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(map(str, get_args(tp)))
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))
