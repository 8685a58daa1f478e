"""Where everything is: the only module that builds a path or maps a name to a file.

Every table carries ``Id`` (and ``fold`` where it has one); predictions are on the Pawpularity scale. Each
stage folder holds a ``manifest.json`` saying what made its files (``store/manifest.py``)::

    output/<experiment>/
      config.yaml                          assembled from the manifests: the settings that made the artifacts
      folds/folds.csv                      Id, fold  (fold -1: the holdout rows, with folds.holdout > 0)
      folds/duplicates.csv                 Id, group, hash: photos with an exact or near duplicate
      train/fold{k}/best.pt                {"model", "model_cfg", "data_cfg", "epoch", "val_rmse"}
      train/fold{k}/last.pt                resume state; removed when the fold is done
      train/fold{k}/metrics.csv            epoch, train_loss, val_rmse, lr
      train/fold{k}/{oof,test,holdout}.parquet   Id, (fold,) pred  for one fold
      train/{oof,test,holdout}.parquet     every fold-assigned train Id once / means over folds
      emb/fold{k}/{train,test}.parquet     Id, e0..e{D-1} float32: fold k's backbone on every image
      emb/<backbone>/{train,test}.parquet  a frozen backbone of embed.backbones (fold-independent)
                                           (emb/* are hard links into <output root>/.embeddings/<key>/, the
                                           sets every experiment under the root shares: store/embedding_cache.py)
      svr/study.db                         Optuna study (sqlite) unless svr.storage names a database
      svr/best_params.json, svr/fold{k}/head.safetensors, svr/{oof,test,holdout}.parquet
      ensemble/weights.json, ensemble/{oof,test,holdout}.parquet
      submission.csv                       Id, Pawpularity in sample_submission order
      select/selection.json                forward selection of embedding sets (pawpular select)
      report.html, timings.json            pawpular report; seconds of the last run that did each stage's work
      tensorboard/<stage>/<start>/, wandb/ with `tracking`: curves and scores (logs, in no manifest)
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# The pipeline in order, and each stage's folder inside the experiment.
PIPELINE = ("folds", "train", "embed", "svr", "ensemble")
STAGE_DIRS = {
    "folds": "folds",
    "train": "train",
    "embed": "emb",
    "svr": "svr",
    "ensemble": "ensemble",
    "select": "select",
}
# Heads whose predictions are blended: head name -> the stage folder holding its {oof,test,holdout}.parquet.
HEADS = {"nn": "train", "svr": "svr"}
SPLITS = ("train", "test")  # embedding tables
PRED_SPLITS = ("oof", "test", "holdout")  # prediction tables
MODEL_SET = "model"  # svr.features name of this experiment's own fine-tuned fold backbones
_FOLD_RE = re.compile(r"fold(\d+)")


def is_name_part(name: object) -> bool:
    """``name`` can be one part of a path that stays inside its folder: a non-empty string, not ``.`` or ``..``,
    with no separator and no NUL (so never absolute)."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not any(c in name for c in "/\\\0")
        and name.strip() == name
    )


def name_part(name: str, key: str) -> str:
    """A name from the config (``key``) as a path part, or ConfigError: a name with a separator, an absolute one
    or ``..`` would write outside its folder (the experiment, ``output/``, an export)."""
    if not is_name_part(name):
        from .errors import ConfigError

        raise ConfigError(
            f"{key}: {name!r} is not a plain name: as a path part it would leave its folder (a "
            "separator, '..', an absolute path or surrounding spaces); choose a plain name",
            (key,),
        )
    return name


def relative(out: Path, path: Path) -> str:
    """How manifests name a file: its path inside the experiment folder (else the path as given)."""
    try:
        return str(Path(path).resolve().relative_to(Path(out).resolve()))
    except ValueError:
        return str(path)


def stage_dir(out: Path, stage: str) -> Path:
    return Path(out) / STAGE_DIRS[stage]


def manifest(out: Path, stage: str) -> Path:
    return stage_dir(out, stage) / "manifest.json"


def config_yaml(out: Path) -> Path:
    return Path(out) / "config.yaml"


def folds_csv(out: Path) -> Path:
    return Path(out) / "folds" / "folds.csv"


def duplicates_csv(out: Path) -> Path:
    return Path(out) / "folds" / "duplicates.csv"


def fold_name(fold: int) -> str:
    return f"fold{fold}"


def parse_fold(name: str) -> int | None:
    """k for a folder named ``fold{k}``, else None."""
    m = _FOLD_RE.fullmatch(name)
    return int(m.group(1)) if m else None


def fold_dirs(parent: Path) -> dict[int, Path]:
    """The ``fold{k}`` folders under ``parent``, by k."""
    found = {}
    for p in Path(parent).iterdir() if Path(parent).is_dir() else ():
        k = parse_fold(p.name)
        if k is not None and p.is_dir():
            found[k] = p
    return dict(sorted(found.items()))


def train_fold_dir(out: Path, fold: int) -> Path:
    return Path(out) / "train" / fold_name(fold)


def best_checkpoint(out: Path, fold: int) -> Path:
    return train_fold_dir(out, fold) / "best.pt"


def last_checkpoint(out: Path, fold: int) -> Path:
    return train_fold_dir(out, fold) / "last.pt"


def fold_metrics(out: Path, fold: int) -> Path:
    return train_fold_dir(out, fold) / "metrics.csv"


def fold_preds(out: Path, fold: int, split: str) -> Path:
    return train_fold_dir(out, fold) / f"{split}.parquet"


def epoch_preds(out: Path, fold: int) -> Path:
    """A fold's validation predictions after every epoch (Id, epoch_1, epoch_2, ...): the nested epoch choice."""
    return train_fold_dir(out, fold) / "epochs.parquet"


def head_stage(head: str) -> str:
    """The stage that makes a head: train for nn, svr for svr and every SVR head of svr.heads."""
    return HEADS.get(head, "svr")


def head_dir(out: Path, head: str) -> Path:
    """A head's folder: train/ (nn), svr/ (svr), svr/<name>/ (an SVR head of svr.heads), or ensemble/."""
    if head in HEADS or head == "ensemble":
        return Path(out) / HEADS.get(head, head)
    return svr_dir(out) / name_part(head, "svr.heads name")


def shipped_json(out: Path) -> Path:
    """Which epoch each fold ships and by which rule (train.checkpoint), and whether its scores can be trusted."""
    return Path(out) / "train" / "shipped.json"


def nested_preds(out: Path, head: str) -> Path:
    """Out-of-fold predictions of a head (nn, svr, an SVR head of svr.heads) or of the ensemble whose every
    choice was made without the fold each row belongs to (Id, fold, pred)."""
    return head_dir(out, head) / "nested.parquet"


def preds(out: Path, head: str, split: str) -> Path:
    """Predictions of a head (nn, svr, an SVR head of svr.heads) or of the ensemble; split: oof, test or
    holdout."""
    return head_dir(out, head) / f"{split}.parquet"


def extra_svr_heads(out: Path) -> list[str]:
    """The SVR heads of svr.heads an experiment holds predictions of: svr/<name>/oof.parquet, sorted."""
    found = svr_dir(out).glob("*/oof.parquet") if svr_dir(out).is_dir() else ()
    return sorted(p.parent.name for p in found if parse_fold(p.parent.name) is None)


def emb_dir(out: Path, fold: int | None = None, backbone: str | None = None) -> Path:
    """Embeddings of this experiment's fold-k backbone, or of a named frozen backbone."""
    name = name_part(backbone, "embed.backbones name") if backbone is not None else fold_name(fold)
    return Path(out) / "emb" / name


def emb_cache(root: Path) -> Path:
    """The embedding sets shared by every experiment under ``root`` (an output folder): ``embedding_cache``."""
    return Path(root) / ".embeddings"


def emb_cache_entry(root: Path, key: str) -> Path:
    """One shared embedding set: {train,test}.parquet and manifest.json, named by its key (hex digits)."""
    return emb_cache(root) / key


def emb_file(out: Path, split: str, fold: int | None = None, backbone: str | None = None) -> Path:
    return emb_dir(out, fold, backbone) / f"{split}.parquet"


def set_file(out: Path, name: str, split: str, fold: int) -> Path:
    """Embedding file of svr.features set ``name``: 'model' is fold k's own backbone, else a frozen one."""
    return emb_file(out, split, fold=fold) if name == MODEL_SET else emb_file(out, split, backbone=name)


def absolute(path: str | Path) -> Path:
    """``path`` made absolute from the working directory (``~`` expanded, symbolic links kept: its name stays)."""
    return Path(os.path.abspath(Path(path).expanduser()))


def blend_members(out: Path, experiments: list) -> list[tuple[str, Path]]:
    """(model-name prefix, folder) of every experiment a blend holds: this one (prefix ""), then
    ``ensemble.experiments`` (prefix "<folder name>/": their models are "<name>/nn", "<name>/svr").

    A relative folder is taken from the working directory (as ``data_dir`` and ``output_dir`` are), once, here:
    every reader (the stage, its manifest, ``runs``, export) gets the same absolute path.

    The names must be unique, or two experiments' models would be one in weights.json and in an export: a folder
    listed twice, or two folders with one name, is an error that says so.
    """
    from .errors import ConfigError

    members = [("", Path(out))] + [(Path(e).name + "/", absolute(e)) for e in experiments]
    seen: dict[str, Path] = {}
    for prefix, folder in members:
        name = prefix.rstrip("/") or Path(out).resolve().name
        where = {p.resolve(): p for p in seen.values()}
        if folder.resolve() in where:
            raise ConfigError(
                f"ensemble.experiments: {folder} is listed twice (or is this experiment itself)",
                ("ensemble.experiments",),
            )
        if name in seen:
            raise ConfigError(
                f"ensemble.experiments: {seen[name]} and {folder} are both called {name!r}: the blend "
                f"names each experiment's models by its folder name ({name}/nn, {name}/svr), so the "
                "two would be one; rename or move one of the folders",
                ("ensemble.experiments",),
            )
        seen[name] = folder
    return members


def svr_dir(out: Path) -> Path:
    return Path(out) / "svr"


def study_db(out: Path) -> Path:
    """The SVR stage's Optuna study (sqlite), unless svr.storage names another database."""
    return svr_dir(out) / "study.db"


def best_params(out: Path, head: str = "svr") -> Path:
    return head_dir(out, head) / "best_params.json"


def svr_head(out: Path, fold: int, head: str = "svr") -> Path:
    """A fold's SVR head (``head``: svr or a name of svr.heads) as arrays (heads.SvrHead): what predict computes
    that head's output from."""
    return head_dir(out, head) / fold_name(fold) / "head.safetensors"


def weights_json(out: Path) -> Path:
    return Path(out) / "ensemble" / "weights.json"


def submission(out: Path) -> Path:
    return Path(out) / "submission.csv"


def selection_json(out: Path) -> Path:
    return Path(out) / "select" / "selection.json"


def selected_from(out: Path) -> Path:
    """What a `select --as` branch was chosen from: the source's selection (its feature sets, chosen on all rows)."""
    return Path(out) / "select" / "selected_from.json"


def report_html(out: Path) -> Path:
    return Path(out) / "report.html"


def timings_json(out: Path) -> Path:
    return Path(out) / "timings.json"


def tensorboard_dir(out: Path, stage: str) -> Path:
    """TensorBoard event files of a stage (one subfolder per execution); in no manifest: logs, not artifacts."""
    return Path(out) / "tensorboard" / stage


def data_check_record(out: Path) -> Path:
    return Path(out) / ".data_check.json"


# ---------------------------------------------------------------------------------------------------------------
# An exported artifact folder (pawpular export -> pawpular predict)


def export_manifest(art: Path) -> Path:
    return Path(art) / "manifest.json"


def export_source(art: Path) -> Path:
    return Path(art) / "src"


def export_experiment(art: Path, name: str) -> Path:
    return Path(art) / "experiments" / name_part(name, "ensemble.experiments name")


def exported_model(exp_dir: Path, fold: int | None = None, backbone: str | None = None) -> Path:
    """An exported model file (safetensors): fold k's fine-tuned model, or a frozen backbone of the SVR's sets."""
    if backbone:
        return Path(exp_dir) / "backbones" / name_part(backbone, "embed.backbones name") / "model.safetensors"
    return train_fold_dir(exp_dir, fold) / "model.safetensors"


def inference_notebook(art: Path) -> Path:
    return Path(art) / "inference.ipynb"


# ---------------------------------------------------------------------------------------------------------------
# The checkout (notebooks and the CLI's default config find it from anywhere inside)


def repo_root(start: str | Path | None = None) -> Path:
    """The checkout holding ``pyproject.toml`` and ``src/pawpular``, searched upwards from ``start`` (cwd)."""
    here = Path(start or os.getcwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "src" / "pawpular").is_dir():
            return folder
    return here


def resolve(path: str | Path, root: str | Path | None = None) -> Path:
    """An absolute path as is; a relative one relative to the repo root (notebooks run from notebooks/)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else repo_root(root) / path


def default_config() -> Path:
    """configs/default.yaml from the current folder, or from this checkout when run elsewhere."""
    local = Path("configs/default.yaml")
    repo = Path(__file__).resolve().parents[3] / "configs" / "default.yaml"
    return local if local.is_file() or not repo.is_file() else repo
