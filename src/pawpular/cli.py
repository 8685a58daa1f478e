"""`pawpular COMMAND ...`: the command line. Each pipeline stage is a module exposing ``run(cfg) -> Path``.

    pawpular make-synthetic --out DIR [--n-train N] [--n-test N] [--seed S]
    pawpular check-data --data DIR [--no-images]
    pawpular STAGE --config FILE [--data DIR] [--output DIR] [--set key=value ...] [--overwrite]
    pawpular all --config FILE ...            every stage in order
    pawpular export --output DIR --to ARTIFACTS
    pawpular predict --artifacts ARTIFACTS --data COMPETITION_DIR --out submission.csv
    pawpular report --output DIR
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import logging
import sys
import time
from pathlib import Path

# The pipeline, in order. `all` runs these; each is pawpular.<name>.run(cfg).
PIPELINE = ["folds", "train", "embed", "svr", "ensemble"]
# Stages that decode images: the data contract (images included) is checked before they start, so a bad photo
# is rejected up front with its Id instead of failing deep in a DataLoader worker.
IMAGE_STAGES = {"folds", "train", "embed"}
# Stages run on demand with the same --config interface.
EXTRA_STAGES = ["select"]

log = logging.getLogger("pawpular")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("PIL", "matplotlib", "timm"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None,
                   help="experiment YAML (default: the saved config.yaml of --output if there is one, else configs/default.yaml)")
    p.add_argument("--data", help="competition folder (overrides data_dir)")
    p.add_argument("--output", help="experiment folder (overrides output_dir; default output/<experiment>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=3 (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="redo finished work instead of skipping it")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pawpular", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-synthetic", help="write the embedded synthetic competition")
    p.add_argument("--out", required=True)
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--n-test", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("check-data", help="validate a competition folder against the data contract")
    p.add_argument("--data", required=True)
    p.add_argument("--no-images", action="store_true", help="check the CSVs only")

    for stage in [*PIPELINE, *EXTRA_STAGES, "all"]:
        _config_args(sub.add_parser(stage, help="run every stage in order" if stage == "all" else f"run the {stage} stage"))

    p = sub.add_parser("report", help="write report.html into an experiment folder")
    _config_args(p)

    p = sub.add_parser("export", help="copy what inference needs into one folder")
    p.add_argument("--output", required=True, help="experiment folder")
    p.add_argument("--to", required=True, help="artifact folder to create")

    p = sub.add_parser("predict", help="inference only, from an exported artifact folder")
    p.add_argument("--artifacts", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", default="submission.csv")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--estimate", type=int, default=None, metavar="N_IMAGES",
                   help="only time a few images and estimate the run time for N_IMAGES")
    return parser


def default_config(output: str | None) -> Path:
    """An experiment's own saved config when --output names one, else configs/default.yaml (from the current
    folder, or from this checkout when run elsewhere)."""
    if output and (Path(output) / "config.yaml").is_file():
        return Path(output) / "config.yaml"
    local = Path("configs/default.yaml")
    repo = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"
    return local if local.is_file() or not repo.is_file() else repo


def _load_cfg(args: argparse.Namespace):
    from .config import load_config

    config = args.config or default_config(args.output)
    return load_config(config, args.overrides, data_dir=args.data, output_dir=args.output,
                       overwrite=True if args.overwrite else None)


def run_stage(name: str, cfg) -> Path:
    from .config import save_config
    from .io import experiment_lock

    module = importlib.import_module(f"pawpular.{name}")
    t0 = time.time()
    lead = _is_lead_process()
    log.info("== %s ==", name)
    # Under torchrun every rank runs this; only rank 0 takes the lock, checks the data and records the run.
    with experiment_lock(cfg.out, name) if lead else contextlib.nullcontext():
        if name in IMAGE_STAGES and lead:
            from .data import ensure_valid

            ensure_valid(cfg.data, cfg.out)
        result = module.run(cfg)
        if lead:
            save_config(cfg, cfg.out / "config.yaml")  # after success: the config that produced these outputs
    if lead:
        log.info("== %s done in %.1fs -> %s", name, time.time() - t0, result)
        _record_time(cfg.out, name, time.time() - t0)
    return result


def _is_lead_process() -> bool:
    """False in the non-zero ranks of a torchrun / DDP launch."""
    return int(os.environ.get("RANK", "0")) == 0


def _record_time(out: Path, stage: str, seconds: float) -> None:
    from .io import read_json, write_json

    path = out / "timings.json"
    timings = read_json(path) if path.exists() else {}
    timings[stage] = round(seconds, 2)
    write_json(path, timings)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "make-synthetic":
        from .synthetic import DEFAULT_N_TEST, DEFAULT_N_TRAIN, make_synthetic

        out = make_synthetic(args.out, n_train=args.n_train or DEFAULT_N_TRAIN, n_test=args.n_test or DEFAULT_N_TEST, seed=args.seed)
        print(f"wrote the synthetic competition to {out}")
        return 0

    if args.command == "check-data":
        from .data import check_competition

        problems, comp = check_competition(args.data, images=not args.no_images)
        if problems:
            print(f"{args.data}: {len(problems)} problem(s):", file=sys.stderr)
            for p in problems[:200]:
                print(f"  {p}", file=sys.stderr)
            if len(problems) > 200:
                print(f"  ... and {len(problems) - 200} more", file=sys.stderr)
            return 2
        assert comp is not None
        what = "CSVs and images" if not args.no_images else "CSVs (images not checked)"
        print(f"{args.data}: valid ({len(comp.train)} train, {len(comp.test)} test; {what})")
        return 0

    if args.command == "export":
        from .predict import export

        print(export(Path(args.output), Path(args.to)))
        return 0

    if args.command == "predict":
        from .predict import predict

        print(predict(Path(args.artifacts), Path(args.data), Path(args.out), device=args.device, estimate=args.estimate))
        return 0

    cfg = _load_cfg(args)
    if args.command == "report":
        from .report import run as report_run

        print(report_run(cfg))
        return 0
    if args.command == "all":
        from .io import experiment_lock

        with experiment_lock(cfg.out, "all") if _is_lead_process() else contextlib.nullcontext():
            for stage in PIPELINE:
                run_stage(stage, cfg)
        print(f"outputs in {cfg.out}")
        return 0
    print(run_stage(args.command, cfg))
    return 0


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError
    from .data import DataError, ImageDecodeError
    from .io import ExperimentLocked

    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return _dispatch(args)
    except (ConfigError, DataError, ImageDecodeError, ExperimentLocked, FileNotFoundError, ValueError) as e:
        # Bad input of any kind: one clear line, exit 2 (-v adds the traceback for bug reports).
        if args.verbose:
            log.exception("failed")
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
