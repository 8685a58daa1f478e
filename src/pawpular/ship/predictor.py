"""``pawpular predict``: a submission from an exported folder and a competition's test set, offline.

Reads   ARTIFACTS/ (written by ``pawpular export``: model files, SVR heads as arrays, settings, each model's
        inference policy, library versions, digests) and DATA/test.csv, DATA/sample_submission.csv, DATA/test/
        (no training data, no network)
Writes  --out (default submission.csv): Id,Pawpularity in sample order, checked as the grader checks it
Run     pawpular predict --artifacts artifacts/default --data input/petfinder --out submission.csv [--estimate 6800]

What it checks first: every file it loads has the digest export recorded (a truncated copy is an error naming
it); the blend's weights (every weighted model is in the folder, the weights sum to 1), both before torch loads;
the libraries here against the export's (``versions.check``: differences logged, a missing or too old one is an
error); the test set and its photos. It loads no pickle: models and heads are safetensors, the SVR's decision
function is computed with numpy (no scikit-learn).

Each blended head's test predictions are recomputed as the pipeline computed them (``experiment.Experiment``). Per
model, the device: an int8 model runs on the CPU (dynamic quantization has no CUDA kernels), bf16 becomes fp16 on a
GPU without native bf16 (one warning), a CPU runs fp32. ``--estimate N`` times a few test images and prints the run
time for N images against Kaggle's 9-hour limit; it writes no submission.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pandas as pd

from ..data.tables import ID, read_test_set
from ..machine import backend
from ..scores.submission import check_output_path, write_submission
from ..store import artifacts
from ..store.errors import UsageError
from ..store.files import TEMP_MARK, ArtifactError, MissingArtifact, file_digest, not_a_folder, read_json, value_digest
from ..store.lock import experiment_lock
from . import versions

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
    weights = check_weights(found)  # a damaged export is refused before torch and timm load (the next line)
    versions.check(found.get("versions", {}))
    test, sample = read_test_set(data)
    from .experiment import Experiment

    device = backend.resolve_device(device)
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
