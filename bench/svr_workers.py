"""Benchmark: the SVR stage's tuning with 1 vs 3 local worker processes on one Optuna study (svr.workers).

    python bench/svr_workers.py                                    # 3,000 x 256, 5 folds, 30 trials, 1 vs 3 workers
    python bench/svr_workers.py --rows 1000 --dims 64 --trials 8   # smoke run, well under a minute
    python bench/svr_workers.py --workers 1 4                      # other worker counts

Data: ``bench/svr_head.py``'s ``make_data`` (embedding-shaped rows: a latent encoded into ``--dims`` features,
a nonlinear target scaled to Pawpularity's range), written as a real experiment folder: a competition folder
(train.csv / test.csv / sample_submission.csv; no photos: the SVR stage reads none), ``folds/folds.csv`` with the
folds stage's manifest, and ``emb/fold{k}/{train,test}.parquet`` with a finished manifest per folder (as the
tests' ``adopt_folds`` / ``plant_finished`` do), so the real stage runs:
``pawpular.runner.run_planned(Context(cfg, "cpu"), "svr")``, i.e. loading the embeddings, the study in the
experiment's own ``svr/study.db``, the local workers, the final fits and the writes.

Each worker count runs on a fresh copy of that folder (the same data, a new study), timed from the call to its
return; the whole stage is timed because that is what a user waits for (workers load the folds and compute
their own kernels before their first trial). The stage's process runs folds on all cores; each local worker on
one core (PAWPULAR_SVR_THREADS=1). Printed: the wall times, the ratio, and each run's best C, its OOF RMSE and
its study's COMPLETE trials (exactly --trials: the budget is shared, never overshot), and how many trials the
stage's own process ran (the rest ran in the workers).

Expect no speed-up on a machine whose cores the stage's process already keeps busy (with 5 folds it fits them
on up to 5 threads): local workers pay off when cores outnumber folds. Each worker also holds its own copy of the
folds and their cached kernels (svr.max_kernel_gb is per process).

Measured (default size, 2 CPU cores shared with another user's jobs, load average 4-6): 1 worker 46.4 s,
3 workers 60.4 s (0.77x: slower; the stage's process ran 18 trials, the workers 7 and 5, after a 20 s start),
best C 16.25 vs 16.78, OOF RMSE 14.0465 vs 14.0466, exactly 30 COMPLETE trials each.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from svr_head import make_data

from pawpular.config.schema import load_config
from pawpular.data.tables import ID, META_COLS, TARGET
from pawpular.runner import Context, run_planned
from pawpular.stages import folds as folds_stage
from pawpular.store import artifacts, manifest
from pawpular.store.files import read_json, write_csv


def write_experiment(root: Path, rows: int, dims: int, n_folds: int, seed: int = 0) -> tuple[Path, Path]:
    """A competition folder and an experiment folder whose folds and embeddings are planted as finished."""
    rng = np.random.default_rng(seed)
    n_test = max(rows // 10, 10)
    x, y = make_data(rows + n_test, dims, seed=seed)
    ids = [f"{i:06x}{rng.integers(1 << 24):06x}" for i in range(rows + n_test)]
    flags = rng.integers(0, 2, size=(rows + n_test, len(META_COLS)))
    comp, out = root / "comp", root / "exp"
    comp.mkdir(parents=True)
    table = pd.DataFrame({ID: ids, **{c: flags[:, j] for j, c in enumerate(META_COLS)}})
    table.iloc[:rows].assign(**{TARGET: np.round(y[:rows]).astype(int)}).to_csv(comp / "train.csv", index=False)
    table.iloc[rows:].to_csv(comp / "test.csv", index=False)
    pd.DataFrame({ID: ids[rows:], TARGET: 50}).to_csv(comp / "sample_submission.csv", index=False)

    cfg = config(comp, out, n_folds, trials=1, workers=1)
    write_csv(
        pd.DataFrame({ID: ids[:rows], "fold": rng.permutation(np.arange(rows) % n_folds)}), artifacts.folds_csv(out)
    )
    plan = folds_stage.plan(Context(cfg))
    manifest.commit(
        artifacts.manifest(out, "folds"), out, manifest.Record(plan.config, plan.inputs), [artifacts.folds_csv(out)]
    )
    columns = [f"e{j}" for j in range(dims)]
    for k in range(n_folds):  # every fold's "backbone" sees the same features (one table per fold, as embed writes)
        folder = artifacts.emb_dir(out, fold=k)
        folder.mkdir(parents=True)
        for split, part in (("train", slice(0, rows)), ("test", slice(rows, None))):
            frame = pd.DataFrame(x[part], columns=columns)
            frame.insert(0, ID, ids[part])
            frame.to_parquet(folder / f"{split}.parquet", index=False)
        files = [folder / f"{s}.parquet" for s in artifacts.SPLITS]
        manifest.commit(folder / "manifest.json", out, manifest.Record({}, {}), files)
    return comp, out


def config(comp: Path, out: Path, n_folds: int, trials: int, workers: int, c_max: float = 100.0):
    # folds.group_duplicates=false: no photos to hash (the folds are planted, round-robin)
    return load_config(
        None,
        [
            "device=cpu",
            f"folds.n_folds={n_folds}",
            "folds.group_duplicates=false",
            f"svr.n_trials={trials}",
            f"svr.workers={workers}",
            f"svr.c_max={c_max}",
        ],
        data_dir=str(comp),
        output_dir=str(out),
    )


class _Summary(logging.Handler):
    """Keeps the stage's summary line ("... 30 trials (12 new, ...") to tell how many trials its process ran."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def run_once(comp: Path, base: Path, dest: Path, n_folds: int, trials: int, workers: int, c_max: float) -> dict:
    shutil.copytree(base, dest)
    cfg = config(comp, dest, n_folds, trials, workers, c_max)
    summary = _Summary()
    logging.getLogger("pawpular").addHandler(summary)
    try:
        t0 = time.perf_counter()
        run_planned(Context(cfg, "cpu"), "svr")
        seconds = time.perf_counter() - t0
    finally:
        logging.getLogger("pawpular").removeHandler(summary)
    best = read_json(artifacts.best_params(dest))
    with sqlite3.connect(artifacts.study_db(dest)) as conn:
        states = dict(conn.execute("SELECT state, COUNT(*) FROM trials GROUP BY state").fetchall())
    own = next((int(m.group(1)) for line in summary.lines if (m := re.search(r"trials \((\d+) new", line))), -1)
    return {
        "seconds": seconds,
        "C": best["C"],
        "oof_rmse": best["oof_rmse"],
        "n_trials": best["n_trials"],
        "states": states,
        "own": own,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=3000)
    p.add_argument("--dims", type=int, default=256)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--trials", type=int, default=30)
    p.add_argument("--c-max", type=float, default=100.0)
    p.add_argument("--workers", type=int, nargs=2, default=[1, 3], metavar=("A", "B"))
    p.add_argument("--keep", help="build the experiments in this folder and keep them (default: a temp folder)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("PIL", "matplotlib", "timm"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="svr-workers-"))
    try:
        comp, base = write_experiment(root, args.rows, args.dims, args.folds)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        results = {
            w: run_once(comp, base, root / f"workers{w}", args.folds, args.trials, w, args.c_max) for w in args.workers
        }
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    a, b = args.workers
    print(
        f"\ndata: {args.rows} train rows x {args.dims} dims, {args.folds} folds, {args.trials} trials, C in "
        f"[0.1, {args.c_max:g}]; {cores} CPU cores; python {sys.version.split()[0]}"
    )
    for w, r in results.items():
        print(
            f"svr.workers={w}: {r['seconds']:7.1f} s  best C {r['C']:.6g}  OOF RMSE {r['oof_rmse']:.4f}  "
            f"n_trials {r['n_trials']} (study: {r['states']}); the stage's process ran {r['own']}, "
            f"workers {r['n_trials'] - r['own']}"
        )
    print(f"wall time ratio workers={a} / workers={b}: {results[a]['seconds'] / results[b]['seconds']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
