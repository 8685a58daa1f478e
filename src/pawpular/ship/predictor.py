"""``pawpular predict``: a submission from an exported folder and a competition's test set, offline.

Reads   ARTIFACTS/ (written by ``pawpular export``: model files, SVR heads as arrays, settings, each model's
        inference policy, library versions, digests) and DATA/test.csv, DATA/sample_submission.csv, DATA/test/
        (no training data, no network)
Writes  --out (default submission.csv): Id,Pawpularity in sample order, checked as the grader checks it
Run     pawpular predict --artifacts artifacts/default --data input/petfinder --out submission.csv [--estimate 6800]

What it checks first: every file it loads has the digest export recorded (a truncated copy is an error naming
it); the libraries here against the export's (``versions.check``: differences logged, a missing or too old one
is an error); the blend's weights (every weighted model is in the folder, the weights sum to 1). It loads no
pickle: models and heads are safetensors, the SVR's decision function is computed with numpy (no scikit-learn).

Each blended head's test predictions are recomputed as the pipeline computed them: the same transforms, TTA,
compression and, per model, the inference policy its own manifest recorded (``inference.Policy``), through the
same ``inference.run_backbone``. Per model, the device: an int8 model runs on the CPU (dynamic quantization has
no CUDA kernels), bf16 becomes fp16 on a GPU without native bf16 (one warning), a CPU runs fp32. One backbone
pass per fold feeds both the NN head and the SVR's embeddings when the two agree; models with weight 0 are
skipped. ``--estimate N`` times a few test images and prints the run time for N images against Kaggle's 9-hour
limit; it writes no submission.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ..config.checks import compress_spec
from ..config.schema import Config, load_config
from ..data.dataset import eval_dataset
from ..data.tables import ID, read_test_set
from ..machine import backend
from ..model.compress import compress_model
from ..model.inference import Policy, model_device, run_backbone
from ..scores.submission import check_output_path, write_submission
from ..store import artifacts
from ..store.errors import UsageError
from ..store.files import TEMP_MARK, ArtifactError, MissingArtifact, file_digest, not_a_folder, read_json, value_digest
from ..store.lock import experiment_lock
from ..svr.head import SvrHead, assemble_features, embedding_table
from . import versions
from .model_file import load_model_file

log = logging.getLogger("pawpular")
KAGGLE_LIMIT_H = 9.0
FORMAT = 4  # of an export folder (exporter writes it); 4: the manifest's own digest, every file listed


def manifest_digest(found: dict) -> str:
    """The hash an export's manifest carries of its own contents (every field but ``digest``)."""
    return value_digest(json.dumps({k: v for k, v in found.items() if k != "digest"}, sort_keys=True, default=str))


def read_manifest(art: Path, verify: bool = True) -> dict:
    """The export's manifest; with ``verify`` its own digest must hold (an edited manifest decides nothing) and
    every recorded file (models, heads, settings, the source copy, the notebook) must have its recorded digest."""
    path = artifacts.export_manifest(art)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {art} a folder written by `pawpular export`?")
    found = read_json(path)
    if not isinstance(found, dict) or found.get("format") != FORMAT:
        format_ = found.get("format") if isinstance(found, dict) else None
        raise ArtifactError(f"{path}: written by another version of pawpular (format {format_}); export again")
    if verify and found.get("digest") != manifest_digest(found):
        raise ArtifactError(
            f"{path}: was changed after export wrote it (its own digest does not match): it decides "
            "every prediction, so it is not used; copy the artifact folder again or export again"
        )
    for rel, digest in found["files"].items() if verify else ():
        p = art / rel
        if not p.is_file() or file_digest(p) != digest:
            raise ArtifactError(
                f"{p}: {'missing' if not p.is_file() else 'damaged (not the file export wrote)'}: "
                "copy the artifact folder again or export again"
            )
    return found


def check_weights(found: dict) -> dict[str, float]:
    """The blend's weights, refused unless every weighted model is shipped and the weights sum to 1."""
    weights = {m: float(w) for m, w in found["weights"].items()}
    shipped = {f"{e['prefix']}{h}" for e in found["experiments"].values() for h, w in e["weights"].items() if w > 0}
    lost = sorted(m for m, w in weights.items() if w > 0 and m not in shipped)
    if lost:
        raise ArtifactError(
            f"the blend weighs {', '.join(lost)}, but the export holds no such model: run "
            "`pawpular ensemble`, then export again"
        )
    total = sum(w for m, w in weights.items() if m in shipped)
    if abs(total - 1.0) > 1e-6:
        raise ArtifactError(
            f"the blend's weights sum to {total:.6f}, not 1: run `pawpular ensemble`, then export again"
        )
    return weights


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


def predict(
    artifacts_dir: Path,
    data: Path,
    out: Path | None = Path("submission.csv"),
    device: str = "auto",
    estimate: int | None = None,
) -> Path | None:
    """Write ``out`` (a validated submission.csv); with ``estimate`` only time a few images (returns None)."""
    from ..store.guards import check_predict_out, export_files

    if estimate is not None and estimate < 1:
        raise UsageError(f"--estimate {estimate}: expected the number of test images to estimate for (>= 1)")
    if (why := not_a_folder(artifacts_dir)) and why != "does not exist":  # a file, or a file above it
        raise MissingArtifact(f"--artifacts {artifacts_dir} {why}: give the folder `pawpular export` wrote")
    if export_files(Path(artifacts_dir)) is None:
        raise MissingArtifact(
            f"{artifacts.export_manifest(Path(artifacts_dir))} not found or damaged: is "
            f"{artifacts_dir} a folder written by `pawpular export`? (export, or copy it, again)"
        )
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
    versions.check(found.get("versions", {}))
    weights = check_weights(found)
    device = backend.resolve_device(device)
    test, sample = read_test_set(data)
    n_total = len(test)
    if estimate is not None:
        test = test.iloc[: min(len(test), 32)].reset_index(drop=True)
    t0 = time.time()
    columns, per_set = {}, {}
    for name, info in found["experiments"].items():
        experiment = Experiment(artifacts.export_experiment(art, name), info, device)
        for head, pred in experiment.run(test, data).items():
            columns[f"{info['prefix']}{head}"] = pred
        per_set.update({f"{name}/{s}": t for s, t in experiment.seconds.items()})
    seconds = time.time() - t0
    if estimate is not None:
        _print_estimate(seconds, len(test), estimate, device, per_set)
        return None
    blend = sum(weights[m] * columns[m] for m in columns)
    write_submission(pd.DataFrame({ID: test[ID], "pred": blend}), sample, out)
    log.info(
        "predict: %d test images, %s in %.1fs -> %s",
        n_total,
        ", ".join(f"{m} x {weights[m]:.3f}" for m in columns),
        seconds,
        out,
    )
    return Path(out)


def _print_estimate(seconds: float, n: int, estimate: int, device: str, per_set: dict[str, float]) -> None:
    per_image = seconds / max(n, 1)
    hours = per_image * estimate / 3600
    verdict = "within" if hours < KAGGLE_LIMIT_H else "OVER"
    msg = (
        f"estimate: {per_image * 1000:.1f} ms/image measured on {n} images ({device}); {estimate} images -> "
        f"{hours * 60:.1f} min ({verdict} Kaggle's {KAGGLE_LIMIT_H:g} h limit; model loading counted per measured "
        "batch, so this is an upper bound). No submission written: run without --estimate to write one."
    )
    for name, t in per_set.items():  # what select --budget-hours adds up, measured here
        msg += f"\n  {name}: {t / max(n, 1) * 1000:.1f} ms/image -> {t / max(n, 1) * estimate / 60:.1f} min"
    log.info(msg)
    print(msg)
