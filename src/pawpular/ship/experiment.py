"""One exported experiment's test predictions, as the pipeline made them (``predictor`` checks the export first).

Each blended head's test predictions are recomputed as the pipeline computed them: the same transforms, TTA,
compression and, per model, the inference policy its own manifest recorded (``inference.Policy``), through the
same ``inference.run_backbone``. One backbone pass per fold feeds both the NN head and the SVR's embeddings when
the two agree; models with weight 0 are skipped.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from ..config.checks import compress_spec
from ..config.schema import Config, load_config
from ..data.dataset import eval_dataset
from ..model.compress import compress_model
from ..model.inference import Policy, model_device, run_backbone
from ..store import artifacts
from ..svr.head import SvrHead, assemble_features, embedding_table
from .model_file import load_model_file


class Experiment:
    """One exported experiment's inference: its settings, models and their policies, on one device."""

    def __init__(self, folder: Path, info: dict, device: str):
        self.folder, self.info, self.device = folder, info, device
        self.cfg: Config = load_config(artifacts.config_yaml(folder))
        self.use_nn, self.sets = info["weights"]["nn"] > 0, info["svr_sets"]
        # {head: {sets, use_meta}} of every shipped SVR head (svr, svr.heads'); an export without it holds svr only
        self.svr_heads = info.get("svr_heads") or (
            {"svr": {"sets": self.sets, "use_meta": self.cfg.svr.use_meta}} if self.sets else {}
        )
        self.finetuned = artifacts.MODEL_SET in self.sets and self.cfg.embed.source == "finetuned"
        self.seconds: dict[str, float] = {}  # per embedding set (a fold's pass for the fine-tuned ones)

    def run(self, test: pd.DataFrame, data: Path) -> dict[str, np.ndarray]:
        """Test predictions of the used heads: {'nn': ..., 'svr': ..., <svr.heads name>: ...}, each the mean over
        folds."""
        frozen = {}
        for name in self.frozen_sets():
            t0 = time.time()
            model, data_cfg = load_model_file(artifacts.exported_model(self.folder, backbone=name))
            frozen[name] = self.embed(model, data_cfg, self.info["embeddings"][name], test, data, name)
            self.seconds[name] = time.time() - t0
        nn_preds, svr_preds = [], {name: [] for name in self.svr_heads}
        for k in self.info["folds"]:
            t0 = time.time()
            nn, emb = self.fold_pass(k, test, data)
            if nn is not None or emb is not None:
                self.seconds[artifacts.fold_name(k)] = time.time() - t0
            if nn is not None:
                nn_preds.append(nn)
            sets = dict(frozen, **({artifacts.MODEL_SET: emb} if emb is not None else {}))
            for name, h in self.svr_heads.items():
                head = SvrHead.load(artifacts.svr_head(self.folder, k, name))
                svr_preds[name].append(head.predict(assemble_features(sets, test, h["sets"], h["use_meta"])))
        out = {"nn": np.mean(nn_preds, axis=0)} if self.use_nn else {}
        return {**out, **{name: np.mean(p, axis=0) for name, p in svr_preds.items()}}

    def frozen_sets(self) -> list[str]:
        """SVR sets computed once for every fold: frozen backbones (and model.* with embed.source: pretrained)."""
        return [s for s in self.sets if s != artifacts.MODEL_SET or not self.finetuned]

    def embed(self, model, data_cfg: dict, entry: dict, test: pd.DataFrame, data: Path, desc: str) -> pd.DataFrame:
        """Embeddings of the test photos as the pipeline made this set: its compression, TTA and policy."""
        device = model_device(entry["compress"], self.device)
        model = compress_model(model.to(device), entry["compress"], device)
        policy = Policy.from_dict(entry["policy"]).usable_on(device)
        ds = eval_dataset(test, data / "test", data_cfg)
        emb = run_backbone(
            model,
            ds,
            device,
            policy,
            batch_size=self.cfg.embed.batch_size,
            num_workers=self.cfg.embed.num_workers,
            emb_tta=entry["tta_hflip"],
            desc=desc,
        ).emb
        return embedding_table(ds.ids, emb)

    def fold_pass(self, k: int, test: pd.DataFrame, data: Path) -> tuple[np.ndarray | None, pd.DataFrame | None]:
        """(NN predictions, the fold backbone's embeddings) of fold k, from one pass when the two agree."""
        if not (self.use_nn or self.finetuned):
            return None, None
        model, data_cfg = load_model_file(artifacts.exported_model(self.folder, k))
        emb_entry = self.info["embeddings"].get(artifacts.fold_name(k)) if self.finetuned else None
        if not self.use_nn:
            return None, self.embed(model, data_cfg, emb_entry, test, data, f"fold {k}")
        nn_entry = self.info["nn"][str(k)]
        policy = Policy.from_dict(nn_entry["policy"]).usable_on(self.device)
        ds = eval_dataset(test, data / "test", data_cfg)
        kw = dict(batch_size=self.cfg.embed.batch_size, num_workers=self.cfg.embed.num_workers, desc=f"fold {k}")
        model = model.to(self.device)
        one_pass = (
            emb_entry is not None
            and compress_spec(emb_entry["compress"])[0] == "none"
            and Policy.from_dict(emb_entry["policy"]).usable_on(self.device) == policy
        )
        if one_pass:
            out = run_backbone(
                model, ds, self.device, policy, pred_tta=nn_entry["tta_hflip"], emb_tta=emb_entry["tta_hflip"], **kw
            )
            return out.pred, embedding_table(ds.ids, out.emb)
        nn = run_backbone(model, ds, self.device, policy, pred_tta=nn_entry["tta_hflip"], **kw).pred
        emb = self.embed(model, data_cfg, emb_entry, test, data, f"fold {k}") if emb_entry is not None else None
        return nn, emb
