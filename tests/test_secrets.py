"""No secret reaches a file: the password of svr.storage, however it is given, is in nothing an experiment, its
report, its export or its log holds; libpq's PGPASSWORD and password file, and env:NAME, let it stay out of the
URL altogether."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
from conftest import tiny_args
from postgres import postgres_server  # noqa: F401  (fixture)

PASSWORD = "Pw-4417-never-on-disk"
ROLE = "svr_owner"


@pytest.fixture
def owned_db(postgres_server):  # noqa: F811
    """A database owned by a password-protected role (it creates Optuna's tables); its URL without password."""
    name = postgres_server.create_database()
    postgres_server.sql(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'")
    postgres_server.sql(f"ALTER DATABASE {name} OWNER TO {ROLE}")
    try:
        yield postgres_server.url(name, ROLE).replace("postgresql+psycopg2://", "postgresql://")
    finally:
        postgres_server.drop_database(name)
        postgres_server.sql(f"DROP ROLE {ROLE}")


def _files_holding(root: Path, secret: str) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes())


def _svr(run: Path, comp: Path, storage: str, *extra: str) -> None:
    from pawpular.cli import main as cli

    assert cli.main(["svr", *tiny_args(comp, run), "--set", f"svr.storage={storage}", *extra]) == 0


@pytest.mark.slow
def test_the_password_is_in_no_file_and_no_log(
    experiment_run, small_competition, owned_db, tmp_path, caplog, capsys, monkeypatch
):
    from pawpular.cli import main as cli

    run = Path(shutil.copytree(experiment_run, tmp_path / "run"))
    with_password = owned_db.replace(f"{ROLE}@", f"{ROLE}:{PASSWORD}@")
    given = ["--set", f"svr.storage={with_password}"]
    with caplog.at_level(logging.DEBUG):
        _svr(run, small_competition, with_password, "--overwrite")  # the password in the URL: it works, unwritten
        assert cli.main(["ensemble", *tiny_args(small_competition, run), *given, "--overwrite"]) == 0
        assert cli.main(["report", "--output", str(run), "--data", str(small_competition)]) == 0
        assert cli.main(["export", "--output", str(run), "--to", str(tmp_path / "art")]) == 0
        assert cli.main(["status", *tiny_args(small_competition, run), *given]) == 0
        assert cli.main(["config", "show", *tiny_args(small_competition, run), *given]) == 0
    out = capsys.readouterr()
    assert PASSWORD not in caplog.text + out.out + out.err
    assert _files_holding(run, PASSWORD) == [] and _files_holding(tmp_path / "art", PASSWORD) == []
    assert f"storage: postgresql://{ROLE}@127.0.0.1" in (run / "config.yaml").read_text()  # masked, not dropped

    # libpq's conventions: the URL names no password; PGPASSWORD, or a password file, holds it
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    _svr(run, small_competition, owned_db, "--overwrite")
    monkeypatch.delenv("PGPASSWORD")
    passfile = tmp_path / "pgpass"
    host, rest = owned_db.split("@", 1)[1].split(":", 1)
    port, database = rest.split("/", 1)
    passfile.write_text(f"{host}:{port}:{database}:{ROLE}:{PASSWORD}\n")
    passfile.chmod(0o600)  # libpq ignores a password file others can read
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    _svr(run, small_competition, owned_db, "--overwrite")
    monkeypatch.delenv("PGPASSFILE")

    # the whole URL from the environment: the config names the variable
    monkeypatch.setenv("PAWPULAR_TEST_STUDY", with_password)
    _svr(run, small_competition, "env:PAWPULAR_TEST_STUDY", "--overwrite")
    assert "storage: env:PAWPULAR_TEST_STUDY" in (run / "config.yaml").read_text()
    assert _files_holding(run, PASSWORD) == []


def test_no_password_anywhere_is_a_clear_error(
    experiment_run, small_competition, owned_db, tmp_path, capsys, monkeypatch
):
    from pawpular.cli import main as cli

    for name in ("PGPASSWORD", "PGPASSFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.pgpass
    run = Path(shutil.copytree(experiment_run, tmp_path / "run"))
    code = cli.main(["svr", *tiny_args(small_competition, run), "--set", f"svr.storage={owned_db}", "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2 and "svr.storage" in err and "password" in err
    code = cli.main(
        ["svr", *tiny_args(small_competition, run), "--set", "svr.storage=env:PAWPULAR_UNSET_VAR", "--overwrite"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "the environment variable PAWPULAR_UNSET_VAR is not set" in err
    assert os.environ.get("PAWPULAR_UNSET_VAR") is None
