"""`tracking: [tensorboard, wandb]`: the curves and scores read back through each tool's own reader, and a tracked
run's artifacts byte for byte those of an untracked one.

TensorBoard's event files are read with tensorboard's EventAccumulator (the scalars and their steps); W&B's offline
run folders with wandb's own reader of its transaction log, ``wandb leet inspect --json`` (no network). Both
packages come from requirements-tracking.txt, which ``./run.sh test`` installs.
"""

from __future__ import annotations

import filecmp
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import HOLDOUT, tiny_args

pytest.importorskip("tensorboard", reason="requirements-tracking.txt is not installed (./run.sh test installs it)")
pytest.importorskip("wandb", reason="requirements-tracking.txt is not installed (./run.sh test installs it)")

BOTH = "tracking=[tensorboard, wandb]"
SECRET = "hunter2"


def wandb_env(mp: pytest.MonkeyPatch, home: Path) -> None:
    """No W&B account, no network: WANDB_MODE unset (pawpular's default is offline), W&B's own folders in tmp."""
    for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_API_KEY", "WANDB_PROJECT"):
        mp.delenv(var, raising=False)
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        mp.setenv(var, str(home / var.lower()))
    mp.setenv("WANDB_SILENT", "true")


@pytest.fixture(scope="module")
def tracked_run(small_competition, tmp_path_factory) -> Path:
    """The tiny holdout run again, with both backends on (the same settings as the session's ``holdout_run``)."""
    from pawpular.cli import main as cli

    out = tmp_path_factory.mktemp("tracked") / "tracked"
    with pytest.MonkeyPatch.context() as mp:
        wandb_env(mp, out.parent)
        assert cli.main(["all", *tiny_args(small_competition, out, *HOLDOUT, BOTH)]) == 0
    return out


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def one_execution(out: Path, stage: str) -> Path:
    runs = sorted((out / "tensorboard" / stage).iterdir())
    assert len(runs) == 1, f"one folder per execution of {stage}: {runs}"
    return runs[0]


def wandb_runs(out: Path) -> dict[str, list[dict]]:
    """job_type -> the records of that offline run, as wandb's own reader prints them."""
    found = {}
    for run_dir in sorted((out / "wandb").glob("offline-run-*")):
        printed = subprocess.run(
            [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
            env={"PATH": "/usr/bin:/bin", "HOME": str(out.parent), "WANDB_MODE": "offline"},
        )
        records = [json.loads(line) for line in printed.stdout.splitlines() if line.startswith("{")]
        run = next(r["run"] for r in records if r["type"] == "run")
        found[run["job_type"]] = records
    return found


def history(records: list[dict], key: str, axis: str) -> list[tuple[int, float]]:
    return [(int(h[axis]), h[key]) for r in records if r["type"] == "history" and key in (h := r["history"]["item"])]


def all_manifests(out: Path) -> dict[str, dict]:
    return {str(p.relative_to(out)): json.loads(p.read_text()) for p in sorted(out.rglob("manifest.json"))}


@pytest.mark.slow
def test_a_tracked_run_writes_the_same_artifacts_byte_for_byte(tracked_run, holdout_run):
    tracked, plain = all_manifests(tracked_run), all_manifests(holdout_run)
    assert set(tracked) == set(plain) and len(plain) >= 5 + 3 + 3  # stages, train folds, embedding folders
    for name, record in plain.items():
        for part in ("config", "inputs", "outputs", "key"):
            assert tracked[name][part] == record[part], f"{name}: {part} differs with tracking on"
        for rel in record["outputs"]:
            assert not rel.startswith(("tensorboard", "wandb")), f"{name} lists a tracking file: {rel}"
            assert filecmp.cmp(tracked_run / rel, holdout_run / rel, shallow=False), rel
    assert (tracked_run / "tensorboard").is_dir() and (tracked_run / "wandb").is_dir()


def test_tracking_enters_no_stage_key(tracked_run, holdout_run):
    from pawpular.api import config_from
    from pawpular.runner import status

    on = status(config_from(output=holdout_run, set=[BOTH]))
    off = status(config_from(output=tracked_run, set=["tracking=[]"]))
    assert {s: v.state for s, v in on.items()} == {s: "done" for s in on} == {s: v.state for s, v in off.items()}


def test_tensorboard_curves_read_back(tracked_run):
    train = one_execution(tracked_run, "train")
    best_epochs = {}
    for k in range(3):
        metrics = pd.read_csv(tracked_run / "train" / f"fold{k}" / "metrics.csv")
        got = scalars(train / f"fold{k}")
        assert [s for s, _ in got["val/rmse"]] == list(metrics["epoch"])
        assert [v for _, v in got["val/rmse"]] == pytest.approx(list(metrics["val_rmse"]), rel=1e-6)
        steps = [s for s, _ in got["train/loss"]]
        batches = len(steps) // len(metrics)
        assert steps == list(range(1, len(steps) + 1)) and batches * len(metrics) == len(steps) and batches > 1
        for e, row in metrics.iterrows():  # equal-size batches: the epoch's loss is the mean of its batches'
            epoch = got["train/loss"][e * batches : (e + 1) * batches]
            assert sum(v for _, v in epoch) / batches == pytest.approx(row["train_loss"], rel=1e-5)
            assert got["train/lr"][(e + 1) * batches - 1][1] == pytest.approx(row["lr"], rel=1e-6, abs=1e-12)
        assert all(v > 0 for _, v in got["train/images_per_s"]) and len(got["train/images_per_s"]) == len(steps)
        best_epochs[k] = int(metrics["val_rmse"].idxmin()) + 1
    folds = scalars(train)
    assert folds["best/epoch"] == [(k, float(e)) for k, e in best_epochs.items()]

    import optuna

    trials = optuna.load_study(
        study_name=json.loads((tracked_run / "svr" / "best_params.json").read_text())["study_name"],
        storage=f"sqlite:///{tracked_run / 'svr' / 'study.db'}",
    ).trials
    svr = scalars(one_execution(tracked_run, "svr"))
    assert [s for s, _ in svr["trial/C"]] == [t.number for t in trials] == list(range(8))
    assert [v for _, v in svr["trial/C"]] == pytest.approx([t.params["C"] for t in trials], rel=1e-6)
    assert [v for _, v in svr["trial/oof_rmse"]] == pytest.approx([t.value for t in trials], rel=1e-6)

    weights = json.loads((tracked_run / "ensemble" / "weights.json").read_text())
    blend = scalars(one_execution(tracked_run, "ensemble"))
    for name, w in weights["weights"].items():
        assert blend[f"weights/{name}"] == [(0, pytest.approx(w, rel=1e-6))]
    for tag, value in (
        ("blend/in_sample", weights["oof_rmse"]["ensemble"]),
        ("blend/cross_validated", weights["oof_rmse"]["ensemble_cv"]),
        ("blend/holdout", weights["holdout_rmse"]["ensemble"]),
    ):
        assert blend[tag] == [(0, pytest.approx(value, rel=1e-6))]


def test_wandb_offline_runs_read_back(tracked_run):
    runs = wandb_runs(tracked_run)
    assert set(runs) == {"train", "svr", "ensemble"}  # one run per stage that logs; folds and embed log nothing
    for stage, records in runs.items():
        run = next(r["run"] for r in records if r["type"] == "run")
        assert run["run_group"] == tracked_run.name and run["display_name"] == f"{tracked_run.name}/{stage}"
        config = run["config"]["update"]
        assert config["svr"]["n_trials"] == 8 and config["folds"]["holdout"] == 0.2
        assert config["tracking"] == ["tensorboard", "wandb"]
        assert any(r["type"] == "exit" and r["exit"].get("exit_code", 0) == 0 for r in records)

    metrics = pd.read_csv(tracked_run / "train" / "fold1" / "metrics.csv")
    assert history(runs["train"], "fold1/val/rmse", "fold1/epoch") == list(
        zip(metrics["epoch"], metrics["val_rmse"], strict=False)
    )
    losses = history(runs["train"], "fold1/train/loss", "fold1/batch")  # the same batches as TensorBoard's
    board = scalars(one_execution(tracked_run, "train") / "fold1")["train/loss"]
    assert [s for s, _ in losses] == [s for s, _ in board] and len(losses) > len(metrics)
    assert [v for _, v in losses] == pytest.approx([v for _, v in board], rel=1e-6)

    best = json.loads((tracked_run / "svr" / "best_params.json").read_text())
    trials = history(runs["svr"], "trial/oof_rmse", "trial")
    assert [s for s, _ in trials] == list(range(8)) and min(v for _, v in trials) == best["best_trial_rmse"]
    assert dict(history(runs["svr"], "trial/C", "trial"))[min(trials, key=lambda t: t[1])[0]] == best["C"]

    weights = json.loads((tracked_run / "ensemble" / "weights.json").read_text())
    for key, value in [
        *((f"weights/{n}", w) for n, w in weights["weights"].items()),
        ("blend/in_sample", weights["oof_rmse"]["ensemble"]),
        ("blend/cross_validated", weights["oof_rmse"]["ensemble_cv"]),
        ("blend/holdout", weights["holdout_rmse"]["ensemble"]),
    ]:
        assert history(runs["ensemble"], key, "step") == [(0, value)], key


def test_wandb_config_is_masked_and_the_password_reaches_no_file(tmp_path, monkeypatch, make_cfg, small_competition):
    from pawpular.logs import tracking
    from pawpular.runner import Context

    wandb_env(monkeypatch, tmp_path)
    url = f"postgresql://svr:{SECRET}@dbhost:5432/optuna"
    cfg = make_cfg(small_competition, f"svr.storage={url}", "tracking=[wandb, tensorboard]", out=tmp_path / "exp")
    tracker = tracking.start(Context(cfg), "svr")
    tracker.log({"trial/C": 1.5, "trial/oof_rmse": 17.0}, 0, axis="trial")
    tracker.close()
    config = next(r["run"] for r in wandb_runs(cfg.out)["svr"] if r["type"] == "run")["config"]["update"]
    assert config["svr"]["storage"] == "postgresql://svr:***@dbhost:5432/optuna"
    files = [p for p in cfg.out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and any("tfevents" in p.name for p in files)
    assert not [p for p in files if SECRET.encode() in p.read_bytes()]


def test_a_backend_that_is_not_installed_is_one_line_and_exit_2(monkeypatch, capsys, small_competition, tmp_path):
    from pawpular.cli import main as cli

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now fails as if it were not installed
    out = tmp_path / "exp"
    assert cli.main(["all", *tiny_args(small_competition, out, "tracking=[wandb]")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install -r requirements-tracking.txt" in err and "wandb" in err
    assert not out.exists()


def test_only_rank_0_logs(monkeypatch, make_cfg, small_competition, tmp_path):
    from pawpular.logs import tracking
    from pawpular.machine.distributed import Dist
    from pawpular.runner import Context

    cfg = make_cfg(small_competition, "tracking=[tensorboard]", out=tmp_path / "exp")
    assert not tracking.start(Context(cfg, dist=Dist(rank=1, world=2)), "train").enabled
    monkeypatch.setenv("RANK", "1")
    assert not tracking.start(Context(cfg), "train").enabled
    assert not (cfg.out / "tensorboard").exists()
    monkeypatch.setenv("RANK", "0")
    tracker = tracking.start(Context(cfg), "train")
    tracker.log({"val/rmse": 17.0}, 1, "fold0", "epoch")
    tracker.close()
    assert scalars(one_execution(cfg.out, "train") / "fold0")["val/rmse"] == [(1, 17.0)]
    assert not tracking.start(Context(cfg), "embed").enabled  # a stage that logs nothing opens no run


def test_an_unknown_backend_is_a_config_error(make_cfg, small_competition):
    from pawpular.store.errors import ConfigError

    with pytest.raises(ConfigError, match="tracking.*tensorboard, wandb"):
        make_cfg(small_competition, "tracking=[mlflow]")
