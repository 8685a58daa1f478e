"""Fine-tuning: the loop learns, every Id gets one OOF prediction, resume replays exactly, SSF saves a plain model,
DDP (gloo, 2 processes) trains in sync. Tiny random-weight Swin at 32 px on the 120-image synthetic competition."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import adopt_folds, torchrun

from pawpular.api import run_config
from pawpular.config.schema import ModelConfig, TrainConfig, load_config
from pawpular.data.dataset import PetDataset, build_transform
from pawpular.data.tables import ID, TARGET, read_competition
from pawpular.model import training
from pawpular.model.inference import predict
from pawpular.model.models import build_model, load_checkpoint
from pawpular.runner import run_stage
from pawpular.scores.metrics import rmse
from pawpular.store.errors import ConfigError
from pawpular.store.files import ArtifactError

N_FOLDS = 3
TINY = [
    "device=cpu",
    f"folds.n_folds={N_FOLDS}",
    "model.name=swin_tiny_patch4_window7_224",
    "model.kwargs={embed_dim: 16, depths: [1, 1], num_heads: [1, 2], img_size: 32, window_size: 4}",
    "model.img_size=32",
    "model.use_meta=true",
    "train.epochs=2",
    "train.batch_size=16",
    "train.lr=2e-3",
    "train.num_workers=0",
    "train.patience=0",
]


def make_experiment(data: Path, out: Path, *overrides: str):
    """A config for ``data`` writing to ``out``, with a round-robin folds.csv."""
    cfg = load_config(None, [*TINY, *overrides], data_dir=str(data), output_dir=str(out))
    ids = read_competition(data).train[ID]
    adopt_folds(cfg, pd.DataFrame({ID: ids, "fold": np.arange(len(ids)) % N_FOLDS}))
    return cfg


@pytest.fixture(scope="module")
def trained(small_competition, tmp_path_factory):
    cfg = make_experiment(small_competition, tmp_path_factory.mktemp("train") / "exp")
    return cfg, run_config("train", cfg)


def test_loss_falls_on_a_tiny_set():
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(
            name="swin_tiny_patch4_window7_224",
            img_size=32,
            drop_rate=0.0,
            kwargs=dict(embed_dim=16, depths=[1, 1], num_heads=[1, 2], img_size=32, window_size=4),
        ),
        pretrained=False,
    )
    g = torch.Generator().manual_seed(0)
    batches = [
        dict(image=torch.randn(8, 3, 32, 32, generator=g), meta=torch.zeros(8, 12), target=torch.rand(8, generator=g))
        for _ in range(2)
    ]
    y = np.concatenate([b["target"].numpy() * 100 for b in batches])
    tc = TrainConfig(epochs=15, lr=3e-3, warmup_epochs=0, batch_size=8, channels_last=False)
    opt = training.make_optimizer(model, tc)
    sched = training.make_scheduler(opt, tc, steps_per_epoch=2)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    before = rmse(predict(model, batches, "cpu"), y)
    losses = [
        training.train_one_epoch(model, batches, opt, sched, scaler, torch.device("cpu"), tc, show=False)
        for _ in range(tc.epochs)
    ]
    after = rmse(predict(model, batches, "cpu"), y)
    assert losses[-1] < losses[0] - 0.01
    assert after < 0.25 * before, (before, after)
    assert sched.get_last_lr()[0] == pytest.approx(0.0, abs=1e-9)  # the cosine ran its full course


def test_oof_covers_every_id_once_and_files_agree(trained, small_competition):
    cfg, out = trained
    comp = read_competition(small_competition)
    folds = pd.read_csv(cfg.out / "folds" / "folds.csv", dtype={ID: str})
    oof = pd.read_parquet(out / "oof.parquet")
    assert list(oof.columns) == [ID, "fold", "pred"]
    assert sorted(oof[ID]) == sorted(comp.train[ID]) and not oof[ID].duplicated().any()
    assert (oof.merge(folds, on=ID, suffixes=("", "_csv")).eval("fold == fold_csv")).all()
    assert np.isfinite(oof["pred"]).all() and oof["pred"].between(0, 100).all() and oof["pred"].std() > 0
    test = pd.read_parquet(out / "test.parquet")
    assert test[ID].tolist() == comp.test[ID].tolist() and test["pred"].between(0, 100).all()
    per_fold = [pd.read_parquet(out / f"fold{k}" / "test.parquet")["pred"].to_numpy() for k in range(N_FOLDS)]
    np.testing.assert_allclose(test["pred"], np.mean(per_fold, axis=0))
    for k in range(N_FOLDS):
        d = out / f"fold{k}"
        assert not (d / "last.pt").exists()  # removed once the fold is done
        metrics = pd.read_csv(d / "metrics.csv")
        assert metrics["epoch"].tolist() == [1, 2] and metrics["val_rmse"].gt(0).all()
        ckpt = torch.load(d / "best.pt", weights_only=True)
        assert set(ckpt) == {"model", "model_cfg", "data_cfg", "epoch", "val_rmse"}
        # train.checkpoint: last (the default): the fold ships the schedule's last epoch, whatever its own curve says
        assert ckpt["data_cfg"]["input_size"] == (3, 32, 32) and ckpt["epoch"] == len(metrics) == 2
        assert ckpt["val_rmse"] == pytest.approx(metrics["val_rmse"].iloc[-1])
        fold_oof = oof[oof["fold"] == k]
        target = comp.train.set_index(ID).loc[fold_oof[ID], TARGET].to_numpy()
        assert rmse(fold_oof["pred"], target) == pytest.approx(ckpt["val_rmse"])


def test_best_checkpoint_reproduces_the_oof_predictions(trained, small_competition):
    cfg, out = trained
    comp = read_competition(small_competition)
    model, dc = load_checkpoint(out / "fold1" / "best.pt")
    oof = pd.read_parquet(out / "fold1" / "oof.parquet")
    df = comp.train.set_index(ID).loc[oof[ID]].reset_index()
    ds = PetDataset(
        df, comp.root / "train", build_transform(dc["input_size"][1], dc["mean"], dc["std"], train=False), 32
    )
    loader = torch.utils.data.DataLoader(ds, batch_size=64)
    pred = predict(model, loader, "cpu", tta_hflip=cfg.train.tta_hflip)
    np.testing.assert_allclose(pred, oof["pred"], atol=1e-4)


def test_rerun_skips_finished_folds(trained, caplog):
    cfg, out = trained
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.p*")}
    caplog.set_level("INFO", logger="pawpular")
    run_config("train", cfg)
    assert "train: cached" in caplog.text  # the stage's manifest holds: nothing to look at fold by fold
    (out / "manifest.json").unlink()  # without it, each fold's own manifest decides
    caplog.clear()
    run_config("train", cfg)
    assert caplog.text.count("already trained") == N_FOLDS
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.p*") if p.parent.name.startswith("fold")} == {
        p: t for p, t in stamps.items() if p.parent.name.startswith("fold")
    }


def test_clear_errors_for_missing_folds_and_unknown_fold(small_competition, tmp_path):
    with pytest.raises(ConfigError, match=r"train.folds=\[7\]"):  # caught when the config loads, before any work
        make_experiment(small_competition, tmp_path / "exp", "train.folds=[7]")
    cfg = make_experiment(small_competition, tmp_path / "exp")
    (tmp_path / "exp" / "folds" / "folds.csv").unlink()
    with pytest.raises(ArtifactError, match="run `pawpular folds`"):
        run_config("train", cfg)


def _final_weights(store: dict, stop_at: tuple[int, int] | None = None):
    def on_epoch_end(fold: int, epoch: int, model) -> None:
        store[(fold, epoch)] = {k: v.clone() for k, v in model.state_dict().items()}
        if stop_at == (fold, epoch):
            raise KeyboardInterrupt("simulated kill")

    return on_epoch_end


def test_interrupted_then_resumed_run_ends_with_the_same_weights(small_competition, tmp_path):
    # workers, mixup, dropout and augmentations all draw random numbers: each must replay after the resume
    over = ["train.epochs=2", "train.folds=[0]", "train.num_workers=1", "train.mixup_alpha=0.4", "model.drop_rate=0.3"]
    a, b = {}, {}
    run_stage("train", make_experiment(small_competition, tmp_path / "a", *over), {"on_epoch_end": _final_weights(a)})
    cfg_b = make_experiment(small_competition, tmp_path / "b", *over)
    with pytest.raises(KeyboardInterrupt):
        run_stage("train", cfg_b, {"on_epoch_end": _final_weights(b, stop_at=(0, 0))})
    fold_dir = tmp_path / "b" / "train" / "fold0"
    assert (fold_dir / "last.pt").exists() and not (fold_dir / "oof.parquet").exists()
    assert torch.load(fold_dir / "last.pt", weights_only=True)["state"]["epoch"] == 1
    b.clear()
    run_stage("train", cfg_b, {"on_epoch_end": _final_weights(b)})
    assert list(b) == [(0, 1)]  # only the second epoch ran again
    assert all(torch.equal(a[(0, 1)][k], v) for k, v in b[(0, 1)].items())
    ma, mb = ((tmp_path / x / "train" / "fold0" / "metrics.csv").read_bytes() for x in "ab")
    assert ma == mb  # byte for byte: no timings in it
    for name in ("oof.parquet", "test.parquet"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(tmp_path / "a/train/fold0" / name), pd.read_parquet(fold_dir / name)
        )


def test_ssf_run_saves_a_plain_checkpoint(small_competition, tmp_path):
    cfg = make_experiment(
        small_competition, tmp_path / "exp", "model.finetune=ssf", "train.epochs=1", "train.folds=[2]", "train.lr=1e-2"
    )
    out = run_config("train", cfg)
    assert not (out / "oof.parquet").exists()  # folds 0 and 1 are not trained
    ckpt = torch.load(out / "fold2" / "best.pt", weights_only=True)
    base = build_model(cfg.model, pretrained=False)
    assert set(ckpt["model"]) == set(base.state_dict())
    assert sum(v.numel() for k, v in ckpt["model"].items()) == sum(v.numel() for v in base.state_dict().values())
    load_checkpoint(out / "fold2" / "best.pt")  # a strict load into the base architecture
    trained_norm = ckpt["model"]["backbone.layers.0.blocks.0.norm1.weight"]
    torch.manual_seed(cfg.seed + 1000 * 2)  # the fold's initial weights: SSF changed the merged layers
    init = build_model(cfg.model, pretrained=False).state_dict()["backbone.layers.0.blocks.0.norm1.weight"]
    assert not torch.allclose(trained_norm, init)


DDP_SCRIPT = """
import logging, os, sys, torch
from pawpular.config.schema import load_config
from pawpular.runner import run_stage
logging.basicConfig(level=logging.INFO)
cfg = load_config(sys.argv[1])
rank = int(os.environ["RANK"])
def record(fold, epoch, model):
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, f"{sys.argv[2]}/rank{rank}_fold{fold}.pt")
run_stage("train", cfg, {"on_epoch_end": record})
run_stage("embed", cfg)
"""


@pytest.mark.slow
def test_ddp_two_processes_gloo_train_then_embed(small_competition, tmp_path):
    """train, then embed, in one torchrun launch of two processes (gloo): the ranks end each fold with the same
    weights, each sees half of the batches; the embeddings equal one process's (float rounding), rank 0 speaks."""
    import yaml

    cfg = make_experiment(small_competition, tmp_path / "exp", "train.epochs=1", "train.batch_size=8")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    (tmp_path / "ddp.py").write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        torchrun(str(tmp_path / "ddp.py"), str(tmp_path / "cfg.yaml"), str(tmp_path)),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("DDP: rank 1 of 2") == 2 and "gloo" in proc.stderr  # in train, and again in embed
    for k in range(N_FOLDS):  # gradients were averaged: both ranks end every fold with the same weights
        w0, w1 = (torch.load(tmp_path / f"rank{r}_fold{k}.pt", weights_only=True) for r in (0, 1))
        assert all(torch.equal(w0[n], w1[n]) for n in w0)
    comp = read_competition(small_competition)
    oof = pd.read_parquet(cfg.out / "train" / "oof.parquet")
    assert sorted(oof[ID]) == sorted(comp.train[ID]) and oof["pred"].between(0, 100).all()
    # each rank saw half of the fold's training images: 80 / 2 / 8 = 5 steps, logged once (rank 0 only)
    assert proc.stderr.count("fold 0: 80 train / 40 val images") == 1 and "5 steps/epoch" in proc.stderr
    # embed: each rank embeds every 2nd image, one gather, rank 0 writes; one process on the same checkpoints
    assert proc.stderr.count("embed summary: fold0=computed, fold1=computed, fold2=computed") == 1
    one = Path(shutil.copytree(cfg.out, tmp_path / "one" / "exp", ignore=shutil.ignore_patterns("emb")))
    run_stage("embed", load_config(str(tmp_path / "cfg.yaml"), [], output_dir=str(one)))
    for k in range(N_FOLDS):
        assert (cfg.out / "emb" / f"fold{k}" / "manifest.json").is_file()
        for split in ("train", "test"):
            ddp, alone = (pd.read_parquet(r / "emb" / f"fold{k}" / f"{split}.parquet") for r in (cfg.out, one))
            assert list(ddp.columns) == list(alone.columns) and ddp[ID].tolist() == alone[ID].tolist()
            np.testing.assert_allclose(ddp.drop(columns=ID).to_numpy(), alone.drop(columns=ID).to_numpy(), atol=1e-5)
    assert not [p for p in cfg.out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".write-probe")]
