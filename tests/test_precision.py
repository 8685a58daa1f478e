"""The GPU path rehearsed on the CPU: explicit precision (bf16, fp16 with the GradScaler), channels_last and
torch.compile through the real stages, under torchrun too; resume across a SIGKILL with the scaler's state; the
review's findings (CUDA RNG states on fewer GPUs, channels_last from the policy alone).

A CPU runs autocast to bf16 and fp16, ``torch.amp.GradScaler("cpu")``, channels_last and inductor (with gcc). What it
cannot run (CUDA kernels, cuDNN, nccl, cuML, cuDF) is not here. The end-to-end runs are the tiny config of
``conftest.tiny_args`` on the 120-photo competition; ``experiment_run`` is its fp32 run. One torch.compile in the
suite: the torchrun run's (both ranks compile at once, one graph each).

Tolerances, and why:
- OOF RMSE of the NN head within ``OOF_TOL`` of fp32's. A lower precision perturbs every activation (fp16 keeps 11
  bits of mantissa, bf16 8), and training amplifies that like a change of seed: four fp32 runs of this config
  (seeds 42, 1, 2, 3) put their NN OOF RMSE at 18.38, 18.37, 18.01, 18.19 (a spread of 0.37). fp16 gets half that
  spread, 0.2 (it measured 0.001 from fp32). The bf16 torchrun run is another run, not a perturbed one: its two
  ranks take a batch each, so it makes half the optimizer steps; it gets 0.5, the spread rounded up (it measured
  18.72 vs 18.38). Both stay far below what a broken path costs: predicting the mean scores 20.6.
- predict equals the pipeline's submission within 1e-4 (the existing bar), since predict honours each unit's
  recorded policy on this CPU; where the CPU lacks the instructions predict runs fp32 (warned once) and the
  submission moves by less than 0.2 (third decimal of the embeddings, amplified by the SVR), but it moves.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import CONFIG, TINY, build_run, commits_counted, fault_commits, tiny_args, torchrun

import pawpular
from pawpular.data.tables import ID, TARGET, read_competition
from pawpular.model import inference, training
from pawpular.model.inference import Policy
from pawpular.scores.metrics import rmse

SRC = str(Path(pawpular.__file__).resolve().parents[1])
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p),
    "OMP_NUM_THREADS": "1",
}
FP16 = ["train.precision=fp16", "embed.precision=fp16", "train.channels_last=true", "embed.channels_last=true"]
BF16 = [
    "train.precision=bf16",
    "embed.precision=bf16",
    "train.channels_last=true",
    "embed.channels_last=true",
    "train.compile=true",
]
OOF_TOL = {"fp16": 0.2, "bf16": 0.5}


# --- units: the policy, the scaler, the RNG states ------------------------------------------------------------


def test_policy_auto_is_todays_rule_and_an_explicit_precision_holds_on_any_device(caplog):
    assert Policy.for_run("cpu") == Policy("fp32", False)
    assert Policy.for_run("cuda", bf16=True) == Policy("bf16", True)
    assert Policy.for_run("cuda", bf16=False) == Policy("fp16", True)
    assert Policy.for_run("cuda", amp=False, bf16=True) == Policy("fp32", True)  # auto follows train.amp
    assert Policy.for_run("cpu", "bf16", True) == Policy("bf16", True)
    assert Policy.for_run("cpu", "fp16", False) == Policy("fp16", False)
    assert Policy.for_run("cuda", "fp32", False, bf16=True) == Policy("fp32", False)
    with caplog.at_level(logging.WARNING, logger="pawpular"):
        assert Policy.for_run("cuda", "bf16", bf16=False) == Policy("fp16", True)  # a T4 asked for bf16
    assert "no native bf16" in caplog.text


def test_predict_honours_a_policy_where_the_cpu_has_the_instructions(caplog):
    bf16 = Policy("bf16", channels_last=True)
    assert bf16.usable_on("cpu", native=True) == bf16  # channels_last holds on a CPU too
    with caplog.at_level(logging.WARNING, logger="pawpular"):
        assert Policy("fp16", True).usable_on("cpu", native=False) == Policy("fp32", True)
        assert Policy("fp16", True).usable_on("cpu", native=False) == Policy("fp32", True)
    assert caplog.text.count("no fp16 instructions") == 1
    flags = inference.cpu_flags()
    assert inference.cpu_native("bf16") == bool(flags & {"avx512_bf16", "amx_bf16"}) and inference.cpu_native("fp32")


def test_fp16_trains_on_a_cpu_with_a_scaler_that_records_its_state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 1))
    model.to(memory_format=torch.channels_last)
    scaler = training.grad_scaler("fp16", "cpu")
    assert scaler.is_enabled() and not training.grad_scaler("bf16", "cpu").is_enabled()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(3):
        with inference.autocast("cpu", "fp16"):
            out = model(torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last))
        assert out.dtype == torch.float16  # autocast to fp16 ran on the CPU
        scaler.scale(torch.nn.functional.mse_loss(out.float().squeeze(1), torch.zeros(2))).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    state = scaler.state_dict()
    # finite steps counted, overflowing ones halve the scale (fp16's range: 65504): either way not a fresh state
    assert (state["_growth_tracker"], state["scale"]) != (0, 2.0**16)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    again = training.grad_scaler("fp16", "cpu")
    again.load_state_dict(state)
    assert again.state_dict() == state


def test_resume_restores_the_cuda_rng_states_that_fit(monkeypatch, caplog):
    """last.pt from a 2-GPU machine resumed on one: set_rng_state_all would raise; the states that fit come back."""
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.setdefault(device, s))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("every saved state restored"))
    monkeypatch.setattr(
        torch.cuda,
        "get_rng_state_all",
        lambda: [torch.tensor([1], dtype=torch.uint8), torch.tensor([2], dtype=torch.uint8)],
    )
    state = training.rng_state()
    with caplog.at_level(logging.WARNING, logger="pawpular"):
        training.set_rng_state(state)
    assert list(restored) == [0] and restored[0].tolist() == [1]
    assert "RNG states of 2 GPUs, this machine has 1" in caplog.text


def test_forward_batches_puts_the_model_in_the_policy_layout():
    from pawpular.config.schema import ModelConfig
    from pawpular.model.models import build_model

    model = build_model(ModelConfig(name="resnet10t", img_size=32, use_meta=True), pretrained=False)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    batches = [{"image": torch.randn(2, 3, 32, 32), "meta": torch.zeros(2, 12)}]
    plain = inference.forward_batches(model, batches, "cpu", Policy("fp32", False), pred_tta=False).pred
    assert conv.weight.is_contiguous()
    cl = inference.forward_batches(model, batches, "cpu", Policy("fp32", True), pred_tta=False).pred
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)  # predict converts the model too
    np.testing.assert_allclose(cl, plain, atol=1e-4)


# --- end to end: fp16 with the scaler and channels_last; a SIGKILL mid-epoch -----------------------------------


@pytest.fixture(scope="module")
def fp16_run(small_competition, tmp_path_factory) -> Path:
    return build_run(small_competition, tmp_path_factory.getbasetemp() / "fp16_run", *FP16)


def _nn_oof_rmse(run: Path, comp: Path) -> float:
    oof = pd.read_parquet(run / "train" / "oof.parquet")
    return rmse(oof["pred"], read_competition(comp).train.set_index(ID).loc[oof[ID], TARGET].to_numpy())


def _assert_recorded(run: Path, precision: str) -> None:
    for manifest in [*run.glob("train/fold*/manifest.json"), *run.glob("emb/*/manifest.json")]:
        assert json.loads(manifest.read_text())["info"]["policy"] == {"precision": precision, "channels_last": True}


def _assert_predict_matches(run: Path, comp: Path, tmp_path: Path, precision: str, monkeypatch, caplog) -> None:
    """predict (this process) honours the recorded policy: the pipeline's submission; without the instructions,
    fp32 with one warning: close, not equal."""
    from pawpular.ship.exporter import export
    from pawpular.ship.predictor import predict

    art = export(run, tmp_path / "art")
    info = json.loads((art / "manifest.json").read_text())["experiments"][run.name]
    assert (
        info["nn"]["0"]["policy"]
        == info["embeddings"]["fold0"]["policy"]
        == {"precision": precision, "channels_last": True}
    )
    pipeline = pd.read_csv(run / "submission.csv")
    got = {}
    for native in (True, False):
        monkeypatch.setattr(inference, "cpu_native", lambda p, native=native: native or p == "fp32")
        inference._WARNED.clear()
        with caplog.at_level(logging.WARNING, logger="pawpular"):
            got[native] = pd.read_csv(predict(art, comp, tmp_path / f"sub_{native}.csv", device="cpu"))
        assert got[native]["Id"].tolist() == pipeline["Id"].tolist()
    assert (got[True]["Pawpularity"] - pipeline["Pawpularity"]).abs().max() < 1e-4
    moved = (got[False]["Pawpularity"] - pipeline["Pawpularity"]).abs()
    assert 0 < moved.max() < 0.2 and caplog.text.count(f"no {precision} instructions") == 1


@pytest.mark.slow
def test_fp16_end_to_end_is_close_to_fp32_and_predict_repeats_it(
    fp16_run, experiment_run, small_competition, tmp_path, monkeypatch, caplog
):
    _assert_recorded(fp16_run, "fp16")
    fp32, fp16 = (_nn_oof_rmse(r, small_competition) for r in (experiment_run, fp16_run))
    assert fp16 != fp32 and abs(fp16 - fp32) < OOF_TOL["fp16"], (fp16, fp32)
    _assert_predict_matches(fp16_run, small_competition, tmp_path, "fp16", monkeypatch, caplog)


@pytest.mark.slow
def test_sigkill_mid_epoch_in_fp16_resumes_with_the_scalers_state(
    fp16_run, small_competition, tmp_path, monkeypatch, caplog
):
    from pawpular.config.schema import load_config
    from pawpular.runner import run_stage

    out, probe = tmp_path / "killed", tmp_path / "probe" / "exp"
    for folder in (out, probe):
        shutil.copytree(fp16_run / "folds", folder / "folds")
    env = {**ENV, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the same kernels' rounding as this process

    def train(folder: Path, **extra: str) -> subprocess.CompletedProcess:
        args = tiny_args(small_competition, folder, *FP16, "train.folds=[0]")
        cmd = [sys.executable, "-m", "pawpular.cli", "train", *args]
        return subprocess.run(cmd, env={**env, **extra}, capture_output=True, text=True)

    # A probe run (in this process: a child costs its imports) lists its file commits; the one after epoch 1's
    # last.pt comes once epoch 2 has trained: killed there, epoch 2's work is lost and last.pt holds epoch 1 (a kill
    # by the clock raced a fast epoch here).
    from pawpular.cli import main as cli

    log = tmp_path / "commits.log"
    with commits_counted(log):
        assert cli.main(["train", *tiny_args(small_competition, probe, *FP16, "train.folds=[0]")]) == 0
    after_epoch_1 = next(k for k, path in fault_commits(log) if path.endswith("fold0/last.pt")) + 1
    r = train(out, PAWPULAR_FAULT_KILL_AT=str(after_epoch_1))
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    last = out / "train" / "fold0" / "last.pt"
    saved = torch.load(last, weights_only=True)
    assert saved["state"]["epoch"] == 1 and not (out / "train" / "fold0" / "oof.parquet").exists()
    assert saved["scaler"] != training.grad_scaler("fp16", "cpu").state_dict()  # restoring it matters

    seen = {}
    restore = training.Trainer.restore

    def spy(self, path, key):
        found = restore(self, path, key)
        seen["scaler"] = self.scaler.state_dict()
        return found

    monkeypatch.setattr(training.Trainer, "restore", spy)
    cfg = load_config(CONFIG, [*TINY, *FP16, "train.folds=[0]"], data_dir=str(small_competition), output_dir=str(out))
    with caplog.at_level(logging.INFO, logger="pawpular"):
        run_stage("train", cfg)
    assert "fold 0: resuming after epoch 1 of 2" in caplog.text
    assert seen["scaler"] == saved["scaler"]
    resumed, whole = (pd.read_parquet(r / "train" / "fold0" / "oof.parquet") for r in (out, fp16_run))
    np.testing.assert_allclose(resumed["pred"], whole["pred"], atol=1e-4)  # as the uninterrupted fp16 run


# --- torchrun (gloo, 2 processes): train and embed in bf16 with compile and channels_last ----------------------


@pytest.mark.slow
def test_torchrun_bf16_compiled_channels_last(experiment_run, small_competition, tmp_path, monkeypatch, caplog):
    from pawpular.cli import main as cli
    from pawpular.model.models import load_checkpoint

    out = tmp_path / "ddp"
    shutil.copytree(experiment_run / "folds", out / "folds")
    args = tiny_args(small_competition, out, *BF16)
    cmd = torchrun("-m", "pawpular.cli", "all", *args)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr  # `all` in one launch: train and embed on both ranks, folds, svr and ensemble on rank 0
    assert err.count("DDP: rank 1 of 2 (local rank 1, gloo)") == 2 and "== embed done" in err
    assert "Grad strides do not match" not in err  # channels_last before DDP builds its buckets
    assert "cpu, bf16, channels_last, compiled" in err
    with caplog.at_level(logging.INFO, logger="pawpular"):
        assert (out / "submission.csv").is_file() and cli.main(["all", *args]) == 0
    assert caplog.text.count("cached in") == 5, caplog.text  # done: folds, train, embed, svr, ensemble
    caplog.clear()
    _assert_recorded(out, "bf16")
    for k in range(3):  # the compiled module's keys (_orig_mod.) never reach a checkpoint: a plain model loads it
        ckpt = torch.load(out / "train" / f"fold{k}" / "best.pt", weights_only=True)
        assert not [n for n in ckpt["model"] if "_orig_mod" in n]
        load_checkpoint(out / "train" / f"fold{k}" / "best.pt")  # strict
    fp32, bf16 = (_nn_oof_rmse(r, small_competition) for r in (experiment_run, out))
    assert bf16 != fp32 and abs(bf16 - fp32) < OOF_TOL["bf16"], (bf16, fp32)
    _assert_predict_matches(out, small_competition, tmp_path, "bf16", monkeypatch, caplog)


# --- svr.max_kernel_gb: every local worker's kernels and each concurrent fit's cache ----------------------------


def test_kernel_budget_counts_every_worker_and_each_cuml_fits_cache(monkeypatch):
    from pawpular.machine import backend
    from pawpular.svr import memory as svr_memory

    fold_of = np.repeat(np.arange(5), 2000)  # 8,000 train rows a fold: 3.0 GB of kernels, 0.24 GB of cache a fit
    kernels, cache = svr_memory.kernel_gb(fold_of), svr_memory.fit_cache_gb(fold_of)
    # by hand: 5 folds x 8,000 x 10,000 float64 = 3.2e9 bytes; one fit's float32 8,000 x 8,000 = 2.56e8 bytes (under
    # the 1 GiB cache_size), in GiB
    assert kernels == pytest.approx(3.2e9 / 1024**3) and cache == pytest.approx(2.56e8 / 1024**3)
    monkeypatch.setattr(backend, "use_rapids", lambda device: device == "cuda")
    assert svr_memory.memory_gb(fold_of, "cuda") == pytest.approx(kernels + cache)  # cuML: one fit at a time
    assert svr_memory.memory_gb(fold_of, "cuda", workers=3) == pytest.approx(3 * (kernels + cache))
    assert svr_memory.memory_gb(fold_of, "cpu", workers=2) == pytest.approx(2 * kernels)  # libsvm: RAM, as it needs
    monkeypatch.setattr(backend, "svr_precomputed_ok", lambda device: True)  # a cuML of 26.02+
    assert svr_memory.resolve_kernel_cache("auto", fold_of, 3.1, "cpu") == "precomputed"
    assert svr_memory.resolve_kernel_cache("auto", fold_of, 3.1, "cuda") == "plain"  # the cache tips it over
    # one worker fits in 4 GB; three on the same machine do not (each builds its own kernels)
    assert svr_memory.resolve_kernel_cache("auto", fold_of, 4.0, "cuda", workers=1) == "precomputed"
    assert svr_memory.resolve_kernel_cache("auto", fold_of, 4.0, "cuda", workers=3) == "plain"


def test_a_tuned_width_counts_its_distances_and_the_kernels_of_the_folds_fit_at_once(monkeypatch):
    from pawpular.svr import head as svr_head
    from pawpular.svr import memory as svr_memory

    fold_of = np.repeat(np.arange(5), 2000)  # 8,000 train x 10,000 rows a fold: 0.596 GB of float64 kernels
    one_fold = 8 * 8000 * 10000 / 2**30
    monkeypatch.setattr(svr_head, "_n_jobs", lambda device, n: 2)  # two folds fit at once on this CPU
    kernels = svr_memory.kernel_gb(fold_of)
    assert kernels == pytest.approx(5 * one_fold)  # the distances: one matrix per fold, as the kernels were
    assert svr_memory.memory_gb(fold_of, "cpu", tuned_width=True) == pytest.approx(kernels + 2 * one_fold)
    assert svr_memory.memory_gb(fold_of, "cpu", workers=2, tuned_width=True) == pytest.approx(
        2 * (kernels + 2 * one_fold)
    )
    assert svr_memory.resolve_kernel_cache("auto", fold_of, 3.1, "cpu") == "precomputed"
    assert svr_memory.resolve_kernel_cache("auto", fold_of, 3.1, "cpu", tuned_width=True) == "plain"
    assert svr_memory.resolve_kernel_cache("auto", fold_of, 4.2, "cpu", tuned_width=True) == "precomputed"
