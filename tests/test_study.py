"""The shared Optuna study (pawpular.svr.study): exact trial budgets across worker processes, heartbeat retries of a
killed worker's trial, studies that do not mix, storage errors, and odd SQLite paths.

Workers are real OS processes running this file (``python test_study.py SPEC``) on a cheap deterministic
objective of C instead of the SVR. They open the study, print ``ready`` and wait for ``go`` on stdin, so the test
starts them together once their imports are done.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

HEARTBEAT, GRACE, POLL = 1, 3, 0.2  # seconds: a killed worker's trial goes stale after ~3-4 s
C_MIN, C_MAX = 1e-2, 1e2


def loss(c: float) -> float:
    """A smooth function of log C with its minimum at C = 10**0.7, standing in for the SVR's OOF RMSE."""
    return (math.log10(c) - 0.7) ** 2


def _worker(spec: dict) -> None:
    from pawpular.svr import study as st

    storage = st.make_storage(spec["url"], Path("unused"), heartbeat_interval=HEARTBEAT, grace_period=GRACE)
    study = st.open_study(spec["name"], storage, seed=0, shared=spec.get("shared", True))
    hang_at = spec.get("hang_at")  # this trial number never finishes: the test kills the worker during it

    def objective(trial) -> float:
        c = trial.suggest_float("C", C_MIN, C_MAX, log=True)
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("study", spec["name"])
        time.sleep(600 if trial.number == hang_at else spec.get("sleep", 0.25))
        return loss(c)

    print("ready", flush=True)
    sys.stdin.readline()
    ran = st.run_trials(study, objective, spec["n_trials"], poll=POLL)
    print(json.dumps({"pid": os.getpid(), "ran": ran}), flush=True)


if __name__ == "__main__":  # a worker process
    _worker(json.loads(sys.argv[1]))
    sys.exit(0)

from postgres import postgres_db, postgres_role, postgres_server  # noqa: E402,F401  (fixtures)

import pawpular  # noqa: E402
from pawpular.svr import study as st  # noqa: E402

SRC = str(Path(pawpular.__file__).resolve().parents[1])  # workers import the same pawpular as the tests


_started: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_leftover_workers():
    """Kill the workers a failing test left running (a hung victim would otherwise sleep for 10 minutes)."""
    yield
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def start(*specs: dict) -> list[subprocess.Popen]:
    """Start one worker per spec (their imports run in parallel) and wait until each is ready."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p))
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for spec in specs
    ]
    _started.extend(procs)
    for proc in procs:
        if proc.stdout.readline().strip() != "ready":
            for p in procs:
                p.kill()
            raise AssertionError(f"worker did not start: {proc.communicate()[1][-3000:]}")
    return procs


def go(*procs: subprocess.Popen) -> None:
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()


def finish(*procs: subprocess.Popen, timeout: float = 120) -> list[int]:
    """Wait for workers; each must exit 0. Returns how many trials each completed."""
    ran = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            assert p.returncode == 0, f"worker {p.pid} exited {p.returncode}:\n{err[-3000:]}"
            ran.append(json.loads(out.strip().splitlines()[-1])["ran"])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return ran


def states(study) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in study.study.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def make(url: str, name: str, shared: bool = True):
    storage = st.make_storage(url, Path("unused"), heartbeat_interval=HEARTBEAT, grace_period=GRACE)
    return st.open_study(name, storage, seed=0, shared=shared)


def test_three_workers_fill_one_budget_exactly_and_find_the_single_worker_best(postgres_db, tmp_path):
    """3 processes on one PostgreSQL study end with exactly n_trials COMPLETE trials and nothing more.

    Fair comparison with one worker: the same 12 C values are enqueued into the shared study and into a
    single-worker study, and n_trials = 12. With a deterministic objective both studies must then have evaluated
    exactly that set of C values, once each, so their best C must be identical; what may differ is only which
    worker ran which value, and when. A worker that overshot would add a 13th trial (sampled by TPE once the queue
    is empty), one that stopped early would leave a value unevaluated.
    """
    n = 12
    grid = [10 ** (-2 + 4 * (0.5 + i) / n) for i in range(n)]
    shared = make(postgres_db, "svr-shared")
    for c in grid:
        shared.study.enqueue_trial({"C": c})
    workers = start(*[{"url": postgres_db, "name": "svr-shared", "n_trials": n}] * 3)
    go(*workers)
    ran = finish(*workers)

    single = make(st.storage_url(None, tmp_path / "single.db"), "svr-single", shared=False)
    for c in grid:
        single.study.enqueue_trial({"C": c})
    done = []
    assert (
        st.run_trials(
            single,
            lambda t: loss(t.suggest_float("C", C_MIN, C_MAX, log=True)),
            n,
            poll=POLL,
            callbacks=[lambda study, trial: done.append(trial.number)],
        )
        == n
    )
    assert done == list(range(n))

    assert states(shared) == {"COMPLETE": n} and st.n_complete(shared.study) == n
    assert sum(ran) == n and sum(r > 0 for r in ran) >= 2, ran  # the budget really was shared
    assert sorted(t.params["C"] for t in shared.study.trials) == sorted(grid)
    assert sorted(t.params["C"] for t in single.study.trials) == sorted(grid)
    assert shared.study.best_params["C"] == single.study.best_params["C"]
    assert shared.study.best_value == single.study.best_value
    assert {t.user_attrs["pid"] for t in shared.study.trials} == {
        p.pid for p, r in zip(workers, ran, strict=False) if r
    }


def test_killed_worker_trial_fails_by_heartbeat_and_is_retried(postgres_db):
    """A worker SIGKILLed mid-trial: its trial ends FAIL (stale heartbeat), its C is retried by the others, and
    the study still ends with exactly n_trials COMPLETE, none of them the killed worker's."""
    n = 6
    study = make(postgres_db, "svr-kill")
    victim, *others = start(
        {"url": postgres_db, "name": "svr-kill", "n_trials": n, "hang_at": 0},
        *[{"url": postgres_db, "name": "svr-kill", "n_trials": n}] * 2,
    )
    go(victim)
    deadline = time.monotonic() + 60
    while not (
        running := [
            t for t in study.study.get_trials() if t.state.name == "RUNNING" and t.user_attrs.get("pid") == victim.pid
        ]
    ):
        assert time.monotonic() < deadline and victim.poll() is None, "the victim never started its trial"
        time.sleep(0.05)
    killed = running[0]
    go(*others)
    os.kill(victim.pid, signal.SIGKILL)
    assert victim.wait(timeout=30) == -signal.SIGKILL
    ran = finish(*others)

    assert states(study) == {"COMPLETE": n, "FAIL": 1}
    assert sum(ran) == n
    (failed,) = [t for t in study.study.trials if t.state.name == "FAIL"]
    assert failed.number == killed.number
    retried = [t for t in study.study.trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retried) == 1 and retried[0].state.name == "COMPLETE"
    assert retried[0].params == killed.params and retried[0].value == loss(killed.params["C"])
    complete = [t for t in study.study.trials if t.state.name == "COMPLETE"]
    assert victim.pid not in {t.user_attrs["pid"] for t in complete}
    assert len({t.number for t in complete}) == n


def test_two_studies_on_one_server_do_not_mix(postgres_db):
    """Two experiments' studies in one database, two workers each at once: each ends with its own budget and
    only its own trials (each trial records the study its worker was given)."""
    budgets = {"svr-exp-a": 5, "svr-exp-b": 7}
    studies = {name: make(postgres_db, name) for name in budgets}
    procs = start(
        *[
            {"url": postgres_db, "name": name, "n_trials": n, "sleep": 0.1}
            for name, n in budgets.items()
            for _ in range(2)
        ]
    )
    go(*procs)
    ran = {"svr-exp-a": finish(*procs[:2]), "svr-exp-b": finish(*procs[2:])}
    for name, n in budgets.items():
        study = studies[name]
        assert states(study) == {"COMPLETE": n}
        assert sum(ran[name]) == n
        assert {t.user_attrs["study"] for t in study.study.trials} == {name}
        assert len({t.params["C"] for t in study.study.trials}) == n  # shared seeding: workers draw different C


def test_bad_storage_is_a_clear_error_before_anything_is_written(
    postgres_server, postgres_db, postgres_role, monkeypatch
):
    database = postgres_db.rsplit("/", 1)[1]
    down = socket_port_with_nothing_listening()
    cases = {
        "postgresql://nouser@127.0.0.1:1/nodb": "cannot connect",
        f"postgresql://postgres@127.0.0.1:{down}/{database}": "cannot connect",
        postgres_server.url("no_such_db"): 'database "no_such_db" does not exist',
        postgres_server.url(database, postgres_role, "wrong-password"): "password authentication failed",
        "notaurl://x": "not a postgresql:// or sqlite:// URL",
        "::not a url": "not a database URL",
    }
    for url, reason in cases.items():
        error = _error(url)
        message = str(error)
        assert isinstance(error, ValueError)
        assert message.startswith("svr.storage: ") and reason in message, message
        assert "wrong-password" not in message
    assert "svr_worker:***@" in str(_error(postgres_server.url(database, postgres_role, "wrong-password")))

    monkeypatch.setitem(sys.modules, "psycopg2", None)  # as if requirements-distributed.txt was not installed
    message = str(_error(postgres_db))
    assert "psycopg2" in message and "pip install -r requirements-distributed.txt" in message, message
    monkeypatch.undo()

    # The right password, but PostgreSQL 15 lets only the owner create tables in schema public.
    message = str(_error(postgres_server.url(database, postgres_role, "right-password")))
    assert "cannot create Optuna's tables (permission denied for schema public)" in message, message
    assert "right-password" not in message

    assert postgres_server.tables(database) == []  # no failed attempt created any of Optuna's tables
    postgres_server.sql(f"GRANT CREATE ON SCHEMA public TO {postgres_role}", database)
    st.make_storage(postgres_server.url(database, postgres_role, "right-password"), Path("unused"))
    assert "trials" in postgres_server.tables(database)


def _error(url: str) -> st.StudyStorageError:
    with pytest.raises(st.StudyStorageError) as info:
        st.make_storage(url, Path("unused"), connect_timeout=3)
    return info.value


def socket_port_with_nothing_listening() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sqlite_path_with_odd_characters_and_local_workers(tmp_path):
    """The study file lands at exactly the path given (``?``, ``#``, ``%41``, spaces), and local processes on it
    end with exactly n_trials COMPLETE: 2 on a shared study, and at the same time 2 on a private study in the same
    file, which run one trial at a time (a private study's sampler keys on the completed count)."""
    db = tmp_path / "runs ?a=1#x%41" / "study %41 #1?.db"
    url = st.storage_url(None, db)
    assert st.sqlite_path(url) == db.resolve()
    storage = st.make_storage(None, db, heartbeat_interval=HEARTBEAT, grace_period=GRACE)
    shared = st.open_study("svr-shared", storage, seed=0, shared=True)
    private = st.open_study("svr-private", storage, seed=0, shared=False)
    assert [p.relative_to(tmp_path) for p in sorted(tmp_path.rglob("*"))] == [
        db.parent.relative_to(tmp_path),
        db.relative_to(tmp_path),
    ]
    with sqlite3.connect(db) as conn:  # that very file holds the studies
        assert sorted(conn.execute("SELECT study_name FROM studies").fetchall()) == [("svr-private",), ("svr-shared",)]

    n = 6
    workers = start(
        *[
            {"url": url, "name": name, "n_trials": n, "shared": name == "svr-shared", "sleep": 0.1}
            for name in ("svr-shared", "svr-shared", "svr-private", "svr-private")
        ]
    )
    go(*workers)
    ran = finish(*workers)
    assert states(shared) == {"COMPLETE": n} and sum(ran[:2]) == n
    assert states(private) == {"COMPLETE": n} and sum(ran[2:]) == n
    assert len({t.params["C"] for t in private.study.trials}) == n
    trials = private.study.trials
    for before, after in zip(trials, trials[1:], strict=False):  # serial: each trial starts after the last ends
        assert after.datetime_start >= before.datetime_complete
    assert sorted(p.name for p in db.parent.iterdir()) == sorted([db.name, db.name + ".lock"])


def test_private_study_killed_mid_trial_resumes_to_the_uninterrupted_trials(tmp_path):
    """A private (one-machine) study killed during trial 10 and rerun evaluates the same C values, in the same
    order, as an uninterrupted study: the stale trial is retried with its own C, and the sampler's seed follows
    the completed trials, so TPE (past its 10 random start-up trials) sees the same history."""
    n = 12

    def complete_cs(study) -> list[float]:
        done = [t for t in study.study.trials if t.state.name == "COMPLETE"]
        return [t.params["C"] for t in sorted(done, key=lambda t: t.system_attrs.get("failed_trial", t.number))]

    whole = make(st.storage_url(None, tmp_path / "whole.db"), "svr", shared=False)
    st.run_trials(whole, lambda t: loss(t.suggest_float("C", C_MIN, C_MAX, log=True)), n, poll=POLL)

    url = st.storage_url(None, tmp_path / "killed.db")
    study = make(url, "svr", shared=False)
    (victim,) = start({"url": url, "name": "svr", "n_trials": n, "shared": False, "sleep": 0, "hang_at": 10})
    go(victim)
    deadline = time.monotonic() + 60
    while not any(t.state.name == "RUNNING" and t.number == 10 and t.params for t in study.study.get_trials()):
        assert time.monotonic() < deadline and victim.poll() is None, "the victim never reached trial 10"
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    (rerun,) = start({"url": url, "name": "svr", "n_trials": n, "shared": False, "sleep": 0})  # within grace
    go(rerun)
    assert finish(rerun) == [2]  # the retried trial 10, then trial 11

    assert states(study) == {"COMPLETE": n, "FAIL": 1}
    assert complete_cs(study) == complete_cs(whole)
    assert study.study.best_params == whole.study.best_params


def test_open_never_deletes_delete_is_explicit_and_a_failing_objective_stops_the_worker(tmp_path):
    db = tmp_path / "svr" / "study.db"
    storage = st.make_storage(None, db, heartbeat_interval=HEARTBEAT, grace_period=GRACE)
    study = st.open_study("svr", storage, seed=0, shared=False)

    def objective(trial) -> float:
        c = trial.suggest_float("C", C_MIN, C_MAX, log=True)
        if trial.number == 2:
            raise RuntimeError("the SVR failed")
        return float("nan") if trial.number == 4 else loss(c)

    with pytest.raises(RuntimeError, match="the SVR failed"):
        st.run_trials(study, objective, 5, poll=POLL)
    assert states(study) == {"COMPLETE": 2, "FAIL": 1}  # failed by the error, not retried
    with pytest.raises(ValueError, match="trial 4 returned nan"):
        st.run_trials(study, objective, 5, poll=POLL)
    assert st.run_trials(study, objective, 5, poll=POLL) == 2  # a rerun fills the budget exactly

    again = st.open_study("svr", st.storage_url(None, db), seed=0)  # reopening (from the URL) keeps every trial
    assert st.n_complete(again.study) == 5 and states(again) == {"COMPLETE": 5, "FAIL": 2}
    assert st.delete_study("svr", storage) is True
    assert st.delete_study("svr", storage) is False
    assert st.n_complete(st.open_study("svr", storage, seed=0, shared=False).study) == 0


def test_the_stages_own_study_retries_a_killed_runs_trial_at_once_and_its_heartbeat_outlasts_sqlites_waits(tmp_path):
    """The experiment's own SQLite study (svr.workers 1: one process, the experiment lock held) runs ``sole``: a
    trial a killed run left RUNNING is failed and retried with its own C at once, not after the grace period; the
    storage's grace (for local workers that do beat) outlasts a beat delayed by SQLite's lock wait and its
    whole-second timestamps."""
    from types import SimpleNamespace

    from pawpular.svr.storage import SQLITE_LOCK_WAIT

    storage = st.open_storage(SimpleNamespace(out=tmp_path, svr=SimpleNamespace(storage=None)))
    assert storage.grace_period > storage.get_heartbeat_interval() + SQLITE_LOCK_WAIT + 1
    study = st.open_study("svr", storage, seed=0, shared=False)
    objective = lambda t: loss(t.suggest_float("C", C_MIN, C_MAX, log=True))  # noqa: E731
    st.run_trials(study, objective, 3, sole=True)
    _, killed, _ = st._claim(study, storage.get_study_id_from_name("svr"), 6)  # claimed, sampled, then killed
    c = killed.suggest_float("C", C_MIN, C_MAX, log=True)
    t0 = time.monotonic()
    assert st.run_trials(st.open_study("svr", storage, seed=0, shared=False), objective, 6, sole=True) == 3
    assert time.monotonic() - t0 < storage.grace_period / 3  # no waiting for the killed trial to go stale
    assert states(study) == {"COMPLETE": 6, "FAIL": 1}
    assert [t.params["C"] for t in study.study.trials if t.state.name == "COMPLETE"][3] == c  # retried first
