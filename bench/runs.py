"""Benchmark: `pawpular runs` listing 50 experiments (target: under 2 s).

    python bench/runs.py                  # one tiny real run (~15 s on 2 cores), 50 varied copies, timed listings
    python bench/runs.py --run DIR        # copies of an existing experiment folder instead (e.g. output/default)
    python bench/runs.py --n 200          # more copies

The copies are of one real experiment folder (folds, train, embed, svr, ensemble, manifests and all), varied as
a folder of real experiments is: each copy's config.yaml gets its own svr.c_max and train.lr (so the settings
that differ are listed), its weights.json other scores (re-recorded in the ensemble's manifest, so the copy is
still done), and every tenth copy of each kind is left stale (the ensemble's recorded svr/oof.parquet digest is
not svr's), damaged (weights.json truncated) or partial (the ensemble never finished).

Timed, each in a fresh process so nothing is cached (the digests of small files are memoized per process only):
``experiments.table(folder)`` alone (the work), and ``python -m pawpular runs folder`` end to end (interpreter
start, imports, printing). Printed: both times, their ratio to the 2 s target, and the statuses found.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))

from pawpular.store import artifacts  # noqa: E402
from pawpular.store.files import file_digest, write_json, write_text  # noqa: E402

TARGET_S = 2.0


def tiny_run(root: Path) -> Path:
    """The tests' tiny config on a 120-photo synthetic competition: a real, finished experiment folder."""
    from conftest import build_run

    from pawpular.data.synthetic import make_synthetic

    comp = make_synthetic(root / "comp", n_train=120, n_test=16, seed=3)
    logging.disable(logging.INFO)  # the pipeline's own log: not what is measured here
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        return build_run(comp, root / "base")


def vary(base: Path, out: Path, i: int, rng: random.Random) -> str:
    """A copy of ``base`` with its own settings and scores; returns the status it was made to have."""
    shutil.copytree(base, out)
    config = yaml.safe_load(artifacts.config_yaml(out).read_text())
    config["svr"]["c_max"] = float(rng.choice([10, 30, 50, 100, 300]))
    config["train"]["lr"] = float(rng.choice([1e-3, 2e-3, 4e-3]))
    write_text(artifacts.config_yaml(out), yaml.safe_dump(config, sort_keys=False))
    weights = json.loads(artifacts.weights_json(out).read_text())
    weights["oof_rmse"] = {k: v + rng.uniform(-0.5, 0.5) for k, v in weights["oof_rmse"].items()}
    write_json(artifacts.weights_json(out), weights)
    ens = artifacts.manifest(out, "ensemble")
    record = json.loads(ens.read_text())
    record["outputs"]["ensemble/weights.json"] = file_digest(artifacts.weights_json(out))
    kind = ["done"] * 7 + ["stale", "damaged", "partial"]
    status = kind[i % len(kind)]
    if status == "stale":
        record["inputs"]["svr/oof.parquet"] = "0" * 32
    write_json(ens, record)
    if status == "damaged":
        artifacts.weights_json(out).write_bytes(artifacts.weights_json(out).read_bytes()[:40])
    if status == "partial":
        ens.unlink()
    return status


def timed(code: list[str]) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, *code], capture_output=True, text=True, env=env, check=True)
    return time.perf_counter() - t0, done.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="an existing experiment folder to copy (default: build a tiny one)")
    ap.add_argument("--n", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-runs-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        base = args.run or tiny_run(root)
        rng = random.Random(0)
        made = [vary(base, root / "experiments" / f"exp{i:03d}", i, rng) for i in range(args.n)]
        print(
            f"{args.n} copies of {base if args.run else 'a tiny real run'} in {time.perf_counter() - t0:.1f}s: "
            + ", ".join(f"{made.count(s)} {s}" for s in ("done", "stale", "damaged", "partial"))
        )
        folder = str(root / "experiments")
        work, printed = timed(
            [
                "-c",
                "import json, sys, time; from pawpular.views import experiments; t = time.perf_counter(); "
                f"df = experiments.table([{folder!r}]); s = time.perf_counter() - t; "
                "print(json.dumps([s, df['status'].tolist()]))",
            ]
        )
        seconds, statuses = json.loads(printed.splitlines()[-1])
        assert statuses == made, "runs found other statuses than the copies were made to have"
        cli, text = timed(["-m", "pawpular", "runs", folder])
        assert len([line for line in text.splitlines() if line.startswith("exp")]) >= args.n
    print(
        f"experiments.table on {args.n} experiments: {seconds:.2f}s ({seconds / TARGET_S:.2f}x the {TARGET_S:g} s "
        f"target; {seconds / args.n * 1000:.1f} ms each; that process took {work:.2f}s with its imports)"
    )
    print(f"`python -m pawpular runs` end to end: {cli:.2f}s ({cli / TARGET_S:.2f}x the target)")
    print(
        "statuses found = statuses made: "
        + ", ".join(f"{statuses.count(s)} {s}" for s in ("done", "stale", "damaged", "partial"))
    )


if __name__ == "__main__":
    main()
