"""Adversarial cases, round four (issue 43), the path classes: a path fault is one line naming the path (7, 14);
a budget no set fits says what the smallest needs (8); Ctrl-C pressed several times is one line (9); reading
commands work on a read-only experiment, or say in one line what they needed to write (13); several starts, pasted
commands, an interrupted make-synthetic and a read-only shared cache (15).

Each case runs the real CLI (in process, or as a subprocess where a signal or a read-only mount is needed) and
asserts the exit code, the one line naming the cause, and that the user's files are what they were (``tree``).
A read-only folder is a read-only bind mount in a private mount namespace (``unshare``): root ignores mode bits.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from adversary import one_line, run_cli, tree
from conftest import REPO, popen_cli, tiny_args
from test_select import sel_exp  # noqa: F401  (fixture)
from test_winners import _plant_speed

WRONG_WORDS = ("File exists", "file exists", "No such", "no such", "Not a directory", "not a directory")


@pytest.fixture
def run(experiment_run, tmp_path) -> Path:
    return Path(shutil.copytree(experiment_run, tmp_path / "out" / "run"))


def _says_the_path(out: str, path: Path, what: str) -> None:
    assert one_line(out) and str(path) in out and what in out, out
    assert not any(w in out for w in WRONG_WORDS), out


# ---------------------------------------------------------------------------------------------------------------
# 7, 14. A file (or a dangling link) where a folder is needed: one line naming it, exit 2, every file as it was


def _commands(run: Path, comp: Path, bad: Path) -> dict[str, list]:
    return {
        "all": ["all", *tiny_args(comp, bad)],
        "status": ["status", *tiny_args(comp, bad)],
        "export --to": ["export", "--output", run, "--to", bad],
        "make-synthetic --out": ["make-synthetic", "--out", bad, "--n-train", "20", "--n-test", "2"],
        "runs --html": ["runs", run, "--html", bad],
        "select --as": ["select", *tiny_args(comp, run), "--as", bad],
        "report --output": ["report", "--output", bad],
    }


@pytest.mark.parametrize("where", ["a file", "under a file", "a dangling link"])
def test_an_output_path_in_the_way_is_one_line_naming_it(where, run, small_competition, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere" / "x")
    bad, what = {
        "a file": (notes, "is a file, not a folder"),
        "under a file": (notes / "sub", f"{notes} is a file, not a folder"),
        "a dangling link": (tmp_path / "link", "symbolic link"),
    }[where]
    for name, args in _commands(run, small_competition, bad).items():
        if name == "runs --html" and where == "a file":
            continue  # a page file is a file: runs --html refuses a user's file on its own (round three)
        before = tree(tmp_path)
        code, out = run_cli(capsys, *args)
        assert code == 2, (name, out)
        _says_the_path(out, notes if where == "under a file" else bad, what)
        assert tree(tmp_path) == before, name  # nothing written, no partial folder left beside it


@pytest.mark.parametrize(
    "tree_path, command",
    [
        (".embeddings", "embed"),
        ("run/emb/fold0", "embed"),
        ("run/svr/fold0", "svr"),
        ("run/ensemble", "ensemble"),
    ],
)
def test_a_file_where_the_output_tree_needs_a_folder(tree_path, command, run, small_competition, capsys):
    path = run.parent / tree_path
    shutil.rmtree(path, ignore_errors=True)
    path.write_text("a user's file")
    code, out = run_cli(capsys, command, *tiny_args(small_competition, run), "--overwrite")
    assert code == 2, out
    _says_the_path(out, path, "is a file, not a folder")
    assert path.read_text() == "a user's file"


def test_only_a_path_fault_found_on_disk_under_a_given_path_is_a_user_error(tmp_path):
    import errno

    from pawpular.cli import main as cli
    from pawpular.store import path_faults

    notes = tmp_path / "given" / "notes.txt"
    notes.parent.mkdir()
    notes.write_text("my notes")
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("x")
    path_faults.register(tmp_path / "given")
    assert "notes.txt is a file" in cli._one_line(NotADirectoryError(errno.ENOTDIR, "no", str(notes / "a")))
    assert cli._one_line(NotADirectoryError(errno.ENOTDIR, "no", str(elsewhere / "a"))) is None  # not given
    assert cli._one_line(FileExistsError(errno.EEXIST, "exists", str(notes.parent))) is None  # nothing in the way
    assert cli._one_line(IsADirectoryError(errno.EISDIR, "is a dir", str(notes))) is None  # it is no folder


def test_a_path_under_a_file_is_never_called_missing(run, small_competition, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    cases = [
        ("check-data", "--data", notes / "comp"),
        ("config", "show", "--config", notes / "c.yaml"),
        ("predict", "--artifacts", notes / "art", "--data", small_competition, "--out", tmp_path / "s.csv"),
        ("runs", notes / "exp"),
        ("folds", *tiny_args(notes / "comp", tmp_path / "exp")),
        ("train", *tiny_args(small_competition, run, f"model.pretrained={notes / 'w.safetensors'}")),
    ]
    for args in cases:
        before = tree(tmp_path)
        code, out = run_cli(capsys, *args)
        assert code == 2 and f"under {notes}, which is a file, not a folder" in out, out
        assert "not found" not in out and "does not exist" not in out and "no such" not in out, out
        assert tree(tmp_path) == before, args


# ---------------------------------------------------------------------------------------------------------------
# 8. An inference budget no embedding set fits


def test_a_budget_no_set_fits_says_what_the_fastest_needs(sel_exp, capsys):  # noqa: F811
    _, out, config = sel_exp
    for folder, ips in (("fold0", 100.0), ("fold1", 100.0), ("fold2", 100.0), ("partial", 1.0), ("noise", 50.0)):
        _plant_speed(out, folder, ips)
    before = tree(out)
    code, text = run_cli(capsys, "select", "--config", config, "--budget-hours", "0.01", "--test-images", "3600")
    # the fastest: "noise", 3,600 photos at 50/s = 0.02 h ("model": 3 folds at 100/s = 0.03 h)
    assert code == 2 and one_line(text) and "select.budget_hours" in text and "'noise'" in text, text
    assert "0.02 h" in text and "at least 0.02" in text, text
    assert tree(out) == before


# ---------------------------------------------------------------------------------------------------------------
# 9. Ctrl-C pressed several times


def _popen(*args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    return popen_cli([sys.executable, "-m", "pawpular", *map(str, args)], env, cwd=REPO)


def _wait_for(proc: subprocess.Popen, done, what: str, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not done():
        assert proc.poll() is None and time.monotonic() < deadline, f"never saw {what}: {proc.communicate()}"
        time.sleep(0.05)


@pytest.mark.slow
def test_ctrl_c_pressed_three_times_is_one_line(small_competition, tmp_path):
    out = tmp_path / "exp"
    proc = _popen("all", *tiny_args(small_competition, out, "train.epochs=50"))
    try:
        _wait_for(proc, lambda: (out / "train" / "fold0" / "last.pt").is_file(), "fold 0's first epoch")
        for _ in range(3):  # while the first one unwinds, and during the interpreter's exit handlers
            proc.send_signal(signal.SIGINT)
            time.sleep(0.01)
        err = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert err.count("interrupted; rerun the same command to resume") == 1, err[-3000:]
    assert "Traceback" not in err and "Exception ignored" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert not (out / ".lock").exists()


# ---------------------------------------------------------------------------------------------------------------
# 13. A read-only experiment (an earlier run attached as a read-only dataset)


READ_ONLY = """
import json, sys
from pawpular.cli.main import main
for argv in json.loads(sys.argv[1]):
    for stream in (sys.stdout, sys.stderr):
        print("@@ command", file=stream, flush=True)
    code = main(argv)
    sys.stdout.flush()
    print(f"@@ exit {code}", file=sys.stderr, flush=True)
"""


def _read_only(folder: Path, *commands: list) -> list[tuple[int, str, str]]:
    """Each command (``pawpular ARGS``) in turn, in one process that has ``folder`` mounted read-only (a private
    mount namespace: nobody else sees it; one process: a process costs 4-5 s of imports); (exit code, stdout,
    stderr) of each."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("unshare -rm is not available here: no read-only mount to test with")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    script = 'mount --bind -o ro "$1" "$1" && shift && exec "$@"'
    argv = json.dumps([[str(a) for a in args] for args in commands])
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, "sh", str(folder), sys.executable, "-c", READ_ONLY, argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    outs, errs = done.stdout.split("@@ command\n")[1:], done.stderr.split("@@ command\n")[1:]
    assert len(outs) == len(errs) == len(commands), done.stderr[-3000:]
    found = []
    for out, err in zip(outs, errs, strict=True):
        err, _, code = err.rpartition("@@ exit ")
        found.append((int(code), out, err))
    return found


def test_status_writes_nothing(run, small_competition, capsys):
    (run / ".data_check.json").unlink()  # the photos' digests must be computed again: status keeps them to itself
    before = {str(p): p.stat().st_mtime_ns for p in run.rglob("*")}
    code, out = run_cli(capsys, "status", *tiny_args(small_competition, run))
    assert code == 0 and "everything is done and current" in out, out
    assert {str(p): p.stat().st_mtime_ns for p in run.rglob("*")} == before


def test_reading_commands_work_on_a_read_only_experiment(run, small_competition, tmp_path):
    (run / ".data_check.json").unlink()
    before = tree(run)
    status, runs, export, report = _read_only(
        run,
        ["status", *tiny_args(small_competition, run)],
        ["runs", run],
        ["export", "--output", run, "--to", tmp_path / "art", "--data", small_competition],
        ["report", "--output", run],
    )
    assert status[0] == 0 and "everything is done and current" in status[1], status[2][-2000:]
    assert runs[0] == 0 and "error" not in runs[2] and str(run.name) in runs[1], runs[2][-2000:]
    assert export[0] == 0 and (tmp_path / "art" / "manifest.json").is_file(), export[2][-2000:]
    assert report[0] == 2 and one_line(report[2]), report[2][-2000:]
    assert "read-only" in report[2] and str(run / "report.html") in report[2], report[2]
    assert tree(run) == before


# ---------------------------------------------------------------------------------------------------------------
# 15. Several starts, pasted commands, an interrupted make-synthetic, a read-only shared cache


def test_select_as_with_several_starts_writes_each_start(sel_exp, capsys):  # noqa: F811
    _, out, config = sel_exp
    for folder, ips in (("fold0", 100.0), ("fold1", 100.0), ("fold2", 100.0), ("partial", 1.0), ("noise", 50.0)):
        _plant_speed(out, folder, ips)
    budget = ["--budget-hours", "0.9", "--test-images", "3600"]  # "partial" does not fit: two different starts
    code, text = run_cli(capsys, "select", "--config", config, "--starts", "2", *budget, "--as", "my best")
    assert code == 0, text
    found = json.loads((out / "select" / "selection.json").read_text())
    starts = [s["features"] for s in found["starts"]]
    assert len(starts) == 2, starts
    for folder, features in zip((out.parent / "my best", out.parent / "my best-start2"), starts, strict=True):
        assert yaml.safe_load((folder / "config.yaml").read_text())["svr"]["features"] == features
    blend = next(line for line in text.splitlines() if line.startswith("blend them:"))
    argv = shlex.split(blend.removeprefix("blend them:").split("   (")[0])
    assert argv[:4] == ["pawpular", "ensemble", "--output", str(out.parent / "my best")], argv
    assert argv[-1] == f"ensemble.experiments=[{out.parent / 'my best-start2'}]", argv


def test_printed_next_commands_paste_into_a_shell(run, small_competition, tmp_path, capsys):
    spaced = Path(shutil.copytree(run, tmp_path / "my runs" / "run 1"))
    code, text = run_cli(capsys, "all", *tiny_args(small_competition, spaced))
    assert code == 0, text
    line = next(x for x in text.splitlines() if x.startswith("report: "))
    argv = shlex.split(line.removeprefix("report: ").split("   (")[0])
    assert argv == ["pawpular", "report", "--output", str(spaced)], argv


def test_ctrl_c_during_make_synthetic_leaves_no_partial_folder(tmp_path):
    out = tmp_path / "syn"
    proc = _popen("make-synthetic", "--out", out, "--n-train", "20000", "--n-test", "10")
    partial = tmp_path / ".syn.pawpular-partial.tmp"
    try:
        _wait_for(proc, lambda: partial.is_dir() and len(list((partial / "train").glob("*.jpg"))) > 20, "photos")
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_a_read_only_shared_cache(run, small_competition, experiment_run):
    shutil.copytree(experiment_run.parent / ".embeddings", run.parent / ".embeddings")
    shutil.rmtree(run / "emb")
    cache = run.parent / ".embeddings"
    before = tree(cache)
    found, other = _read_only(
        cache,
        ["embed", *tiny_args(small_competition, run)],  # the sets are there: read, linked
        ["embed", *tiny_args(small_competition, run, "embed.tta_hflip=false")],  # new sets: nowhere to write them
    )
    assert found[0] == 0, found[2][-2000:]
    assert other[0] == 2 and one_line(other[2]), other[2][-2000:]
    assert "embedding cache" in other[2] and "read-only" in other[2] and str(cache) in other[2]
    assert tree(cache) == before


def test_a_library_error_that_ctrl_c_caused_is_not_logged_as_a_traceback():
    """SQLAlchemy logs "Error closing cursor" with a traceback when Ctrl-C lands inside a query: that record is
    dropped on the terminal's handlers (the interrupt has its own line); an error with no interrupt behind it, or
    pawpular's own line, is kept."""
    import logging
    import sys

    from pawpular.logs.progress import _not_interrupt_noise

    def record(name: str, interrupted: bool) -> logging.LogRecord:
        try:
            try:
                if interrupted:
                    raise KeyboardInterrupt
                raise ValueError("the query failed")
            except BaseException:
                raise RuntimeError("Cannot operate on a closed database.")  # noqa: B904 (chained as a library does)
        except RuntimeError:
            return logging.LogRecord(name, logging.ERROR, __file__, 1, "Error closing cursor", None, sys.exc_info())

    assert not _not_interrupt_noise(record("sqlalchemy.pool.impl.QueuePool", interrupted=True))
    assert _not_interrupt_noise(record("sqlalchemy.pool.impl.QueuePool", interrupted=False))
    assert _not_interrupt_noise(record("pawpular", interrupted=True))
    assert _not_interrupt_noise(logging.LogRecord("optuna", logging.WARNING, __file__, 1, "a warning", None, None))


def test_a_ctrl_c_lost_in_a_finalizer_is_raised_again_at_the_next_check():
    """Python prints and drops a KeyboardInterrupt raised inside a finalizer (a database cursor's ``__del__``): the
    hook keeps it quiet and pending, so the SVR's trial loop (interrupts.check) stops instead of running on with
    later presses ignored; any other lost exception is printed as Python does."""
    import gc
    import io
    import sys

    from pawpular.logs import interrupts

    class Interrupted:
        def __del__(self):
            raise KeyboardInterrupt

    interrupts.reset()
    saved_hook, saved_err = sys.unraisablehook, sys.stderr
    sys.unraisablehook, sys.stderr = interrupts.quiet_unraisable, io.StringIO()
    try:
        Interrupted()
        gc.collect()
        printed_for_interrupt = sys.stderr.getvalue()

        class Broken:
            def __del__(self):
                raise ValueError("a real fault")

        Broken()
        gc.collect()
        printed_for_fault = sys.stderr.getvalue()
    finally:
        sys.unraisablehook, sys.stderr = saved_hook, saved_err
    assert printed_for_interrupt == ""
    assert "ValueError: a real fault" in printed_for_fault
    with pytest.raises(KeyboardInterrupt):
        interrupts.check()
    interrupts.reset()
    interrupts.check()  # a new command starts with nothing pending
