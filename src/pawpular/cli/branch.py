"""A new experiment from another one (`pawpular select --as NAME`): another SVR on the same embeddings.

    target = branch.target(cfg, "resnet_only")     # output/resnet_only beside cfg.out; refused before any work
    branch.write(cfg, target, ["resnet"])          # -> output/resnet_only/config.yaml (svr.features=[resnet])

The new folder gets hard links (copies where links are not possible) of what the experiment computed upstream of
the SVR head: ``folds/``, the fine-tuned folds ``train/`` (when it has them) and its embedding sets ``emb/<set>/``
with their manifests (all of them: a set the branch leaves out of its SVR is still embedded by its config),
``select/selected_from.json`` (the source and the chosen sets: chosen on all rows, so the branch's blend is labelled
optimistic) and a ``config.yaml``: the settings that made those files, with
``svr.features`` the chosen sets and ``experiment`` the folder's name. `pawpular all --output <target>` then finds
folds, train and embed done (nothing is trained or embedded) and fits the SVR and the blend. The source
experiment is never written; links are safe to share because every write replaces a file, never changes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..store import artifacts, guards
from ..store.errors import UsageError
from ..store.files import is_temp_name, link_or_copy, write_json
from ..store.path_faults import check_output_path

_NOT_LINKED = ("last.pt",)  # a fold's resume state: the branch never resumes the source's training


def target(cfg: Any, name: str) -> Path:
    """The new experiment's folder: ``name`` beside ``cfg.out`` (or a path, when it has a slash). Refuses (before
    any work) the source itself, a folder inside it or the data, and any folder that is not new or empty."""
    if not name.strip():
        raise UsageError(f"select --as {name!r}: the name is empty; name the new experiment, e.g. --as frozen_best")
    folder = Path(name) if "/" in name else Path(cfg.out).parent / name
    if not name or name in (".", "..") or guards.within(folder, cfg.out) or guards.within(cfg.out, folder):
        raise UsageError(
            f"select --as {name}: that is the experiment {cfg.out} (or a folder inside or above it); name a new folder"
        )
    check_output_path(folder, "select --as")  # a file or a dangling link where the folder would be
    guards.check_experiment_folder(folder, cfg.data)
    if folder.is_dir() and any(not is_temp_name(p.name) for p in folder.iterdir()):
        raise UsageError(f"select --as {name}: {folder} exists and is not empty; name a new folder")
    return folder


def _link_tree(src: Path, dst: Path) -> int:
    n = 0
    for p in sorted(src.rglob("*")) if src.is_dir() else ():
        if p.is_file() and not is_temp_name(p.name) and p.name not in _NOT_LINKED:
            link_or_copy(p, dst / p.relative_to(src))
            n += 1
    return n


def write(cfg: Any, folder: Path, features: list[str]) -> Path:
    """Write the new experiment (see the module docstring); returns its config.yaml."""
    from ..config.schema import save_config
    from ..runner import assembled_config
    from ..store.lock import experiment_lock

    src = Path(cfg.out)
    with experiment_lock(folder, "select --as"):
        if artifacts.data_check_record(src).is_file():  # the photos' digests: not hashed again
            link_or_copy(artifacts.data_check_record(src), artifacts.data_check_record(folder))
        _link_tree(artifacts.stage_dir(src, "folds"), artifacts.stage_dir(folder, "folds"))
        if artifacts.manifest(src, "train").is_file():
            _link_tree(artifacts.stage_dir(src, "train"), artifacts.stage_dir(folder, "train"))
        emb = artifacts.stage_dir(src, "embed")
        for d in sorted(p for p in emb.iterdir() if p.is_dir()) if emb.is_dir() else ():
            _link_tree(d, artifacts.stage_dir(folder, "embed") / d.name)  # every set: the branch embeds none again
        # the sets were chosen on all of the source's rows: the branch's blend says so (scores/trust.py)
        write_json(artifacts.selected_from(folder), {"source": str(src), "chosen": list(features)})
        data = assembled_config(cfg)
        data["svr"]["features"] = list(features)
        data.update(experiment=folder.name, output_dir=str(folder), overwrite=False)
        path = artifacts.config_yaml(folder)
        save_config(data, path)  # last: a folder without it is no finished branch (the lock's record says whose)
    return path
