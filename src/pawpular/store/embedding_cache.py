"""Embedding sets shared by every experiment under one output root: computed once, hard-linked into each user.

    <output root>/.embeddings/<key>/{train,test}.parquet, manifest.json   one embedding set, whoever made it
    <experiment>/emb/<set>/{train,test}.parquet                          hard links to those files (copies where
                                                                          the file system has no links)

The key is ``manifest.key_of`` of what the set's own manifest records (its plan: the model and its weights' or
checkpoint's digest, the transform, TTA, compression, the photos' and CSVs' digests, and any setting a stage adds
to that plan later) plus the inference policy (precision, channels_last): two experiments that would record the
same set share one entry, whatever they call it. An experiment's ``emb/<set>/manifest.json`` records the entry it
used (``info["cache"]``) and whether another experiment computed it (``info["reused"]``); the entry's own record
says which one (``info["made_by"]``).

Nothing removes an entry, and an entry's files are only ever replaced (``os.replace``), never changed in place:
an experiment's links keep the bytes it recorded whatever later happens to the entry (another experiment's
``--overwrite`` recomputes into a new file under the same name; the other's links still hold the old one). The
crash rules are the stages': an entry's manifest is cleared before its files are rewritten and written last, so a
kill at any instant leaves no entry that passes as done. Writers of one entry take its lock (``store/lock.py``,
``<entry>/.lock``); a second experiment embedding the same set waits for the first and then reuses its files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import artifacts, manifest
from .errors import UsageError
from .files import link_or_copy
from .lock import ExperimentLocked, experiment_lock

log = logging.getLogger("pawpular")
WAIT_SECONDS = 2.0  # how often a waiting writer retries the entry's lock
REUSED, COMPUTED = "reused", "computed"
# in the entry's record only: how fast, where and by which experiment it was made (select's budget reads the
# speed there); an experiment's own record says only whether another experiment computed it ("reused"), so it is
# the same bytes wherever the experiment's folder is and on whichever machine the set was made
ENTRY_ONLY = ("images_per_second", "machine", "made_by")


def entry_config(config: dict, policy: dict) -> dict:
    """What an entry's manifest records as its config: the set's plan config and the policy that ran it."""
    return {**config, "policy": policy}


def cache_key(config: dict, inputs: dict, policy: dict) -> str:
    """The entry's name: the key its manifest will carry (``manifest.Record.key``)."""
    return manifest.key_of(entry_config(config, policy), inputs)


def entry_of(out: Path, config: dict, inputs: dict, policy: dict) -> Path:
    return artifacts.emb_cache_entry(Path(out).parent, cache_key(config, inputs, policy))


def entry_record(out: Path, folder: Path) -> manifest.Record | None:
    """The cache entry's own record behind ``folder`` (an ``emb/<set>`` of the experiment ``out``), or None."""
    record = manifest.read(folder / "manifest.json")
    if record is None or not record.info.get("cache"):
        return None
    return manifest.read(artifacts.emb_cache_entry(Path(out).parent, record.info["cache"]) / "manifest.json")


def _files(folder: Path) -> list[Path]:
    return [folder / f"{s}.parquet" for s in artifacts.SPLITS]


@contextlib.contextmanager
def entry_lock(entry: Path, command: str) -> Iterator[None]:
    """Hold the entry's lock; while another process holds it (embedding the same set), wait for it."""
    said = False
    with contextlib.ExitStack() as stack:
        while True:
            try:
                stack.enter_context(experiment_lock(entry, command))
                break
            except ExperimentLocked as e:
                if not said:
                    log.info("embedding cache: waiting: %s", e)
                    said = True
                time.sleep(WAIT_SECONDS)
        yield


def _read_only(entry: Path) -> bool:
    """The entry, or the nearest folder above it that exists, cannot be written by this process."""
    found = next((p for p in (entry, *entry.parents) if p.exists()), None)
    return found is not None and not os.access(found, os.W_OK)


def done_entry(entry: Path, config: dict, inputs: dict, policy: dict) -> manifest.Record | None:
    """The entry's record when it is finished and its files are the ones it recorded, else None."""
    v = manifest.verdict(entry / "manifest.json", entry, entry_config(config, policy), inputs)
    return v.record if v.done else None


def provide(
    ctx: Any,
    folder: Path,
    config: dict,
    inputs: dict,
    policy: dict,
    compute: Callable[[], tuple[dict[str, Any], dict]],
    write: Callable[[Any, Path], None],
    fresh: bool = False,
) -> str:
    """Make ``folder`` (an experiment's ``emb/<set>``) hold the set: the cached entry's files when it is done
    (and --overwrite was not asked, or ``fresh``: this run wrote it, ``store``), else freshly computed ones written
    into the entry first. ``compute()`` returns ({split: table}, info) on every rank; ``write(table, path)`` writes
    one table. Returns "reused" or "computed". The caller has cleared ``folder``'s manifest."""
    entry = entry_of(ctx.out, config, inputs, policy)
    main = ctx.dist.main
    read_only = main and _read_only(entry)  # a cache attached read-only: its finished sets are read unlocked
    with entry_lock(entry, f"embed {ctx.out}") if main and not read_only else contextlib.nullcontext():
        ctx.dist.barrier()  # rank 0 holds the lock: every rank sees the same entry
        record = None if ctx.cfg.overwrite and not fresh else done_entry(entry, config, inputs, policy)
        how = REUSED if record is not None else COMPUTED
        if record is None and read_only:
            raise UsageError(
                f"the shared embedding cache {entry.parent} is read-only, and embed needs to write this set into "
                f"{entry} ({'--overwrite asked to recompute it' if ctx.cfg.overwrite else 'it is not there yet'}); "
                "make the cache writable, or give an --output under another folder (its own cache)"
            )
        if record is None:
            tables, info = compute()
            if main:
                record = _write_entry(
                    entry, config, inputs, policy, tables, write, {**info, "made_by": str(Path(ctx.out).resolve())}
                )
        if main:
            _link(ctx.out, folder, entry, config, inputs, record)
    return how


def store(
    ctx: Any, config: dict, inputs: dict, policy: dict, tables: dict, write: Callable[[Any, Path], None], info: dict
) -> str | None:
    """Write a set that a pass computed beside another (``embed``'s pooled + logits from one pass) as an entry of
    its own, for whichever experiment asks for it next; no experiment folder links to it here. Skipped when its
    entry is done (unless --overwrite). Returns the entry's key when written (rank 0), else None."""
    if not ctx.dist.main:
        return None
    entry = entry_of(ctx.out, config, inputs, policy)
    with entry_lock(entry, f"embed {ctx.out}"):
        if not ctx.cfg.overwrite and done_entry(entry, config, inputs, policy) is not None:
            return None
        _write_entry(entry, config, inputs, policy, tables, write, {**info, "made_by": str(Path(ctx.out).resolve())})
    return entry.name


def _write_entry(
    entry: Path, config: dict, inputs: dict, policy: dict, tables: dict, write: Callable, info: dict
) -> manifest.Record:
    path = entry / "manifest.json"
    manifest.clear(path)
    for split, table in tables.items():
        write(table, entry / f"{split}.parquet")
    return manifest.commit(path, entry, manifest.Record(entry_config(config, policy), inputs, info=info), _files(entry))


def _link(out: Path, folder: Path, entry: Path, config: dict, inputs: dict, record: manifest.Record) -> None:
    """The experiment's folder: links to the entry's files, then its own manifest (last)."""
    for src, dst in zip(_files(entry), _files(folder), strict=False):
        link_or_copy(src, dst)
    # what the files are, not how fast this machine made them: the speed stays in the entry's own record
    reused = record.info.get("made_by") != str(Path(out).resolve())  # another experiment computed it
    info = {**{k: v for k, v in record.info.items() if k not in ENTRY_ONLY}, "cache": entry.name, "reused": reused}
    manifest.commit(folder / "manifest.json", out, manifest.Record(config, inputs, info=info), _files(folder))
