"""The only place pawpular calls Optuna storage methods that Optuna documents as not meant for library users.

Why: ``run_trials`` keeps an exact trial budget across workers (COMPLETE + RUNNING < n_trials, counted and claimed
under one lock), which ``Study.optimize`` cannot do (``MaxTrialsCallback`` lets each worker overshoot by one trial),
so it asks and tells trials itself and therefore beats their heartbeat itself, through ``RDBStorage``'s methods
below. Checked against Optuna ``CHECKED`` (requirements.txt: optuna>=5.0,<6); ``tests/test_optuna_internals.py``
asserts the installed Optuna is in that range and that each method has the signature used here, so an upgrade that
changes them fails a test instead of a study.
"""

from __future__ import annotations

from typing import Any

CHECKED = ((5, 0), (6, 0))  # Optuna versions these calls were checked against: from (inclusive) to (exclusive)
# RDBStorage method -> its parameters (after self), as called below
METHODS = {
    "get_study_id_from_name": ("study_name",),
    "get_trial_id_from_study_id_trial_number": ("study_id", "trial_number"),
    "record_heartbeat": ("trial_id",),
    "set_trial_system_attr": ("trial_id", "key", "value"),
    "get_heartbeat_interval": (),
    "remove_session": (),
}


def study_id(rdb: Any, study_name: str) -> int:
    return rdb.get_study_id_from_name(study_name)


def trial_id(rdb: Any, study_id_: int, number: int) -> int:
    return rdb.get_trial_id_from_study_id_trial_number(study_id_, number)


def record_heartbeat(rdb: Any, trial_id_: int) -> None:
    rdb.record_heartbeat(trial_id_)


def set_system_attr(rdb: Any, trial_id_: int, key: str, value: Any) -> None:
    rdb.set_trial_system_attr(trial_id_, key, value)


def heartbeat_interval(rdb: Any) -> int | None:
    return rdb.get_heartbeat_interval()


def end_thread_session(rdb: Any) -> None:
    """Close this thread's database session (SQLite connections are per thread)."""
    rdb.remove_session()


def engine(rdb: Any) -> Any:
    """The storage's SQLAlchemy engine (an attribute ``RDBStorage`` sets; the budget's PostgreSQL lock uses it)."""
    return rdb.engine


def url(rdb: Any) -> str:
    """The storage's database URL (an attribute ``RDBStorage`` sets; the budget's SQLite lock file sits beside it)."""
    return rdb.url
