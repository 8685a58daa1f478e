"""Adversarial cases, round three (issue 32), one section per class: a secret never reaches a tracker, log or
file; writes only onto what the project made; a refused command changes nothing; what ships and what is done is
verified; user input never ends in a traceback; no unclear or silently wrong answer.

Each case runs the real CLI (or the Python API) and asserts the exit code, the one line naming the cause, and,
where the user had files, that every one of them is byte for byte what it was (``tree`` before and after).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

import pawpular
from pawpular import artifacts
from pawpular.config import load_config, public_dict, redact_url, url_password

from conftest import tiny_args
from adversary import one_line, run_cli, tree

SECRET = "s3cr@t-P@ss"  # a password that itself holds '@'


@pytest.fixture
def run(experiment_run, tmp_path) -> Path:
    return Path(shutil.copytree(experiment_run, tmp_path / "run"))


def _holding(root: Path, secret: str) -> list[str]:
    return sorted(str(p) for p in Path(root).rglob("*") if p.is_file() and secret.encode() in p.read_bytes())


# ---------------------------------------------------------------------------------------------------------------
# 1. A secret never reaches a tracker, a log or a file


def test_a_password_holding_at_signs_is_masked_whole():
    url = f"postgresql://svr:{SECRET}@dbhost:5432/optuna"
    for shown in (redact_url(url), redact_url(url, "***"), json.dumps(public_dict({"svr": {"storage": url}}))):
        assert "P@ss" not in shown and "s3cr" not in shown and "dbhost:5432/optuna" in shown, shown
    assert url_password(url) == SECRET
    query = "postgresql://svr@dbhost/optuna?password=a@b&sslmode=require"
    assert "a@b" not in redact_url(query, "***") and "sslmode=require" in redact_url(query, "***")


def test_config_show_and_errors_never_print_a_password_with_an_at_sign(tmp_path, capsys):
    url = f"postgresql://svr:{SECRET}@dbhost:5432/optuna"
    code, out = run_cli(capsys, "config", "show", "--set", f"svr.storage={url}", "--output", tmp_path / "x")
    assert code == 0 and "svr:***@dbhost" in out and "P@ss" not in out and "s3cr" not in out
    code, out = run_cli(capsys, "config", "show", "--set", f"svr.storage={url}", "--set", "svr.n_trials=-1",
                        "--output", tmp_path / "x")
    assert code == 2 and one_line(out) and "P@ss" not in out and "s3cr" not in out


def test_wandb_never_records_the_password_of_the_command_line(tmp_path, monkeypatch, make_cfg, small_competition):
    pytest.importorskip("wandb")
    from test_tracking import wandb_env

    from pawpular import tracking
    from pawpular.runner import Context

    wandb_env(monkeypatch, tmp_path)
    url = f"postgresql://svr:{SECRET}@dbhost:5432/optuna"
    argv = ["pawpular", "svr", "--set", f"svr.storage={url}", "--set", "tracking=[wandb]"]
    monkeypatch.setattr(sys, "argv", argv)
    cfg = make_cfg(small_competition, f"svr.storage={url}", "tracking=[wandb]", out=tmp_path / "exp")
    tracker = tracking.start(Context(cfg), "svr")
    tracker.log({"trial/C": 1.5}, 0, axis="trial")
    tracker.close()
    assert sys.argv == argv  # the process's own arguments are given back as they were
    files = [p for p in cfg.out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files)
    assert _holding(tmp_path, "P@ss") == [] and _holding(tmp_path, "s3cr") == []
