"""Scores a Kaggler can trust (issue 34): the nested choice and the paired bootstrap over duplicate groups
(nested.py, compare.py) as maths, then on real tiny experiments: the nested NN score is never below the optimistic
one, the nested SVR and blend are what their files say, two seeds come out within noise, a bad C range beyond it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import build_run, tiny_args

from pawpular import compare, nested

# --- the maths ----------------------------------------------------------------------------------------------------


def test_leave_one_out_chooses_on_the_other_folds_only():
    # candidate 0 is best on fold 0 alone; on folds 1 and 2 together candidate 1 is best
    loss = np.array([[0.0, 9.0, 9.0], [5.0, 1.0, 2.0], [5.0, 2.0, 1.0]])
    assert nested.leave_one_out(loss).tolist() == [1, 2, 1]  # fold 0: a tie of 1 and 2 -> the earlier
    assert nested.leave_one_out(np.array([[1.0, np.nan], [2.0, 2.0]])).tolist() == [1, 1]  # NaN: never chosen
    with pytest.raises(ValueError, match="folds >= 2"):
        nested.leave_one_out(np.ones((3, 1)))


def test_epoch_choice_uses_the_epochs_every_fold_ran_and_is_never_below_each_folds_own_best():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n_folds = int(rng.integers(2, 6))
        curves = [list(rng.uniform(10, 20, int(rng.integers(1, 8)))) for _ in range(n_folds)]
        epochs = nested.epoch_choice(curves)
        common = min(map(len, curves))
        assert all(1 <= e <= common for e in epochs)
        for k, e in enumerate(epochs):
            others = np.mean([c[:common] for j, c in enumerate(curves) if j != k], axis=0)
            assert others[e - 1] == others.min()
            assert curves[k][e - 1] >= min(curves[k])  # each fold's own best epoch is the optimistic choice


def test_nested_rmse_of_sse_tables():
    sse = np.array([[4.0, 16.0], [9.0, 1.0]])
    counts = np.array([1, 1])
    assert nested.nested_rmse(sse, counts, [0, 1]) == pytest.approx(np.sqrt(5 / 2))
    assert nested.optimistic_rmse(sse, counts) == pytest.approx(np.sqrt(10 / 2))


def test_paired_bootstrap_resamples_groups_not_rows():
    rng = np.random.default_rng(1)
    y = rng.uniform(1, 100, 300)
    a, b = y + rng.normal(0, 15, 300), y + rng.normal(0, 16, 300)
    d = nested.paired_bootstrap(a, b, y, seed=3)
    assert d.low < d.delta < d.high and d.groups == 300
    assert d.delta == pytest.approx(np.sqrt(np.mean((a - y) ** 2)) - np.sqrt(np.mean((b - y) ** 2)))
    swapped = nested.paired_bootstrap(b, a, y, seed=3)  # the same resamples: the interval mirrors
    assert (swapped.delta, swapped.low, swapped.high) == pytest.approx((-d.delta, -d.high, -d.low))
    # every row twice: as pairs (groups) the interval is the original one; as single rows it narrows (wrongly)
    twice = lambda v: np.repeat(v, 2)  # noqa: E731
    pairs = nested.paired_bootstrap(twice(a), twice(b), twice(y), np.repeat(np.arange(300), 2), seed=3)
    rows = nested.paired_bootstrap(twice(a), twice(b), twice(y), seed=3)
    assert (pairs.low, pairs.high) == pytest.approx((d.low, d.high))
    assert rows.high - rows.low < 0.8 * (pairs.high - pairs.low)
    same = nested.paired_bootstrap(a, a, y)
    assert (same.delta, same.low, same.high, same.verdict) == (0.0, 0.0, 0.0, "within noise")
    worse = nested.paired_bootstrap(y + rng.normal(0, 25, 300), a, y, fold=np.arange(300) % 3)
    assert worse.verdict == "worse" and worse.folds == 3 and worse.folds_won == 0


def test_group_codes_and_what_is_not_comparable():
    codes = nested.group_codes(["a", "b", "c", "d"], {"a": 7, "c": 7})
    assert codes[0] == codes[2] and len(set(codes)) == 3
    t = pd.DataFrame({"Id": list("abcd"), "fold": [0, 0, 1, 1], "pred": [1.0, 2, 3, 4], "target": [1.0, 2, 3, 5]})
    assert compare.paired(t, t.assign(pred=t["pred"] + 1), {}).delta < 0  # a is off on one row, b on three
    with pytest.raises(compare.NotComparable, match="different folds"):
        compare.paired(t, t.assign(fold=[0, 1, 1, 0]), {})
    with pytest.raises(compare.NotComparable, match="different rows"):
        compare.paired(t, t.iloc[:3], {})
    with pytest.raises(compare.NotComparable, match="different targets"):
        compare.paired(t, t.assign(target=0.0), {})


# --- real tiny experiments ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_nested_nn_score_is_never_below_the_optimistic_one(experiment_run):
    from pawpular import artifacts

    out = experiment_run
    oof, nn = pd.read_parquet(artifacts.preds(out, "nn", "oof")), pd.read_parquet(artifacts.nested_preds(out, "nn"))
    both = oof.merge(nn, on=["Id", "fold"], suffixes=("_opt", "_nested"))
    assert len(both) == len(oof) == len(nn)
    curves = {k: pd.read_csv(artifacts.fold_metrics(out, k))["val_rmse"].tolist() for k in sorted(oof["fold"].unique())}
    for k, e in zip(curves, nested.epoch_choice(list(curves.values())), strict=False):
        rows = pd.read_parquet(artifacts.epoch_preds(out, k))
        fold = both[both["fold"] == k].merge(rows, on="Id")
        assert np.allclose(fold["pred_nested"], fold[f"epoch_{e}"])  # the epoch the other folds' curve chose
        assert np.allclose(fold["pred_opt"], fold[f"epoch_{int(np.argmin(curves[k])) + 1}"])  # its own best
    weights = json.loads(artifacts.weights_json(out).read_text())
    assert weights["nested_rmse"]["nn"] >= weights["oof_rmse"]["nn"] - 1e-9
    assert "nested_rmse.ensemble is the score to trust" in weights["trust"]


@pytest.mark.slow
def test_nested_svr_picks_c_on_the_other_folds(experiment_run):
    import optuna

    from pawpular import artifacts
    from pawpular.stages.svr import FOLD_SSE

    out = experiment_run
    best = json.loads(artifacts.best_params(out).read_text())
    study = optuna.load_study(study_name=best["study_name"], storage=f"sqlite:///{artifacts.study_db(out)}")
    trials = [t for t in study.trials if t.state.name == "COMPLETE"]
    folds = sorted(best["nested_C"])
    choice = nested.leave_one_out(np.array([[t.user_attrs[FOLD_SSE][k] for k in folds] for t in trials]))
    assert best["nested_C"] == {k: trials[c].params["C"] for k, c in zip(folds, choice, strict=False)}
    oof, svr = pd.read_parquet(artifacts.preds(out, "svr", "oof")), pd.read_parquet(artifacts.nested_preds(out, "svr"))
    same = [int(k) for k in folds if best["nested_C"][k] == best["C"]]  # where C_k is the best C: the kept fits
    m = oof.merge(svr, on=["Id", "fold"])
    kept = m[m["fold"].isin(same)]
    assert len(m) == len(oof) and np.allclose(kept["pred_x"], kept["pred_y"])
    assert np.isfinite(best["nested_rmse"])


@pytest.mark.slow
def test_runs_baseline_two_seeds_within_noise_a_bad_c_range_beyond_it(
    experiment_run, small_competition, tmp_path, capsys
):
    """The seed run retrains (another seed, same folds); the bad-C run reuses the baseline's training and
    embeddings (copied) and retunes the SVR over C in [0.001, 0.003]: the SVR nearly predicts the mean."""
    from pawpular import api, cli

    seed = build_run(small_competition, tmp_path / "seed", "seed=1")
    bad = tmp_path / "bad_c"
    shutil.copytree(experiment_run, bad, ignore=shutil.ignore_patterns("svr", "ensemble", "submission.csv"))
    assert cli.main(["all", *tiny_args(small_competition, bad, "svr.c_min=0.001", "svr.c_max=0.003")]) == 0
    capsys.readouterr()
    df = api.runs(experiment_run, seed, bad, baseline=experiment_run.name)
    by = df.set_index("experiment")
    assert by.loc["seed", "verdict"] == "within noise" and by.loc["seed", "low"] < 0 < by.loc["seed", "high"]
    assert by.loc["bad_c", "verdict"] == "worse" and by.loc["bad_c", "low"] > 0
    assert by.loc[experiment_run.name, "verdict"] == "baseline"
    inside = {(r["experiment"], r["part"]): r for r in df.attrs["inside"]}
    assert inside[("bad_c", "svr head vs nn head")]["verdict"] == "worse"
    assert cli.main(["runs", str(experiment_run), str(seed), str(bad), "--baseline", experiment_run.name]) == 0
    text = capsys.readouterr().out
    assert f"against {experiment_run.name}" in text and "within noise" in text and "worse" in text
