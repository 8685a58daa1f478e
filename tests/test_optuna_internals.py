"""The Optuna storage methods pawpular calls that Optuna does not document for users (svr/optuna_internals.py): the
installed Optuna is one they were checked against, and each still has the parameters pawpular passes."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import optuna
import pytest

from pawpular.ship.versions import parse
from pawpular.svr import optuna_internals as internals


def test_installed_optuna_is_in_the_checked_range():
    low, high = internals.CHECKED
    assert low <= parse(optuna.__version__)[:2] < high, (optuna.__version__, internals.CHECKED)


@pytest.mark.parametrize("name", sorted(internals.METHODS))
def test_each_storage_method_has_the_parameters_pawpular_passes(name):
    method = getattr(optuna.storages.RDBStorage, name)
    params = [p for p in inspect.signature(method).parameters if p != "self"]
    assert tuple(params) == internals.METHODS[name]


def test_the_calls_work_on_a_real_storage(tmp_path):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=7, grace_period=30)
    study = optuna.create_study(study_name="s", storage=storage)
    trial = study.ask()
    sid = internals.study_id(storage, "s")
    tid = internals.trial_id(storage, sid, trial.number)
    internals.record_heartbeat(storage, tid)
    internals.set_system_attr(storage, tid, "k", 3)
    assert study.trials[0].system_attrs["k"] == 3 and internals.heartbeat_interval(storage) == 7
    assert internals.engine(storage).name == "sqlite" and Path(str(tmp_path / "s.db")).name in internals.url(storage)
    internals.end_thread_session(storage)


def test_no_other_module_calls_them():
    src = Path(internals.__file__).parents[1]
    calls = [
        f"{path.name}: {name}"
        for path in sorted(src.rglob("*.py"))
        if path.name != "optuna_internals.py"
        for name in internals.METHODS
        if re.search(rf"(?<!internals)\.{name}\(", path.read_text())
    ]
    assert calls == []
