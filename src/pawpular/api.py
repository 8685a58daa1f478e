"""The Python API: what the command line does, for notebooks. Failures raise (never a silent return code).

    import pawpular
    pawpular.run("all", config="configs/default.yaml", train={"epochs": 3})   # -> output/default/submission.csv
    pawpular.run("svr", output="output/default", svr__n_trials=60)           # section__key=value works too
    pawpular.status(output="output/default")                                  # {stage: Verdict}
    pawpular.runs("output")                                                   # DataFrame: one row per experiment
    pawpular.export("output/default", "artifacts/default")
    pawpular.predict("artifacts/default", "input/petfinder", "submission.csv")

Overrides are the command line's ``--set``: ``section={"key": value}``, ``section__key=value`` or
``set=["section.key=value"]``; unknown keys are errors that say so (with "did you mean").
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config.schema import Config, load_config
from .store import artifacts
from .store.errors import ConfigError, UsageError

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("pawpular")
# The main thing each stage writes (what run() returns).
MAIN_OUTPUT = {
    "folds": artifacts.folds_csv,
    "train": lambda out: out / "train",
    "embed": lambda out: out / "emb",
    "svr": artifacts.svr_dir,
    "ensemble": artifacts.submission,
    "select": artifacts.selection_json,
}


def _override_items(overrides: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """Keyword overrides as (key, value, how the caller wrote it): typed values, checked like the config file's."""
    out = []
    for key, value in overrides.items():
        key = key.replace("__", ".")
        if isinstance(value, dict):
            out += _override_items({f"{key}.{k}": v for k, v in value.items()})
        else:
            value = os.fspath(value) if isinstance(value, os.PathLike) else value
            value = list(value) if isinstance(value, tuple) else value
            out.append((key, value, f"keyword argument {key}={value!r}"))
    return out


def config_from(
    config: str | Path | None = None,
    *,
    output: str | Path | None = None,
    data: str | Path | None = None,
    overwrite: bool = False,
    set: list[str] | None = None,
    **overrides: Any,
) -> Config:
    """The resolved config: the file (default: the experiment's own config.yaml when ``output`` has one, else
    configs/default.yaml), then ``set`` / keyword overrides, then data / output / overwrite."""
    if isinstance(set, (str, bytes)):
        raise ConfigError(f"set= takes a list of 'key=value' strings, got the string {set!r} (write set=[{set!r}])")
    path = config
    if path is None:
        saved = artifacts.config_yaml(Path(output)) if output else None
        path = saved if saved is not None and saved.is_file() else artifacts.default_config()
    return load_config(
        path,
        [*(set or []), *_override_items(overrides)],
        data_dir=str(data) if data else None,
        output_dir=str(output) if output else None,
        overwrite=True if overwrite else None,
    )


def run_config(stage: str, cfg: Config, hooks: dict | None = None) -> Path:
    """Run ``stage`` ("all" = every pipeline stage in order, under one lock) with a resolved config."""
    from .logs.tracking import require
    from .machine.distributed import is_lead_process
    from .runner import check_data_folder, not_needed_why, run_stage
    from .stages import needed
    from .store.lock import experiment_lock, interruptible

    if stage not in ("all", *MAIN_OUTPUT):
        raise UsageError(f"no stage {stage!r}: stages are all, {', '.join(MAIN_OUTPUT)}")
    require(cfg)  # a tracking backend that is not installed: one line before anything is written
    check_data_folder(cfg.data)  # a competition folder that is none: refused before the output folder is made
    with interruptible():
        if stage != "all":
            run_stage(stage, cfg, hooks)
            return MAIN_OUTPUT[stage](cfg.out)
        # under torchrun: train and embed on every rank, the rest on rank 0 (machine/distributed.py)
        with experiment_lock(cfg.out, "all") if is_lead_process() else contextlib.nullcontext():
            if is_lead_process():
                from .recipe import describe

                log.info("all: %s", describe(cfg))  # a frozen run says so before its first stage
            want = needed(cfg)
            for name in artifacts.PIPELINE:
                if name in want:
                    run_stage(name, cfg, hooks)
                elif is_lead_process():
                    log.info("== %s: not needed, skipped: %s", name, not_needed_why(cfg, name))
        return artifacts.submission(cfg.out)


def run(
    stage: str = "all",
    config: str | Path | None = None,
    *,
    output: str | Path | None = None,
    data: str | Path | None = None,
    overwrite: bool = False,
    set: list[str] | None = None,
    **overrides: Any,
) -> Path:
    """Run one stage (or "all") and return its main output; raises on any failure."""
    cfg = config_from(config, output=output, data=data, overwrite=overwrite, set=set, **overrides)
    return run_config(stage, cfg)


def status(
    config: str | Path | None = None,
    *,
    output: str | Path | None = None,
    data: str | Path | None = None,
    set: list[str] | None = None,
    **overrides: Any,
) -> dict:
    """Each pipeline stage's verdict: done / stale / damaged / missing / partial, with the reasons."""
    from .runner import status as stage_status

    return stage_status(config_from(config, output=output, data=data, set=set, **overrides))


def export(output: str | Path, to: str | Path, overwrite: bool = False, data: str | Path | None = None) -> Path:
    """Export a finished experiment for offline inference (see ``pawpular.export``); returns the folder."""
    from .ship.exporter import export as _export
    from .store.lock import interruptible

    with interruptible():
        return _export(Path(output), Path(to), overwrite=overwrite, data=str(data) if data else None)


def predict(
    artifacts_dir: str | Path, data: str | Path, out: str | Path = "submission.csv", device: str = "auto"
) -> Path:
    """Write a validated submission from an exported folder; returns its path (raises on any problem)."""
    from .ship.predictor import predict as _predict
    from .store.lock import interruptible

    with interruptible():
        return _predict(Path(artifacts_dir), Path(data), Path(out), device=device)


def report(output: str | Path, data: str | Path | None = None) -> Path:
    """Write ``report.html`` for an experiment folder; returns its path."""
    from .store.guards import is_experiment
    from .views.reporting import write_report

    if Path(output).is_dir() and not is_experiment(Path(output)):  # never a report.html into a user's folder
        raise UsageError(f"report --output {output}: holds no pawpular experiment (no config.yaml or stage manifest)")
    return write_report(Path(output), Path(data) if data else None)


def runs(
    *folders: str | Path | list, sort: str | None = None, baseline: str | None = None, repeats: list | None = None
) -> pd.DataFrame:
    """One row per experiment (default: every one under output/): status, scores, settings, seconds per stage;
    then the settings that differ between the rows (listed in ``attrs["settings"]``). See ``views/experiments.py``.
    ``baseline``: an experiment's name or folder: each row's nested RMSE minus its own, with a 95% interval, the
    folds won and a verdict (``scores/compare.py``), widened by the seed spread of ``repeats`` (the baseline's config at
    other seeds: experiments' names or folders); ``attrs["inside"]``: each experiment's parts against each other."""
    from .views.experiments import table

    flat = [f for item in folders for f in (item if isinstance(item, (list, tuple)) else [item])]
    return table(flat or None, sort, baseline, repeats)
