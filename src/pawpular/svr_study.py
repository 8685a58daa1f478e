"""The SVR head's tuning, whole: where the Optuna study lives, how workers share its trial budget, the objective.

    study = open_study(name, open_storage(cfg), seed, shared)   # StudyStorageError naming svr.storage first
    ran = run_trials(study, make_objective(folds, y, cfg.svr, device), n_trials)   # this worker's share

Storage: the experiment's own SQLite file (any path), or ``svr.storage`` (a ``postgresql://`` URL, or ``env:NAME``)
shared by processes and machines; a heartbeat fails and re-queues the trial of a dead worker. Budget: a worker
creates a trial only while COMPLETE + RUNNING < n_trials, under a lock all workers share, so the study ends with
exactly n_trials COMPLETE trials. Sampling replays: each trial is asked from a TPE sampler built for it, seeded by
(seed, completed trials) - or the trial number when shared, so concurrent workers draw different C - using only
Optuna's public API. Optuna and SQLAlchemy are imported lazily; nothing here knows the stages.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from . import artifacts
from .config import redact_url, without_password
from .errors import ArtifactError, PawpularError

log = logging.getLogger("pawpular")
SETTING = "svr.storage"  # the config key users set; named in every storage error
ENV_PREFIX = "env:"  # svr.storage: env:NAME = the URL is the value of environment variable NAME
_CLAIM = "pawpular:claimed"  # trial system attr: the trial number its worker wrote when it claimed it
_TABLES_KEY = 8327713490  # PostgreSQL advisory lock "creating pawpular's tables"


class StudyStorageError(PawpularError, ValueError):
    """The study storage cannot be used: bad URL, missing driver, server down, refused or wrong credentials."""


# ---------------------------------------------------------------------------------------------------------------
# Where the study lives


def resolve_setting(setting: str | None) -> str | None:
    """``svr.storage`` as a URL: ``env:NAME`` is environment variable NAME (no file ever holds the URL)."""
    if setting is None or not setting.startswith(ENV_PREFIX):
        return setting
    name = setting[len(ENV_PREFIX):]
    value = os.environ.get(name, "").strip()
    if not value:
        raise StudyStorageError(f"{SETTING}: {setting}: the environment variable {name} is not set (it should hold "
                                "the study's URL, e.g. postgresql://USER:PASSWORD@HOST:5432/DATABASE)")
    return value


def storage_url(setting: str | None, default_sqlite: Path) -> str:
    """``setting`` as a URL (``env:NAME`` resolved; a bare postgresql:// means psycopg2, whatever SQLAlchemy's
    default), or for ``None`` the file ``default_sqlite`` as an SQLite URI, encoded so any name reaches SQLite."""
    import sqlalchemy

    setting = resolve_setting(setting)
    if setting is not None:
        try:
            u = sqlalchemy.make_url(setting)
        except (sqlalchemy.exc.ArgumentError, ValueError):  # ValueError: a port that is no number (multi-host)
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
        db = unquote(db[len("file:"):].split("?", 1)[0].split("#", 1)[0].removeprefix("//"))
        if db in ("", ":memory:"):
            return None
    return Path(db)


def _engine_kwargs(url: str, connect_timeout: int) -> dict:
    """SQLite waits for other processes' write locks; PostgreSQL replaces dropped connections and fails in seconds
    on an unreachable host (libpq's connect_timeout)."""
    import sqlalchemy

    u = sqlalchemy.make_url(url)
    if u.get_backend_name() == "sqlite":
        return {"connect_args": {"timeout": 60}}
    return {"pool_pre_ping": True, "connect_args": {"connect_timeout": connect_timeout}
            if u.get_driver_name() in ("psycopg2", "psycopg") else {}}


def _storage_error(url: str, err: BaseException, connected: bool = False) -> StudyStorageError:
    """A StudyStorageError naming the setting, the masked URL and what to do."""
    import sqlalchemy

    if isinstance(err, ImportError):
        reason = f"the database driver is not installed ({type(err).__name__}: {err}); " + (
            "pip install -r requirements-distributed.txt" if getattr(err, "name", None) == "psycopg2"
            else "install that module, or write postgresql:// (psycopg2, from requirements-distributed.txt)")
    elif isinstance(err, (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError, ValueError)):
        reason = (f"not a database URL ({err}); expected postgresql://USER:PASSWORD@HOST:PORT/DATABASE with one host "
                  "(a multi-host URL is not supported), or leave it unset for the experiment's own SQLite file")
    else:
        detail = " ".join(line.strip() for line in str(getattr(err, "orig", None) or err).strip().splitlines()[:3])
        if connected:  # e.g. PostgreSQL 15+: only the database owner may create tables in schema public
            reason = (f"connected, but cannot create Optuna's tables ({detail}); the user needs to own the "
                      "database, or GRANT CREATE ON SCHEMA public TO the user")
        elif url.startswith("sqlite"):
            reason = f"cannot open ({detail}); does its folder exist, and may we write there?"
        else:
            reason = (f"cannot connect ({detail}); is the server running and reachable, and are the user, password "
                      "and database right?")
    if "no password supplied" in reason or "password authentication failed" in reason:
        reason += ("; a password is never written to a file, so a config read back (config.yaml) has none: give "
                   "it with PGPASSWORD or ~/.pgpass (libpq), or the whole URL with svr.storage: env:NAME")
    message = f"{SETTING}: {redact_url(url, '***')}: {reason}"
    return StudyStorageError(without_password(message, url))


def make_storage(setting: str | None, default_sqlite: Path, *, heartbeat_interval: int = 10,
                 grace_period: int = 60, max_retry: int | None = 3, connect_timeout: int = 5) -> Any:
    """An ``optuna.storages.RDBStorage`` for ``setting`` (``storage_url``), checked by connecting once before any
    table exists; a trial silent for ``grace_period`` s is failed and retried up to ``max_retry`` times."""
    import optuna
    import sqlalchemy

    url = storage_url(setting, default_sqlite)
    try:
        backend = sqlalchemy.make_url(url).get_backend_name()
    except (sqlalchemy.exc.ArgumentError, ValueError) as e:
        raise _storage_error(url, e) from None
    if backend not in ("postgresql", "sqlite"):
        raise StudyStorageError(f"{SETTING}: {redact_url(url, '***')}: not a postgresql:// or sqlite:// URL, the two "
                                "this supports (the trial budget's lock is implemented for them); expected "
                                "postgresql://USER:PASSWORD@HOST:PORT/DATABASE")
    if setting is None:
        Path(default_sqlite).parent.mkdir(parents=True, exist_ok=True)
    kwargs = _engine_kwargs(url, connect_timeout)
    try:
        engine = sqlalchemy.create_engine(url, **kwargs)
    except (ImportError, sqlalchemy.exc.SQLAlchemyError) as e:
        raise _storage_error(url, e) from None
    try:  # errors surface here, before RDBStorage creates its tables; PostgreSQL: one process creates them
        with engine.connect() as conn, _advisory_lock(conn, _TABLES_KEY, backend == "postgresql"):
            conn.exec_driver_sql("SELECT 1")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
                try:
                    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=heartbeat_interval,
                                                      grace_period=grace_period, heartbeat_stale_trial_callback=retry)
                except (ImportError, sqlalchemy.exc.SQLAlchemyError) as e:
                    raise _storage_error(url, e, connected=True) from None
    except (ImportError, sqlalchemy.exc.SQLAlchemyError) as e:
        raise _storage_error(url, e) from None
    finally:
        engine.dispose()


@contextlib.contextmanager
def _advisory_lock(conn: Any, key: int, enabled: bool = True) -> Iterator[None]:
    """A PostgreSQL session advisory lock on ``conn`` (the server drops it if this process dies)."""
    if not enabled:
        yield
        return
    conn.exec_driver_sql(f"SELECT pg_advisory_lock({int(key)})")
    try:
        yield
    finally:
        conn.exec_driver_sql(f"SELECT pg_advisory_unlock({int(key)})")


def open_storage(cfg: Any, replace_damaged: bool = False) -> Any:
    """The SVR's storage for ``cfg``: svr.storage, or the experiment's own svr/study.db. A damaged study.db (not
    SQLite, corrupt) is an ArtifactError naming it, or with ``replace_damaged`` is removed (it is the experiment's
    own file, holding only its studies) so a new study starts."""
    from .files import remove, sqlite_damage

    if cfg.svr.storage is not None:
        return make_storage(cfg.svr.storage, artifacts.study_db(cfg.out))
    db = artifacts.study_db(cfg.out)
    if why := sqlite_damage(db):
        if not replace_damaged:
            raise ArtifactError(f"{db} is damaged ({why}): rerun with --overwrite to start a new study, or "
                                "`pawpular delete-study` to remove it")
        log.warning("svr: %s is damaged (%s): removing it; a new study starts", db, why)
        for extra in (db, db.with_name(db.name + "-journal"), db.with_name(db.name + "-wal")):
            remove(extra)
    return make_storage(None, db, heartbeat_interval=1, grace_period=2)


# ---------------------------------------------------------------------------------------------------------------
# The study and its trial budget


@dataclass
class Study:
    """An Optuna study and the RDBStorage it lives in (Optuna has no public way from one to the other); reads
    like the ``optuna.Study`` itself (``best_params``, ``trials``...)."""

    study: Any  # optuna.Study
    storage: Any  # optuna.storages.RDBStorage
    seed: int
    shared: bool  # several workers at once: seed by trial number; else one trial at a time, seeded by progress

    def __getattr__(self, name: str) -> Any:
        return getattr(self.study, name)

    def sampler_for_next_trial(self) -> Any:
        """A TPE sampler seeded by (seed, completed trials so far), or by the next trial's number when shared."""
        import optuna

        trials = self.study.get_trials(deepcopy=False)
        key = len(trials) if self.shared else sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
        return optuna.samplers.TPESampler(seed=(self.seed * 1_000_003 + key) % 2**32)


def open_study(name: str, storage: Any, seed: int, shared: bool = False) -> Study:
    """Create study ``name`` in ``storage`` (a ``make_storage`` result, or a URL given to it), or load it."""
    import optuna

    if isinstance(storage, str):
        storage = make_storage(storage, Path())
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return Study(optuna.create_study(study_name=name, storage=storage, direction="minimize", load_if_exists=True),
                 storage, seed, shared)


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


def study_lock(study: Study) -> Callable[[], contextlib.AbstractContextManager]:
    """The lock every worker takes to "count trials, then create one": a PostgreSQL advisory lock keyed on the
    study name, ``flock`` on ``<database>.lock`` for SQLite, a thread lock in memory (all die with their holder)."""
    rdb = study.storage
    if rdb.engine.name == "postgresql":
        key = int.from_bytes(hashlib.blake2b(f"pawpular-study:{study.study_name}".encode(), digest_size=8).digest(),
                             "big", signed=True)

        @contextlib.contextmanager
        def pg() -> Iterator[None]:
            import sqlalchemy

            with rdb.engine.begin() as conn:  # released at commit, or when a killed worker's connection drops
                conn.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
                yield

        return pg
    path = sqlite_path(rdb.url)
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


def _claim(study: Study, study_id: int, n_trials: int) -> tuple[Any, Any, int]:
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
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        trial = asker.ask()  # pops a re-queued (WAITING) trial first: a retry keeps its parameters
    trial_id = rdb.get_trial_id_from_study_id_trial_number(study_id, trial.number)
    rdb.record_heartbeat(trial_id)  # first, so a claimed trial always has a heartbeat that can go stale
    rdb.set_trial_system_attr(trial_id, _CLAIM, trial.number)
    return asker, trial, complete


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


def run_trials(study: Study, objective: Callable[[Any], float], n_trials: int, *,
               callbacks: Sequence[Callable[[Any, Any], None]] | None = (),
               lock: Callable[[], contextlib.AbstractContextManager] | None = None, poll: float | None = None) -> int:
    """Run trials until ``study`` holds ``n_trials`` COMPLETE trials across all its workers; returns how many this
    worker completed. With the budget taken but others' trials running, poll every ``poll`` s until they finish or
    go stale. A private study runs one trial at a time: a rerun after a kill retries the killed trial first.
    ``callbacks(optuna_study, frozen_trial)`` run after each trial this worker completes; an objective that raises
    (or returns a non-finite value) fails its trial and the error propagates."""
    from optuna.trial import TrialState

    rdb = study.storage
    if rdb.get_heartbeat_interval() is None:
        raise ValueError("run_trials needs a storage with a heartbeat: use make_storage()")
    lock = lock or study_lock(study)
    poll = poll if poll is not None else float(rdb.get_heartbeat_interval())
    study_id = rdb.get_study_id_from_name(study.study_name)
    ran, waiting = 0, False
    while True:
        with lock():
            asker, trial, complete = _claim(study, study_id, n_trials)
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
        with _heartbeat(rdb, rdb.get_trial_id_from_study_id_trial_number(study_id, trial.number)):
            try:
                value = float(objective(trial))
            except BaseException:
                _tell(asker, trial, state=TrialState.FAIL)
                raise
        if not math.isfinite(value):
            _tell(asker, trial, state=TrialState.FAIL)
            raise ValueError(f"study {study.study_name}: trial {trial.number} returned {value} for {trial.params}")
        frozen = _tell(asker, trial, value)
        if frozen is None or frozen.state != TrialState.COMPLETE:  # we stalled past grace_period: failed as stale
            log.warning("study %s: trial %d was failed as stale by another worker; its retry counts instead",
                        study.study_name, trial.number)
            continue
        ran += 1
        for callback in callbacks or ():
            callback(asker, frozen)


def _tell(study: Any, trial: Any, value: float | None = None, state: Any = None) -> Any:
    """``study.tell`` that tolerates a trial another worker already failed; returns the stored trial or None."""
    import optuna

    try:
        return study.tell(trial, value, state=state, skip_if_finished=True)
    except optuna.exceptions.UpdateFinishedTrialError:
        return None
