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
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

log = logging.getLogger(__name__)

SETTING = "svr.storage"  # the config key users set; named in every storage error
_CLAIM = "pawpular:claimed"  # system attr: the trial number a worker wrote when it claimed the trial (see _claim)


class StudyStorageError(ValueError):
    """The study storage cannot be used: bad URL, missing driver, server down, refused or wrong credentials."""


# ---------------------------------------------------------------------------------------------------------------
# Storage


def storage_url(setting: str | None, default_sqlite: Path) -> str:
    """The storage URL: ``setting`` as given, or for ``None`` the SQLite file ``default_sqlite`` (absolute).

    The file name goes through an SQLite URI (``?uri=true``), percent-encoded for SQLite and again for
    SQLAlchemy's URL parser (which decodes the database part once), so ``?``, ``#``, ``%41``, ``{}`` and spaces
    reach SQLite verbatim. A plain ``sqlite:///{path}`` cuts the name at ``?`` and trips on ``%``.
    """
    import sqlalchemy

    if setting is not None:
        # A bare postgresql:// means psycopg2 (requirements-distributed.txt), whatever SQLAlchemy's default
        # driver is (2.0: psycopg2, 2.1: psycopg 3); postgresql+DRIVER:// is taken as written.
        try:
            u = sqlalchemy.make_url(setting)
        except sqlalchemy.exc.ArgumentError:
            return setting  # make_storage reports it
        if u.drivername in ("postgresql", "postgres"):  # postgres:// too, as libpq and Heroku write it
            return u.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
        return setting

    database = "file:" + quote(str(Path(default_sqlite).resolve()), safe="/")
    return sqlalchemy.URL.create("sqlite", database=database, query={"uri": "true"}).render_as_string(
        hide_password=False)


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL (plain or URI form); ``None`` for other databases and in-memory ones."""
    import sqlalchemy

    u = sqlalchemy.make_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    db = u.database
    if u.query.get("uri") in ("true", "1", "True") and db.startswith("file:"):
        db = db[len("file:"):].split("?", 1)[0].split("#", 1)[0]
        if db.startswith("//"):  # file:///abs/path: an empty authority
            db = db[2:]
        db = unquote(db)
        if db in ("", ":memory:"):
            return None
    return Path(db)


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (also for a URL SQLAlchemy cannot parse)."""
    try:
        import sqlalchemy

        return sqlalchemy.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL still gets masked by hand
        return re.sub(r"(://[^/:@]*:)[^@/]*@", r"\1***@", url)


def _engine_kwargs(url: str, connect_timeout: int) -> dict:
    import sqlalchemy

    u = sqlalchemy.make_url(url)
    if u.get_backend_name() == "sqlite":  # wait for other processes' write locks instead of "database is locked"
        return {"connect_args": {"timeout": 60}}
    # pool_pre_ping: a trial may run for minutes; a connection dropped meanwhile is replaced, not an error.
    # libpq's connect_timeout: an unreachable host fails in seconds, not after the OS's minutes-long TCP timeout.
    libpq = u.get_driver_name() in ("psycopg2", "psycopg")
    return {"pool_pre_ping": True, "connect_args": {"connect_timeout": connect_timeout} if libpq else {}}


def _storage_error(url: str, err: BaseException, connected: bool = False) -> StudyStorageError:
    """A StudyStorageError naming the setting, the masked URL and what to do."""
    import sqlalchemy

    masked = mask_url(url)
    try:
        password = sqlalchemy.make_url(url).password
    except Exception:  # noqa: BLE001
        password = None
    if isinstance(err, ImportError):
        reason = f"the database driver is not installed ({type(err).__name__}: {err}); " + (
            "pip install -r requirements-distributed.txt" if getattr(err, "name", None) == "psycopg2"
            else "install that module, or write postgresql:// (psycopg2, from requirements-distributed.txt)")
    elif isinstance(err, (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError)):
        reason = (f"not a database URL ({err}); expected postgresql://USER:PASSWORD@HOST:PORT/DATABASE, "
                  "or leave it unset for the experiment's own SQLite file")
    else:
        detail = " ".join(line.strip() for line in str(getattr(err, "orig", None) or err).strip().splitlines()[:3])
        sqlite = url.startswith("sqlite")
        if connected:  # e.g. PostgreSQL 15+: only the database owner may create tables in schema public
            reason = (f"connected, but cannot create Optuna's tables ({detail}); the user needs to own the "
                      "database, or GRANT CREATE ON SCHEMA public TO the user")
        else:
            reason = (f"cannot {'open' if sqlite else 'connect'} ({detail}); "
                      + ("does its folder exist, and may we write there?" if sqlite else
                         "is the server running and reachable, and are the user, password and database right?"))
    message = f"{SETTING}: {masked}: {reason}"
    if password:
        message = message.replace(password, "***")
    return StudyStorageError(message)


def make_storage(setting: str | None, default_sqlite: Path, *, heartbeat_interval: int = 10,
                 grace_period: int = 60, max_retry: int | None = 3, connect_timeout: int = 5) -> Any:
    """An ``optuna.storages.RDBStorage`` for ``setting`` (see ``storage_url``), checked by connecting once.

    Heartbeat: a running trial records one every ``heartbeat_interval`` s; one silent for more than
    ``grace_period`` s is failed and its parameters are retried up to ``max_retry`` times (None: forever).
    Raises ``StudyStorageError`` for a bad URL, a missing driver or a server that is down or refuses us,
    before any table is created. With ``setting=None`` the folder of ``default_sqlite`` is created.
    """
    import optuna
    import sqlalchemy

    url = storage_url(setting, default_sqlite)
    try:
        backend = sqlalchemy.make_url(url).get_backend_name()
    except sqlalchemy.exc.ArgumentError as e:
        raise _storage_error(url, e) from None
    if backend not in ("postgresql", "sqlite"):
        raise StudyStorageError(f"{SETTING}: {mask_url(url)}: not a postgresql:// or sqlite:// URL, the two this "
                                "supports (workers share the trial budget through a lock implemented for them); "
                                "expected postgresql://USER:PASSWORD@HOST:PORT/DATABASE")
    if setting is None:
        Path(default_sqlite).parent.mkdir(parents=True, exist_ok=True)
    kwargs = _engine_kwargs(url, connect_timeout)
    try:  # connect once with a throwaway engine: errors surface here, before RDBStorage creates its tables
        engine = sqlalchemy.create_engine(url, **kwargs)
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
        finally:
            engine.dispose()
    except (ImportError, sqlalchemy.exc.SQLAlchemyError) as e:
        raise _storage_error(url, e) from None

    # Optuna 4.9 renamed RetryFailedTrialCallback / failed_trial_callback (deprecated since, removed in 6).
    retry_cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if retry_cls is not None:
            retry = {"heartbeat_stale_trial_callback": retry_cls(max_retry=max_retry)}
        else:
            retry = {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=max_retry)}
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=heartbeat_interval,
                                              grace_period=grace_period, **retry)
        except (ImportError, sqlalchemy.exc.SQLAlchemyError) as e:
            raise _storage_error(url, e, connected=True) from None


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
