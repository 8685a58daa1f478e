"""The SVR head's features: embedding tables side by side (+ the 12 flags), and how each set weighs in the RBF
distance (``svr.set_weighting``).

An embedding table is ``Id`` + ``e0..e{D-1}`` (float32), one row per image; the SVR's input is the listed sets'
tables joined on Id, side by side (``<set>/e<j>`` columns), plus the 12 metadata flags with ``svr.use_meta``: the
same code for the SVR stage, ``select`` and ``predict``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..data.tables import ID, META_COLS
from ..machine import backend
from ..store.errors import ArtifactError

Array = Any  # numpy.ndarray on CPU, cupy.ndarray on a RAPIDS GPU


def embedding_table(ids: Sequence[str], emb: np.ndarray) -> pd.DataFrame:
    """The on-disk layout of embeddings: ``Id`` + ``e0..e{D-1}``."""
    cols = {f"e{j}": emb[:, j] for j in range(emb.shape[1])}
    return pd.DataFrame({ID: list(ids), **cols})


def assemble_matrix(
    sets: dict[str, Any], ids: Sequence[str], names: Sequence[str], meta: np.ndarray | None = None, xp: Any = np
) -> tuple[Array, list[str]]:
    """Rows ``ids`` of the embedding tables ``sets[name]`` side by side (+ ``meta``), with their column names."""
    blocks, columns = [], []
    for name in names:
        table = sets[name]
        have = pd.Index(backend.column_values(table, ID).astype(str))
        if not have.is_unique:
            raise ArtifactError(f"embedding set {name!r} has duplicated Ids, e.g. {have[have.duplicated()][0]!r}")
        pos = have.get_indexer(pd.Index(ids))
        if (pos < 0).any():
            missing = [ids[i] for i in np.flatnonzero(pos < 0)[:3]]
            raise ArtifactError(
                f"embedding set {name!r} lacks {int((pos < 0).sum())} Ids, e.g. {missing}: rerun `pawpular embed`"
            )
        cols = [c for c in table.columns if c != ID]
        blocks.append(backend.table_matrix(table, cols)[xp.asarray(pos)])
        columns += [f"{name}/{c}" for c in cols]
    if meta is not None:
        blocks.append(xp.asarray(meta, dtype=np.float32))
        columns += list(META_COLS)
    return xp.concatenate(blocks, axis=1), columns


def assemble_features(
    sets: dict[str, pd.DataFrame], table: pd.DataFrame, names: Sequence[str], use_meta: bool
) -> pd.DataFrame:
    """The SVR's input for the rows of ``table`` (Id + flags) as a named table: what ``SvrHead.predict`` takes."""
    ids = table[ID].astype(str).tolist()
    meta = table[META_COLS].to_numpy(np.float32) if use_meta else None
    x, columns = assemble_matrix(sets, ids, names, meta)
    return pd.DataFrame(x, columns=columns, index=table.index)


WEIGHTINGS = ("columns", "sets")


def set_weights(columns: Sequence[str], weighting: str) -> np.ndarray | None:
    """Per-column weights for ``svr.set_weighting``: 'columns' (None: every z-scored column weighs the same, so a set
    weighs in the RBF distance in proportion to its width) or 'sets' (each set - an embedding set's ``<set>/e<j>``
    columns, the 12 flags as one more - weighs the same: its columns are scaled by 1/sqrt(its width))."""
    if weighting == "columns":
        return None
    if weighting != "sets":
        raise ValueError(f"svr.set_weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    group = [c.split("/", 1)[0] if "/" in c else "meta flags" for c in columns]
    size = pd.Series(group).value_counts()
    return 1.0 / np.sqrt(np.array([size[g] for g in group], np.float64))
