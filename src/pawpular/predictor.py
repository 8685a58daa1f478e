"""``pawpular predict``: a submission from an exported folder and a competition's test set, offline.

Reads   ARTIFACTS/ (written by ``pawpular export``: models, heads, settings, inference policies, digests) and
        DATA/test.csv, DATA/sample_submission.csv, DATA/test/ (no training data, no network)
Writes  --out (default submission.csv): Id,Pawpularity in sample order, checked as the grader checks it
Run     pawpular predict --artifacts artifacts/default --data input/petfinder --out submission.csv [--estimate 6800]

Every file it loads is checked against the digest export recorded (a truncated copy is an error naming it).
Each blended head's test predictions are recomputed exactly as the pipeline computed them: the same transforms,
TTA, compression and inference policy (``inference.Policy``), through the same ``inference.run_backbone``. One
backbone pass per fold feeds both the NN head and the SVR's embeddings; models with weight 0 are skipped.
``--estimate N`` times a few test images and prints the run time for N images against Kaggle's 9-hour limit; it
writes no submission.
"""
from __future__ import annotations

import logging
import pickle
import time
from pathlib import Path

import numpy as np
import pandas as pd

from . import artifacts, backend
from .compress import compress_model, load_compressed
from .config import Config, backbone_configs, backbone_model_config, load_config
from .data import ID, read_test_set
from .dataset import eval_dataset
from .features import assemble_features, embedding_table
from .errors import UsageError
from .files import TEMP_MARK, ArtifactError, MissingArtifact, file_digest, read_json
from .inference import Policy, run_backbone
from .lock import experiment_lock
from .models import build_frozen, data_config, load_checkpoint
from .submission import check_output_path, write_submission

log = logging.getLogger("pawpular")
KAGGLE_LIMIT_H = 9.0


def read_manifest(art: Path, verify: bool = True) -> dict:
    """The export's manifest; with ``verify`` every recorded file must have its recorded digest."""
    path = artifacts.export_manifest(art)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {art} a folder written by `pawpular export`?")
    found = read_json(path)
    if found.get("format") != 2:
        raise ArtifactError(f"{path}: written by another version of pawpular (format {found.get('format')}); export again")
    for rel, digest in found["files"].items() if verify else ():
        p = art / rel
        if not p.is_file() or file_digest(p) != digest:
            raise ArtifactError(f"{p}: {'missing' if not p.is_file() else 'damaged (not the file export wrote)'}: "
                                "copy the artifact folder again or export again")
    return found


class Experiment:
    """One exported experiment's inference: its settings, policies and models, on one device."""

    def __init__(self, folder: Path, info: dict, device: str):
        self.folder, self.info, self.device = folder, info, device
        self.cfg: Config = load_config(artifacts.config_yaml(folder))
        self.nn_policy = Policy.from_dict(info["nn_policy"]).usable_on(device)
        self.emb_policy = Policy.from_dict(info["emb_policy"]).usable_on(device)
        self.use_nn, self.sets = info["weights"]["nn"] > 0, info["svr_sets"]

    def run(self, test: pd.DataFrame, data: Path) -> dict[str, np.ndarray]:
        """Test predictions of the used heads: {'nn': ..., 'svr': ...}, each the mean over folds."""
        frozen = {name: self.embed(test, data, *self.frozen_model(name))
                  for name in self.frozen_sets()}
        nn_preds, svr_preds = [], []
        for k in self.info["folds"]:
            nn, emb = self.fold_pass(k, test, data)
            if nn is not None:
                nn_preds.append(nn)
            if self.sets:
                sets = dict(frozen, **({artifacts.MODEL_SET: emb} if emb is not None else {}))
                svr_preds.append(self.svr(k, sets, test))
        out = {"nn": np.mean(nn_preds, axis=0)} if self.use_nn else {}
        return {**out, "svr": np.mean(svr_preds, axis=0)} if self.sets else out

    def frozen_sets(self) -> list[str]:
        """SVR sets computed once for every fold: frozen backbones (and model.* with embed.source: pretrained)."""
        finetuned = self.cfg.embed.source == "finetuned"
        return [s for s in self.sets if s != artifacts.MODEL_SET or not finetuned]

    def frozen_model(self, name: str):
        packed = artifacts.compressed_embedder(self.folder, backbone=name)
        if packed.is_file():
            return load_compressed(packed, self.device)
        if name == artifacts.MODEL_SET:
            mcfg = self.cfg.model
        else:
            mcfg = backbone_model_config(next(b for b in backbone_configs(self.cfg) if b.name == name))
        if mcfg.pretrained not in ("none", "hub"):
            mcfg.pretrained = str(self.folder / mcfg.pretrained)
        model = build_frozen(mcfg).to(self.device).eval()
        return compress_model(model, self.cfg.embed.compress, self.device), data_config(mcfg, model.backbone)

    def embed(self, test: pd.DataFrame, data: Path, model, data_cfg: dict) -> pd.DataFrame:
        ds = eval_dataset(test, data / "test", data_cfg)
        emb = run_backbone(model, ds, self.device, self.emb_policy, batch_size=self.cfg.embed.batch_size,
                           num_workers=self.cfg.embed.num_workers, emb_tta=self.cfg.embed.tta_hflip).emb
        return embedding_table(ds.ids, emb)

    def fold_pass(self, k: int, test: pd.DataFrame, data: Path) -> tuple[np.ndarray | None, pd.DataFrame | None]:
        """(NN predictions, the fold backbone's embeddings) of fold k, from one pass when the two agree."""
        wants_emb = artifacts.MODEL_SET in self.sets and self.cfg.embed.source == "finetuned"
        packed = artifacts.compressed_embedder(self.folder, k)
        one_pass = self.use_nn and wants_emb and not packed.is_file() and self.nn_policy == self.emb_policy
        nn = emb = None
        if self.use_nn or (wants_emb and not packed.is_file()):
            model, data_cfg = load_checkpoint(artifacts.best_checkpoint(self.folder, k), self.device)
            ds = eval_dataset(test, data / "test", data_cfg)
            kw = dict(batch_size=self.cfg.embed.batch_size, num_workers=self.cfg.embed.num_workers, desc=f"fold {k}")
            if one_pass:
                out = run_backbone(model, ds, self.device, self.nn_policy, pred_tta=self.cfg.train.tta_hflip,
                                   emb_tta=self.cfg.embed.tta_hflip, **kw)
                return out.pred, embedding_table(ds.ids, out.emb)
            if self.use_nn:
                nn = run_backbone(model, ds, self.device, self.nn_policy, pred_tta=self.cfg.train.tta_hflip, **kw).pred
            if wants_emb:
                model = compress_model(model, self.cfg.embed.compress, self.device)
                emb = self.embed(test, data, model, data_cfg)
        if wants_emb and packed.is_file():
            emb = self.embed(test, data, *load_compressed(packed, self.device))
        return nn, emb

    def svr(self, k: int, sets: dict[str, pd.DataFrame], test: pd.DataFrame) -> np.ndarray:
        with open(artifacts.svr_model(self.folder, k), "rb") as f:
            head = pickle.load(f)
        return head.predict(assemble_features(sets, test, self.sets, self.cfg.svr.use_meta))


def predict(artifacts_dir: Path, data: Path, out: Path | None = Path("submission.csv"), device: str = "auto",
            estimate: int | None = None) -> Path | None:
    """Write ``out`` (a validated submission.csv); with ``estimate`` only time a few images (returns None)."""
    from .guards import check_predict_out, export_files

    if estimate is not None and estimate < 1:
        raise UsageError(f"--estimate {estimate}: expected the number of test images to estimate for (>= 1)")
    if export_files(Path(artifacts_dir)) is None:
        raise MissingArtifact(f"{artifacts.export_manifest(Path(artifacts_dir))} not found or damaged: is "
                              f"{artifacts_dir} a folder written by `pawpular export`? (export, or copy it, again)")
    if estimate is not None:
        return _predict(Path(artifacts_dir), Path(data), None, device, estimate)
    out = Path(out)
    check_predict_out(out, Path(artifacts_dir), Path(data))  # never onto test.csv, the sample or a model
    check_output_path(out)  # a folder or an unwritable place fails now, not after the whole inference
    with experiment_lock(out.parent, "predict", name=f".{out.name}.lock", sweep=False):
        for stale in out.parent.glob(f".{out.name}{TEMP_MARK}*.tmp"):  # a killed predict's half-written file
            stale.unlink(missing_ok=True)
        return _predict(Path(artifacts_dir), Path(data), out, device, None)


def _predict(art: Path, data: Path, out: Path | None, device: str, estimate: int | None) -> Path | None:
    found = read_manifest(art)
    device = backend.resolve_device(device)
    test, sample = read_test_set(data)
    n_total = len(test)
    if estimate is not None:
        test = test.iloc[: min(len(test), 32)].reset_index(drop=True)
    t0 = time.time()
    columns = {}
    for name, info in found["experiments"].items():
        for head, pred in Experiment(artifacts.export_experiment(art, name), info, device).run(test, data).items():
            columns[f"{info['prefix']}{head}"] = pred
    seconds = time.time() - t0
    if estimate is not None:
        _print_estimate(seconds, len(test), estimate, device)
        return None
    weights = found["weights"]
    blend = sum(weights[m] * columns[m] for m in columns)
    write_submission(pd.DataFrame({ID: test[ID], "pred": blend}), sample, out)
    log.info("predict: %d test images, %s in %.1fs -> %s", n_total,
             ", ".join(f"{m} x {weights[m]:.3f}" for m in columns), seconds, out)
    return Path(out)


def _print_estimate(seconds: float, n: int, estimate: int, device: str) -> None:
    per_image = seconds / max(n, 1)
    hours = per_image * estimate / 3600
    verdict = "within" if hours < KAGGLE_LIMIT_H else "OVER"
    msg = (f"estimate: {per_image * 1000:.1f} ms/image measured on {n} images ({device}); {estimate} images -> "
           f"{hours * 60:.1f} min ({verdict} Kaggle's {KAGGLE_LIMIT_H:g} h limit; model loading counted per measured "
           "batch, so this is an upper bound). No submission written: run without --estimate to write one.")
    log.info(msg)
    print(msg)
