"""The pipeline's stages, in order: folds -> train -> embed -> svr -> ensemble (and select, on demand).

Each stage is a module here with the same small interface; the runner (``runner.py``) does what every stage
needs before and after (lock, device, data check, upstream checks, manifest verdict / skip, timing), so a stage's
``run`` reads as inputs -> compute -> outputs:

    SUMMARY                          one line for `pawpular --help`
    HELP                             what it reads, writes, needs first, and its main config keys (its docstring)
    IMAGES                           True when it decodes photos (the data contract is checked first)
    needs(cfg) -> [stage, ...]       upstream stages whose outputs it reads (each must be done first)
    plan(ctx) -> Plan                the config and input digests that decide its outputs (the cache key)
    run(ctx) -> Result               the work; returns the files it wrote

and, where a stage needs them: DISTRIBUTED (every torchrun rank takes part: train, embed), check(ctx) (fail before
anything changes: svr's storage), partial(ctx) (how much of an unfinished stage is done: train's folds),
tidy(ctx) (leftovers no manifest lists: train's stray last.pt).
"""
from __future__ import annotations

import ast
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from ..artifacts import PIPELINE

ON_DEMAND = ("select",)
__all__ = ["PIPELINE", "ON_DEMAND", "Plan", "Result", "describe", "get"]


@dataclass
class Plan:
    """What decides a stage's outputs: config sections and input digests (None: an input is missing)."""

    config: dict
    inputs: dict[str, str | None]
    # Extra reasons the recorded work no longer serves (e.g. svr.n_trials raised): record -> reasons.
    extra: Callable[[Any], list[str]] | None = None


@dataclass
class Result:
    """What a stage's run wrote. ``complete=False``: only part of the work (e.g. train.folds) - no manifest."""

    outputs: list[Path]
    info: dict = field(default_factory=dict)
    complete: bool = True
    cached: bool = False  # nothing needed doing: every unit was already done


def _known(name: str) -> str:
    if name not in (*PIPELINE, *ON_DEMAND):
        raise KeyError(f"no stage {name!r}: stages are {', '.join((*PIPELINE, *ON_DEMAND))}")
    return name


def get(name: str) -> ModuleType:
    """The stage module called ``name``."""
    return importlib.import_module(f"pawpular.stages.{_known(name)}")


def describe(name: str) -> tuple[str, str]:
    """A stage's SUMMARY and HELP, read from its source without importing it: the CLI's parser lists every stage,
    and ``pawpular predict`` (an offline notebook) must not import training code or Optuna to build it."""
    tree = ast.parse((Path(__file__).parent / f"{_known(name)}.py").read_text())
    summary = next(node.value.value for node in tree.body if isinstance(node, ast.Assign)
                   and any(isinstance(t, ast.Name) and t.id == "SUMMARY" for t in node.targets))
    return summary, ast.get_docstring(tree, clean=False) or ""
