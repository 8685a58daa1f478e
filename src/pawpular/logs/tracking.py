"""Training curves and results in TensorBoard and Weights & Biases (``tracking: [tensorboard, wandb]``).

    tracker = tracking.start(ctx, "train")          # the runner, when a stage does its work (rank 0 only)
    tracker.log({"train/loss": 0.61, "train/lr": 4e-3}, step=12, series="fold0", axis="batch")
    tracker.summary({"fold0/best_epoch": 3})
    tracker.close()                                  # the runner, also when the stage fails

What the stages log:
  train     per batch (series fold{k}, axis batch: the fold's batch count) train/loss (that batch's BCE),
            train/lr, train/images_per_s (since the previous batch, times the torchrun world); per epoch (axis
            epoch) val/rmse and train/epoch_loss; per fold (axis fold) best/epoch and best/val_rmse
  svr       per Optuna trial (axis trial: its number) trial/C, trial/oof_rmse (trial/epsilon when tuned), every
            COMPLETE trial of the study, a local worker's too; the summary best/C, best/oof_rmse
  ensemble  weights/<model>, oof/<model> and blend/in_sample, blend/cross_validated, blend/holdout (with a holdout)

Where: TensorBoard event files under ``<experiment>/tensorboard/<stage>/<start time>/[fold{k}]`` (one folder per
execution of a stage, so ``tensorboard --logdir output`` shows every experiment and every rerun); W&B one run per
experiment and stage execution: project ``$WANDB_PROJECT`` (default pawpular), group = the experiment folder's
name, name ``<experiment>/<stage>``, job_type the stage, config = the resolved config with secrets masked.
W&B runs offline unless ``WANDB_MODE`` says otherwise (``wandb sync <experiment>/wandb/offline-run-*`` uploads
them later); its files go to ``<experiment>/wandb/`` unless ``WANDB_DIR`` is set.

Logging never changes results: the backends start with every RNG state saved and restored, the stages only read
numbers they already computed, ``tracking`` enters no stage's plan, and these folders are in no manifest.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib
import logging
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..config.schema import public_dict, redact_url
from ..store import artifacts
from ..store.errors import ConfigError

log = logging.getLogger("pawpular")
BACKENDS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # config name -> the module that must import
STAGES = ("train", "svr", "ensemble")  # the stages that log something; the others get no run
INSTALL = "pip install -r requirements-tracking.txt"


class TrackingError(ConfigError):
    """A tracking backend that is asked for but cannot run (not installed, or its start failed)."""


def require(cfg) -> None:
    """Fail in one line, before any work, when ``cfg.tracking`` names a backend that does not import."""
    for name in cfg.tracking:
        try:
            importlib.import_module(BACKENDS[name])
        except ImportError as e:
            raise TrackingError(
                f"tracking: {name} is not installed ({e}): {INSTALL}  (or: pip install {name})", ("tracking",)
            ) from None


@contextlib.contextmanager
def _rng_kept() -> Iterator[None]:
    """Whatever a backend's start-up draws, the pipeline's random streams are left exactly as they were."""
    import numpy as np

    torch = sys.modules.get("torch")
    state = random.getstate(), np.random.get_state(), torch.get_rng_state() if torch else None
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        if torch is not None:
            torch.set_rng_state(state[2])


class Tracker:
    """Scalars to every backend asked for; with none it does nothing (``enabled`` is False)."""

    def __init__(self, backends: list | None = None):
        self.backends = backends or []
        self.logged_trials: set[int] = set()

    @property
    def enabled(self) -> bool:
        return bool(self.backends)

    def log(self, values: dict[str, float], step: int, series: str = "", axis: str = "step") -> None:
        """``values`` at ``step`` on the x-axis ``axis`` of ``series`` (e.g. a fold); None values are left out."""
        values = {k: float(v) for k, v in values.items() if v is not None}
        for b in self.backends:
            b.log(values, int(step), series, axis)

    def summary(self, values: dict[str, Any]) -> None:
        for b in self.backends:
            b.summary(values)

    def close(self, failed: bool = False) -> None:
        for b in self.backends:
            b.close(failed)
        self.backends = []


class _TensorBoard:
    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.folder, self.writers, self.cls = folder, {}, SummaryWriter

    def log(self, values: dict, step: int, series: str, axis: str) -> None:
        if series not in self.writers:
            self.writers[series] = self.cls(log_dir=str(self.folder / series if series else self.folder))
        for tag, value in values.items():
            self.writers[series].add_scalar(tag, value, step)

    def summary(self, values: dict) -> None:
        pass  # TensorBoard has no run summary: the same numbers are logged as scalars

    def close(self, failed: bool) -> None:
        for w in self.writers.values():
            w.close()


@contextlib.contextmanager
def _argv_masked() -> Iterator[None]:
    """``sys.argv`` with every password masked (``config.redact_url``) while a backend reads it; then as it was."""
    given = sys.argv
    sys.argv = [redact_url(a, "***") for a in given]
    try:
        yield
    finally:
        sys.argv = given


class _WandB:
    def __init__(self, cfg, stage: str):
        import wandb

        mode = os.environ.get("WANDB_MODE") or "offline"
        where = {} if os.environ.get("WANDB_DIR") else {"dir": str(cfg.out)}
        with _argv_masked():  # W&B records the command line: a --set svr.storage=URL holds a password
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT") or "pawpular",
                group=cfg.out.name,
                name=f"{cfg.out.name}/{stage}",
                job_type=stage,
                config=public_dict(cfg, "***"),
                mode=mode,
                settings=wandb.Settings(console="off", silent=True),
                **where,
            )
        self.defined: set[str] = set()
        folder = Path(self.run.dir).parent  # run.dir is the run's files/ folder
        log.info(
            "tracking: W&B run %s (%s) in %s%s",
            self.run.name,
            mode,
            folder,
            f"; upload it later: wandb sync {folder}" if mode == "offline" else "",
        )

    def log(self, values: dict, step: int, series: str, axis: str) -> None:
        prefix = f"{series}/" if series else ""
        x = f"{prefix}{axis}"
        for key in values:  # each metric plotted against its own x-axis (a fold's batches, epochs, trials)
            if prefix + key not in self.defined:
                self.run.define_metric(prefix + key, step_metric=x)
                self.defined.add(prefix + key)
        self.run.log({**{prefix + k: v for k, v in values.items()}, x: step})

    def summary(self, values: dict) -> None:
        self.run.summary.update(values)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def start(ctx, stage: str) -> Tracker:
    """The tracker of one execution of ``stage``: backends of ``ctx.cfg.tracking``, on rank 0 only."""
    from ..machine.distributed import is_lead_process

    cfg = ctx.cfg
    if not cfg.tracking or stage not in STAGES or not ctx.dist.main or not is_lead_process():
        return Tracker()
    require(cfg)
    backends: list = []
    try:
        with _rng_kept():
            if "tensorboard" in cfg.tracking:
                backends.append(_TensorBoard(_run_folder(artifacts.tensorboard_dir(cfg.out, stage))))
            if "wandb" in cfg.tracking:
                backends.append(_WandB(cfg, stage))
    except Exception as e:
        Tracker(backends).close(failed=True)
        raise TrackingError(
            f"tracking: could not start {stage}'s logging ({type(e).__name__}: {e})", ("tracking",)
        ) from e
    return Tracker(backends)


@contextlib.contextmanager
def opened(ctx, stage: str) -> Iterator[Tracker]:
    """``ctx.tracker`` for the block: started before the stage's work, closed after it, also when it fails."""
    ctx.tracker = start(ctx, stage)
    try:
        yield ctx.tracker
    except BaseException:
        ctx.tracker.close(failed=True)
        raise
    finally:
        ctx.tracker.close()
        ctx.tracker = Tracker()


def _run_folder(parent: Path) -> Path:
    """A fresh folder per execution, named by its start time (a rerun never mixes its curves with the last)."""
    base = parent / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    folder, n = base, 1
    while folder.exists():
        n += 1
        folder = base.with_name(f"{base.name}-{n}")
    return folder


# ---------------------------------------------------------------------------------------------------------------
# What the stages log (each a few lines here, so a stage's own code calls one function)


class StepMeter:
    """Per-batch train loss, lr and images/s of one fold (images/s over the time since the previous batch)."""

    def __init__(self, tracker: Tracker, fold: int, epoch: int, batches: int, world: int = 1):
        self.tracker, self.series, self.first, self.world = tracker, f"fold{fold}", epoch * batches, world
        self.t = time.perf_counter()

    def __call__(self, i: int, loss: float, lr: float, images: int) -> None:
        now = time.perf_counter()
        rate = images * self.world / (now - self.t) if now > self.t else None
        self.t = now
        self.tracker.log(
            {"train/loss": loss, "train/lr": lr, "train/images_per_s": rate}, self.first + i + 1, self.series, "batch"
        )


def log_trials(tracker: Tracker, study: Any) -> None:
    """Every COMPLETE trial of ``study`` not logged yet (this process's, a worker's, an earlier run's)."""
    if not tracker.enabled:
        return
    from optuna.trial import TrialState

    for t in sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number):
        if t.number not in tracker.logged_trials:
            tracker.logged_trials.add(t.number)
            tracker.log(
                {
                    "trial/C": t.params.get("C"),
                    "trial/epsilon": t.params.get("epsilon"),
                    "trial/gamma_x": t.params.get("gamma_x"),
                    "trial/oof_rmse": t.value,
                },
                t.number,
                axis="trial",
            )


def log_blend(tracker: Tracker, weights: dict[str, float], summary: dict, holdout: dict) -> None:
    """The ensemble's weights, every model's OOF RMSE and the blend's three scores."""
    scores = {f"weights/{n}": w for n, w in weights.items()}
    scores |= {f"oof/{n}": summary.get(n) for n in weights}
    scores |= {
        "blend/in_sample": summary.get("ensemble"),
        "blend/cross_validated": summary.get("ensemble_cv"),
        "blend/holdout": holdout.get("ensemble"),
        "blend/predict_mean": summary.get("predict_mean"),
    }
    tracker.log(scores, 0)
    tracker.summary({k: v for k, v in scores.items() if v is not None})
