"""Where an Optuna study lives: the experiment's own SQLite file (any path) or a shared PostgreSQL database.

``make_storage(cfg.svr.storage, study_db)`` connects once and raises ``StudyStorageError`` naming ``svr.storage``
(password masked) for a bad URL, a missing driver, or a server that is down or refuses us, before any work and
before any table exists. The storage has heartbeats: a trial of a killed worker goes stale and is retried.
"""
from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from .errors import PawpularError

SETTING = "svr.storage"  # the config key users set; named in every storage error
ENV_PREFIX = "env:"  # svr.storage: env:NAME = the URL is the value of environment variable NAME


class StudyStorageError(PawpularError, ValueError):
    """The study storage cannot be used: bad URL, missing driver, server down, refused or wrong credentials."""


# ---------------------------------------------------------------------------------------------------------------
# Storage


def resolve_setting(setting: str | None) -> str | None:
    """``svr.storage`` as a URL: ``env:NAME`` is the value of environment variable NAME, anything else as given.

    Keeping the URL (and its password) in the environment keeps it out of every file: the config, and so every
    manifest, report and export, holds only ``env:NAME``.
    """
    if setting is None or not setting.startswith(ENV_PREFIX):
        return setting
    name = setting[len(ENV_PREFIX):]
    value = os.environ.get(name, "").strip()
    if not value:
        raise StudyStorageError(f"{SETTING}: {setting}: the environment variable {name} is not set (it should hold "
                                "the study's URL, e.g. postgresql://USER:PASSWORD@HOST:5432/DATABASE)")
    return value


def storage_url(setting: str | None, default_sqlite: Path) -> str:
    """The storage URL: ``setting`` (``env:NAME`` resolved), or for ``None`` the SQLite file ``default_sqlite``.

    The file name goes through an SQLite URI (``?uri=true``), percent-encoded for SQLite and again for
    SQLAlchemy's URL parser (which decodes the database part once), so ``?``, ``#``, ``%41``, ``{}`` and spaces
    reach SQLite verbatim. A plain ``sqlite:///{path}`` cuts the name at ``?`` and trips on ``%``.
    """
    import sqlalchemy

    setting = resolve_setting(setting)
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


def url_password(url: str) -> str | None:
    """The password a URL carries (for masking it in messages), or None."""
    try:
        import sqlalchemy

        return sqlalchemy.make_url(url).password or None
    except Exception:  # noqa: BLE001 - an unparsable URL: by hand
        m = re.search(r"://[^/:@]*:([^@/]*)@", url)
        return m.group(1) if m else None


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
    password = url_password(url)
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
    if "password" in reason and "no password supplied" in reason or "password authentication failed" in reason:
        reason += ("; a password is never written to a file, so a config read back (config.yaml) has none: give "
                   "it with PGPASSWORD or ~/.pgpass (libpq), or the whole URL with svr.storage: env:NAME")
    message = f"{SETTING}: {masked}: {reason}"
    if password:
        message = message.replace(password, "***")
    return StudyStorageError(message)


def sqlite_damage(path: Path) -> str | None:
    """Why the SQLite file at ``path`` is not a usable database (not SQLite, corrupt), or None (fine, empty or
    absent). Read-only: the file is opened with ``mode=ro`` and checked with ``PRAGMA quick_check``."""
    import sqlite3

    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return None
    with open(path, "rb") as f:
        if f.read(16) != b"SQLite format 3\x00":
            return "not an SQLite database"
    try:
        conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, timeout=60)
        try:
            verdict = conn.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.DatabaseError as e:
        return f"corrupt ({e})"
    return None if verdict == "ok" else f"corrupt ({verdict})"


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
            with _creating_tables(url, kwargs):
                return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=heartbeat_interval,
                                                  grace_period=grace_period, **retry)
        except (ImportError, sqlalchemy.exc.SQLAlchemyError) as e:
            raise _storage_error(url, e, connected=True) from None


@contextlib.contextmanager
def _creating_tables(url: str, kwargs: dict) -> Iterator[None]:
    """PostgreSQL: one process at a time creates Optuna's tables (machines started together on a fresh database
    otherwise collide on "duplicate key ... pg_type_typname_nsp_index"). A session advisory lock, dropped by the
    server if this process dies."""
    import sqlalchemy

    if sqlalchemy.make_url(url).get_backend_name() != "postgresql":
        yield
        return
    engine = sqlalchemy.create_engine(url, **kwargs)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT pg_advisory_lock(8327713490)")  # a fixed key: "creating pawpular's tables"
            try:
                yield
            finally:
                conn.exec_driver_sql("SELECT pg_advisory_unlock(8327713490)")
    finally:
        engine.dispose()
