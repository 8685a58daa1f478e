"""Where the SVR's Optuna study lives: the experiment's own SQLite file (any path), or ``svr.storage`` (a
``postgresql://`` URL, or ``env:NAME``) shared by processes and machines; checked by connecting once, errors named
for the setting with the password masked; the heartbeat timing each database can keep. ``svr/study.py`` runs the
trials on it. Optuna and SQLAlchemy are imported lazily.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from ..store import artifacts
from ..store.errors import ArtifactError, PawpularError
from ..store.masking import redact_url, without_password

log = logging.getLogger("pawpular")
SETTING = "svr.storage"  # the config key users set; named in every storage error
ENV_PREFIX = "env:"  # svr.storage: env:NAME = the URL is the value of environment variable NAME
_TABLES_KEY = 8327713490  # PostgreSQL advisory lock "creating pawpular's tables"
# SQLite: a write waits up to SQLITE_LOCK_WAIT s for a lock and a heartbeat is stored in whole seconds: a beat every
# 10 s is late by at most 10 + 60 + 1 s, inside the grace. A study one process works on (``sole``) sends none.
SQLITE_LOCK_WAIT, SQLITE_HEARTBEAT = 60, {"heartbeat_interval": 10, "grace_period": 75}


class StudyStorageError(PawpularError, ValueError):
    """The study storage cannot be used: bad URL, missing driver, server down, refused or wrong credentials."""


# ---------------------------------------------------------------------------------------------------------------
# Where the study lives


def resolve_setting(setting: str | None) -> str | None:
    """``svr.storage`` as a URL: ``env:NAME`` is environment variable NAME (no file ever holds the URL)."""
    if setting is None or not setting.startswith(ENV_PREFIX):
        return setting
    name = setting[len(ENV_PREFIX) :]
    value = os.environ.get(name, "").strip()
    if not value:
        raise StudyStorageError(
            f"{SETTING}: {setting}: the environment variable {name} is not set (it should hold "
            "the study's URL, e.g. postgresql://USER:PASSWORD@HOST:5432/DATABASE)"
        )
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
        hide_password=False
    )


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL (plain or URI form); ``None`` for other databases and in-memory ones."""
    import sqlalchemy

    u = sqlalchemy.make_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    db = u.database
    if u.query.get("uri") in ("true", "1", "True") and db.startswith("file:"):
        db = unquote(db[len("file:") :].split("?", 1)[0].split("#", 1)[0].removeprefix("//"))
        if db in ("", ":memory:"):
            return None
    return Path(db)


def _engine_kwargs(url: str, connect_timeout: int) -> dict:
    """SQLite waits for other processes' write locks; PostgreSQL replaces dropped connections and fails in seconds
    on an unreachable host (libpq's connect_timeout)."""
    import sqlalchemy

    u = sqlalchemy.make_url(url)
    if u.get_backend_name() == "sqlite":
        return {"connect_args": {"timeout": SQLITE_LOCK_WAIT}}
    return {
        "pool_pre_ping": True,
        "connect_args": {"connect_timeout": connect_timeout} if u.get_driver_name() in ("psycopg2", "psycopg") else {},
    }


def _storage_error(url: str, err: BaseException, connected: bool = False) -> StudyStorageError:
    """A StudyStorageError naming the setting, the masked URL and what to do."""
    import sqlalchemy

    if isinstance(err, ImportError):
        reason = f"the database driver is not installed ({type(err).__name__}: {err}); " + (
            "pip install -r requirements-distributed.txt"
            if getattr(err, "name", None) == "psycopg2"
            else "install that module, or write postgresql:// (psycopg2, from requirements-distributed.txt)"
        )
    elif isinstance(err, (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError, ValueError)):
        reason = (
            f"not a database URL ({err}); expected postgresql://USER:PASSWORD@HOST:PORT/DATABASE with one host "
            "(a multi-host URL is not supported), or leave it unset for the experiment's own SQLite file"
        )
    else:
        detail = " ".join(line.strip() for line in str(getattr(err, "orig", None) or err).strip().splitlines()[:3])
        if connected:  # e.g. PostgreSQL 15+: only the database owner may create tables in schema public
            reason = (
                f"connected, but cannot create Optuna's tables ({detail}); the user needs to own the "
                "database, or GRANT CREATE ON SCHEMA public TO the user"
            )
        elif url.startswith("sqlite"):
            reason = f"cannot open ({detail}); does its folder exist, and may we write there?"
        else:
            reason = (
                f"cannot connect ({detail}); is the server running and reachable, and are the user, password "
                "and database right?"
            )
    if "no password supplied" in reason or "password authentication failed" in reason:
        reason += (
            "; a password is never written to a file, so a config read back (config.yaml) has none: give "
            "it with PGPASSWORD or ~/.pgpass (libpq), or the whole URL with svr.storage: env:NAME"
        )
    message = f"{SETTING}: {redact_url(url, '***')}: {reason}"
    return StudyStorageError(without_password(message, url))


def make_storage(
    setting: str | None,
    default_sqlite: Path,
    *,
    heartbeat_interval: int = 10,
    grace_period: int = 60,
    max_retry: int | None = 3,
    connect_timeout: int = 5,
) -> Any:
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
        raise StudyStorageError(
            f"{SETTING}: {redact_url(url, '***')}: not a postgresql:// or sqlite:// URL, the two "
            "this supports (the trial budget's lock is implemented for them); expected "
            "postgresql://USER:PASSWORD@HOST:PORT/DATABASE"
        )
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
                    return optuna.storages.RDBStorage(
                        url,
                        engine_kwargs=kwargs,
                        heartbeat_interval=heartbeat_interval,
                        grace_period=grace_period,
                        heartbeat_stale_trial_callback=retry,
                    )
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
    from ..store.files import remove, sqlite_damage

    if cfg.svr.storage is not None:
        return make_storage(cfg.svr.storage, artifacts.study_db(cfg.out))
    db = artifacts.study_db(cfg.out)
    if why := sqlite_damage(db):
        if not replace_damaged:
            raise ArtifactError(
                f"{db} is damaged ({why}): rerun with --overwrite to start a new study, or "
                "`pawpular delete-study` to remove it"
            )
        log.warning("svr: %s is damaged (%s): removing it; a new study starts", db, why)
        for extra in (db, db.with_name(db.name + "-journal"), db.with_name(db.name + "-wal")):
            remove(extra)
    return make_storage(None, db, **SQLITE_HEARTBEAT)
