"""An experiment's embedding tables read for the SVR head: the one loader of the SVR stage and ``select``.

    frozen = {}
    sets = read_sets(out, ["model", "convnext"], "train", fold, device, frozen)   # {name: table}
    x, columns = svr_head.assemble_matrix(sets, ids, names, meta)

"model" (the fine-tuned network) has a table per fold; a frozen backbone's is the same for every fold, so it is
read once per split and kept in ``frozen``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..machine import backend
from ..store import artifacts
from ..store.errors import MissingArtifact


def read_sets(out: Path, names: Sequence[str], split: str, fold: int, device: str, frozen: dict) -> dict[str, Any]:
    """The tables of the sets ``names`` for ``fold`` and ``split`` ("train" or "test"), read with ``device``'s
    table library; a MissingArtifact names the first file not there."""
    sets = {}
    for name in names:
        key = (name, split) if name != artifacts.MODEL_SET else None  # "model" differs per fold: never kept
        if key in frozen:
            sets[name] = frozen[key]
            continue
        path = artifacts.set_file(out, name, split, fold)
        if not path.is_file():
            raise MissingArtifact(f"{path} not found: run `pawpular embed` first (the sets asked for: {list(names)})")
        sets[name] = backend.read_table(path, device)
        if key is not None:
            frozen[key] = sets[name]
    return sets
