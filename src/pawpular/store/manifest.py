"""What made each artifact: per-stage (and per-fold) manifests, and the verdict on whether they still hold.

A manifest (``<stage folder>/manifest.json``, ``train/fold{k}/manifest.json``, ``emb/<set>/manifest.json``)
records the config the work used (its own sections and the upstream ones that matter), the digests of the inputs
it read, and the digests of the outputs it wrote::

    {"key": ..., "config": {"svr": {...}}, "inputs": {"folds/folds.csv": "9f..", "data:train.csv": ..},
     "outputs": {"svr/oof.parquet": "c1..", ...}, "info": {"n_trials": 30, "precision": "fp32", ...}}

The commit protocol: a stage deletes its manifest before it rewrites any output and writes it last, after every
output is on disk. So a manifest exists only over a whole, finished set of files, and its output digests say
whether those files are still the ones it wrote. Work is *done* when the manifest exists, its config and inputs
equal the current ones, and every output still has its recorded digest; otherwise it is *missing*, *stale* (with
the reasons: which setting or input changed) or *damaged* (which output was changed or removed).

The manifest also holds ``digest``, a hash of everything else in it, checked on every read: a manifest changed
by hand (a setting edited so that old outputs pass for new settings) is *damaged* and trusted by nothing, so the
work is redone. It guards against edits and accidents, not against someone who recomputes the hash or deletes
it (a manifest without one, as older versions wrote them, is trusted as it was then).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from . import artifacts
from .files import digest_or_none, read_json, remove, value_digest, write_json

DONE, STALE, MISSING, DAMAGED, PARTIAL = "done", "stale", "missing", "damaged", "partial"
NOT_NEEDED = "not needed"  # a stage no output of the config reads (runner.status; `all` skips it)


@dataclass
class Record:
    config: dict
    inputs: dict[str, str | None]
    outputs: dict[str, str] = field(default_factory=dict)  # path relative to the experiment folder -> digest
    info: dict = field(default_factory=dict)
    key: str = ""
    pawpular: str = __version__

    def __post_init__(self) -> None:
        self.key = self.key or key_of(self.config, self.inputs)


def key_of(config: dict, inputs: dict) -> str:
    return value_digest(config, inputs)[:16]


def record_digest(data: dict) -> str:
    """The hash a manifest carries of its own contents (every field but ``digest``), as they read back from JSON."""
    return value_digest(json.dumps({k: v for k, v in data.items() if k != "digest"}, sort_keys=True, default=str))


def _load(path: Path) -> tuple[Record | None, str | None]:
    """(the record, or why a manifest that is there is not trusted: it was altered since it was written)."""
    try:
        data = read_json(path)
        record = Record(**{k: data[k] for k in ("config", "inputs", "outputs", "info", "key")})
    except (OSError, ValueError, KeyError, TypeError):
        return None, None
    if "digest" not in data:  # written before manifests carried one: trusted as then (no retraining on upgrade)
        return record, None
    if data["digest"] != record_digest(data):
        return None, "was changed after it was written (its record digest does not match): it is not trusted"
    return record, None


def read(path: Path) -> Record | None:
    """The manifest at ``path``, or None when there is none, it cannot be read or it was altered after it was
    written (then the work is redone)."""
    return _load(path)[0]


def clear(path: Path) -> None:
    """First step of rewriting a set of files: from now on they are not valid until ``commit`` writes anew."""
    remove(path)


def commit(path: Path, root: Path, record: Record, outputs: list[Path]) -> Record:
    """Last step: record the digests of ``outputs`` (already whole on disk) and write the manifest."""
    root = Path(root)
    record.outputs = {}
    for p in outputs:
        digest = digest_or_none(p)
        if digest is None:
            raise FileNotFoundError(f"{p}: expected output is missing; the manifest is not written")
        record.outputs[artifacts.relative(root, p)] = digest
    data = json.loads(json.dumps(asdict(record), default=str))  # as it will read back
    write_json(path, {**data, "digest": record_digest(data)})
    return record


@dataclass
class Verdict:
    state: str
    reasons: list[str] = field(default_factory=list)
    record: Record | None = None

    @property
    def done(self) -> bool:
        return self.state == DONE

    def why(self, limit: int = 3) -> str:
        more = f" (+{len(self.reasons) - limit} more)" if len(self.reasons) > limit else ""
        return "; ".join(self.reasons[:limit]) + more


def by_name(value: Any) -> dict | None:
    """A list of settings that each have a unique "name" (embed.backbones) as {name: settings}, else None: so
    that a change shows key by key (``embed.backbones.resnet.img_size 96 -> 128``), not as one long list."""
    if not isinstance(value, list) or not value or not all(isinstance(v, dict) and "name" in v for v in value):
        return None
    named = {str(v["name"]): {k: x for k, x in v.items() if k != "name"} for v in value}
    return named if len(named) == len(value) else None


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    d = by_name(d) or d
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        v = by_name(v) or v
        if isinstance(v, dict) and v and all(isinstance(kk, str) for kk in v):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _show(v: Any) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def config_changes(old: dict, new: dict) -> list[str]:
    """'train.lr 0.004 -> 0.001' for every setting that differs."""
    a, b = _flatten(old), _flatten(new)
    return [f"{k} {_show(a.get(k))} -> {_show(b.get(k))}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


# The digest of an input that a plan names only while it is not there (a frozen set's weight file): the verdict
# says "<label> is missing" though the manifest never recorded it.
GONE = "missing"


def input_changes(old: dict, new: dict) -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        if old.get(k) == new.get(k):
            continue
        if k not in new:  # left out by a setting (a set no longer listed): not a file gone missing
            out.append(f"{k} is no longer used")
        elif new.get(k) in (None, GONE):
            out.append(f"{k} is missing")
        elif k not in old:
            out.append(f"{k} is a new input")
        else:
            out.append(f"{k} changed")
    return out


def damaged_outputs(record: Record, root: Path) -> list[str]:
    return [
        f"{p} is {'missing' if not (Path(root) / p).exists() else 'damaged (not the file this stage wrote)'}"
        for p, d in record.outputs.items()
        if digest_or_none(Path(root) / p) != d
    ]


def verdict(path: Path, root: Path, config: dict, inputs: dict) -> Verdict:
    """Is the work recorded at ``path`` still what ``config`` and ``inputs`` ask for, with its outputs intact?"""
    record, distrust = _load(path)
    if distrust:
        return Verdict(DAMAGED, [f"{artifacts.relative(root, Path(path))} {distrust}"])
    if record is None:
        return Verdict(MISSING, ["never finished" if not Path(path).parent.exists() else "not finished"])
    reasons = config_changes(record.config, config) + input_changes(record.inputs, inputs)
    if reasons:
        return Verdict(STALE, reasons, record)
    damaged = damaged_outputs(record, root)
    if damaged:
        return Verdict(DAMAGED, damaged, record)
    return Verdict(DONE, [], record)


def unit_records(out: Path) -> dict[str, Record]:
    """The manifests of an experiment's units of work: ``train/fold{k}`` (a fine-tuned model and its
    predictions) and ``emb/<set>`` (an embedding set), by folder. Each records the inference policy it was made
    with (``info["policy"]``): folds trained on another machine keep their own."""
    found = {}
    for stage in ("train", "embed"):
        root = artifacts.stage_dir(out, stage)
        for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else ():
            record = read(folder / "manifest.json")
            if record is not None:
                found[f"{root.name}/{folder.name}"] = record
    return found


def policies(out: Path) -> dict[str, dict]:
    """``unit_records``' inference policies: {"train/fold0": {"precision": "bf16", ...}, "emb/fold0": ...}."""
    return {unit: r.info["policy"] for unit, r in unit_records(out).items() if r.info.get("policy")}
