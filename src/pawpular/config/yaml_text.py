"""Reading YAML as plain values, strictly: a key given twice is an error, text and alias expansion are bounded
(a config is a few KB; an alias bomb is a few lines that expand to 10**9 values)."""

from __future__ import annotations

import typing
from typing import Any

import yaml

from ..store.errors import ConfigError


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error (PyYAML keeps the last silently: a
    second ``train:`` would replace the whole first section)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges; explicit keys override it
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, typing.Hashable) and key in seen:
                raise ConfigError(
                    f"line {line}: duplicate key '{key}' (first on line {seen[key]}): the second would "
                    "silently replace the first; keep one",
                    (str(key),),
                )
            seen[key] = line
        return super().construct_mapping(node, deep)


MAX_YAML_CHARS = 1 << 20  # a config is a few KB: a bound on what it may cost to read


MAX_YAML_VALUES = 100_000  # values after aliases are expanded ("billion laughs": a few lines, 10**9 values)


def parse_yaml(text: str) -> Any:
    """YAML text as values (safe: no objects), refusing duplicate keys (ConfigError naming the key and line), text
    over ``MAX_YAML_CHARS`` and aliases that expand to over ``MAX_YAML_VALUES`` values or refer to themselves."""
    if len(text) > MAX_YAML_CHARS:
        raise ConfigError(f"{len(text)} characters, over the {MAX_YAML_CHARS} a config may have")
    data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    _expanded_size(data, {})
    return data


def _expanded_size(value: Any, sizes: dict[int, int | None]) -> int:
    """How many values ``value`` holds with its aliases expanded (each shared node counted once per use, computed
    once); ConfigError over MAX_YAML_VALUES or for a node inside itself."""
    if not isinstance(value, (dict, list)):
        return 1
    if id(value) in sizes:
        if sizes[id(value)] is None:
            raise ConfigError("an alias refers to a node that holds it (a loop): write the values out")
        return sizes[id(value)]
    sizes[id(value)] = None
    items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
    size = 1 + sum(_expanded_size(v, sizes) for v in items)
    if size > MAX_YAML_VALUES:
        raise ConfigError(
            f"its aliases expand to over {MAX_YAML_VALUES} values (a YAML alias bomb?): write the values out"
        )
    sizes[id(value)] = size
    return size
