"""The command line's grammar: every command, its arguments and its --help (``cli/main.py`` does what they ask)."""

from __future__ import annotations

import argparse

from ..store.artifacts import PIPELINE

DESCRIPTION = """\
Predict PetFinder Pawpularity from photos: fine-tune a timm backbone per fold, embed every photo, fit an SVR head
on the embeddings, blend the two heads on out-of-fold predictions, write submission.csv.

  pawpular all --config configs/default.yaml     every stage in order (each skips what is already done)
  pawpular status --config configs/default.yaml  which stages are done, stale (and why) or missing
  pawpular STAGE --help                          what a stage reads, writes, needs first, and its keys

Stages, in order: folds -> train -> embed -> svr -> ensemble (select: on demand).
"""
EPILOG = "The Python API does the same from a notebook: import pawpular; pawpular.run('all', config=...)."


def _config_args(p: argparse.ArgumentParser, stage: bool = True) -> None:
    p.add_argument(
        "--config",
        default=None,
        help="experiment YAML (default: the saved config.yaml of --output if there is one, else configs/default.yaml)",
    )
    p.add_argument("--data", help="competition folder (overrides data_dir)")
    p.add_argument("--output", help="experiment folder (overrides output_dir; default output/<experiment>)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=3 (repeatable); `pawpular config keys` lists them",
    )
    if stage:
        p.add_argument("--overwrite", action="store_true", help="redo finished work instead of skipping it")


def _data_commands(sub) -> None:
    p = sub.add_parser("make-synthetic", help="write the embedded synthetic competition")
    p.add_argument("--out", required=True)
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--n-test", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("check-data", help="validate a competition folder against the data contract")
    p.add_argument("--data", required=True)
    p.add_argument("--no-images", action="store_true", help="check the CSVs only")


def _stage_flags(p, name: str) -> None:
    """The flags of one stage only (svr's workers, select's search and branch), beside every stage's config flags."""
    if name == "select":
        p.add_argument(
            "--as",
            dest="branch",
            metavar="NAME",
            help="also write the chosen sets as a new "
            "experiment NAME beside this one (output/NAME), reusing its folds, fine-tuned folds and "
            "embeddings; this experiment is left as it is",
        )
    if name == "svr":
        p.add_argument(
            "--workers",
            type=int,
            metavar="N",
            help="local worker processes on the study (svr.workers): they share svr.n_trials exactly",
        )
    if name == "select":
        p.add_argument(
            "--starts",
            type=int,
            metavar="N",
            help="forward selection from each of the N best "
            "single sets: up to N feature sets, each its own SVR head (select.starts)",
        )
        p.add_argument(
            "--budget-hours",
            type=float,
            metavar="H",
            help="keep only sets whose inference on --test-images photos fits in H hours (select.budget_hours)",
        )
        p.add_argument("--test-images", type=int, metavar="N", help="hidden test photos (select.test_images)")


def _stage_commands(sub, raw) -> None:
    from .. import stages

    for name in (*PIPELINE, *stages.ON_DEMAND):
        summary, description = stages.describe(name)
        p = sub.add_parser(name, help=summary, description=description, formatter_class=raw)
        _config_args(p)
        _stage_flags(p, name)
    _config_args(
        sub.add_parser(
            "all",
            help="every stage in order; each skips what is already done",
            description="Run folds, train, embed, svr and ensemble in order under one lock. "
            "A stage whose settings and inputs are unchanged and whose outputs are intact is "
            "skipped; exactly what is stale is recomputed.",
            formatter_class=raw,
        )
    )
    _config_args(
        sub.add_parser(
            "status",
            help="each stage: done / stale (why) / damaged / missing",
            description="Check every stage's manifest against the current config and inputs; writes nothing.",
            formatter_class=raw,
        ),
        stage=False,
    )
    p = sub.add_parser(
        "delete-study",
        help="delete the SVR's Optuna study (a shared svr.storage one too)",
        description="Delete an Optuna study of the SVR head: the one named by --name, else the one "
        "this experiment's svr/best_params.json names. Workers still on it fail. `--overwrite` "
        "never deletes a shared study; this command is the way.",
        formatter_class=raw,
    )
    _config_args(p, stage=False)
    p.add_argument("--name", help="the study's name (svr-...)")


def _tool_commands(sub, raw) -> None:
    p = sub.add_parser(
        "config",
        help="show the resolved config (every key, value, default, type)",
        description="`pawpular config show [--config FILE] [--set ...]`: every setting with its value, "
        "default and type, as a stage would see it; `--key KEY` prints one value (`out`: the "
        "experiment folder). `pawpular config keys`: every key with its default and type.",
        formatter_class=raw,
    )
    p.add_argument("action", choices=["show", "keys"])
    _config_args(p, stage=False)
    p.add_argument("--key", help="print only this setting's value")
    sub.add_parser(
        "doctor",
        help="what will run where: GPU, torch, RAPIDS, each stage's device and backend (`pawpular doctor --help`)",
    )
    p = sub.add_parser(
        "runs",
        help="experiments side by side: status, scores, settings, time per stage",
        description="One row per experiment (default: every one under output/; a named folder of\n"
        "experiments is expanded): status (done / stale / partial / damaged, from the manifests), the\n"
        "blend's nested OOF RMSE (the one to trust) and holdout RMSE, the optimistic NN, SVR and blend\n"
        "OOF RMSE (in-sample, cross-validated), best C, model, image size,\n"
        "fine-tuning mode, epochs, device, precision, seconds per stage; then the settings that\n"
        "differ between the rows. Reads manifests and result files only (no photo, no output over\n"
        "1 MiB): `pawpular status` hashes everything.",
        formatter_class=raw,
    )
    p.add_argument("folders", nargs="*", metavar="FOLDER", help="experiment folders, or folders of them")
    p.add_argument(
        "--sort", metavar="KEY", help="sort by a column (blend_cv, t_train, svr.use_meta, ...); --sort=-KEY descending"
    )
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--html", metavar="FILE", help="also write one self-contained page: the table and a figure")
    p.add_argument(
        "--baseline",
        metavar="NAME",
        help="compare every experiment's nested RMSE with this one's on the "
        "same rows: difference, 95%% paired-bootstrap interval over duplicate groups, folds won; and "
        "inside each experiment, the SVR head and the blend against what they are added to",
    )
    p.add_argument(
        "--repeats",
        metavar="NAME",
        action="append",
        help="with --baseline, once per experiment: one that reruns the baseline's config at another seed "
        "(e.g. --set seed=7); their spread from the baseline's nested RMSE widens every verdict",
    )
    p = sub.add_parser("report", help="write report.html for an experiment folder")
    for flag, text in (
        ("--config", "experiment YAML (to find its folder)"),
        ("--output", "experiment folder"),
        ("--data", "competition folder (default: the experiment's data_dir)"),
    ):
        p.add_argument(flag, help=text)


def _inference_commands(sub) -> None:
    p = sub.add_parser("export", help="copy what inference needs into one folder (+ a Kaggle notebook)")
    p.add_argument("--output", required=True, help="experiment folder")
    p.add_argument("--to", required=True, help="artifact folder to create")
    p.add_argument("--data", help="competition folder, to check the experiment is current (default: its data_dir)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty artifact folder")
    p = sub.add_parser("predict", help="inference only, from an exported artifact folder")
    p.add_argument("--artifacts", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", default="submission.csv")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--estimate",
        type=int,
        default=None,
        metavar="N_IMAGES",
        help="only time a few images and estimate the run time for N_IMAGES (writes no submission)",
    )


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="pawpular", description=DESCRIPTION, epilog=EPILOG, formatter_class=raw)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _data_commands(sub)
    _stage_commands(sub, raw)
    _tool_commands(sub, raw)
    _inference_commands(sub)
    return parser
