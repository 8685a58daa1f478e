"""Fingerprints of the competition data: a cheap stat fingerprint of every file, the per-split photo digests, and
the record (``<experiment>/.data_check.json``) that lets a stage skip re-checking and re-hashing unchanged photos.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .images import image_path
from .tables import ID, Competition, DataError, check_images, read_competition


def _image_paths(comp: Competition) -> list[Path]:
    return [
        image_path(comp.root, split, i) for split, df in (("train", comp.train), ("test", comp.test)) for i in df[ID]
    ]


def stat_fingerprint(comp: Competition) -> str:
    """Cheap fingerprint (name, size, mtime, inode, inode change time) of the CSVs and every image, as git and DVC
    judge a file: a rewrite changes it even with the same size and a restored mtime (writing a file, or setting
    its mtime, sets its ctime, which no user call can set back)."""
    h = hashlib.blake2b(digest_size=16)
    paths = [comp.root / n for n in ("train.csv", "test.csv", "sample_submission.csv")] + _image_paths(comp)
    for p in paths:
        st = p.stat()
        h.update(f"{p.relative_to(comp.root)}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{st.st_ctime_ns};".encode())
    return h.hexdigest()


def _read_record(record: Path, root: Path) -> dict:
    try:
        entry = json.loads(record.read_text()).get(str(root.resolve()))
    except (OSError, ValueError, AttributeError):
        return {}
    return entry if isinstance(entry, dict) else {}


def _write_record(record: Path, root: Path, entry: dict) -> None:
    from ..store.files import write_json

    write_json(record, {str(root.resolve()): entry})


def cached_images_digest(comp: Competition, record: str | Path) -> dict[str, str] | None:
    """The photo digests ``images_digest`` cached in ``record`` while no photo's stat changed since, else
    None; reads no photo (``pawpular runs``: a status that never hashes images)."""
    entry = _read_record(Path(record), comp.root)
    try:
        fresh = entry.get("fingerprint") == stat_fingerprint(comp)
    except FileNotFoundError:  # a photo is gone
        return None
    return entry["images"] if fresh and isinstance(entry.get("images"), dict) else None


def ensure_valid(root: str | Path, record: str | Path) -> Competition:
    """Full contract check (images decoded) before a stage reads images, skipped when nothing changed since the
    last successful check of this experiment (recorded in ``record``). Raises DataError."""
    root, record = Path(root), Path(record)
    comp = read_competition(root, images=False)
    try:
        fingerprint = stat_fingerprint(comp)
    except OSError:
        fingerprint = None  # a missing or unreadable image: the full check below names it
    if fingerprint and _read_record(record, root).get("fingerprint") == fingerprint:
        return comp
    problems = check_images(root, "train", comp.train[ID].tolist(), 8) + check_images(
        root, "test", comp.test[ID].tolist(), 8
    )
    if problems:
        raise DataError(problems)
    _write_record(record, root, {"fingerprint": fingerprint})
    return comp


def images_digest(comp: Competition, record: str | Path | None = None, save: bool = True) -> dict[str, str]:
    """Per split (train, test), one hash over every image's Id and bytes: a changed photo changes its split's.

    Reading every photo costs about a second per GB; with ``record`` the digests are kept beside the data check's
    stat fingerprint and reused while no image's stat (size, mtime, inode, ctime) changed (as git and DVC judge
    inputs); ``save`` False only reads that record (a reading command writes nothing).
    """
    from ..store.files import file_digest

    fingerprint = stat_fingerprint(comp)
    entry = _read_record(Path(record), comp.root) if record else {}
    if entry.get("fingerprint") == fingerprint and isinstance(entry.get("images"), dict):
        return entry["images"]
    digests = {}
    for split, df in (("train", comp.train), ("test", comp.test)):
        h = hashlib.blake2b(digest_size=16)
        for id_ in df[ID]:
            h.update(f"{id_}:{file_digest(image_path(comp.root, split, id_))};".encode())
        digests[split] = h.hexdigest()
    if record and save:
        _write_record(Path(record), comp.root, {**entry, "fingerprint": fingerprint, "images": digests})
    return digests
