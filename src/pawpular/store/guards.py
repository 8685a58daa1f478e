"""What a command may write onto: never its inputs, never the experiment it reads, never a folder it did not make.

A command deletes or replaces only what it provably wrote: an experiment folder holds a stage's manifest or the
runner's records, an export its manifest (``exporter``), the synthetic competition its marker (``synthetic``);
temporary files carry the project's own pattern (``files.TEMP_GLOB``). Everything else is refused with one line
(``UsageError``, exit 2) before any work:

    check_experiment_folder(out, data, experiment) a stage's --output: new, empty or this experiment; not the data
    check_export_target(out, to, overwrite)        export --to: not the experiment or above it; replaces an export
    check_predict_out(out, artifacts, data)        predict --out: new or a submission; not in the data, the
                                                   artifact folder or an experiment
    check_own_page(path, flag, marker)             runs --html: replaces only a page it wrote
    remove_fold_folder(folder)                     a fold folder of a larger n_folds: its files, not a user's

Paths are compared resolved (symlinks, ``..``), and an existing ``--out`` also by inode (a hard link to an input).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from . import artifacts
from .errors import UsageError
from .files import is_temp_name, remove, remove_tree
from .path_faults import check_output_path

# What the runner writes into an experiment folder before or with any stage output: a folder holding one of
# these is an experiment (the lock file too: a killed run leaves it).
EXPERIMENT_RECORDS = (".data_check.json", "config.yaml", "timings.json", ".lock")


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def within(path: str | Path, folder: str | Path) -> bool:
    """``path`` is ``folder`` or inside it (both resolved)."""
    p, f = _resolved(path), _resolved(folder)
    return p == f or f in p.parents


# What a stage writes into a fold folder (train/fold{k}, emb/fold{k}, svr/fold{k}): removing a fold removes these.
FOLD_FILES = (
    "manifest.json",
    "best.pt",
    "last.pt",
    "metrics.csv",
    "epochs.parquet",
    "head.safetensors",
    *(f"{split}.parquet" for split in ("oof", "test", "holdout", "train")),
)


def remove_fold_folder(folder: Path) -> list[str]:
    """Remove what the project wrote in a fold folder (``FOLD_FILES``, its temporary names) and the folder when
    nothing else is left; returns the names of what it kept (a user's files: never deleted)."""
    kept = []
    for p in sorted(Path(folder).iterdir()):
        if p.is_file() and (p.name in FOLD_FILES or is_temp_name(p.name)):
            remove(p)
        elif is_temp_name(p.name):
            remove_tree(p)
        else:
            kept.append(p.name)
    if not kept:
        Path(folder).rmdir()
    return kept


def is_experiment(folder: Path) -> bool:
    """``folder`` holds what the runner or a stage wrote (a record or a stage manifest)."""
    if any((folder / name).exists() for name in EXPERIMENT_RECORDS):
        return True
    return any(artifacts.manifest(folder, stage).is_file() for stage in artifacts.STAGE_DIRS)


def _entries(folder: Path) -> list[str]:
    """What is in ``folder`` besides the project's own temporary names."""
    return sorted(p.name for p in folder.iterdir() if not is_temp_name(p.name))


def recorded_experiment(out: Path) -> str | None:
    """The ``experiment`` name the folder's config.yaml records (None when there is none or it cannot be read)."""
    import yaml

    try:
        found = yaml.safe_load(artifacts.config_yaml(out).read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return found.get("experiment") if isinstance(found, dict) and isinstance(found.get("experiment"), str) else None


def check_experiment_folder(out: Path, data: Path, experiment: str | None = None) -> None:
    """A stage writes only into a new or empty folder or an experiment (of the same ``experiment`` name, when
    given: a second config never silently takes over another's folder), and never into the competition folder."""
    out = Path(out)
    if experiment is not None and (recorded := recorded_experiment(out)) not in (None, experiment):
        raise UsageError(
            f"--output {out} holds the experiment {recorded!r} (its config.yaml); this config is "
            f"{experiment!r}: it would take over that experiment's files; choose another --output, or "
            f"--set experiment={recorded} to continue that one"
        )
    if data and within(out, data):
        raise UsageError(
            f"--output {out} is inside the competition folder {data} (data_dir): the pipeline never "
            "writes into its inputs; choose another --output"
        )
    if out.is_dir() and not is_experiment(out) and (found := _entries(out)):
        raise UsageError(
            f"--output {out} is not empty and holds no pawpular experiment (found {_show(found)}): "
            "a stage writes only into a new or empty folder or an experiment; choose another --output"
        )


def _show(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def export_files(to: Path) -> dict | None:
    """The files an export at ``to`` was written with (its manifest's record), or None when ``to`` is no export."""
    try:
        found = json.loads(artifacts.export_manifest(to).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(found, dict) or not isinstance(found.get("files"), dict) or "experiments" not in found:
        return None
    return found["files"]


def _foreign_files(to: Path, listed: dict) -> list[str]:
    """Files in export ``to`` that export did not write: not its manifest, notebook, source copy or listed files."""
    own = {
        artifacts.relative(to, artifacts.export_manifest(to)),
        artifacts.relative(to, artifacts.inference_notebook(to)),
    }
    source = artifacts.relative(to, artifacts.export_source(to))
    found = []
    for p in sorted(to.rglob("*")):
        rel = artifacts.relative(to, p)
        if p.is_dir() or rel in own or rel in listed or rel == source or rel.startswith(source + "/"):
            continue
        found.append(rel)
    return found


def check_export_target(out: Path, to: Path, overwrite: bool) -> None:
    """export --to: never the experiment or a folder above it; an existing non-empty folder only when it is an
    earlier export (its manifest says so) holding nothing else, and only with --overwrite."""
    if within(out, to):
        raise UsageError(
            f"export --to {to}: that is the experiment {out} or a folder above it: the export would "
            "replace what it reads; choose another --to (even --overwrite never does this)"
        )
    check_output_path(to, "export --to")  # a file, or a file or dangling link above it
    if not to.exists():
        return
    if not _entries(to):
        return
    listed = export_files(to)
    if listed is None:
        raise UsageError(
            f"export --to {to}: not empty and not an export (no manifest.json of `pawpular export`): "
            "export replaces only an earlier export, even with --overwrite; choose another --to or "
            "empty it"
        )
    if not overwrite:
        raise UsageError(f"{to} exists and is not empty: pass --overwrite to replace it")
    if foreign := _foreign_files(to, listed):
        raise UsageError(
            f"export --to {to}: holds files export did not write ({_show(foreign)}): --overwrite would "
            "remove them; move them out or choose another --to"
        )


def check_own_page(path: Path, flag: str, marker: str) -> None:
    """A page a command writes (``runs --html``) replaces only a page of its own: a file that starts with
    ``marker``; never a user's file, never a folder or a device."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a folder; give a file name, e.g. {path / 'runs.html'}")
    if not path.exists() and not path.is_symlink():
        return
    try:
        with open(path, "rb") as f:
            ours = path.is_file() and f.read(len(marker.encode())) == marker.encode()
    except OSError:
        ours = False
    if not ours:
        raise UsageError(
            f"{flag} {path}: exists and is not a page pawpular wrote: it would be replaced; choose "
            "another file name (or remove it first)"
        )


def check_predict_out(out: Path, art: Path, data: Path) -> None:
    """predict --out: a new path or a submission (a file whose first line is ``Id,Pawpularity``), never a file of
    the competition folder, of the artifact folder (test.csv, a model ...) or of an experiment (its config.yaml,
    its predictions, its own submission.csv)."""
    for folder, what in ((data, "the competition folder (--data)"), (art, "the artifact folder (--artifacts)")):
        if within(out, folder):
            raise UsageError(
                f"predict --out {out}: inside {what} {folder}: predict never writes onto its inputs; "
                "choose another --out, e.g. submission.csv"
            )
    if (folder := _experiment_holding(out)) is not None:
        raise UsageError(
            f"predict --out {out}: inside the experiment {folder}: its stages own its files (a submission "
            "there is the ensemble's); choose another --out, e.g. submission.csv"
        )
    if out.is_dir() or (not out.exists() and not out.is_symlink()):
        return  # a new path; a folder is refused by submission.check_output_path ("is a directory")
    inputs = [Path(data) / n for n in ("test.csv", "sample_submission.csv", "train.csv")]
    inputs.append(artifacts.export_manifest(Path(art)))
    for p in inputs:
        if out.is_file() and p.is_file() and os.path.samefile(p, out):
            raise UsageError(
                f"predict --out {out}: is {p} (the same file: a link): predict never writes onto its "
                "inputs; choose another --out"
            )
    if not _is_submission(out):
        raise UsageError(
            f"predict --out {out}: exists and is not a submission (its first line is not Id,Pawpularity): "
            "predict replaces only a submission; choose another --out (or move the file first)"
        )


def _experiment_holding(path: Path) -> Path | None:
    """The experiment ``path`` would be a file of: its folder is an experiment, or ``path`` lies in a stage
    folder of one (``svr/oof.parquet``, ``emb/<set>/train.parquet``); None otherwise (a user's folder that merely
    holds an experiment somewhere above is not one)."""
    parent = Path(path).absolute().parent
    if _ran_in(parent):
        return parent
    stage_dirs = set(artifacts.STAGE_DIRS.values())
    for below, folder in zip([parent, *parent.parents][:3], [*parent.parents][:3], strict=False):
        if below.name in stage_dirs and _ran_in(folder):
            return folder
    return None


def _ran_in(folder: Path) -> bool:
    """A stage ran in ``folder`` (its manifest or the runner's timings are there): a pawpular config.yaml that a
    user keeps in a working folder does not make it an experiment here."""
    records = [folder / "timings.json", *(artifacts.manifest(folder, stage) for stage in artifacts.STAGE_DIRS)]
    return any(p.is_file() for p in records)


def _is_submission(path: Path) -> bool:
    """``path`` is a regular file whose first line is a submission's header (what predict and ensemble write)."""
    try:
        with open(path, "rb") as f:
            return path.is_file() and f.readline(64).rstrip(b"\r\n") == b"Id,Pawpularity"
    except OSError:
        return False
