"""The tree is lint-clean and formatted, as ruff (pyproject.toml [tool.ruff]) says: CI runs this with the suite."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=REPO, capture_output=True, text=True)


def test_ruff_finds_nothing_to_fix():
    r = _ruff("check", "--no-cache", ".")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_every_file_is_formatted_as_ruff_formats_it():
    r = _ruff("format", "--check", "--no-cache", ".")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_the_check_fails_on_a_bad_file(tmp_path):
    """The two commands above can fail: ruff reads this project's settings and flags an unused import and an
    unformatted line in a file under them."""
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nx=1\n")
    settings = str(REPO / "pyproject.toml")
    assert _ruff("check", "--no-cache", "--config", settings, str(bad)).returncode == 1
    assert _ruff("format", "--check", "--no-cache", "--config", settings, str(bad)).returncode == 1
