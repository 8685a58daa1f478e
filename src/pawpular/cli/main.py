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
import shlex
import sys
import traceback
from pathlib import Path

from ..logs.interrupts import interrupt_once
from ..logs.progress import setup_logging
from ..store.masking import redact_url
from .args import build_parser

log = logging.getLogger("pawpular")


def _config(args: argparse.Namespace):
    """The command's resolved config; its experiment folder (and the shared embedding cache beside it) are the
    paths it writes under: a file or a dangling link in their way is refused here, before any work."""
    from ..api import config_from
    from ..store import artifacts
    from ..store.path_faults import check_output_path, register

    extra = [f"svr.workers={args.workers}"] if getattr(args, "workers", None) else []
    flags = ("starts", "budget_hours", "test_images")  # select's
    extra += [f"select.{flag}={getattr(args, flag)}" for flag in flags if getattr(args, flag, None) is not None]
    cfg = config_from(
        args.config,
        output=args.output,
        data=args.data,
        overwrite=getattr(args, "overwrite", False),
        set=[*args.overrides, *extra],
    )
    register(cfg.out, artifacts.emb_cache(cfg.out.parent))
    if args.command != "config":
        check_output_path(cfg.out, "--output" if args.output else "output_dir")
    return cfg


def _show_config(args: argparse.Namespace) -> int:
    from ..config.schema import Config
    from ..config.show import describe

    cfg = Config() if args.action == "keys" else _config(args)
    if args.key:
        values = {k: v for k, v, _, _ in describe(cfg)} | {"out": cfg.out}
        if args.key not in values:
            from ..config.checks import unknown_key_message
            from ..store.errors import ConfigError

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
    from ..store import artifacts
    from ..store.errors import UsageError
    from ..store.files import read_json_object
    from ..store.lock import experiment_lock

    cfg = _config(args)
    db = artifacts.study_db(cfg.out)
    if cfg.svr.storage is not None:
        return _delete_named_study(cfg, args.name)
    if not db.is_file():
        print(f"no study: {db} does not exist")
        return 2
    with experiment_lock(cfg.out, "delete-study"):  # the experiment's own file: not while a stage uses it
        from ..store.files import remove, sqlite_damage

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
    from ..store import artifacts
    from ..store.errors import UsageError
    from ..store.files import read_json_object
    from ..svr.study import delete_study, open_storage

    if name is None and artifacts.best_params(cfg.out).is_file():
        name = read_json_object(artifacts.best_params(cfg.out)).get("study_name")
    if name is None:
        raise UsageError(f"no --name given and no {artifacts.best_params(cfg.out)} naming a study")
    deleted = delete_study(name, open_storage(cfg))
    print(f"{'deleted' if deleted else 'no such study:'} {name}")
    return 0 if deleted else 2


def _check_data(args: argparse.Namespace) -> int:
    from ..data.tables import check_competition

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
    from .. import recipe
    from ..config.heads import all_features
    from ..runner import status
    from ..scores.compare import experiment_score_line, heads_line
    from ..store.manifest import NOT_NEEDED

    cfg = _config(args)
    verdicts = status(cfg)
    print(f"{cfg.out} (data {cfg.data}; {recipe.describe(cfg)}):")
    for name, v in verdicts.items():
        why = v.why(4) if not v.done or name != "embed" else recipe.reuse_line(cfg.out, all_features(cfg))
        print(f"  {name:<9} {v.state:<10} {why}".rstrip())
    todo = [n for n, v in verdicts.items() if not v.done and v.state != NOT_NEEDED]
    partial = cfg.train.folds is not None and verdicts.get("train") and verdicts["train"].state == "partial"
    run_all = "pawpular all --set train.folds=null" if partial else "pawpular all"  # else it trains the same folds
    if cfg.svr.heads and (line := heads_line(cfg.out)):  # several SVR heads: each one's weight and nested score
        print(f"heads: {line}")
    if line := experiment_score_line(cfg.out):
        print(f"scores: {line}")
    print(f"next: {run_all} (recomputes {', '.join(todo)})" if todo else "everything is done and current")
    return 0


def _select_as(args: argparse.Namespace) -> int:
    """`pawpular select --as NAME`: select, then write the choice as a new experiment (checked first). With
    several starts, each start's sets become an experiment: NAME, NAME-start2, ...; a line says how to blend them."""
    from .. import api
    from ..store.files import read_json
    from ..store.path_faults import register
    from ..svr.selection import blend_line
    from . import branch

    cfg = _config(args)
    names = [args.branch, *(f"{args.branch}-start{i}" for i in range(2, cfg.select.starts + 1))]
    folders = [branch.target(cfg, name) for name in names]  # every one checked before any work
    register(*folders)
    result = read_json(api.run_config("select", cfg))
    starts = [s["features"] for s in result.get("starts") or [{"features": result["chosen"]}]]
    if len(starts) > 1:  # select's own use:/blend: lines name {output}-startN folders, which --as does not write
        print(f"--as {args.branch}: the {len(starts)} starts are written as the experiments below instead")
    for folder, chosen in zip(folders, starts, strict=False):
        branch.write(cfg, folder, chosen)
        print(
            f"wrote the experiment {folder} (svr.features={chosen}; folds, trained folds and embeddings linked "
            f"from {cfg.out}): next: pawpular all --output {shlex.quote(str(folder))}"
        )
    written = folders[: len(starts)]
    if len(written) > 1:
        first = shlex.quote(str(written[0]))
        print(f"blend them: pawpular ensemble --output {first} {blend_line(written[1:])}   (after each one's `all`)")
    elif cfg.select.starts > 1:
        print(f"select: the {cfg.select.starts} starts found one feature set: one experiment written")
    return 0


def _check_paths(args: argparse.Namespace) -> None:
    """The paths this command writes under: noted for the one-line errors (``path_faults``), and refused before
    any work when a file, a folder or a dangling link is in their way."""
    from ..store.path_faults import check_output_path, register

    register(*(getattr(args, name, None) for name in ("output", "to", "out", "html")))
    if args.command == "predict":  # make-synthetic's --out and export's --to: checked where they are written
        check_output_path(args.out, "predict --out", folder=False)
    elif args.command == "runs" and args.html:
        check_output_path(args.html, "runs --html", folder=False)
    elif args.command == "report" and args.output:
        check_output_path(args.output, "report --output")


def _dispatch(args: argparse.Namespace) -> int:
    from .. import api
    from ..machine.distributed import is_lead_process

    _check_paths(args)
    if args.command == "make-synthetic":
        from ..data.synthetic import DEFAULT_N_TEST, DEFAULT_N_TRAIN, make_synthetic

        out = make_synthetic(
            args.out,
            n_train=DEFAULT_N_TRAIN if args.n_train is None else args.n_train,
            n_test=DEFAULT_N_TEST if args.n_test is None else args.n_test,
            seed=args.seed,
        )
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
        from ..views.experiments_view import main as runs_main

        return runs_main(args.folders, args.sort, args.json, args.html, args.baseline, args.repeats)
    if args.command == "export":
        print(api.export(args.output, args.to, overwrite=args.overwrite, data=args.data))
        return 0
    if args.command == "predict":
        from ..ship.predictor import predict
        from ..store.lock import interruptible

        with interruptible():
            written = predict(Path(args.artifacts), Path(args.data), Path(args.out), args.device, args.estimate)
        if written is not None:
            print(written)
        return 0
    if args.command == "report":
        from ..api import config_from

        output = args.output or config_from(args.config, output=args.output).out
        print(api.report(output, args.data))
        return 0
    if args.command == "select" and args.branch is not None:  # --as "" is a name too: refused, never ignored
        return _select_as(args)
    cfg = _config(args)
    result = api.run_config(args.command, cfg)
    if is_lead_process():  # under torchrun, one line, not one per rank
        print(result)
        if args.command == "all":  # what ./run.sh does next
            where = shlex.quote(str(cfg.out))
            print(f"report: pawpular report --output {where}   (report.html: scores, figures, what ran)")
    return 0


# OS errors that say something about the machine or the paths given (space, permissions, the file system), not
# about the code: one line wherever they happen. Others (a missing file, a folder where a file was expected) are
# one line only where the project reads or writes (ReadError, WriteError); elsewhere they are a bug's symptom.
MACHINE_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EIO,
    errno.EACCES,
    errno.EPERM,
    errno.ENOMEM,
    errno.EMFILE,
    errno.ENFILE,
    errno.EFBIG,
    errno.ENAMETOOLONG,
    errno.ELOOP,
    errno.EBUSY,
    errno.ETXTBSY,
    errno.ESTALE,
    errno.ENODEV,
    errno.ENXIO,
}
BUG_REPORT = (
    "this is a bug in pawpular, not a problem with your input ({kind}): please report it with the "
    "command you ran, the traceback above and the output of `pawpular doctor`"
)


def _os_error(e: OSError) -> str:
    """One line for an OS error: what was being done (read / write, where known), the path and the reason."""
    from ..store.errors import ReadError, WriteError, reason

    why = reason(e)
    if e.filename is None:
        return why
    verb = "cannot write " if isinstance(e, WriteError) else "cannot read " if isinstance(e, ReadError) else ""
    return f"{verb}{e.filename}: {why}"


def _one_line(e: BaseException) -> str | None:
    """The line for a failure a user can fix (exit 2), or None for a bug (traceback, exit 70)."""
    from ..store.errors import PawpularError, ReadError, WriteError
    from ..store.path_faults import describe

    if isinstance(e, PawpularError):
        return str(e)
    if isinstance(e, OSError) and (line := describe(e)):  # a file, folder or dangling link in a given path's way
        return line
    if (
        isinstance(e, OSError)
        and e.errno is not None
        and (isinstance(e, (ReadError, WriteError)) or e.errno in MACHINE_ERRNOS)
    ):
        return _os_error(e)
    if isinstance(e, UnicodeEncodeError) and e.encoding.lower() in (sys.getfilesystemencoding().lower(), "ascii"):
        return (
            f"a path or name holds {e.object[e.start : e.end]!r}, which this system's locale encoding "
            f"({e.encoding}) cannot write: set a UTF-8 locale (export LC_ALL=C.UTF-8) or use a plain ASCII name"
        )
    top, name = type(e).__module__.split(".")[0], type(e).__name__
    if top == "sqlalchemy":  # the study database failed mid-run (e.g. SQLite's "database or disk is full")
        return f"the Optuna study's database: {str(getattr(e, 'orig', None) or e).splitlines()[0]}"
    if top == "torch" and name == "OutOfMemoryError":
        return (
            f"the GPU ran out of memory ({str(e).splitlines()[0][:160]}): lower train.batch_size / "
            "embed.batch_size (train.accum_steps keeps the effective batch), or model.img_size"
        )
    return None


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code: 2 (one line) for what a user can fix, 70 with the traceback for a
    bug (EX_SOFTWARE)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["doctor"]:  # its own options (--short, --config): cli/doctor.py parses them
        from .doctor import main as doctor_main

        return doctor_main(argv[1:])
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        with interrupt_once():
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
