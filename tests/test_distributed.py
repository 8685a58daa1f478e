"""Past one machine, end to end: the real SVR stage on a shared PostgreSQL study from several OS processes, two
experiments on one server, bad svr.storage settings through the CLI, --overwrite vs delete-study, local workers
(--workers), and embed / inference under torchrun (gloo, CPU).

A "machine" is a copy of the session's finished tiny run (conftest.build_run) without its svr/ and ensemble/
outputs, and a process running ``python -m pawpular.cli``. Copies of one run hold the same embeddings, so their
study (named by a hash of the values it is tuned on) is one study on the server. PostgreSQL comes from the
fixtures of tests/postgres.py (a throwaway server; the tests skip only where its binaries or psycopg2 are absent).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import popen_cli, tiny_args, torchrun
from postgres import postgres_db, postgres_role, postgres_server  # noqa: F401  (fixtures)

import pawpular
from pawpular.data.tables import ID
from pawpular.store import artifacts
from pawpular.svr import study as st

SRC = str(Path(pawpular.__file__).resolve().parents[1])  # subprocesses import the same pawpular as the tests
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p),
    "OMP_NUM_THREADS": "1",
}
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d ")  # our log lines; anything else on stderr is what a user reads
SUMMARY = re.compile(r"svr: best C=.*?(\d+) trials \((\d+) new")
WORKER = re.compile(r"svr worker (\d+): (\d+) trials")

pytestmark = pytest.mark.slow


def machine(run: Path, dest: Path) -> Path:
    """A copy of the finished run as it stood before `svr`: folds, train and embed done."""
    return Path(shutil.copytree(run, dest, ignore=shutil.ignore_patterns("svr", "ensemble", "submission.csv")))


def cli(command: str, comp: Path, out: Path, *sets: str, flags: tuple[str, ...] = ()) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pawpular.cli",
        command,
        *tiny_args(comp, out),
        *[a for s in sets for a in ("--set", s)],
        *flags,
    ]


def run_all(*commands: list[str], timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """Start every command at once (the "machines") and wait for all; each result also has ``seconds`` (from the
    start until it had exited)."""
    t0 = time.monotonic()
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) for c in commands]
    done = []
    try:
        for c, p in zip(commands, procs, strict=False):
            out, err = p.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(c, p.returncode, out, err))
            done[-1].seconds = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return done


def ok(results: list[subprocess.CompletedProcess]) -> None:
    for r in results:
        assert r.returncode == 0, f"{' '.join(r.args[3:5])} exited {r.returncode}:\n{r.stderr[-3000:]}"


def load(url: str, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=url)


def states(study) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def create_schema(url: str) -> None:
    """Optuna's tables, created once before the machines start: several processes creating them at the same
    instant on a fresh database collide (see test_machines_started_together_on_a_fresh_database)."""
    st.make_storage(url, Path("unused")).engine.dispose()


def best(out: Path) -> dict:
    return json.loads(artifacts.best_params(out).read_text())


# ---------------------------------------------------------------------------------------------------------------
# a. three machines, one PostgreSQL study


def test_three_machines_share_one_postgres_study(experiment_run, small_competition, tmp_path, postgres_db):
    """3 processes on copies of one experiment, one study on the server: each exits 0, the study ends with
    exactly n COMPLETE trials (the processes' own counts add up to n), and every machine writes the same best C
    (the study's) and bitwise the same predictions."""
    n = 7
    create_schema(postgres_db)
    outs = [machine(experiment_run, tmp_path / f"machine{i}") for i in range(3)]
    results = run_all(
        *[cli("svr", small_competition, out, f"svr.storage={postgres_db}", f"svr.n_trials={n}") for out in outs]
    )
    ok(results)

    names = {best(out)["study_name"] for out in outs}
    assert len(names) == 1
    study = load(postgres_db, names.pop())
    assert states(study) == {"COMPLETE": n}
    own = [int(SUMMARY.search(r.stderr).group(2)) for r in results]
    assert sum(own) == n, own  # no machine ran a trial beyond the budget, none is missing
    for out in outs:
        b = best(out)
        assert b["C"] == study.best_params["C"] and b["best_trial_rmse"] == study.best_value
        assert b["n_trials"] == n
        assert artifacts.manifest(out, "svr").is_file()
    for split in ("oof", "test"):
        first = artifacts.preds(outs[0], "svr", split).read_bytes()
        assert all(artifacts.preds(out, "svr", split).read_bytes() == first for out in outs[1:]), split
    oof = pd.read_parquet(artifacts.preds(outs[0], "svr", "oof"))
    assert len(oof) == 120 and oof[ID].is_unique and oof["pred"].between(1, 100).all()


def test_machines_started_together_on_a_fresh_database(postgres_db, tmp_path):
    """N machines started at once on a database nobody used yet: each must get its storage. (Old: they collided
    creating Optuna's tables, "duplicate key ... pg_type_typname_nsp_index", misreported as a GRANT problem.)"""
    script = tmp_path / "connect.py"
    script.write_text(
        "import sys\nfrom pathlib import Path\nimport optuna, sqlalchemy, psycopg2\n"
        "from pawpular.svr import study as st\n"
        "print('ready', flush=True)\nsys.stdin.readline()\n"
        "try:\n    st.make_storage(sys.argv[1], Path('unused'))\n    print('ok')\n"
        "except st.StudyStorageError as e:\n    print(e)\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), postgres_db],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        for _ in range(5)
    ]
    try:
        assert [p.stdout.readline().strip() for p in procs] == ["ready"] * 5  # imports done: start them together
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        said = [p.communicate(timeout=60)[0].strip() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert said == ["ok"] * 5


# ---------------------------------------------------------------------------------------------------------------
# b. two experiments, one server


def test_two_experiments_on_one_server_keep_their_own_studies(experiment_run, small_competition, tmp_path, postgres_db):
    """Experiment B tunes other values (no flags) over another C range: two studies, each with its own budget,
    and no trial of one in the other (every C lies in its own experiment's range)."""
    create_schema(postgres_db)
    a, b = machine(experiment_run, tmp_path / "a"), machine(experiment_run, tmp_path / "b")
    ok(
        run_all(
            cli("svr", small_competition, a, f"svr.storage={postgres_db}", "svr.n_trials=5"),
            cli(
                "svr",
                small_competition,
                b,
                f"svr.storage={postgres_db}",
                "svr.n_trials=4",
                "svr.use_meta=false",
                "svr.c_min=150",
                "svr.c_max=1000",
            ),
        )
    )
    import optuna

    names = {out: best(out)["study_name"] for out in (a, b)}
    assert sorted(optuna.get_all_study_names(postgres_db)) == sorted(names.values()) and len(set(names.values())) == 2
    for out, n, (lo, hi) in ((a, 5, (0.1, 100)), (b, 4, (150, 1000))):
        study = load(postgres_db, names[out])
        assert states(study) == {"COMPLETE": n} and best(out)["n_trials"] == n
        assert all(lo <= t.params["C"] <= hi for t in study.trials), [t.params["C"] for t in study.trials]
        assert best(out)["C"] == study.best_params["C"]
    assert best(a)["n_features"] == best(b)["n_features"] + 12  # B really tuned on other values (no flags)


# ---------------------------------------------------------------------------------------------------------------
# c. a bad svr.storage


def test_bad_storage_fails_in_seconds_with_one_line_and_writes_nothing(
    experiment_run, small_competition, tmp_path, postgres_server, postgres_db, postgres_role, capfd
):
    """An unreachable server (a real process), a scheme we do not support and a wrong password (in this process,
    through cli.main): exit 2 and one line naming svr.storage with the password masked, before the stage reads
    any embedding, leaving the experiment folder exactly as it was."""
    from pawpular.cli import main as pcli

    database = postgres_db.rsplit("/", 1)[1]
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # nothing listens there once the socket is closed
    cases = {
        f"postgresql://postgres:pw-unreachable@127.0.0.1:{closed}/{database}": ("pw-unreachable", "cannot connect"),
        "mysql://root:pw-mysql@127.0.0.1:3306/optuna": ("pw-mysql", "not a postgresql:// or sqlite:// URL"),
        postgres_server.url(database, postgres_role, "pw-wrong"): ("pw-wrong", "password authentication failed"),
    }
    for i, (url, (password, reason)) in enumerate(cases.items()):
        out = machine(experiment_run, tmp_path / f"bad{i}")
        before = {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*")}
        if i == 0:
            (r,) = run_all(cli("svr", small_competition, out, f"svr.storage={url}"))
            code, stdout, stderr, seconds = r.returncode, r.stdout, r.stderr, r.seconds
            limit = 40  # imports included
        else:
            t0 = time.monotonic()
            code = pcli.main(["svr", *tiny_args(small_competition, out), "--set", f"svr.storage={url}"])
            seconds, (stdout, stderr), limit = time.monotonic() - t0, capfd.readouterr(), 10
        said = [line for line in stderr.splitlines() if not LOG_LINE.match(line)]
        assert code == 2, stderr[-2000:]
        assert len(said) == 1 and said[0].startswith("error: svr.storage: ") and reason in said[0], said
        assert "***" in said[0] and password not in stderr + stdout
        assert "Traceback" not in stderr
        assert seconds < limit, seconds  # no connect waited out a long timeout
        assert {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*")} == before  # no svr/, no manifest
    assert postgres_server.tables(database) == []  # the wrong password created nothing either


# ---------------------------------------------------------------------------------------------------------------
# d. --overwrite never deletes a shared study; delete-study does


def test_overwrite_keeps_a_shared_study_and_delete_study_removes_it(
    experiment_run, small_competition, tmp_path, postgres_db
):
    from pawpular.cli import main as pcli

    out = machine(experiment_run, tmp_path / "m")
    args = [*tiny_args(small_competition, out), "--set", f"svr.storage={postgres_db}", "--set", "svr.n_trials=5"]
    assert pcli.main(["svr", *args]) == 0
    name = best(out)["study_name"]
    first = [(t.number, t.params["C"], t.value) for t in load(postgres_db, name).trials]
    assert len(first) == 5

    assert pcli.main(["svr", *args, "--overwrite"]) == 0  # redoes the stage's outputs, from the same study
    study = load(postgres_db, name)
    assert [(t.number, t.params["C"], t.value) for t in study.trials] == first
    assert best(out)["C"] == study.best_params["C"] and best(out)["n_trials"] == 5

    assert pcli.main(["delete-study", *args]) == 0
    import optuna

    assert name not in optuna.get_all_study_names(postgres_db)
    assert pcli.main(["delete-study", *args]) == 2  # no such study any more


# ---------------------------------------------------------------------------------------------------------------
# e. local workers on the experiment's own SQLite study


def test_local_workers_share_the_budget_and_the_stage_writes_once(
    experiment_run, small_competition, tmp_path, monkeypatch, capfd, caplog
):
    """`pawpular svr --workers 3` (cli.main in this process): exactly n COMPLETE trials in svr/study.db, shared
    between the stage's process and its 2 workers (their logged counts add up to n, and at least 2 processes
    ran trials), and one set of outputs, fitted with the study's best C.

    A trial on the tiny run takes ~0.1 s and a spawned worker needs 5-20 s (imports, folds, kernels) on a busy
    2-core machine, so the stage's process alone could fill the budget before a worker starts: its trials are
    slowed here to 1 s (the workers, fresh interpreters, run the real speed)."""
    from pawpular.cli import main as pcli
    from pawpular.svr import head as svr_head
    from pawpular.svr.head import SvrHead

    n = 40
    real = svr_head.oof_rmse
    monkeypatch.setattr(svr_head, "oof_rmse", lambda *a, **k: (time.sleep(1.0), real(*a, **k))[1])
    out = machine(experiment_run, tmp_path / "w")
    caplog.set_level("INFO", logger="pawpular")  # this process's log; the workers' goes to their stderr
    assert pcli.main(["svr", *tiny_args(small_competition, out), "--set", f"svr.n_trials={n}", "--workers", "3"]) == 0
    stdout, stderr = capfd.readouterr()
    r = subprocess.CompletedProcess([], 0, stdout, caplog.text + stderr)

    b = best(out)
    study = load(st.storage_url(None, artifacts.study_db(out)), b["study_name"])
    assert states(study) == {"COMPLETE": n}
    own = int(SUMMARY.search(r.stderr).group(2))
    workers = {int(pid): int(k) for pid, k in WORKER.findall(r.stderr)}
    assert own + sum(workers.values()) == n, (own, workers)
    assert sum(k > 0 for k in (own, *workers.values())) >= 2, (own, workers)
    assert r.stderr.count("== svr done") == 1

    assert b["n_trials"] == n and b["C"] == study.best_params["C"]
    assert artifacts.manifest(out, "svr").is_file()
    for k in range(3):
        head = SvrHead.load(artifacts.svr_head(out, k))
        assert head.params["C"] == b["C"]
    written = sorted(str(p.relative_to(out / "svr")) for p in (out / "svr").rglob("*") if p.is_file())
    assert written == sorted(
        [
            "best_params.json",
            "manifest.json",
            "oof.parquet",
            "test.parquet",
            "nested.parquet",
            "study.db",
            "study.db.lock",
            *[f"fold{k}/head.safetensors" for k in range(3)],
        ]
    )


def test_ctrl_c_with_local_workers_exits_130_and_stops_them(experiment_run, small_competition, tmp_path):
    """Ctrl-C in a terminal reaches the stage's process and its workers (one process group): the stage says
    "interrupted" and exits 130 (not a traceback about failed workers), the workers log their count and stop,
    and nothing of the stage is written."""
    out = machine(experiment_run, tmp_path / "ctrl-c")
    argv = cli("svr", small_competition, out, "svr.n_trials=100000", flags=("--workers", "3"))
    proc = popen_cli(argv, ENV, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while sum("kernel_cache:" in line for line in list(lines)) < 3:  # the stage's process and both workers
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.2)
        time.sleep(1.0)  # the workers are running trials
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(timeout=10)
    stderr = "".join(lines)
    assert stderr.strip().splitlines()[-1] == "interrupted; rerun the same command to resume"
    assert "Traceback" not in stderr and "failed" not in stderr, stderr[-3000:]
    # each worker logs its count as it stops, or (one busy in C code past the stage's 10 s wait, e.g. in SQLite's
    # busy wait right after the interrupt) the stage says it killed it: both accounted for either way
    stopped = re.findall(r"svr worker (\d+): (?:\d+ trials \(stopped by the stage\)|did not stop within)", stderr)
    assert len(set(stopped)) == 2, stderr[-3000:]
    for pid in stopped:  # gone (or a zombie waiting for a reaper that is not ours)
        status = Path(f"/proc/{pid}/status")
        assert not status.exists() or "zombie" in status.read_text(), status.read_text()
    assert not artifacts.manifest(out, "svr").exists() and not artifacts.best_params(out).exists()


# ---------------------------------------------------------------------------------------------------------------
# f. the sharding of inference under torchrun (embed under torchrun: test_train.py's DDP test)


SHARD_SCRIPT = """
import sys
import numpy as np, torch
from pawpular.machine.distributed import Dist, process_group
from pawpular.model.inference import run_backbone

class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3 * 4 * 4, 5)
    def embed(self, x):
        return self.lin(x.flatten(1))
    def head_logits(self, e, meta):
        return e.sum(1) + meta.sum(1)

class Images(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n
    def __len__(self):
        return self.n
    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"image": torch.randn(3, 4, 4, generator=g), "meta": np.full(12, i % 2, np.float32)}

torch.manual_seed(0)
model = Toy()
with process_group("cpu") as dist:
    for n in (2, 7):  # 2 images on 3 ranks: rank 2 has none; 7: shards of 3, 2, 2
        whole = run_backbone(model, Images(n), "cpu", batch_size=2, pred_tta=True, emb_tta=True)
        part = run_backbone(model, Images(n), "cpu", batch_size=2, pred_tta=True, emb_tta=True, dist=dist)
        np.savez(f"{sys.argv[1]}/rank{dist.rank}_n{n}.npz", emb=part.emb, pred=part.pred, emb1=whole.emb,
                 pred1=whole.pred)
"""


def test_sharded_inference_gathers_every_item_in_order_even_with_more_ranks_than_items(tmp_path):
    (tmp_path / "shard.py").write_text(SHARD_SCRIPT)
    (r,) = run_all(torchrun(str(tmp_path / "shard.py"), str(tmp_path), nproc=3), timeout=180)
    ok([r])
    for n in (2, 7):
        for rank in range(3):
            got = np.load(tmp_path / f"rank{rank}_n{n}.npz")
            assert got["emb"].shape == (n, 5) and got["pred"].shape == (n,)
            np.testing.assert_allclose(got["emb"], got["emb1"], atol=1e-5)  # other batches: float32 rounding
            np.testing.assert_allclose(got["pred"], got["pred1"], atol=1e-4)  # Pawpularity, 0-100
