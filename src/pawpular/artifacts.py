"""Where every stage reads and writes: files are the only interface between stages.

Every table carries ``Id`` (and ``fold`` where it has one); predictions are on the Pawpularity scale (0-100).

    output/<experiment>/
      config.yaml                       resolved config of the last stage run
      folds.csv                         Id, fold
      train/fold{k}/best.pt             best checkpoint: {"model": state_dict, "model_cfg": {...},
                                        "data_cfg": {"input_size", "mean", "std"}, "epoch", "val_rmse"}
      train/fold{k}/last.pt             resume state (model, optimizer, scheduler, scaler, RNG, epoch)
      train/fold{k}/metrics.csv         epoch, train_loss, val_rmse, lr, seconds
      train/fold{k}/{oof,test}.parquet  Id, (fold,) pred  for one fold
      train/oof.parquet                 Id, fold, pred   (every train Id exactly once)
      train/test.parquet                Id, pred         (mean over folds)
      emb/fold{k}/{train,test}.parquet  Id, e0..e{D-1} (float32): fold k's fine-tuned backbone, every image
      emb/fold{k}/meta.json             cache key of those files
      emb/<backbone>/{train,test}.parquet  frozen pretrained backbone (fold-independent), + meta.json
      svr/study.db                      Optuna study (sqlite)
      svr/best_params.json              best C (and epsilon), gamma per fold, RMSE
      svr/fold{k}/model.pkl             fitted scaler + SVR for fold k (used by predict)
      svr/{oof,test}.parquet            Id, (fold,) pred
      select/selection.json             forward selection of embedding sets (pawpular select)
      ensemble/weights.json             model -> weight, OOF RMSEs
      ensemble/oof.parquet              Id, fold, pred
      submission.csv                    Id, Pawpularity in sample_submission order
"""
from __future__ import annotations

from pathlib import Path


def folds_csv(out: Path) -> Path:
    return out / "folds.csv"


def train_fold_dir(out: Path, fold: int) -> Path:
    return out / "train" / f"fold{fold}"


def best_checkpoint(out: Path, fold: int) -> Path:
    return train_fold_dir(out, fold) / "best.pt"


def last_checkpoint(out: Path, fold: int) -> Path:
    return train_fold_dir(out, fold) / "last.pt"


def preds(out: Path, head: str, split: str) -> Path:
    """OOF (split='oof') or test predictions of a head ('train' = NN head, 'svr', 'ensemble')."""
    return out / head / f"{split}.parquet"


def emb_dir(out: Path, fold: int | None = None, backbone: str | None = None) -> Path:
    """Embeddings of this experiment's fine-tuned fold model, or of a named frozen backbone."""
    if backbone is not None:
        return out / "emb" / backbone
    return out / "emb" / f"fold{fold}"


def emb_file(out: Path, split: str, fold: int | None = None, backbone: str | None = None) -> Path:
    return emb_dir(out, fold, backbone) / f"{split}.parquet"


def svr_dir(out: Path) -> Path:
    return out / "svr"


def study_db(out: Path) -> Path:
    """The SVR stage's Optuna study (sqlite), unless svr.storage names another database."""
    return svr_dir(out) / "study.db"


def svr_model(out: Path, fold: int) -> Path:
    return svr_dir(out) / f"fold{fold}" / "model.pkl"


def submission(out: Path) -> Path:
    return out / "submission.csv"
