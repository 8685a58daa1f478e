"""`pawpular COMMAND ...`: the command line, a thin layer over the Python API (``api.py``).

Exit codes: 0 done; 2 bad input (config, data, a stale or damaged artifact, a refused write, a file that cannot be
read or written), with one line naming the problem (``-v`` adds the traceback); 70 a bug in pawpular (any other
exception): its traceback and a line saying what to put in a report; 130 / 143 interrupted by Ctrl-C / SIGTERM
(rerun the same command to resume).
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import sys
import traceback
from pathlib import Path

from .artifacts import PIPELINE
from .masking import redact_url
from .progress import setup_logging

DESCRIPTION = """\
Predict PetFinder Pawpularity from photos: fine-tune a timm backbone per fold, embed every photo, fit an SVR head
on the embeddings, blend the two heads on out-of-fold predictions, write submission.csv.

  pawpular all --config configs/default.yaml     every stage in order (each skips what is already done)
  pawpular status --config configs/default.yaml  which stages are done, stale (and why) or missing
  pawpular STAGE --help                          what a stage reads, writes, needs first, and its keys

Stages, in order: folds -> train -> embed -> svr -> ensemble (select: on demand).
"""
EPILOG = "The Python API does the same from a notebook: import pawpular; pawpular.run('all', config=...)."
log = logging.getLogger("pawpular")


def _config_args(p: argparse.ArgumentParser, stage: bool = True) -> None:
    p.add_argument("--config", default=None, help="experiment YAML (default: the saved config.yaml of --output "
                   "if there is one, else configs/default.yaml)")
    p.add_argument("--data", help="competition folder (overrides data_dir)")
    p.add_argument("--output", help="experiment folder (overrides output_dir; default output/<experiment>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=3 (repeatable); "
                        "`pawpular config keys` lists them")
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


def _stage_commands(sub, raw) -> None:
    from . import stages

    for name in (*PIPELINE, *stages.ON_DEMAND):
        summary, description = stages.describe(name)
        p = sub.add_parser(name, help=summary, description=description, formatter_class=raw)
        _config_args(p)
        if name == "svr":
            p.add_argument("--workers", type=int, metavar="N", help="local worker processes on the study "
                           "(svr.workers): they share svr.n_trials exactly")
    _config_args(sub.add_parser("all", help="every stage in order; each skips what is already done",
                                description="Run folds, train, embed, svr and ensemble in order under one lock. "
                                "A stage whose settings and inputs are unchanged and whose outputs are intact is "
                                "skipped; exactly what is stale is recomputed.", formatter_class=raw))
    _config_args(sub.add_parser("status", help="each stage: done / stale (why) / damaged / missing",
                                description="Check every stage's manifest against the current config and inputs; "
                                "writes nothing.", formatter_class=raw), stage=False)
    p = sub.add_parser("delete-study", help="delete the SVR's Optuna study (a shared svr.storage one too)",
                       description="Delete an Optuna study of the SVR head: the one named by --name, else the one "
                       "this experiment's svr/best_params.json names. Workers still on it fail. `--overwrite` "
                       "never deletes a shared study; this command is the way.", formatter_class=raw)
    _config_args(p, stage=False)
    p.add_argument("--name", help="the study's name (svr-...)")


def _tool_commands(sub, raw) -> None:
    p = sub.add_parser("config", help="show the resolved config (every key, value, default, type)",
                       description="`pawpular config show [--config FILE] [--set ...]`: every setting with its value, "
                       "default and type, as a stage would see it; `--key KEY` prints one value (`out`: the "
                       "experiment folder). `pawpular config keys`: every key with its default and type.",
                       formatter_class=raw)
    p.add_argument("action", choices=["show", "keys"])
    _config_args(p, stage=False)
    p.add_argument("--key", help="print only this setting's value")
    sub.add_parser("doctor", help="what will run where: GPU, torch, RAPIDS, each stage's device and backend "
                   "(`pawpular doctor --help`)")
    p = sub.add_parser("runs", help="experiments side by side: status, scores, settings, time per stage",
                       description="One row per experiment (default: every one under output/; a named folder of\n"
                       "experiments is expanded): status (done / stale / partial / damaged, from the manifests), NN,\n"
                       "SVR and blend OOF RMSE (in-sample, cross-validated, holdout), best C, model, image size,\n"
                       "fine-tuning mode, epochs, device, precision, seconds per stage; then the settings that\n"
                       "differ between the rows. Reads manifests and result files only (no photo, no output over\n"
                       "1 MiB): `pawpular status` hashes everything.", formatter_class=raw)
    p.add_argument("folders", nargs="*", metavar="FOLDER", help="experiment folders, or folders of them")
    p.add_argument("--sort", metavar="KEY", help="sort by a column (blend_cv, t_train, svr.use_meta, ...); "
                   "--sort=-KEY descending")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--html", metavar="FILE", help="also write one self-contained page: the table and a figure")
    p = sub.add_parser("report", help="write report.html for an experiment folder")
    for flag, text in (("--config", "experiment YAML (to find its folder)"), ("--output", "experiment folder"),
                       ("--data", "competition folder (default: the experiment's data_dir)")):
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
    p.add_argument("--estimate", type=int, default=None, metavar="N_IMAGES",
                   help="only time a few images and estimate the run time for N_IMAGES (writes no submission)")


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


def _config(args: argparse.Namespace):
    from .api import config_from

    extra = [f"svr.workers={args.workers}"] if getattr(args, "workers", None) else []
    return config_from(args.config, output=args.output, data=args.data, overwrite=getattr(args, "overwrite", False),
                       set=[*args.overrides, *extra])


def _show_config(args: argparse.Namespace) -> int:
    from .config import Config, describe

    cfg = Config() if args.action == "keys" else _config(args)
    if args.key:
        values = {k: v for k, v, _, _ in describe(cfg)} | {"out": cfg.out}
        if args.key not in values:
            from .config_checks import unknown_key_message
            from .errors import ConfigError

            raise ConfigError(unknown_key_message(args.key, list(values)))
        value = values[args.key]
        print(value if not isinstance(value, (list, dict)) else json.dumps(value))
        return 0
    rows = describe(cfg)
    width = max(len(k) for k, *_ in rows)
    for key, value, default, tp in rows:
        shown = json.dumps(value, default=str)
        if args.action == "keys":
            print(f"{key:<{width}}  {tp:<24} default {shown}")
        else:
            mark = "" if value == default else f"   (default {json.dumps(default, default=str)})"
            print(f"{key:<{width}}  {shown}{mark}   [{tp}]")
    return 0


def _delete_study(args: argparse.Namespace) -> int:
    from . import artifacts
    from .errors import UsageError
    from .files import read_json_object
    from .lock import experiment_lock

    cfg = _config(args)
    db = artifacts.study_db(cfg.out)
    if cfg.svr.storage is not None:
        return _delete_named_study(cfg, args.name)
    if not db.is_file():
        print(f"no study: {db} does not exist")
        return 2
    with experiment_lock(cfg.out, "delete-study"):  # the experiment's own file: not while a stage uses it
        from .files import remove
        from .files import sqlite_damage

        if why := sqlite_damage(db):
            for path in (db, db.with_name(db.name + "-journal")):
                remove(path)
            print(f"removed {db}: it was damaged ({why}); the next `pawpular svr` starts a new study")
            return 0
        if args.name is None and not artifacts.best_params(cfg.out).is_file():
            raise UsageError(f"no --name given and no {artifacts.best_params(cfg.out)} naming a study")
        recorded = read_json_object(artifacts.best_params(cfg.out)).get("study_name")
        return _delete_named_study(cfg, args.name or recorded)


def _delete_named_study(cfg, name: str | None) -> int:
    from . import artifacts
    from .errors import UsageError
    from .files import read_json_object
    from .svr_study import delete_study, open_storage

    if name is None and artifacts.best_params(cfg.out).is_file():
        name = read_json_object(artifacts.best_params(cfg.out)).get("study_name")
    if name is None:
        raise UsageError(f"no --name given and no {artifacts.best_params(cfg.out)} naming a study")
    deleted = delete_study(name, open_storage(cfg))
    print(f"{'deleted' if deleted else 'no such study:'} {name}")
    return 0 if deleted else 2


def _check_data(args: argparse.Namespace) -> int:
    from .data import check_competition

    problems, comp = check_competition(args.data, images=not args.no_images)
    if problems:
        print(f"{args.data}: {len(problems)} problem(s):", file=sys.stderr)
        for p in problems[:200]:
            print(f"  {p}", file=sys.stderr)
        if len(problems) > 200:
            print(f"  ... and {len(problems) - 200} more", file=sys.stderr)
        return 2
    what = "CSVs and images" if not args.no_images else "CSVs (images not checked)"
    print(f"{args.data}: valid ({len(comp.train)} train, {len(comp.test)} test; {what})")
    return 0


def _status(args: argparse.Namespace) -> int:
    from .manifest import NOT_NEEDED
    from .runner import status

    cfg = _config(args)
    verdicts = status(cfg)
    print(f"{cfg.out} (data {cfg.data}):")
    for name, v in verdicts.items():
        print(f"  {name:<9} {v.state:<10} {v.why(4)}".rstrip())
    todo = [n for n, v in verdicts.items() if not v.done and v.state != NOT_NEEDED]
    partial = cfg.train.folds is not None and verdicts.get("train") and verdicts["train"].state == "partial"
    run_all = "pawpular all --set train.folds=null" if partial else "pawpular all"  # else it trains the same folds
    print(f"next: {run_all} (recomputes {', '.join(todo)})" if todo else "everything is done and current")
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    from . import api
    from .distributed import is_lead_process

    if args.command == "make-synthetic":
        from .synthetic import DEFAULT_N_TEST, DEFAULT_N_TRAIN, make_synthetic

        out = make_synthetic(args.out, n_train=DEFAULT_N_TRAIN if args.n_train is None else args.n_train,
                             n_test=DEFAULT_N_TEST if args.n_test is None else args.n_test, seed=args.seed)
        print(f"wrote the synthetic competition to {out}")
        return 0
    if args.command == "check-data":
        return _check_data(args)
    if args.command == "status":
        return _status(args)
    if args.command == "delete-study":
        return _delete_study(args)
    if args.command == "config":
        return _show_config(args)
    if args.command == "runs":
        from .experiments_view import main as runs_main

        return runs_main(args.folders, args.sort, args.json, args.html)
    if args.command == "export":
        print(api.export(args.output, args.to, overwrite=args.overwrite, data=args.data))
        return 0
    if args.command == "predict":
        from .predictor import predict

        from .lock import interruptible

        with interruptible():
            written = predict(Path(args.artifacts), Path(args.data), Path(args.out), args.device, args.estimate)
        if written is not None:
            print(written)
        return 0
    if args.command == "report":
        from .api import config_from

        output = args.output or config_from(args.config, output=args.output).out
        print(api.report(output, args.data))
        return 0
    result = api.run_config(args.command, _config(args))
    if is_lead_process():  # under torchrun, one line, not one per rank
        print(result)
    return 0


# OS errors that say something about the machine or the paths given (space, permissions, the file system), not
# about the code: one line wherever they happen. Others (a missing file, a folder where a file was expected) are
# one line only where the project reads or writes (ReadError, WriteError); elsewhere they are a bug's symptom.
MACHINE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM, errno.ENOMEM,
                  errno.EMFILE, errno.ENFILE, errno.EFBIG, errno.ENAMETOOLONG, errno.ELOOP, errno.EBUSY,
                  errno.ETXTBSY, errno.ESTALE, errno.ENODEV, errno.ENXIO}
BUG_REPORT = ("this is a bug in pawpular, not a problem with your input ({kind}): please report it with the "
              "command you ran, the traceback above and the output of `pawpular doctor`")


def _os_error(e: OSError) -> str:
    """One line for an OS error: what was being done (read / write, where known), the path and the reason."""
    from .errors import ReadError, WriteError, reason

    why = reason(e)
    if e.filename is None:
        return why
    verb = "cannot write " if isinstance(e, WriteError) else "cannot read " if isinstance(e, ReadError) else ""
    return f"{verb}{e.filename}: {why}"


def _one_line(e: BaseException) -> str | None:
    """The line for a failure a user can fix (exit 2), or None for a bug (traceback, exit 70)."""
    from .errors import PawpularError, ReadError, WriteError

    if isinstance(e, PawpularError):
        return str(e)
    if isinstance(e, OSError) and e.errno is not None and (isinstance(e, (ReadError, WriteError))
                                                           or e.errno in MACHINE_ERRNOS):
        return _os_error(e)
    if isinstance(e, UnicodeEncodeError) and e.encoding.lower() in (sys.getfilesystemencoding().lower(), "ascii"):
        return (f"a path or name holds {e.object[e.start:e.end]!r}, which this system's locale encoding "
                f"({e.encoding}) cannot write: set a UTF-8 locale (export LC_ALL=C.UTF-8) or use a plain ASCII name")
    top, name = type(e).__module__.split(".")[0], type(e).__name__
    if top == "sqlalchemy":  # the study database failed mid-run (e.g. SQLite's "database or disk is full")
        return f"the Optuna study's database: {str(getattr(e, 'orig', None) or e).splitlines()[0]}"
    if top == "torch" and name == "OutOfMemoryError":
        return (f"the GPU ran out of memory ({str(e).splitlines()[0][:160]}): lower train.batch_size / "
                "embed.batch_size (train.accum_steps keeps the effective batch), or model.img_size")
    return None


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code: 2 (one line) for what a user can fix, 70 with the traceback for a
    bug (EX_SOFTWARE)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["doctor"]:  # its own options (--short, --config): doctor.py parses them
        from .doctor import main as doctor_main

        return doctor_main(argv[1:])
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return _dispatch(args)
    except BrokenPipeError:  # `pawpular config show | head`: the reader left; nothing to report
        sys.stderr.close()
        return 141
    except KeyboardInterrupt as e:
        code = 143 if "signal" in str(e) else 130
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return code
    except Exception as e:
        line = _one_line(e)
        if line is None:  # a bug: its traceback (a password it quotes masked), and what a report needs
            print(redact_url(traceback.format_exc(), "***"), end="", file=sys.stderr)
            first = (str(e).splitlines() or [""])[0][:200]
            kind = type(e).__name__ + (f": {first}" if first else "")
            print(f"error: {BUG_REPORT.format(kind=kind)}", file=sys.stderr)
            return 70
        if args.verbose:
            log.exception("failed")
        print(f"error: {redact_url(line, '***')}", file=sys.stderr)  # no password reaches a terminal's log
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
