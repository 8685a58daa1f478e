"""Trust: no stale result passes for a current one, status says what is done, scores are cross-validated.

Each test reproduces a failure users met (the old behaviour is in its docstring) on a copy of the session's tiny
finished run, through the real CLI.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_args

from pawpular.cli import main as cli
from pawpular.config.schema import load_config
from pawpular.scores.blend import cross_validated, fit_weights
from pawpular.scores.metrics import rmse
from pawpular.store.files import read_json


def _copy(run: Path, dst: Path) -> Path:
    return Path(shutil.copytree(run, dst))


def _status(capsys, data: Path, out: Path, *extra: str) -> dict[str, str]:
    capsys.readouterr()
    assert cli.main(["status", *tiny_args(data, out), *extra]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines()[1:-1] if not line.startswith("scores: ")]
    return {line.split()[0]: line.split()[1] for line in lines}


@pytest.mark.slow
def test_a_changed_lr_retrains_and_downstream_refuses_until_recomputed(
    experiment_run, small_competition, tmp_path, caplog, capsys
):
    """Old: `train --set train.lr=...` said "already trained, skipping", rewrote config.yaml, embed "reused"."""
    run = _copy(experiment_run, tmp_path / "run")
    caplog.set_level("INFO", logger="pawpular")
    assert cli.main(["train", *tiny_args(small_competition, run), "--set", "train.lr=1e-3"]) == 0
    assert "train.lr 0.004 -> 0.001" in caplog.text and "already trained" not in caplog.text
    assert (run / "train/fold0/best.pt").read_bytes() != (experiment_run / "train/fold0/best.pt").read_bytes()
    assert load_config(run / "config.yaml").train.lr == pytest.approx(1e-3)
    assert _status(capsys, small_competition, run, "--set", "train.lr=1e-3") == {
        "folds": "done",
        "train": "done",
        "embed": "stale",
        "svr": "stale",
        "ensemble": "stale",
    }
    assert cli.main(["ensemble", *tiny_args(small_competition, run), "--set", "train.lr=1e-3"]) == 2
    assert "ensemble needs embed, which is stale" in capsys.readouterr().err
    caplog.clear()
    assert cli.main(["all", *tiny_args(small_competition, run), "--set", "train.lr=1e-3"]) == 0
    assert "fold0=computed" in caplog.text and "train: cached" in caplog.text


def test_config_yaml_says_what_made_the_artifacts(experiment_run, small_competition, tmp_path, capsys):
    """Old: any stage rewrote config.yaml with the command's settings, including sections it never used."""
    run = _copy(experiment_run, tmp_path / "run")
    assert (
        cli.main(
            [
                "ensemble",
                *tiny_args(small_competition, run),
                "--set",
                "ensemble.method=hill",
                "--set",
                "model.drop_rate=0.5",
            ]
        )
        == 2
    )  # refused: train would be stale
    assert (
        load_config(run / "config.yaml").model.drop_rate == load_config(experiment_run / "config.yaml").model.drop_rate
    )
    assert cli.main(["ensemble", *tiny_args(small_competition, run), "--set", "ensemble.method=hill"]) == 0
    saved = load_config(run / "config.yaml")
    assert saved.ensemble.method == "hill" and saved.train.lr == load_config(experiment_run / "config.yaml").train.lr


@pytest.mark.slow
def test_more_svr_trials_then_export_refuses_the_stale_blend(experiment_run, small_competition, tmp_path, capsys):
    """Old: new SVR heads shipped with the old blend weights; predict differed from submission.csv; "ensemble ok"."""
    run = _copy(experiment_run, tmp_path / "run")
    more = ["--set", "svr.n_trials=12", "--set", "svr.c_max=20"]  # the old best C (37) is out of the new range
    assert cli.main(["svr", *tiny_args(small_competition, run), *more]) == 0
    assert (run / "svr/oof.parquet").read_bytes() != (experiment_run / "svr/oof.parquet").read_bytes()
    capsys.readouterr()
    assert cli.main(["export", "--output", str(run), "--to", str(tmp_path / "art")]) == 2
    err = capsys.readouterr().err
    assert "ensemble is stale" in err and "svr/oof.parquet changed" in err and "run `pawpular ensemble`" in err
    assert not (tmp_path / "art").exists()
    assert cli.main(["report", "--output", str(run), "--data", str(small_competition)]) == 0
    doc = (run / "report.html").read_text()
    assert 'data-stage="ensemble" data-state="stale"' in doc and "no longer match their inputs" in doc
    assert cli.main(["ensemble", *tiny_args(small_competition, run), *more]) == 0
    assert cli.main(["export", "--output", str(run), "--to", str(tmp_path / "art")]) == 0


def test_status_on_a_fresh_a_finished_and_a_partly_stale_experiment(
    experiment_run, small_competition, tmp_path, capsys
):
    assert set(_status(capsys, small_competition, tmp_path / "fresh").values()) == {"missing"}
    assert set(_status(capsys, small_competition, experiment_run).values()) == {"done"}
    stale = _status(capsys, small_competition, experiment_run, "--set", "svr.c_max=50")
    assert stale == {"folds": "done", "train": "done", "embed": "done", "svr": "stale", "ensemble": "stale"}
    assert cli.main(["status", *tiny_args(small_competition, experiment_run), "--set", "svr.c_max=50"]) == 0
    out = capsys.readouterr().out
    assert "svr.c_max 100.0 -> 50.0" in out and "upstream svr is stale" in out and "recomputes svr, ensemble" in out
    weights = read_json(experiment_run / "ensemble" / "weights.json")  # the score to trust first, then the others
    assert (
        f"scores: nested RMSE {weights['nested_rmse']['ensemble']:.3f} (the one to trust); optimistic: "
        f"cross-validated {weights['oof_rmse']['ensemble_cv']:.3f}"
    ) in out


def test_a_cached_rerun_keeps_the_timings_of_the_work(experiment_run, small_competition, tmp_path):
    """Old: a fully cached `all` overwrote timings.json with cache-hit times (train 0.2 s)."""
    run = _copy(experiment_run, tmp_path / "run")
    before = (run / "timings.json").read_bytes()
    assert cli.main(["all", *tiny_args(small_competition, run)]) == 0
    assert (run / "timings.json").read_bytes() == before and read_json(run / "timings.json")["train"] > 1


# ---------------------------------------------------------------------------------------------------------------
# Scores the user can quote


def test_cross_validated_blend_never_sees_the_rows_it_scores():
    rng = np.random.default_rng(0)
    y = rng.uniform(1, 100, 400)
    oof = y[:, None] + rng.normal(0, [8, 12, 20, 30], (400, 4))
    fold = np.arange(400) % 5
    score, pred = cross_validated(oof, y, fold, ["a", "b", "c", "d"])
    in_sample = rmse(np.clip(oof @ fit_weights(oof, y, list("abcd")).weights, 1, 100), y)
    assert score >= in_sample - 1e-9 and score == pytest.approx(rmse(pred, y))
    y2 = y.copy()
    y2[fold == 2] += 40  # the held-out fold's own targets move; its predictions must not
    _, pred2 = cross_validated(oof, y2, fold, ["a", "b", "c", "d"])
    np.testing.assert_array_equal(pred[fold == 2], pred2[fold == 2])
    assert not np.allclose(pred[fold != 2], pred2[fold != 2])


@pytest.mark.slow
def test_holdout_is_never_fit_on_and_scored_once(small_competition, tmp_path, caplog):
    out = tmp_path / "exp"
    caplog.set_level("INFO", logger="pawpular")
    assert cli.main(["all", *tiny_args(small_competition, out), "--set", "folds.holdout=0.25"]) == 0
    folds = pd.read_csv(out / "folds" / "folds.csv", dtype={"Id": str})
    held = set(folds.loc[folds["fold"] == -1, "Id"])
    assert 0.2 * len(folds) <= len(held) <= 0.3 * len(folds)
    train = pd.read_csv(small_competition / "train.csv", dtype={"Id": str}).set_index("Id")["Pawpularity"]
    for head in ("train", "svr", "ensemble"):
        assert not held & set(pd.read_parquet(out / head / "oof.parquet")["Id"]), f"{head} OOF covers the holdout"
        assert set(pd.read_parquet(out / head / "holdout.parquet")["Id"]) == held
    for k in range(3):  # each fold trained on the other folds' rows only
        n_train = int(((folds["fold"] != k) & (folds["fold"] != -1)).sum())
        assert f"fold {k}: {n_train} train / {int((folds['fold'] == k).sum())} val images" in caplog.text
    h = pd.read_parquet(out / "ensemble" / "holdout.parquet")
    weights = read_json(out / "ensemble" / "weights.json")
    assert weights["holdout_rmse"]["ensemble"] == pytest.approx(rmse(h["pred"], train.loc[h["Id"]]))
    assert weights["holdout_rmse"]["rows"] == len(held) and "holdout RMSE" in caplog.text
    assert "ensemble_cv" in weights["oof_rmse"]


def test_a_head_worse_than_the_mean_is_a_loud_warning(make_cfg, small_competition, caplog):
    from conftest import adopt_folds, plant_finished

    from pawpular.runner import Context, run_planned

    cfg = make_cfg(small_competition)
    comp_train = pd.read_csv(small_competition / "train.csv", dtype={"Id": str})
    test_ids = pd.read_csv(small_competition / "test.csv", dtype={"Id": str})["Id"]
    fold = np.arange(len(comp_train)) % 5
    adopt_folds(cfg, pd.DataFrame({"Id": comp_train["Id"], "fold": fold}))
    rng = np.random.default_rng(0)
    y = comp_train["Pawpularity"].to_numpy(float)
    for head, noise in (("train", 4.0), ("svr", 60.0)):
        (cfg.out / head).mkdir(parents=True)
        pd.DataFrame(
            {"Id": comp_train["Id"], "fold": fold, "pred": np.clip(y + rng.normal(0, noise, len(y)), 1, 100)}
        ).to_parquet(cfg.out / head / "oof.parquet")
        pd.DataFrame({"Id": test_ids, "pred": 40.0}).to_parquet(cfg.out / head / "test.parquet")
        plant_finished(cfg.out, cfg.out / head)
    with caplog.at_level("WARNING", logger="pawpular"):
        run_planned(Context(cfg, "cpu"), "ensemble")
    bad = read_json(cfg.out / "ensemble" / "weights.json")["worse_than_mean"]
    assert any(b.startswith("svr OOF RMSE") for b in bad) and not any(b.startswith("nn ") for b in bad)
    assert "WARNING: svr OOF RMSE" in caplog.text
