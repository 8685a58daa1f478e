"""Crash consistency, in the spirit of SQLite's crash tests: kill each command at its k-th file commit, rerun the
same command, and get byte for byte what an uninterrupted run gets.

Every commit (an ``os.replace`` of a finished temporary file, an unlink, a folder rename or swap) passes through
``files._commit_point``; ``PAWPULAR_FAULT_LOG`` lists them and ``PAWPULAR_FAULT_KILL_AT=k`` SIGKILLs the process
just before the k-th. For each command (train, embed, svr with raised n_trials, ensemble, report, export,
predict), a reference run on a copy of the state before it counts its commits N and records its outputs (the
test process runs the seven in turn, on one thread, each counted from 1; the sweep checks that a fresh process makes
N too); then for k in 1..N a fresh copy is killed at k, the same command is
rerun, and the outputs must equal the reference's.

The default suite takes one k per command (seeded, different each command); ``-m crash_sweep`` takes every k
(CI runs it). Plus damaged files (each artifact kind truncated) and corrupt locks.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import CONFIG, REPO, built_once, commits_counted, fault_commits

pytestmark = pytest.mark.slow

SETS = [
    "folds.n_folds=2",
    "train.epochs=2",
    "train.batch_size=16",
    "train.num_workers=0",
    "embed.num_workers=0",
    "svr.n_trials=4",
]
SKIP = {"timings.json", ".data_check.json", "study.db", "study.db.lock", ".lock"}  # times, caches, sqlite pages
OLD_EXPORT = "an older export"  # the starting export's "created": tells it from the new one


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pawpular", *args]


def _run(argv: list[str], kill_at: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PAWPULAR_PROGRESS_SECONDS": "-1"}
    env.pop("PAWPULAR_FAULT_KILL_AT", None)
    if kill_at is not None:
        env["PAWPULAR_FAULT_KILL_AT"] = str(kill_at)
    return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)


def _run_here(argv: list[str], log: Path | None = None) -> int:
    """The same command in this process (a process costs 4-5 s of imports), on one thread as the killed ones run
    (bitwise the same sums); with ``log``, its file commits counted from 1 into it, as a fresh process counts them
    under ``PAWPULAR_FAULT_LOG``. Its exit code (its log is in the test's captured output)."""
    import torch

    from pawpular.cli import main as cli

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with commits_counted(log) if log is not None else contextlib.nullcontext():
            return cli.main(argv[3:])  # after `python -m pawpular`
    finally:
        torch.set_num_threads(threads)


def _normalize(rel: str, data: bytes) -> bytes:
    if rel.endswith("report.html"):  # the time it was written, and timings.json's numbers
        text = re.sub(r"written \d{4}-\d\d-\d\d \d\d:\d\d", "written -", data.decode())
        return re.sub(r'<table id="timings">.*?</table>', "", text).encode()
    if rel == "manifest.json" and b'"created"' in data:  # an export's manifest: when it was made (and its digest)
        found = json.loads(data).items()
        return json.dumps({k: v for k, v in found if k not in ("created", "digest")}, sort_keys=True).encode()
    return data


def snapshot(*folders: Path) -> dict[str, bytes]:
    """Every file's bytes (normalized where time is part of the content), by path; skips times and caches."""
    found = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            if p.is_file() and p.name not in SKIP:
                rel = str(p.relative_to(folder))
                found[f"{folder.name}/{rel}"] = _normalize(rel, p.read_bytes())
    return found


def diff(a: dict[str, bytes], b: dict[str, bytes]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


class Scenario:
    """A command and the state before it: ``prepare(dst)`` makes a fresh copy in ``dst``; ``argv(dst)``."""

    def __init__(self, name: str, base: Path, data: Path, drop: tuple[str, ...] = (), extra: tuple[str, ...] = ()):
        self.name, self.base, self.data, self.drop, self.extra = name, base, data, drop, extra

    def prepare(self, dst: Path) -> Path:
        shutil.copytree(self.base, dst / "exp", symlinks=True)
        for rel in self.drop:
            target = dst / "exp" / rel
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        return dst

    def argv(self, dst: Path) -> list[str]:
        out = dst / "exp"
        common = ["--config", str(CONFIG), "--data", str(self.data), "--output", str(out)]
        sets = [a for s in [*SETS, *self.extra] for a in ("--set", s)]
        if self.name in ("train", "embed", "svr", "ensemble"):
            return _cli(self.name, *common, *sets)
        if self.name == "report":
            return _cli("report", "--output", str(out), "--data", str(self.data))
        if self.name == "export":
            return _cli("export", "--output", str(out), "--to", str(dst / "art"), "--overwrite")
        return _cli("predict", "--artifacts", str(dst / "art"), "--data", str(self.data), "--out", str(dst / "sub.csv"))

    def outputs(self, dst: Path) -> dict[str, bytes]:
        """The files after the command, with this copy's own folder name replaced (config.yaml names it)."""
        sub = {"sub.csv": (dst / "sub.csv").read_bytes()} if (dst / "sub.csv").is_file() else {}
        found = snapshot(*(p for p in (dst / "exp", dst / "art") if p.is_dir())) | sub
        return {k: v.replace(str(dst).encode(), b"<copy>") for k, v in found.items()}


@pytest.fixture(scope="module")
def crash_base(small_competition, tmp_path_factory) -> tuple[Path, Path]:
    """A finished tiny experiment (2 folds, 2 epochs) and an export of it (the starting point of predict), built
    once per session; and the competition it was built on."""
    from pawpular.ship.predictor import manifest_digest

    def build(root: Path) -> None:
        out = root / "exp"
        common = ["--config", str(CONFIG), "--data", str(small_competition), "--output", str(out)]
        assert _run_here(_cli("all", *common, *[a for s in SETS for a in ("--set", s)])) == 0
        assert _run_here(_cli("export", "--output", str(out), "--to", str(root / "art"))) == 0
        manifest = root / "art" / "manifest.json"  # so old and new exports differ (a stray file would be a user's:
        record = {**json.loads(manifest.read_text()), "created": OLD_EXPORT}  # export --overwrite refuses to remove it)
        manifest.write_text(json.dumps({**record, "digest": manifest_digest(record)}))  # signed as export signs it
        (root / "data.txt").write_text(str(small_competition))

    root = built_once(tmp_path_factory, "crash_base", build)
    return root, Path((root / "data.txt").read_text())


SCENARIOS = {
    "train": dict(drop=("train", "emb", "svr", "ensemble", "submission.csv", "report.html")),
    "embed": dict(drop=("emb", "svr", "ensemble", "submission.csv", "report.html")),
    "svr": dict(extra=("svr.n_trials=7",), drop=("report.html",)),  # raised n_trials: the study continues
    "ensemble": dict(drop=("ensemble", "submission.csv", "report.html")),
    "report": dict(drop=("report.html",)),
    "export": dict(),
    "predict": dict(),
}


def _scenario(name: str, crash_base) -> tuple[Scenario, Path]:
    root, data = crash_base
    return Scenario(name, root / "exp", data, **SCENARIOS[name]), root


def _prepare(sc: Scenario, root: Path, dst: Path) -> Path:
    sc.prepare(dst)
    if sc.name in ("export", "predict"):
        shutil.copytree(root / "art", dst / "art")
    return dst


# Every command's uninterrupted run, one after the other in one process (a process each spent 4-5 s on imports),
# each with its commits counted from 1 as in a process of its own; the sweep checks that count against a fresh
# process (killed at one commit more, it finishes).
@pytest.fixture(scope="module")
def references(crash_base, tmp_path_factory) -> dict[str, tuple[int, dict[str, bytes]]]:
    """{command: (the commits of its uninterrupted run, its outputs)}, each run on its own copy of the state before
    it; made once per session."""

    def build(folder: Path) -> None:
        for name in SCENARIOS:
            sc, root = _scenario(name, crash_base)
            argv = sc.argv(_prepare(sc, root, folder / name))
            assert _run_here(argv, log=folder / f"{name}.log") == 0, f"the uninterrupted {name} failed"

    folder = built_once(tmp_path_factory, "crash_references", build)
    found = {}
    for name in SCENARIOS:
        n = len(fault_commits(folder / f"{name}.log"))
        assert n > 0, f"{name}: no commits counted"
        found[name] = n, _scenario(name, crash_base)[0].outputs(folder / name)
    return found


def _artifact_folder_whole(art: Path) -> str:
    """'old' or 'new' when ``art`` is a whole export (every file its manifest lists, with its digest)."""
    from pawpular.ship.predictor import read_manifest

    read_manifest(art)  # raises on a missing or damaged file
    assert (art / "src" / "pawpular" / "cli" / "main.py").is_file(), "the package must travel whole"
    return "old" if json.loads((art / "manifest.json").read_text())["created"] == OLD_EXPORT else "new"


def killed_then_rerun(sc: Scenario, root: Path, tmp: Path, k: int, here: bool = False) -> tuple[int, dict]:
    """Kill the command at its k-th commit (a process of its own), rerun it (``here``: in this process); the
    killed run's exit code and the outputs after the rerun."""
    dst = _prepare(sc, root, tmp / f"k{k}")
    killed = _run(sc.argv(dst), kill_at=k)
    if sc.name == "export":  # after the kill and before any rerun: the old export whole, or the new one whole
        _artifact_folder_whole(dst / "art")
    if here:
        code, err = _run_here(sc.argv(dst)), "(its log: the captured output below)"
    else:
        rerun = _run(sc.argv(dst))
        code, err = rerun.returncode, rerun.stderr[-3000:]
    assert code == 0, f"{sc.name} k={k}: the rerun failed:\n{err}"
    assert not list((dst / "exp").rglob(".*.tmp")), f"{sc.name} k={k}: temporary files left"
    assert not (dst / "exp" / ".lock").exists() and not list(dst.glob(".*.lock"))
    return killed.returncode, sc.outputs(dst)


def _check(name: str, crash_base, references, tmp_path: Path, pick, here: bool = False) -> None:
    """Kill at each commit ``pick(n)`` chooses of the n an uninterrupted run makes; rerun (``here``: in this
    process; the sweep's reruns run two at a time, each a process); compare."""
    sc, root = _scenario(name, crash_base)
    n, ref = references[name]
    todo = pick(n)
    if here:
        results = [(k, *killed_then_rerun(sc, root, tmp_path, k, here=True)) for k in todo]
    else:
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda k: (k, *killed_then_rerun(sc, root, tmp_path, k)), todo))
    for k, code, outputs in results:
        assert code == -signal.SIGKILL, f"{name}: the run meant to die at commit {k} of {n} exited {code}"
        assert not diff(ref, outputs), f"{name} killed at commit {k} of {n}, rerun: differs in {diff(ref, outputs)}"
    print(f"{name}: {n} commits; killed at {todo}; every rerun matched the uninterrupted run")


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_killed_at_a_sampled_commit_then_rerun_matches(name, crash_base, references, tmp_path):
    pick = lambda n: [random.Random(f"crash-{name}").randint(1, n)]  # noqa: E731
    _check(name, crash_base, references, tmp_path, pick, here=True)


@pytest.mark.crash_sweep
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_killed_at_every_commit_then_rerun_matches(name, crash_base, references, tmp_path):
    sc, root = _scenario(name, crash_base)
    n = references[name][0]
    beyond = _run(sc.argv(_prepare(sc, root, tmp_path / "beyond")), kill_at=n + 1)  # a fresh process makes n too
    assert beyond.returncode == 0, f"{name}: a fresh process made more than the {n} commits counted"
    _check(name, crash_base, references, tmp_path, lambda n: list(range(1, n + 1)))
