"""The SVR head's tuning: how workers share its study's trial budget, how each trial is sampled, heartbeats.

    handle = open_study(name, open_storage(cfg), seed, shared)   # StudyStorageError naming svr.storage first
    ran = run_trials(handle, make_objective(folds, y, cfg.svr, device), n_trials)   # this worker's share
    handle.study.best_params                                     # the optuna.Study

Storage: ``svr/storage.py`` (SQLite or PostgreSQL); a heartbeat fails and re-queues the trial of a dead worker
(``sole``: one process on the study, no heartbeat; a killed run's trial is re-queued at once). Budget: a worker
creates a trial only while COMPLETE + RUNNING < n_trials, under a lock all workers share, so the study ends with
exactly n_trials COMPLETE trials. Sampling replays: each trial is asked from a TPE sampler built for it, seeded by
(seed, completed trials) - or the trial number when shared, so concurrent workers draw different C. Trials are
asked and told here, not by ``Study.optimize`` (its ``MaxTrialsCallback`` lets a worker overshoot the budget by
one trial), so their heartbeat is beaten here too, through the few ``RDBStorage`` methods Optuna does not document
for users: all in ``svr/optuna_internals.py``, with the Optuna versions they were checked against and a test.
Optuna and SQLAlchemy are imported lazily; nothing here knows the stages.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..logs import interrupts
from . import optuna_internals as internals

# where the study lives, re-exported: the stage, the CLI and the tests name them here
from .storage import SETTING as SETTING
from .storage import StudyStorageError as StudyStorageError
from .storage import make_storage, sqlite_path
from .storage import open_storage as open_storage
from .storage import resolve_setting as resolve_setting
from .storage import storage_url as storage_url

log = logging.getLogger("pawpular")
_CLAIM = "pawpular:claimed"  # trial system attr: the trial number its worker wrote when it claimed it


# ---------------------------------------------------------------------------------------------------------------
# The study and its trial budget


@dataclass
class StudyHandle:
    """What ``run_trials`` needs besides the ``optuna.Study`` (``.study``: read results from it): the RDBStorage it
    lives in (Optuna has no public way from one to the other), the sampling seed and whether workers share it."""

    study: Any  # optuna.Study
    storage: Any  # optuna.storages.RDBStorage
    seed: int
    shared: bool  # several workers at once: seed by trial number; else one trial at a time, seeded by progress

    @property
    def study_name(self) -> str:
        return self.study.study_name

    def sampler_for_next_trial(self) -> Any:
        """A TPE sampler seeded by (seed, completed trials so far), or by the next trial's number when shared."""
        import optuna

        trials = self.study.get_trials(deepcopy=False)
        key = len(trials) if self.shared else sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
        return optuna.samplers.TPESampler(seed=(self.seed * 1_000_003 + key) % 2**32)


def open_study(name: str, storage: Any, seed: int, shared: bool = False) -> StudyHandle:
    """Create study ``name`` in ``storage`` (a ``make_storage`` result, or a URL given to it), or load it."""
    import optuna

    if isinstance(storage, str):
        storage = make_storage(storage, Path())
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return StudyHandle(
        optuna.create_study(study_name=name, storage=storage, direction="minimize", load_if_exists=True),
        storage,
        seed,
        shared,
    )


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


def study_lock(study: StudyHandle) -> Callable[[], contextlib.AbstractContextManager]:
    """The lock every worker takes to "count trials, then create one": a PostgreSQL advisory lock keyed on the
    study name, ``flock`` on ``<database>.lock`` for SQLite, a thread lock in memory (all die with their holder)."""
    rdb = study.storage
    if internals.engine(rdb).name == "postgresql":
        key = int.from_bytes(
            hashlib.blake2b(f"pawpular-study:{study.study_name}".encode(), digest_size=8).digest(), "big", signed=True
        )

        @contextlib.contextmanager
        def pg() -> Iterator[None]:
            import sqlalchemy

            # released at commit, or when a killed worker's connection drops
            with internals.engine(rdb).begin() as conn:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
                yield

        return pg
    path = sqlite_path(internals.url(rdb))
    if path is None:
        thread_lock = threading.Lock()
        return lambda: thread_lock
    lock_file = path.with_name(path.name + ".lock")

    @contextlib.contextmanager
    def flock() -> Iterator[None]:
        import fcntl

        with open(lock_file, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield  # closing the file releases the lock

    return flock


def _claim(study: StudyHandle, study_id: int, n_trials: int) -> tuple[Any, Any, int]:
    """Under the lock: fail stale trials, then ask a trial if COMPLETE + RUNNING < n_trials (private: and none
    runs); a RUNNING trial counts once its worker claimed it here. Returns (asking study, trial or None, COMPLETE)."""
    import optuna
    from optuna.trial import TrialState

    rdb = study.storage
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study.study)  # FAIL + re-queue (WAITING) the trials of dead workers
    trials = study.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
    complete = sum(t.state == TrialState.COMPLETE for t in trials)
    running = sum(t.state == TrialState.RUNNING and t.system_attrs.get(_CLAIM) == t.number for t in trials)
    if complete + running >= n_trials or (not study.shared and running):
        return None, None, complete
    asker = optuna.load_study(study_name=study.study_name, storage=rdb, sampler=study.sampler_for_next_trial())
    with warnings.catch_warnings():  # true, and deliberate: this module beats the heartbeat itself (_heartbeat)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        trial = asker.ask()  # pops a re-queued (WAITING) trial first: a retry keeps its parameters
    trial_id = internals.trial_id(rdb, study_id, trial.number)
    internals.record_heartbeat(rdb, trial_id)  # first, so a claimed trial always has a heartbeat that can go stale
    internals.set_system_attr(rdb, trial_id, _CLAIM, trial.number)
    return asker, trial, complete


@contextlib.contextmanager
def _heartbeat(rdb: Any, trial_id: int) -> Iterator[None]:
    """Record the trial's heartbeat every heartbeat_interval s while the objective runs (a daemon thread)."""
    stop = threading.Event()

    def beat() -> None:
        try:
            while not stop.wait(internals.heartbeat_interval(rdb)):
                try:
                    internals.record_heartbeat(rdb, trial_id)
                except Exception as e:  # noqa: BLE001 - a database hiccup: try again next beat
                    log.warning("study: heartbeat of trial id %d failed: %s", trial_id, e)
        finally:
            internals.end_thread_session(rdb)  # this thread's connection (SQLite connections are per thread)

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _retry_killed_trials(study: StudyHandle, lock: Callable[[], contextlib.AbstractContextManager]) -> None:
    """A study only this process works on: a RUNNING trial is one a killed run left; fail it and queue its
    parameters again, at once (no heartbeat has to go stale first)."""
    import optuna
    from optuna.trial import TrialState

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)
    with lock():
        for stale in study.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study.study.tell(stale.number, state=TrialState.FAIL, skip_if_finished=True)
            retry(study.study, stale)


def run_trials(
    study: StudyHandle,
    objective: Callable[[Any], float],
    n_trials: int,
    *,
    callbacks: Sequence[Callable[[Any, Any], None]] | None = (),
    lock: Callable[[], contextlib.AbstractContextManager] | None = None,
    poll: float | None = None,
    sole: bool = False,
) -> int:
    """Run trials until ``study`` holds ``n_trials`` COMPLETE trials across all its workers; returns how many this
    worker completed. With the budget taken but others' trials running, poll every ``poll`` s until they finish or
    go stale. A private study runs one trial at a time: a rerun after a kill retries the killed trial first.
    ``callbacks(optuna_study, frozen_trial)`` run after each trial this worker completes; an objective that raises
    (or returns a non-finite value) fails its trial and the error propagates. ``sole``: no other process works on
    the study (the caller holds a lock that says so): a trial a killed run left RUNNING is retried at once, and no
    heartbeat is sent (nothing could fail this worker's trial as stale)."""
    from optuna.trial import TrialState

    rdb = study.storage
    if internals.heartbeat_interval(rdb) is None:
        raise ValueError("run_trials needs a storage with a heartbeat: use make_storage()")
    lock = lock or study_lock(study)
    poll = poll if poll is not None else float(internals.heartbeat_interval(rdb))
    study_id = internals.study_id(rdb, study.study_name)
    ran, waiting = 0, False
    if sole:
        _retry_killed_trials(study, lock)
    while True:
        interrupts.check()  # a Ctrl-C whose KeyboardInterrupt a library lost (in a finalizer) stops here
        with lock():
            asker, trial, complete = _claim(study, study_id, n_trials)
        if trial is None:
            if complete >= n_trials:
                return ran
            if not waiting:
                log.info(
                    "study %s: %d/%d complete, waiting for running trials to finish or go stale",
                    study.study_name,
                    complete,
                    n_trials,
                )
            waiting = True
            time.sleep(poll)
            continue
        waiting = False
        frozen = _evaluate(study, asker, trial, objective, study_id, sole)
        if frozen is None or frozen.state != TrialState.COMPLETE:  # we stalled past grace_period: failed as stale
            log.warning(
                "study %s: trial %d was failed as stale by another worker; its retry counts instead",
                study.study_name,
                trial.number,
            )
            continue
        ran += 1
        for callback in callbacks or ():
            callback(asker, frozen)


def _evaluate(study: StudyHandle, asker: Any, trial: Any, objective: Callable, study_id: int, sole: bool) -> Any:
    """Run ``objective`` on a claimed trial (its heartbeat beating unless ``sole``) and tell the study; returns the
    finished trial. An objective that raises, or returns a non-finite value, fails the trial and raises."""
    from optuna.trial import TrialState

    trial_id = internals.trial_id(study.storage, study_id, trial.number)
    with contextlib.nullcontext() if sole else _heartbeat(study.storage, trial_id):
        try:
            value = float(objective(trial))
        except BaseException:
            _tell(asker, trial, state=TrialState.FAIL)
            raise
    if not math.isfinite(value):
        _tell(asker, trial, state=TrialState.FAIL)
        raise ValueError(f"study {study.study_name}: trial {trial.number} returned {value} for {trial.params}")
    return _tell(asker, trial, value)


def _tell(study: Any, trial: Any, value: float | None = None, state: Any = None) -> Any:
    """``study.tell`` that tolerates a trial another worker already failed; returns the stored trial or None."""
    import optuna

    try:
        return study.tell(trial, value, state=state, skip_if_finished=True)
    except optuna.exceptions.UpdateFinishedTrialError:
        return None


# The best C lies "at the edge" of [c_min, c_max] when it is within this share of the range's width (log scale)
# of a bound: 5% of 0.1-100 is a factor of 1.41, so C above 70.8 or below 0.141. A range that narrow may cut off
# a better C; the user moves the bound. The same rule holds for the width's multiple (svr.gamma_min/gamma_max).
C_EDGE_SHARE = 0.05


def c_at_edge(c: float, c_min: float, c_max: float, share: float | None = None) -> str | None:
    """A one-line warning when the best ``c`` lies at the edge of the searched range (within ``share``, default
    C_EDGE_SHARE, of its log width from a bound), naming the bound to move; None when it lies inside (or the range
    is one value)."""
    return at_edge("C", c, c_min, c_max, "svr.c_min", "svr.c_max", share)


def at_edge(
    what: str, value: float, low: float, high: float, key_low: str, key_high: str, share: float | None = None
) -> str | None:
    """``c_at_edge`` for any log-uniform parameter: ``what`` names it, ``key_low``/``key_high`` its bounds' keys
    (e.g. the width: "gamma x 'scale'", svr.gamma_min, svr.gamma_max)."""
    share = C_EDGE_SHARE if share is None else share
    if not 0 < low < high:
        return None
    width = math.log(high / low)
    if math.log(high / value) <= share * width:
        return (
            f"the best {what} ({value:.4g}) is at the top of the searched range [{low:g}, {high:g}]: a larger "
            f"{what} may score better; raise {key_high} (e.g. --set {key_high}={high * 10:g})"
        )
    if math.log(value / low) <= share * width:
        return (
            f"the best {what} ({value:.4g}) is at the bottom of the searched range [{low:g}, {high:g}]: a smaller "
            f"{what} may score better; lower {key_low} (e.g. --set {key_low}={low / 10:g})"
        )
    return None


# ---------------------------------------------------------------------------------------------------------------
# Local workers (svr.workers > 1): more processes on the same study; the stage's own process writes the outputs


def start_workers(target: Callable, args: tuple, n: int) -> list:
    """``n`` local worker processes (``svr.workers`` - 1) running ``target(*args)`` on the same study: spawned
    (a fresh interpreter: no CUDA or thread state inherited), daemonic, deaf to Ctrl-C (the stage stops them)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=args, daemon=True) for _ in range(n)]
    with _ignoring_sigint():  # inherited through exec: a Ctrl-C is the stage's process's to handle, from the start
        for p in procs:
            p.start()
    return procs


@contextlib.contextmanager
def _ignoring_sigint():
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: nothing to change
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def stop_workers(procs: list, wait: float = 10.0) -> list[int]:
    """Stop the local workers at once; returns the exit codes of those that had failed on their own.

    Called when the stage's run_trials returned (the study holds n_trials COMPLETE trials, so no worker can claim
    another: waiting for one that is still loading its folds, or sleeping a poll interval, gains nothing) or
    raised (its error, or a Ctrl-C, is what gets reported). SIGTERM makes a worker log its count and exit 0;
    one busy in C code past ``wait`` seconds is killed (a trial it left RUNNING goes stale and is retried).
    """
    failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]  # exited before we asked: their own error
    alive = [p for p in procs if p.exitcode is None]
    for p in alive:
        p.terminate()
    deadline = time.monotonic() + wait
    for p in alive:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            log.info("svr worker %d: did not stop within %.0f s of being asked (busy in C code): killed", p.pid, wait)
            p.kill()
            p.join()
    return failed
