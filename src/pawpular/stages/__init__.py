"""The pipeline's stages, in order: folds -> train -> embed -> svr -> ensemble (and select, on demand).

Each stage is a module here with the same small interface; the runner (``runner.py``) does what every stage
needs before and after (lock, device, data check, upstream checks, manifest verdict / skip, timing), so a stage's
``run`` reads as inputs -> compute -> outputs:

    SUMMARY                          one line for `pawpular --help`
    HELP                             what it reads, writes, needs first, and its main config keys (its docstring)
    IMAGES                           True when it decodes photos (the data contract is checked first)
    plan(ctx) -> Plan                the config and input digests that decide its outputs (the cache key)
    run(ctx) -> Result               the work; returns the files it wrote

The graph between them is here, in one place, and imports no stage module (``status``, ``runs`` and the CLI ask
it without loading torch): ``needs(name, cfg)`` says which stages a stage reads, ``needed(cfg)`` which stages the
config's outputs need at all (a frozen recipe needs no ``train``).

and, where a stage needs them: DISTRIBUTED (every torchrun rank takes part: train, embed), check(ctx) (fail before
anything changes: svr's storage), partial(ctx) (how much of an unfinished stage is done: train's folds),
remove_leftovers(ctx) (files no manifest lists: train's stray last.pt).
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from ..store import artifacts
from ..store.artifacts import PIPELINE

ON_DEMAND = ("select",)
__all__ = ["PIPELINE", "ON_DEMAND", "Plan", "Result", "describe", "get", "needs", "needed"]


@dataclass
class Plan:
    """What decides a stage's outputs: config sections and input digests (None: an input is missing)."""

    config: dict
    inputs: dict[str, str | None]
    # More reasons the recorded work no longer serves, beyond settings and inputs (svr.n_trials raised):
    # record -> reasons; any reason makes the stage stale.
    stale_if: Callable[[Any], list[str]] | None = None


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
    summary = next(
        node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "SUMMARY" for t in node.targets)
    )
    return summary, ast.get_docstring(tree, clean=False) or ""


def wants_fold_embeddings(cfg: Any) -> bool:
    """Whether the folds' own embeddings (emb/fold{k}, the SVR's set "model") are wanted: the features of an SVR
    head (svr.features, svr.heads) list it."""
    from ..config.heads import all_features

    return artifacts.MODEL_SET in all_features(cfg)


def needs(name: str, cfg: Any) -> list[str]:
    """The stages whose outputs stage ``name`` reads (each must be done before it runs).

    embed reads train only for the fine-tuned folds' own embeddings (svr.features lists "model" and
    embed.source is finetuned); the ensemble reads the stages of its heads (ensemble.heads) that have run, so
    ``pawpular ensemble`` after train alone blends the NN head and says the SVR's is missing.
    """
    if name == "folds":
        return []
    if name == "embed":
        finetuned = cfg.embed.source == "finetuned" and wants_fold_embeddings(cfg)
        return ["folds", "train"] if finetuned else ["folds"]
    if name == "svr":
        return ["folds", "embed"]
    if name == "ensemble":
        stages = dict.fromkeys(
            artifacts.head_stage(h)
            for h in cfg.ensemble.heads
            if artifacts.manifest(cfg.out, artifacts.head_stage(h)).is_file()
            or artifacts.preds(cfg.out, h, "oof").is_file()
        )
        return ["folds", *(s for s in PIPELINE if s in stages)]
    return ["folds"]  # train, select


def needed(cfg: Any) -> list[str]:
    """The pipeline stages the config's outputs need, in order: the ensemble, the stages of its heads
    (``ensemble.heads``), and everything those read. ``pawpular all`` runs only these."""
    todo = ["ensemble", *(artifacts.head_stage(h) for h in cfg.ensemble.heads)]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += [u for u in needs(name, cfg) if u != "ensemble"]
    return [s for s in PIPELINE if s in seen]
