"""The stage runner: what every stage needs around its own work, done once here.

    run_stage("svr", cfg)   lock -> device -> data check -> upstream done? -> manifest verdict (skip when done)
                            -> clear manifest -> stage.run -> commit manifest -> config.yaml, timings.json
    status(cfg)             each stage: done / stale (why) / damaged / missing / partial, without running anything

Rules it enforces: only rank 0 of a torchrun launch writes; a stage whose upstream is not done refuses with the
command to run; a cache hit never overwrites a stage's recorded time; ``config.yaml`` is assembled from the
manifests, so it says what made the artifacts, never what was merely asked for.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import stages
from .config.schema import Config, save_config
from .logs import tracking
from .machine.distributed import Dist, is_lead_process, process_group
from .store import artifacts, manifest
from .store.errors import env_number
from .store.files import ArtifactError, digest_or_none, read_json, write_json

log = logging.getLogger("pawpular")
# Environment knobs a stage reads mid-run: checked before it starts, so a bad value refuses before anything changes.
ENV_KNOBS = (("PAWPULAR_PROGRESS_SECONDS", float, None), ("PAWPULAR_SVR_THREADS", int, 1))  # < 0: no progress lines
DERIVED = "derived"  # a plan's config entry for values computed from the config (transforms, fold lists): not settings


@dataclass
class Context:
    """What a stage's plan and run get: the config, the resolved device, the launch, and the data (read once)."""

    cfg: Config
    device: str = "cpu"
    dist: Dist = field(default_factory=Dist)
    hooks: dict = field(default_factory=dict)  # test hooks, e.g. on_epoch_end(fold, epoch, model) in train
    tracker: tracking.Tracker = field(default_factory=tracking.Tracker)  # curves to TensorBoard / W&B (logs only)
    read_only: bool = False  # a reading command (status, export): the photo digests are never saved
    _comp: Any = None
    _images: dict | None = None

    @property
    def out(self) -> Path:
        return self.cfg.out

    @property
    def comp(self) -> Any:
        if self._comp is None:
            from .data.tables import read_competition

            self._comp = read_competition(self.cfg.data)
        return self._comp

    def images_digest(self, split: str) -> str:
        if self._images is None:
            from .data.digest import images_digest

            self._images = images_digest(self.comp, artifacts.data_check_record(self.out), save=not self.read_only)
        return self._images[split]

    def data_inputs(self, *names: str, images: tuple[str, ...] | bool = ()) -> dict[str, str | None]:
        """Digests of the competition's CSVs (by file name) and of the photos of ``images`` (True: both splits)."""
        found = {f"data:{n}": digest_or_none(self.cfg.data / n) for n in names}
        for split in ("train", "test") if images is True else images or ():
            found[f"data:{split} photos"] = self.images_digest(split)
        return found

    def file_inputs(self, paths: list[Path]) -> dict[str, str | None]:
        """Digests of experiment files, labelled by their path inside the experiment folder."""
        return {artifacts.relative(self.out, p): digest_or_none(p) for p in paths}


# ---------------------------------------------------------------------------------------------------------------
# Verdicts


def stage_verdict(ctx: Context, name: str, plan: stages.Plan | None = None) -> manifest.Verdict:
    """This stage's own verdict: its manifest against its current plan."""
    stage = stages.get(name)
    plan = plan or stage.plan(ctx)
    v = manifest.verdict(artifacts.manifest(ctx.out, name), ctx.out, plan.config, plan.inputs)
    if v.state == manifest.MISSING and getattr(stage, "partial", None) and (why := stage.partial(ctx)):
        return manifest.Verdict(manifest.PARTIAL, [why])
    if v.done and plan.stale_if is not None and (reasons := plan.stale_if(v.record)):
        return manifest.Verdict(manifest.STALE, reasons, v.record)
    return v


def upstream(cfg: Config, name: str) -> list[str]:
    """Every stage ``name`` reads from, directly or through others, in pipeline order."""
    seen: list[str] = []

    def visit(n: str) -> None:
        for u in stages.needs(n, cfg):
            if u not in seen:
                visit(u)
                seen.append(u)

    visit(name)
    return [s for s in (*stages.PIPELINE, *stages.ON_DEMAND) if s in seen]


def not_needed_why(cfg: Config, name: str) -> str:
    from .recipe import describe

    return f"nothing the config asks for reads it ({describe(cfg)}); `pawpular {name}` runs it anyway"


def chain(ctx: Context, names: list[str]) -> dict[str, manifest.Verdict]:
    """Verdicts of ``names`` in order; a stage downstream of one that is not done is stale through it."""
    out: dict[str, manifest.Verdict] = {}
    for name in names:
        v = stage_verdict(ctx, name)
        blocked = [u for u in stages.needs(name, ctx.cfg) if u in out and not out[u].done]
        if v.done and blocked:
            v = manifest.Verdict(manifest.STALE, [f"upstream {u} is {out[u].state}" for u in blocked], v.record)
        out[name] = v
    return out


def status(cfg: Config, names: list[str] | None = None) -> dict[str, manifest.Verdict]:
    """Each pipeline stage's verdict (reads and hashes files; writes nothing, so it works on a read-only
    experiment); a stage nothing needs (``needed``) is "not needed", whatever its files."""
    names = list(names or stages.PIPELINE)
    want = stages.needed(cfg)
    verdicts = chain(Context(cfg, read_only=True), [n for n in names if n in want or n not in stages.PIPELINE])
    return {n: verdicts.get(n) or manifest.Verdict(manifest.NOT_NEEDED, [not_needed_why(cfg, n)]) for n in names}


def fix_command(cfg: Config, name: str, v: manifest.Verdict) -> str:
    """The command that makes stage ``name`` done: with train.folds naming only some folds, rerunning the same
    command would train the same folds again, so the command trains the rest."""
    if name == "train" and v.state == manifest.PARTIAL and cfg.train.folds is not None:
        return (
            f"`pawpular train --set train.folds=null` (train.folds={cfg.train.folds} trains only those; or list "
            "the missing folds)"
        )
    return f"`pawpular {name}` (or `pawpular all`, which recomputes exactly what is stale)"


def require_upstream(ctx: Context, name: str) -> None:
    for u, v in chain(ctx, upstream(ctx.cfg, name)).items():
        if not v.done:
            raise ArtifactError(f"{name} needs {u}, which is {v.state} ({v.why()}): run {fix_command(ctx.cfg, u, v)}")


# ---------------------------------------------------------------------------------------------------------------
# Running


def check_writable(folder: Path, data: Path | None = None, experiment: str | None = None) -> None:
    """Fail before any long work when the experiment folder cannot be written (read-only, a file, no space), or
    must not be (the competition folder, a non-empty folder that holds no experiment: ``guards``)."""
    from .store.errors import WriteError
    from .store.files import temp_path
    from .store.guards import check_experiment_folder
    from .store.path_faults import check_output_path

    check_output_path(folder, "output folder")  # a file, or a dangling link, where the folder should be
    check_experiment_folder(folder, data, experiment)
    probe = temp_path(folder / "write-probe", str(os.getpid()))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise WriteError(e.errno, e.strerror, str(folder)) from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)


def check_data_folder(data: Path) -> None:
    """The competition folder is a folder (DataError naming what it is instead), before the output is made."""
    from .store.files import not_a_folder

    if why := not_a_folder(data):
        from .data.tables import DataError, Problem

        raise DataError([Problem(str(data), "folder", f"competition folder {why}")])


def run_stage(name: str, cfg: Config, hooks: dict | None = None) -> stages.Result:
    """Run one stage with everything around it; returns what it wrote (or, when cached, what it had written)."""
    from .machine.backend import resolve_device
    from .store.lock import experiment_lock

    stage = stages.get(name)
    for knob, kind, low in ENV_KNOBS:
        env_number(knob, 1, kind, low)
    device = resolve_device(cfg.device)
    t0 = time.time()
    distributed = getattr(stage, "DISTRIBUTED", False)
    if not distributed and not is_lead_process():
        return stages.Result([], cached=True)  # under torchrun only train and embed use the other ranks
    with process_group(device, distributed) as dist:  # the others run on rank 0 alone, outside the group
        ctx = Context(cfg, device, dist, hooks or {})
        if dist.main:
            check_data_folder(cfg.data)  # every stage reads the competition: refused before a folder is made
            check_writable(cfg.out, cfg.data, cfg.experiment)
        with experiment_lock(cfg.out, name) if dist.main else contextlib.nullcontext():
            if dist.main:
                log.info("== %s ==", name)
            if stage.IMAGES and dist.main:
                from .data.digest import ensure_valid

                ctx._comp = ensure_valid(cfg.data, artifacts.data_check_record(cfg.out))
            require_upstream(ctx, name)
            result = run_planned(ctx, name)
            if dist.main and hasattr(stage, "remove_leftovers"):
                stage.remove_leftovers(
                    ctx
                )  # leftovers of killed runs that no manifest lists (e.g. a done fold's last.pt)
    if dist.main:
        seconds = time.time() - t0
        if not result.cached:
            record_time(cfg.out, name, seconds)
        write_config(cfg)
        log.info("== %s %s in %.1fs", name, "cached" if result.cached else "done", seconds)
    return result


def run_planned(ctx: Context, name: str) -> stages.Result:
    """The stage's own part of the protocol: plan -> verdict (skip when done) -> clear -> run -> commit."""
    stage = stages.get(name)
    plan = stage.plan(ctx)
    path = artifacts.manifest(ctx.out, name)
    v = stage_verdict(ctx, name, plan)
    ctx.dist.barrier()  # every rank decided before rank 0 touches the manifest
    if v.done and not ctx.cfg.overwrite:
        log.info("%s: cached: settings and inputs unchanged since it ran, outputs intact (--overwrite redoes it)", name)
        return stages.Result([ctx.out / p for p in v.record.outputs], v.record.info, cached=True)
    if v.state in (manifest.STALE, manifest.DAMAGED):
        log.info("%s: %s: %s", name, v.state, v.why(6))
    if hasattr(stage, "check"):
        stage.check(ctx)  # fails before the manifest is cleared: a bad setting leaves a finished stage finished
    with tracking.opened(ctx, name):  # sets ctx.tracker for the stage's work: logs only, in no manifest
        if ctx.dist.main:
            manifest.clear(path)
        result = stage.run(ctx)
    if ctx.dist.main and result.complete:
        record = manifest.Record(plan.config, plan.inputs, info=result.info)
        manifest.commit(path, ctx.out, record, result.outputs)
    return result


def record_time(out: Path, stage: str, seconds: float) -> None:
    """timings.json: the seconds of the last run that did the stage's work (a cache hit leaves it alone)."""
    path = artifacts.timings_json(out)
    try:
        timings = read_json(path)
    except (OSError, ValueError):
        timings = {}
    timings = timings if isinstance(timings, dict) else {}  # a damaged record is rewritten whole
    timings[stage] = round(seconds, 2)
    write_json(path, timings)


def _overlay(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _overlay(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def assembled_config(cfg: Config) -> dict:
    """The config as the artifacts were made: every finished stage's recorded settings over ``cfg``."""
    data = cfg.to_dict()
    data["train"]["folds"] = None  # which folds this command ran is no setting of the artifacts (fold manifests are)
    for name in (*stages.PIPELINE, *stages.ON_DEMAND):
        record = manifest.read(artifacts.manifest(cfg.out, name))
        if record is not None:
            data = _overlay(data, {k: v for k, v in record.config.items() if k != DERIVED})
            recorded = getattr(stages.get(name), "recorded_settings", None)  # e.g. the trials svr's study holds
            data = _overlay(data, recorded(record) if recorded else {})
    return data


def write_config(cfg: Config) -> None:
    save_config(assembled_config(cfg), artifacts.config_yaml(cfg.out))
