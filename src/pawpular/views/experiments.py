"""`pawpular runs`: experiments side by side, one row each, from their manifests and result files only.

    table = experiments.table(["output"])     # a folder of experiments is expanded; -> pandas DataFrame
    table.attrs["settings"]                    # the settings that differ between the rows (also columns)

Reads per experiment: each stage's manifest.json (and train's per-fold ones), ensemble/weights.json,
svr/best_params.json, timings.json, config.yaml, .data_check.json, the competition's CSVs (hashed: small), and
the weight files of frozen sets (hashed once per command: shared by the experiments that use them), the
stage manifests of the experiments a blend holds. Never a
checkpoint's or embedding table's bytes, never a photo, never a recomputed score: listing dozens of experiments
takes about a second (``python bench/runs.py``).

Its status is the manifests' verdict without re-hashing what is big:
  done     every stage finished; each stage's recorded inputs are what its upstream stage recorded writing; the
           CSVs hash to the recorded digests; the photos' digests cached by the data check are the recorded ones
           and no photo changed (size, mtime, inode, ctime) since; every recorded output exists, and those up to
           1 MiB (scores, predictions, tables) still hash to their recorded digests; a frozen set's weight file
           is there and makes the key it was embedded with (``frozen_key.change``)
  stale    an input changed after a stage ran (an upstream stage ran again, a CSV, photo or weight file changed),
           or an experiment the blend holds (ensemble.experiments) was made on other data (its manifests record
           other train or test digests: ``member_data``)
  damaged  a recorded output is missing, or a small one is not the file the stage wrote
  partial  a stage has not finished (train: only some folds)
``pawpular status`` also hashes the big outputs and the photos, and compares with the settings asked for now.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from .. import recipe
from ..scores.member_data import members_on_other_data
from ..store import artifacts, manifest
from ..store.errors import UsageError
from ..store.files import ArtifactError, digest_or_none, not_a_folder, read_json

SMALL = 1 << 20  # outputs up to this size are hashed; bigger ones (checkpoints, embeddings) only must exist
NOT_SETTINGS = ("experiment", "output_dir", "overwrite")  # differ between experiments by definition
ORDER = {
    manifest.DAMAGED: 3,
    manifest.STALE: 2,
    manifest.PARTIAL: 1,
    manifest.MISSING: 1,
    manifest.DONE: 0,
    manifest.NOT_NEEDED: 0,
}
COLUMNS = [
    "experiment",
    "status",
    "recipe",
    "nested",
    "nested_trusted",
    "holdout",
    "nn",
    "svr",
    "svr_heads",
    "blend",
    "blend_cv",
    "mean",
    "best_C",
    "sets",
    "model",
    "img_size",
    "finetune",
    "epochs",
    "device",
    "precision",
    *[f"t_{s}" for s in artifacts.PIPELINE],
    "t_total",
    "why",
    "path",
    "stages",
]


# ---------------------------------------------------------------------------------------------------------------
# Which folders are experiments


def is_experiment(folder: Path) -> bool:
    """A folder some stage wrote into: it has config.yaml or a stage's (or a train fold's) manifest."""
    return (
        artifacts.config_yaml(folder).is_file()
        or any(artifacts.manifest(folder, s).is_file() for s in artifacts.PIPELINE)
        or any((d / "manifest.json").is_file() for d in artifacts.fold_dirs(Path(folder) / "train").values())
    )


def find(folders: list[str | Path] | None = None) -> list[Path]:
    """The experiment folders named, a named folder of experiments expanded (default: every one under output/).
    A named folder that is neither is an error naming it."""
    named = [Path(f) for f in folders] if folders else [Path("output")]
    found: list[Path] = []
    for folder in named:
        if why := not_a_folder(folder):
            hint = ": name experiment folders (pawpular runs FOLDER ...)" if not folders else ""
            raise ArtifactError(f"{folder}: {'no such folder' if why == 'does not exist' else why}{hint}")
        inside = (
            [folder]
            if is_experiment(folder)
            else sorted(p for p in folder.iterdir() if p.is_dir() and is_experiment(p))
        )
        if not inside:
            raise ArtifactError(
                f"{folder}: not an experiment folder (no config.yaml and no stage manifest) and "
                "none of its subfolders is one"
            )
        found += [p for p in inside if p.resolve() not in {q.resolve() for q in found}]
    return found


# ---------------------------------------------------------------------------------------------------------------
# The status, from the manifests (see the module docstring for what is and is not checked)


class _Data:
    """The competition's digests as the manifests label them ("data:train.csv", "data:train photos"), lazily."""

    def __init__(self, out: Path, root: Path | None, cache: dict, config: dict | None = None):
        self.out, self.root, self.cache, self.config = out, root, cache, config or {}

    def photos(self, split: str) -> str | None:
        """The photos' digest cached by this experiment's data check, if no photo changed since (else None).
        Experiments whose records say the same (copies, runs on one data folder) share one look at the photos."""
        from ..data.digest import cached_images_digest
        from ..data.tables import DataError, read_competition

        record = artifacts.data_check_record(self.out)
        key = (self.root, digest_or_none(record))
        if key not in self.cache:
            try:
                if self.root not in self.cache:
                    self.cache[self.root] = read_competition(self.root)
                self.cache[key] = cached_images_digest(self.cache[self.root], record) or {}
            except (DataError, OSError):
                self.cache[key] = {}
        return self.cache[key].get(split)

    def change(self, label: str, recorded: str | None) -> str | None:
        name = label.removeprefix("data:")
        if self.root is None:
            return (
                f"{label}: unknown: the experiment's config.yaml is missing or cannot be read (no data_dir): "
                "`pawpular status --output` with --config and --data checks it"
            )
        if not self.root.is_dir():
            return f"{label}: the competition folder {self.root} is not here"
        if name.endswith(" photos"):
            if self.photos(name.split()[0]) != recorded:
                return (
                    f"{name} changed (size, mtime, inode or ctime) since they were hashed: "
                    "`pawpular status` hashes them again (it saves nothing), a stage run records them"
                )
            return None
        now = digest_or_none(self.root / name)
        return None if now == recorded else f"data {name} {'is missing' if now is None else 'changed'}"


def _damaged(out: Path, record: manifest.Record) -> list[str]:
    bad = []
    for rel, digest in record.outputs.items():
        path = out / rel
        try:
            size = path.stat().st_size
        except OSError:
            bad.append(f"{rel} is missing")
            continue
        if size <= SMALL and digest_or_none(path) != digest:
            bad.append(f"{rel} is damaged (not the file this stage wrote)")
    return bad


def _input_change(out: Path, label: str, recorded: str | None, produced: dict, states: dict, data: _Data) -> str | None:
    if label.startswith("data:"):
        return data.change(label, recorded)
    if label.endswith(": frozen backbone"):
        from ..model.frozen_key import change

        return change(data.config, label.removesuffix(": frozen backbone"), recorded)
    rel = label.split(": ", 1)[-1]  # embed labels its units' inputs "fold0: train/fold0/best.pt"
    if rel in produced:
        stage, digest = produced[rel]
        if states[stage][0] != manifest.DONE:
            return f"upstream {stage} is {states[stage][0]}"
        return None if digest == recorded else f"{rel} changed ({stage} ran again)"
    if "/" not in rel:  # not a file of an experiment (a frozen backbone's key, folds.file's digest)
        return None
    path = Path(rel) if Path(rel).is_absolute() else out / rel  # another experiment's file (ensemble.experiments)
    if path.is_file() and path.stat().st_size <= SMALL:
        return None if digest_or_none(path) == recorded else f"{rel} changed"
    return None if path.exists() else f"{rel} is missing"


def _unfinished(out: Path, stage: str, n_folds: int | None) -> tuple[str, list[str]]:
    if stage == "train":
        done = [k for k, d in artifacts.fold_dirs(out / "train").items() if manifest.read(d / "manifest.json")]
        if done:
            return manifest.PARTIAL, [
                f"folds {', '.join(map(str, done))}" + (f" of {n_folds}" if n_folds else "") + " trained"
            ]
    return manifest.MISSING, ["not run" if not artifacts.stage_dir(out, stage).exists() else "not finished"]


def quick_status(out: Path, config: dict, cache: dict | None = None) -> dict[str, tuple[str, list[str]]]:
    """stage -> (done | stale | damaged | missing | partial, reasons), in pipeline order, hashing only small files."""
    out = Path(out)
    records = {s: manifest.read(artifacts.manifest(out, s)) for s in artifacts.PIPELINE}
    produced = {rel: (s, d) for s, r in records.items() if r for rel, d in r.outputs.items()}
    root = Path(config["data_dir"]) if config.get("data_dir") else None
    data = _Data(out, root, {} if cache is None else cache, config)
    states: dict[str, tuple[str, list[str]]] = {}
    want = _needed(out, config)
    for s, record in records.items():
        if s not in want:
            states[s] = (manifest.NOT_NEEDED, ["nothing the config asks for reads it"])
        elif record is None:
            states[s] = _unfinished(out, s, (config.get("folds") or {}).get("n_folds"))
        elif damaged := _damaged(out, record):
            states[s] = (manifest.DAMAGED, damaged)
        else:
            why = [
                w for label, d in record.inputs.items() if (w := _input_change(out, label, d, produced, states, data))
            ]
            if s == "ensemble" and data.root is not None and data.root.is_dir():
                why += members_on_other_data(out, record.inputs, data.root, data.photos)
            states[s] = (manifest.STALE, why) if why else (manifest.DONE, [])
    return states


def _needed(out: Path, config: dict) -> list[str]:
    """The stages the experiment's config needs (``stages.needed``); every stage when the config cannot be read."""
    from ..config.schema import load_config_dict
    from ..stages import needed

    try:
        return needed(load_config_dict({**config, "output_dir": str(out)}))
    except (ValueError, TypeError):  # a config.yaml of another version: judge every stage
        return list(artifacts.PIPELINE)


def overall(states: dict[str, tuple[str, list[str]]]) -> tuple[str, str]:
    """The experiment's status (the worst stage's: damaged > stale > partial > done) and why, briefly."""
    worst = max((ORDER[st] for st, _ in states.values()), default=1)
    if worst == 0:
        return manifest.DONE, ""
    status = {3: manifest.DAMAGED, 2: manifest.STALE, 1: manifest.PARTIAL}[worst]
    why = [f"{s}: {'; '.join(reasons[:2])}" for s, (st, reasons) in states.items() if ORDER[st] == worst]
    return status, " | ".join(why[:3])


# ---------------------------------------------------------------------------------------------------------------
# One row per experiment


def _json(path: Path) -> dict:
    try:
        value = read_json(path)
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _yaml(path: Path) -> dict:
    import yaml

    try:
        value = yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _img_size(out: Path, model: dict) -> Any:
    if model.get("img_size"):
        return model["img_size"]
    for d in artifacts.fold_dirs(out / "emb").values():  # the transform embed recorded (the model's own size)
        record = manifest.read(d / "manifest.json")
        size = ((record.config.get("derived") or {}).get("transform") or {}).get("input_size") if record else None
        if size:
            return size[-1]
    return None


def row(out: Path, cache: dict | None = None) -> dict[str, Any]:
    """One experiment's row (see COLUMNS) and its flattened config under the key "config"."""
    config = _yaml(artifacts.config_yaml(out))
    states = quick_status(out, config, cache)
    status, why = overall(states)
    weights, best = _json(artifacts.weights_json(out)), _json(artifacts.best_params(out))
    oof, held = weights.get("oof_rmse") or {}, weights.get("holdout_rmse") or {}
    ran = recipe.what_ran(out, config)  # the fine-tuned model only when it trained
    trained, sets, kind = ran["model"] or {}, ran["sets"], ran["recipe"]
    units = manifest.unit_records(out).values()  # each fold's and embedding set's own device and policy
    devices = sorted({r.info["device"] for r in units if r.info.get("device")})
    precisions = sorted({r.info["policy"]["precision"] for r in units if r.info.get("policy")})
    timings = _json(artifacts.timings_json(out))
    times = {f"t_{s}": _number(timings.get(s)) for s in artifacts.PIPELINE}
    nested = weights.get("nested_rmse") or {}  # the score to trust; nn, svr, blend and blend_cv are optimistic
    return {
        "experiment": out.name,
        "status": status,
        "recipe": kind,
        "nested": _number(nested.get("ensemble")),
        # false (or absent: an older version, every fold shipped its own best epoch) makes the nested score optimistic
        "nested_trusted": bool(weights.get("trusted", False)) if "ensemble" in nested else None,
        "nn": _number(oof.get("nn")),
        "svr": _number(best.get("oof_rmse", oof.get("svr"))),
        "svr_heads": _svr_heads(out, nested),
        "blend": _number(oof.get("ensemble")),
        "blend_cv": _number(oof.get("ensemble_cv")),
        "holdout": _number(held.get("ensemble")),
        "mean": _number(oof.get("predict_mean")),
        "best_C": _number(best.get("C")),
        "sets": sets,
        "model": trained.get("model"),
        "img_size": _img_size(out, trained) if trained else None,
        "finetune": trained.get("finetune"),
        "epochs": trained.get("epochs"),
        "device": "/".join(devices) or None,
        "precision": "/".join(precisions) or None,
        **times,
        "t_total": sum(v for v in times.values() if not math.isnan(v)) if timings else math.nan,
        "why": why,
        "path": str(out),
        "stages": {s: st for s, (st, _) in states.items()},
        "config": _flatten({k: v for k, v in config.items() if k not in NOT_SETTINGS}),
    }


def _svr_heads(out: Path, nested: dict) -> str | None:
    """The SVR heads of svr.heads an experiment holds, each with its nested RMSE (its OOF RMSE where the blend has
    no nested score of it): e.g. "svr_logits 17.874"; None without any."""
    found = []
    for head in artifacts.extra_svr_heads(out):
        score = _number(nested.get(head, _json(artifacts.best_params(out, head)).get("oof_rmse")))
        found.append(f"{head} {score:.3f}" if not math.isnan(score) else head)
    return ", ".join(found) or None


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        v = manifest.by_name(v) or v  # embed.backbones: one key per backbone and setting
        if isinstance(v, dict) and v and k != "kwargs":
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def differing(configs: list[dict[str, Any]]) -> list[str]:
    """The settings whose values are not the same in every config (a setting missing from one counts)."""
    keys = sorted({k for c in configs for k in c})
    return [k for k in keys if len({json.dumps(c.get(k), sort_keys=True, default=str) for c in configs}) > 1]


def table(
    folders: list[str | Path] | None = None,
    sort: str | None = None,
    baseline: str | None = None,
    repeats: list | None = None,
) -> pd.DataFrame:
    """One row per experiment (COLUMNS, then the settings that differ between the rows, also listed in
    ``attrs["settings"]``); ``sort``: a column, ``-column`` descending (missing values last). ``baseline``: an
    experiment's name or folder: the columns of ``compare.BASELINE_COLUMNS`` and ``attrs["inside"]``; ``repeats``: the
    baseline at other seeds (names or folders), whose spread widens the verdicts."""
    cache: dict = {}
    rows = [row(out, cache) for out in find(folders)]
    settings = differing([r["config"] for r in rows]) if len(rows) > 1 else []
    df = pd.DataFrame([{**{c: r[c] for c in COLUMNS}, **{k: r["config"].get(k) for k in settings}} for r in rows])
    if sort:
        key = sort.lstrip("-")
        if key not in df.columns:
            raise UsageError(
                f"--sort {sort}: no such column; columns: {', '.join(c for c in df.columns if c != 'stages')}"
            )
        df = df.sort_values(
            key,
            ascending=not sort.startswith("-"),
            na_position="last",
            kind="stable",
            key=lambda s: s.map(lambda v: json.dumps(v) if isinstance(v, (list, dict)) else v),
        )
    df = df.reset_index(drop=True)
    df.attrs["settings"] = settings
    if baseline is not None:
        from ..scores.compare import with_baseline

        df = with_baseline(df, baseline, repeats)
    return df
