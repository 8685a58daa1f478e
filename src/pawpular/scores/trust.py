"""Whether a blend's nested score can be trusted: the choices it was not protected from, named.

    why = trust.optimistic_because(cfg)   # None, or what makes every score of the blend optimistic

A nested score redoes the SVR's C and the blend's weights without the fold scored. It cannot redo two choices made
upstream on all rows, so a blend that holds either is labelled optimistic and never called the one to trust:

- a fine-tuned checkpoint chosen on its fold's own validation rows (``train/shipped.json`` says
  ``train.checkpoint: best``, or is missing: trained by a version that always shipped the own best epoch);
- an SVR head whose ``svr.features`` are a set ``pawpular select`` chose on all rows (this experiment's
  ``select/selection.json``, a start of it, or the source a ``select --as`` branch records in
  ``select/selected_from.json``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config.yaml_text import parse_yaml
from ..store import artifacts
from ..store.files import read_json


def _features(cfg: Any, prefix: str, folder: Path) -> list[str] | None:
    """The svr.features of a blended experiment: this config's, or the one saved in the other folder."""
    if not prefix:
        return list(cfg.svr.features)
    path = artifacts.config_yaml(folder)
    data = parse_yaml(path.read_text()) if path.is_file() else None
    svr = data.get("svr") if isinstance(data, dict) else None
    return list(svr["features"]) if isinstance(svr, dict) and isinstance(svr.get("features"), list) else None


def _selected_sets(folder: Path) -> list[frozenset]:
    """Every feature set select chose on all rows for ``folder``: its selection.json's choice and starts, and the
    choice of a ``select --as`` source (selected_from.json)."""
    sets = []
    for path in (artifacts.selection_json(folder), artifacts.selected_from(folder)):
        data = read_json(path) if path.is_file() else {}
        sets += [frozenset(data["chosen"])] if isinstance(data.get("chosen"), list) else []
        sets += [frozenset(s["features"]) for s in data.get("starts") or [] if isinstance(s.get("features"), list)]
    return sets


def optimistic_because(cfg: Any, members: list[tuple[str, Path]], heads: dict[str, list[str]]) -> str | None:
    """Why no score of the blend can be trusted, or None. ``members``: (prefix, folder) of the blended experiments
    (this one first); ``heads``: the heads blended from each folder (by prefix)."""
    why = []
    selected = [s for _, folder in members for s in _selected_sets(folder)]
    for prefix, folder in members:
        used = heads.get(prefix, [])
        finetuned_svr = "svr" in used and (
            bool(prefix) or ("model" in cfg.svr.features and cfg.embed.source == "finetuned")
        )
        if ("nn" in used or finetuned_svr) and artifacts.preds(folder, "nn", "oof").is_file():
            path = artifacts.shipped_json(folder)
            shipped = read_json(path) if path.is_file() else {}
            if not shipped.get("trusted", False):
                how = "train.checkpoint: best" if shipped else "trained by an older version"
                why.append(f"{folder.name} ships each fold's own best epoch ({how})")
        features = _features(cfg, prefix, folder) if "svr" in used else None
        if features is not None and frozenset(features) in selected:
            why.append(f"{folder.name}'s svr.features {features} were chosen by pawpular select on all rows")
    return "; ".join(why) or None
