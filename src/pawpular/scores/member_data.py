"""What data a blend's members were made on: ``ensemble`` refuses a member whose stages recorded other train or
test files than this experiment's (another experiment's test predictions of other photos under the same Ids would
blend silently), and ``status`` and ``runs`` call such a blend stale."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..store import artifacts, manifest
from ..store.files import digest_or_none


def data_seen(folder: Path) -> list[tuple[str, str, str | None]]:
    """The competition data an experiment's work was made on: (label: ``data:test photos``, ``data:train.csv``
    ..., the manifest that records it, its digest), from its stages' and their units' manifests."""
    seen = []
    for stage in artifacts.PIPELINE:
        stage_dir = artifacts.stage_dir(folder, stage)
        units = sorted(p for p in stage_dir.iterdir() if p.is_dir()) if stage_dir.is_dir() else []
        for path in [artifacts.manifest(folder, stage), *(u / "manifest.json" for u in units)]:
            record = manifest.read(path) if path.is_file() else None
            seen += [
                (label, artifacts.relative(folder, path), digest)
                for label, digest in (record.inputs if record else {}).items()
                if label.startswith("data:")
            ]
    return seen


def other_data(now: dict[str, str], data_dir: Path | str, members: list[Path]) -> list[str]:
    """Per member made on other data than ``now`` (this experiment's digests of its train and test CSVs and photos,
    read from ``data_dir``): the first thing that differs, where it is recorded, and both digests."""
    found = []
    for folder in members:
        differ = [(label, where, d) for label, where, d in data_seen(folder) if label in now and d != now[label]]
        if differ:
            label, where, digest = differ[0]
            found.append(
                f"{folder} was made on other data: {label.removeprefix('data:')} differs ({where} records "
                f"{str(digest)[:12]}, {data_dir} gives {str(now[label])[:12]})"
            )
    return found


def recorded_members(out: Path, inputs: dict) -> list[Path]:
    """The other experiments a finished blend read, from its manifest's ``inputs``: their prediction files are
    recorded by absolute path (``artifacts.blend_members``), each inside its experiment folder."""
    from ..store.guards import is_experiment

    found: list[Path] = []
    for label in inputs:
        path = Path(label)
        if not path.is_absolute() or path.suffix != ".parquet":
            continue
        folder = next((p for p in path.parents if is_experiment(p)), None)
        if folder is not None and folder.resolve() != Path(out).resolve() and folder not in found:
            found.append(folder)
    return found


def members_on_other_data(out: Path, inputs: dict, data_dir: Path, photos: Callable[[str], str | None]) -> list[str]:
    """``other_data`` for a finished blend as `pawpular runs` sees it: the members its manifest's ``inputs``
    record (``recorded_members``), this experiment's data being what ``data_dir`` holds now (its CSVs hashed, the
    photos' digests from ``photos(split)``, None when unknown: left out)."""
    members = recorded_members(out, inputs)
    if not members:
        return []
    now = {f"data:{n}": digest_or_none(Path(data_dir) / n) for n in ("train.csv", "test.csv")}
    now |= {f"data:{split} photos": photos(split) for split in ("train", "test")}
    return other_data({k: v for k, v in now.items() if v is not None}, data_dir, members)
