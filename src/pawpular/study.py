"""The Optuna study of a tuned stage: where it lives, how it is opened, and how workers share its trial budget.

    storage = make_storage(cfg.svr.storage, artifacts.study_db(cfg.out))   # StudyStorageError before any work
    study = open_study(name, storage, seed, shared=cfg.svr.storage is not None)
    ran = run_trials(study, objective, n_trials)                          # this worker's share

Storage: ``None`` is a private SQLite file (any path: ``?``, ``#``, ``%`` and spaces included); otherwise a
``postgresql://`` (or ``sqlite://``) URL that several processes or machines share. Either way an ``RDBStorage``
with a heartbeat: every running trial records one every ``heartbeat_interval`` s, and a trial whose heartbeat is
older than ``grace_period`` s (its worker was killed) is failed and its parameters are re-queued (retried).

Budget: ``run_trials`` stops when the study holds exactly ``n_trials`` COMPLETE trials, whoever ran them. A worker
creates a trial only while COMPLETE + RUNNING < n_trials, decided under a lock shared by all workers (a PostgreSQL
advisory lock keyed on the study name, or ``flock`` on a file beside the SQLite database), so N workers never
overshoot; with the budget taken but trials still running elsewhere it waits for them to finish or go stale.

This module knows nothing of the stages; it imports optuna and SQLAlchemy lazily.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

# Re-exported: the stage and the tests take the storage functions from here, with the study's.
from .study_storage import (SETTING, StudyStorageError, make_storage, mask_url, sqlite_damage,  # noqa: F401
                            sqlite_path, storage_url)

log = logging.getLogger(__name__)

_CLAIM = "pawpular:claimed"  # system attr: the trial number a worker wrote when it claimed the trial (see _claim)


def _rdb(study: Any) -> Any:
    """The RDBStorage under ``study`` (Optuna wraps it in a cache and offers no public accessor)."""
    import optuna

    storage = getattr(study, "_storage", None)
    storage = getattr(storage, "_backend", storage)
    if not isinstance(storage, optuna.storages.RDBStorage):
        raise TypeError(f"study {study.study_name!r} is not on an RDBStorage: open it on make_storage(...)")
    return storage


# ---------------------------------------------------------------------------------------------------------------
# Opening and deleting


def _replayable_tpe(seed: int, shared: bool) -> Any:
    """TPE whose random draws for a trial are seeded by (seed, completed trials so far).

    A study killed mid-trial and rerun then samples exactly the C values an uninterrupted study samples: the
    killed trial is failed by its stale heartbeat and retried with its own parameters, and the completed history
    is the same, so the resumed run ends with the same best C. For a study shared by several workers the trial
    number seeds instead, so concurrent workers do not draw the same C.
    """
    import optuna

    class ReplayableTPESampler(optuna.samplers.TPESampler):
        serial = not shared  # read by run_trials: a private study runs one trial at a time

        def before_trial(self, study: Any, trial: Any) -> None:
            key = trial.number if shared else n_complete(study)
            state = (seed * 1_000_003 + key) % 2**32
            self._rng.rng.seed(state)
            self._random_sampler._rng.rng.seed(state)
            super().before_trial(study, trial)

    return ReplayableTPESampler(seed=seed)


def open_study(name: str, storage: Any, seed: int, shared: bool = False) -> Any:
    """Create study ``name`` in ``storage`` (a ``make_storage`` result, or a URL given to it), or load it; never
    deletes anything."""
    import optuna

    if isinstance(storage, str):
        storage = make_storage(storage, Path())
    elif storage is None:
        raise ValueError("open_study needs a storage: make_storage(cfg.svr.storage, <the experiment's study.db>)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(study_name=name, storage=storage, direction="minimize", load_if_exists=True,
                               sampler=_replayable_tpe(seed, shared))


def delete_study(name: str, storage: Any) -> bool:
    """Delete study ``name`` and all its trials; False when there was none. Workers still on it will fail."""
    import optuna

    try:
        optuna.delete_study(study_name=name, storage=storage)
    except KeyError:
        return False
    return True


def n_complete(study: Any) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


# ---------------------------------------------------------------------------------------------------------------
# Sharing the budget


@contextlib.contextmanager
def _pg_lock(engine: Any, name: str) -> Iterator[None]:
    # A transaction-scoped advisory lock: released at commit, or by the server when a killed worker's
    # connection drops, so a dead worker never holds it.
    import sqlalchemy

    key = int.from_bytes(hashlib.blake2b(f"pawpular-study:{name}".encode(), digest_size=8).digest(), "big",
                         signed=True)
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
        yield


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    import fcntl

    with open(path, "a") as f:  # the kernel drops the lock when the holder dies
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def study_lock(study: Any) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the lock every worker of ``study`` takes around "count trials, then create one".

    PostgreSQL: ``pg_advisory_xact_lock`` keyed on the study name (other studies on the server are not held up).
    SQLite: ``flock`` on ``<database>.lock`` beside the file (processes of one machine; SQLite's own locks are
    per connection and would block this process's other connections). In-memory: a thread lock.
    """
    rdb = _rdb(study)
    if rdb.engine.name == "postgresql":
        return lambda: _pg_lock(rdb.engine, study.study_name)
    path = sqlite_path(rdb.url)
    if path is not None:
        lock_file = path.with_name(path.name + ".lock")
        return lambda: _file_lock(lock_file)
    thread_lock = threading.Lock()
    return lambda: thread_lock


def _claim(study: Any, rdb: Any, study_id: int, n_trials: int, serial: bool) -> tuple[Any, int]:
    """Under the lock: fail stale trials, then ask a trial if COMPLETE + RUNNING < n_trials (and, ``serial``,
    if nothing runs).

    Returns (trial or None, COMPLETE count). A RUNNING trial counts only once its worker claimed it here (its
    heartbeat recorded, then its number stored under _CLAIM), so a trial some pre-heartbeat run left RUNNING
    forever does not block the budget; it is simply ignored, as before.
    """
    import optuna
    from optuna.trial import TrialState

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # FAIL + re-queue (WAITING) the trials of dead workers
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
    complete = sum(t.state == TrialState.COMPLETE for t in trials)
    running = sum(t.state == TrialState.RUNNING and t.system_attrs.get(_CLAIM) == t.number for t in trials)
    if complete + running >= n_trials or (serial and running):
        return None, complete
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        trial = study.ask()  # pops a re-queued (WAITING) trial first: a retry keeps its parameters
    trial_id = rdb.get_trial_id_from_study_id_trial_number(study_id, trial.number)
    rdb.record_heartbeat(trial_id)  # first, so a claimed trial always has a heartbeat that can go stale
    rdb.set_trial_system_attr(trial_id, _CLAIM, trial.number)
    return trial, complete


@contextlib.contextmanager
def _heartbeat(rdb: Any, trial_id: int) -> Iterator[None]:
    """Record the trial's heartbeat every heartbeat_interval s while the objective runs (a daemon thread)."""
    stop = threading.Event()

    def beat() -> None:
        try:
            while not stop.wait(rdb.get_heartbeat_interval()):
                try:
                    rdb.record_heartbeat(trial_id)
                except Exception as e:  # noqa: BLE001 - a database hiccup: try again next beat
                    log.warning("study: heartbeat of trial id %d failed: %s", trial_id, e)
        finally:
            rdb.remove_session()  # this thread's connection (SQLite connections are per thread)

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def run_trials(study: Any, objective: Callable[[Any], float], n_trials: int, *,
               callbacks: Sequence[Callable[[Any, Any], None]] | None = (),
               lock: Callable[[], contextlib.AbstractContextManager] | None = None,
               poll: float | None = None) -> int:
    """Run trials in this process until ``study`` holds ``n_trials`` COMPLETE trials across all its workers.

    Returns how many this worker completed. A trial is created only while COMPLETE + RUNNING < n_trials (under
    ``lock``, default ``study_lock(study)``); when the budget is taken but others' trials still run, the worker
    polls every ``poll`` s (default: the heartbeat interval) until they complete, or go stale and are retried by
    whoever polls next. A private study (``open_study(shared=False)``) runs one trial at a time, whoever runs
    it: its sampler keys on the completed count, so concurrent trials would draw the same C, and a rerun after a
    kill must retry the killed trial (once its heartbeat is stale) before sampling the next, to replay exactly.

    ``callbacks(study, frozen_trial)`` run after each trial this worker completes. An objective that raises
    fails its trial (not retried) and the error propagates; a non-finite value does the same as a ValueError.
    """
    from optuna.trial import TrialState

    rdb = _rdb(study)
    if rdb.get_heartbeat_interval() is None:
        raise ValueError("run_trials needs a storage with a heartbeat: use make_storage()")
    lock = lock or study_lock(study)
    poll = poll if poll is not None else float(rdb.get_heartbeat_interval())
    study_id = rdb.get_study_id_from_name(study.study_name)
    serial = bool(getattr(study.sampler, "serial", False))
    ran, waiting = 0, False
    while True:
        with lock():
            trial, complete = _claim(study, rdb, study_id, n_trials, serial)
        if trial is None:
            if complete >= n_trials:
                return ran
            if not waiting:
                log.info("study %s: %d/%d complete, waiting for running trials to finish or go stale",
                         study.study_name, complete, n_trials)
            waiting = True
            time.sleep(poll)
            continue
        waiting = False
        trial_id = rdb.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        with _heartbeat(rdb, trial_id):
            try:
                value = float(objective(trial))
            except BaseException:
                _tell(study, trial, state=TrialState.FAIL)
                raise
        if not math.isfinite(value):
            _tell(study, trial, state=TrialState.FAIL)
            raise ValueError(f"study {study.study_name}: trial {trial.number} returned {value} for {trial.params}")
        frozen = _tell(study, trial, value)
        if frozen is None or frozen.state != TrialState.COMPLETE:
            # Another worker saw our heartbeat go stale (we stalled past grace_period) and failed the trial; its
            # retry counts instead, so this result must not.
            log.warning("study %s: trial %d was failed as stale by another worker; its retry counts instead",
                        study.study_name, trial.number)
            continue
        ran += 1
        for callback in callbacks or ():
            callback(study, frozen)


def _tell(study: Any, trial: Any, value: float | None = None, state: Any = None) -> Any:
    """``study.tell`` that tolerates a trial another worker already failed; returns the stored trial or None."""
    import optuna

    try:
        return study.tell(trial, value, state=state, skip_if_finished=True)
    except optuna.exceptions.UpdateFinishedTrialError:
        return None
