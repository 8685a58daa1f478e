"""A throwaway PostgreSQL server for tests (the Debian PostgreSQL 15 server binaries, no system service).

    from postgres import postgres_server, postgres_db, postgres_role  # noqa: F401  (fixtures)

    def test_x(postgres_db): ...   # postgres_db: the URL of a fresh, empty database on the session's server
    def test_y(postgres_role): ... # postgres_role: a login role with a password, no privileges on it

``postgres_server`` (session) runs ``initdb`` into a folder under /tmp and starts the cluster on a free TCP port
of 127.0.0.1 (plus a unix socket in that folder), stops it with ``pg_ctl stop -m fast`` and removes the folder at
the end. ``initdb`` and ``pg_ctl`` refuse to run as root, so a root test process runs them as the ``postgres``
user (which must own the folder); any other user runs them directly. Authentication: the superuser
``postgres`` is trusted (socket and 127.0.0.1); other roles need their password (scram-sha-256), so a test can
check a refused login with ``server.create_role``. Skips, saying which, only when psycopg2, the binaries or (as
root) the postgres user are missing.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PG_MAJOR = 15
_HBA = """\
local all all trust
host all postgres 127.0.0.1/32 trust
host all all 127.0.0.1/32 scram-sha-256
"""


def find_bindir() -> Path | None:
    """The folder holding initdb / pg_ctl / postgres: pg_config's answer, else Debian's versioned path."""
    candidates = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            candidates.append(
                Path(subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=True).stdout.strip())
            )
        except (OSError, subprocess.CalledProcessError):
            pass
    candidates += [
        Path(f"/usr/lib/postgresql/{PG_MAJOR}/bin"),
        *sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True),
    ]
    for d in candidates:
        if all((d / exe).is_file() for exe in ("initdb", "pg_ctl", "postgres")):
            return d
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PostgresServer:
    bindir: Path
    root: Path  # our folder: data/, the socket, the log
    port: int
    run_as: str | None  # "postgres" when the tests run as root
    _n: Iterator[int] = field(default_factory=itertools.count)

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, database: str = "postgres", user: str = "postgres", password: str | None = None) -> str:
        auth = f"{user}:{password}" if password is not None else user
        return f"postgresql+psycopg2://{auth}@127.0.0.1:{self.port}/{database}"

    def run(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        """Run a server binary as the cluster's owner."""
        user = {"user": self.run_as, "group": self.run_as, "extra_groups": []} if self.run_as else {}
        return subprocess.run(
            [str(self.bindir / args[0]), *args[1:]], capture_output=True, text=True, cwd=self.root, **user, **kwargs
        )

    def sql(self, statement: str, database: str = "postgres") -> list[tuple]:
        """Run one statement as the superuser (autocommit); returns its rows, if any."""
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname=database, connect_timeout=5)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(statement)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def create_database(self) -> str:
        name = f"test_{next(self._n)}"
        self.sql(f"CREATE DATABASE {name}")
        return name

    def drop_database(self, name: str) -> None:
        self.sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")  # FORCE: workers a test left behind

    def create_role(self, name: str, password: str) -> None:
        self.sql(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")

    def tables(self, database: str) -> list[str]:
        return [r[0] for r in self.sql("SELECT tablename FROM pg_tables WHERE schemaname = 'public'", database)]


def _skip_reason() -> tuple[str | None, Path | None, str | None]:
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "psycopg2 is not installed (pip install -r requirements-distributed.txt)", None, None
    bindir = find_bindir()
    if bindir is None:
        return (
            (
                f"PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: no pg_config on PATH and no "
                f"/usr/lib/postgresql/*/bin (apt-get install postgresql-{PG_MAJOR})"
            ),
            None,
            None,
        )
    run_as = None
    if os.geteuid() == 0:
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root, and initdb refuses root, but there is no 'postgres' user to run it as", None, None
        run_as = "postgres"
    return None, bindir, run_as


def start_server() -> PostgresServer:
    """initdb + pg_ctl start; the caller stops it with stop_server (pytest.skip when it cannot run here)."""
    reason, bindir, run_as = _skip_reason()
    if reason:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="pawpular-pg-"))
    try:
        if run_as:
            import pwd

            pw = pwd.getpwnam(run_as)
            os.chown(root, pw.pw_uid, pw.pw_gid)
        server = PostgresServer(bindir, root, 0, run_as)
        init = server.run(
            "initdb",
            "-D",
            str(server.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        )
        if init.returncode:
            raise RuntimeError(f"initdb failed:\n{init.stdout}\n{init.stderr}")
        (server.data / "pg_hba.conf").write_text(_HBA)  # the file is the owner's; writing keeps that owner
        for _ in range(3):  # a free port can be taken between probing and listening: try another
            server.port = _free_port()
            opts = (
                f"-c listen_addresses=127.0.0.1 -p {server.port} -c unix_socket_directories={root} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=100"
            )
            start = server.run(
                "pg_ctl", "start", "-D", str(server.data), "-l", str(root / "server.log"), "-w", "-t", "60", "-o", opts
            )
            if start.returncode == 0:
                return server
        log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
        raise RuntimeError(f"pg_ctl start failed:\n{start.stdout}\n{start.stderr}\n{log[-3000:]}")
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise


def stop_server(server: PostgresServer) -> None:
    try:
        server.run("pg_ctl", "stop", "-D", str(server.data), "-m", "fast", "-w", "-t", "60")
    finally:
        shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = start_server()
    try:
        yield server
    finally:
        stop_server(server)


@pytest.fixture
def postgres_db(postgres_server: PostgresServer) -> Iterator[str]:
    """The URL of a fresh database on the session's server (dropped after the test), as the trusted superuser."""
    name = postgres_server.create_database()
    try:
        yield postgres_server.url(name)
    finally:
        postgres_server.drop_database(name)


@pytest.fixture
def postgres_role(postgres_server: PostgresServer, postgres_db: str) -> Iterator[str]:
    """A login role (password ``right-password``) with no privileges on postgres_db's schema; dropped after."""
    name = "svr_worker"
    postgres_server.create_role(name, "right-password")
    try:
        yield name
    finally:
        postgres_server.sql(f"DROP OWNED BY {name}", postgres_db.rsplit("/", 1)[1])
        postgres_server.sql(f"DROP ROLE {name}")
