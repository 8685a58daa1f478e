"""The SVR stage's final fits of one head: each fold's SVR with the chosen parameters, saved as arrays, and the
head's OOF, test and holdout predictions computed from those arrays as predict computes them.

Writes  <head folder>/fold{k}/head.safetensors, <head folder>/{oof,test,holdout}.parquet (``artifacts.head_dir``:
        svr/ for the svr block's head, svr/<name>/ for a head of svr.heads)
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..data.splits import HOLDOUT
from ..data.tables import ID, META_COLS
from ..machine import backend
from ..store import artifacts
from ..store.files import write_bytes
from . import head as svr_head
from .embedding_sets import read_sets


def final_fits(
    ctx, folds: list, folds_df: pd.DataFrame, columns: list[str], params: dict, mode: str, head_name: str = "svr"
) -> tuple[dict[str, tuple[pd.Series, np.ndarray]], str]:
    """Each fold's SVR with the best params, saved as arrays (head.safetensors); OOF, test and holdout
    predictions computed from those arrays, as predict computes them."""
    cfg, comp, device = ctx.cfg, ctx.comp, ctx.device
    xp = backend.array_module(device)
    held = folds_df["fold"].to_numpy() == HOLDOUT
    tables = {"test": comp.test, **({"holdout": comp.train[held]} if held.any() else {})}
    n = len(comp.train)
    oof, fold_of, other = np.full(n, np.nan), np.full(n, HOLDOUT, dtype=np.int64), {s: [] for s in tables}
    frozen: dict = {}
    for f in folds:
        head, model = svr_head.fit_head(f, params, columns, mode, device)
        write_bytes(artifacts.svr_head(cfg.out, f.fold, head_name), head.to_bytes())
        oof[f.val_rows] = np.clip(head.decision(backend.to_numpy(f.x_val)), 1, 100)
        fold_of[f.val_rows] = f.fold
        for split, table in tables.items():
            sets = read_sets(cfg.out, cfg.svr.features, "test" if split == "test" else "train", f.fold, device, frozen)
            meta = table[META_COLS].to_numpy(np.float32) if cfg.svr.use_meta else None
            x, _ = svr_head.assemble_matrix(sets, table[ID].astype(str).tolist(), cfg.svr.features, meta, xp)
            other[split].append(head.predict_matrix(x))
    keep = ~held
    preds = {"oof": (comp.train[ID][keep].astype(str), oof[keep], fold_of[keep])}
    for split, table in tables.items():
        preds[split] = (table[ID].astype(str), np.mean(other[split], axis=0), None)
    return preds, f"{type(model).__module__}.{type(model).__name__}"


def write_predictions(ctx, folds_df: pd.DataFrame, preds: dict, head: str = "svr") -> list:
    paths = []
    for split, (ids, values, fold) in preds.items():
        table = pd.DataFrame({ID: ids.to_numpy(), **({"fold": fold} if fold is not None else {}), "pred": values})
        path = artifacts.preds(ctx.out, head, split)
        backend.write_table(table, path, ctx.device)
        paths.append(path)
    return paths
