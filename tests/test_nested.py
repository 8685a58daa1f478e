"""Scores a Kaggler can trust (issues 34, 42): the nested choice and the paired bootstrap over duplicate groups
(scores/nested.py, compare.py) as maths, then on real tiny experiments: each fold ships the epoch its trusted score
describes (own-best checkpoints make every score optimistic), a new TTA leaves no stale nested score, the nested SVR
and blend are what their files say, and `runs --baseline` widens its verdicts by the seed spread of its repeats."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import build_run, tiny_args

from pawpular.scores import compare, nested

# --- the maths ----------------------------------------------------------------------------------------------------


def test_leave_one_out_chooses_on_the_other_folds_only():
    # candidate 0 is best on fold 0 alone; on folds 1 and 2 together candidate 1 is best
    loss = np.array([[0.0, 9.0, 9.0], [5.0, 1.0, 2.0], [5.0, 2.0, 1.0]])
    assert nested.leave_one_out(loss).tolist() == [1, 2, 1]  # fold 0: a tie of 1 and 2 -> the earlier
    assert nested.leave_one_out(np.array([[1.0, np.nan], [2.0, 2.0]])).tolist() == [1, 1]  # NaN: never chosen
    with pytest.raises(ValueError, match="folds >= 2"):
        nested.leave_one_out(np.ones((3, 1)))


def test_epoch_choice_uses_the_epochs_every_fold_ran_and_never_its_own_curve():
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
            # fold k's own curve has no say: make its every other epoch perfect and its choice stays
            rigged = [
                c if j != k else [0.0 if i != e - 1 else 99.0 for i in range(len(c))] for j, c in enumerate(curves)
            ]
            assert nested.epoch_choice(rigged)[k] == e


def test_nested_rmse_of_sse_tables():
    sse = np.array([[4.0, 16.0], [9.0, 1.0]])
    counts = np.array([1, 1])
    assert nested.nested_rmse(sse, counts, [0, 1]) == pytest.approx(np.sqrt(5 / 2))
    assert nested.optimistic_rmse(sse, counts) == pytest.approx(np.sqrt(10 / 2))


def test_a_nested_choice_never_scores_below_the_optimistic_one():
    """The order docs/experiments.md promises: where the optimistic choice minimizes the score over fixed candidates
    (the SVR's C and width on all rows, each fold's own best epoch), the choice made without each fold cannot score
    below it. Random loss tables with few candidates and folds, where a leak would show."""
    rng = np.random.default_rng(5)
    for _ in range(500):
        sse = rng.uniform(0, 10, (int(rng.integers(1, 5)), int(rng.integers(2, 5))))
        counts = rng.integers(1, 4, sse.shape[1])
        score = nested.nested_rmse(sse, counts, nested.leave_one_out(sse))
        assert score >= nested.optimistic_rmse(sse, counts) - 1e-12  # one candidate best on all rows
        own_best = np.sqrt(sse.min(axis=0).sum() / counts.sum())  # each fold its own best (the own-best epoch)
        assert score >= own_best - 1e-12


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


def _fold_epochs(out, k: int) -> pd.DataFrame:
    from pawpular.store import artifacts

    return pd.read_parquet(artifacts.epoch_preds(out, k))


def _shipped(out) -> tuple[dict, dict]:
    """train/shipped.json, and the epoch each fold's best.pt was saved at."""
    import torch

    from pawpular.store import artifacts

    folds = sorted(int(k) for k in json.loads(artifacts.shipped_json(out).read_text())["epochs"])
    saved = {str(k): torch.load(artifacts.best_checkpoint(out, k), weights_only=True)["epoch"] for k in folds}
    return json.loads(artifacts.shipped_json(out).read_text()), saved


@pytest.mark.slow
def test_each_fold_ships_the_epoch_its_trusted_score_describes(experiment_run, tmp_path):
    """train.checkpoint: last (the default): best.pt is the last epoch's, export ships its weights, the NN's OOF
    and nested predictions are that epoch's, the blend's nested score is the one to trust and says so everywhere."""
    import torch
    from safetensors.torch import load_file

    from pawpular.scores import compare
    from pawpular.ship.exporter import export
    from pawpular.store import artifacts

    out = experiment_run
    shipped, saved = _shipped(out)
    assert shipped == {"checkpoint": "last", "epochs": {"0": 2, "1": 2, "2": 2}, "trusted": True}
    assert saved == shipped["epochs"]  # the checkpoint embedded, exported and scored is the epoch recorded
    art = export(out, tmp_path / "art")
    for k in range(3):  # the weights export ships are that checkpoint's, tensor for tensor
        ckpt = torch.load(artifacts.best_checkpoint(out, k), weights_only=True)["model"]
        model = load_file(artifacts.exported_model(art / "experiments" / out.name, k))
        assert model.keys() == ckpt.keys() and all(torch.equal(model[n], ckpt[n].cpu()) for n in ckpt)
    oof, nn = pd.read_parquet(artifacts.preds(out, "nn", "oof")), pd.read_parquet(artifacts.nested_preds(out, "nn"))
    both = oof.merge(nn, on=["Id", "fold"], suffixes=("_oof", "_nested"))
    assert len(both) == len(oof) == len(nn) and np.array_equal(both["pred_oof"], both["pred_nested"])
    for k in range(3):  # the predictions are the shipped (last) epoch's, whatever epoch the fold's own curve prefers
        fold = both[both["fold"] == k].merge(_fold_epochs(out, k), on="Id")
        assert np.allclose(fold["pred_nested"], fold["epoch_2"])
    weights = json.loads(artifacts.weights_json(out).read_text())
    assert weights["trusted"] is True and "nested_rmse.ensemble is the score to trust" in weights["trust"]
    assert "(the one to trust)" in compare.score_line(weights)


BEST = ("train.checkpoint=best", "train.epochs=3")


@pytest.fixture(scope="module")
def best_run(small_competition, tmp_path_factory):
    """The tiny run shipping each fold's own best epoch (3 epochs: room for the best to be another than the last)."""
    return build_run(small_competition, tmp_path_factory.mktemp("best") / "best", *BEST)


@pytest.mark.slow
def test_own_best_checkpoints_make_every_score_optimistic(best_run):
    """train.checkpoint: best ships each fold's own best epoch: the nested NN epoch (chosen on the other folds'
    curves) is not the one shipped, so nothing is called the one to trust; the nested NN score is never below the
    own-best one (each fold's own best minimizes that fold's error)."""
    from pawpular.scores import compare
    from pawpular.store import artifacts

    out = best_run
    shipped, saved = _shipped(out)
    assert shipped["checkpoint"] == "best" and shipped["trusted"] is False and saved == shipped["epochs"]
    curves = {k: pd.read_csv(artifacts.fold_metrics(out, k))["val_rmse"].tolist() for k in range(3)}
    assert saved == {str(k): int(np.argmin(c)) + 1 for k, c in curves.items()}  # each fold's own best
    oof, nn = pd.read_parquet(artifacts.preds(out, "nn", "oof")), pd.read_parquet(artifacts.nested_preds(out, "nn"))
    both = oof.merge(nn, on=["Id", "fold"], suffixes=("_opt", "_nested"))
    for k, e in zip(curves, nested.epoch_choice(list(curves.values())), strict=False):
        fold = both[both["fold"] == k].merge(_fold_epochs(out, k), on="Id")
        assert np.allclose(fold["pred_nested"], fold[f"epoch_{e}"])  # the epoch the other folds' curve chose
        assert np.allclose(fold["pred_opt"], fold[f"epoch_{saved[str(k)]}"])  # the epoch shipped
    weights = json.loads(artifacts.weights_json(out).read_text())
    assert weights["nested_rmse"]["nn"] >= weights["oof_rmse"]["nn"] - 1e-9
    assert weights["trusted"] is False and "no score here is to be trusted" in weights["trust"]
    assert "the one to trust" not in compare.score_line(weights) and "optimistic: own-best" in compare.score_line(
        weights
    )


@pytest.mark.slow
def test_runs_marks_an_optimistic_nested_score_in_its_table_and_page(experiment_run, best_run, tmp_path, capsys):
    """`pawpular runs`: the own-best run's nested score carries "opt." (text and HTML) with the legend saying what
    it means; the default run's nested score, the one to trust, carries none."""
    from pawpular import api
    from pawpular.cli import main as cli
    from pawpular.views.experiments_view import LEGEND, OPTIMISTIC_MARK

    df = api.runs(experiment_run, best_run).set_index("experiment")
    nested_of = {name: f"{df.loc[name, 'nested']:.3f}" for name in (experiment_run.name, best_run.name)}
    assert [df.loc[n, "nested_trusted"] for n in (experiment_run.name, best_run.name)] == [True, False]
    page = tmp_path / "runs.html"
    capsys.readouterr()
    assert cli.main(["runs", str(experiment_run), str(best_run), "--html", str(page)]) == 0
    table = capsys.readouterr().out.split("\n\n")[0]  # the table and its legend, before the settings that differ
    lines = {line.split()[0]: line for line in table.splitlines()}
    assert f"{nested_of[best_run.name]}{OPTIMISTIC_MARK}" in lines[best_run.name]
    assert nested_of[experiment_run.name] in lines[experiment_run.name]
    assert OPTIMISTIC_MARK.strip() not in lines[experiment_run.name]  # the only "opt." of a row is the mark
    assert LEGEND in lines.values()
    html = page.read_text()
    assert (
        f">{nested_of[best_run.name]}{OPTIMISTIC_MARK}</td>" in html
        and f">{nested_of[experiment_run.name]}</td>" in html
    )
    assert LEGEND.replace('"', "&quot;") in html
    assert cli.main(["runs", str(experiment_run)]) == 0
    assert LEGEND not in capsys.readouterr().out  # no marked row: no legend


def _tta_off(run, small_competition, dest, *extra: str):
    """A copy of ``run`` after `all` with train.tta_hflip=false: the NN OOF before and after, and the copy."""
    from pawpular.cli import main as cli
    from pawpular.store import artifacts

    out = shutil.copytree(run, dest)
    before = pd.read_parquet(artifacts.preds(out, "nn", "oof")).sort_values("Id")
    assert cli.main(["all", *tiny_args(small_competition, out, "train.tta_hflip=false", *extra)]) == 0
    after = pd.read_parquet(artifacts.preds(out, "nn", "oof")).sort_values("Id")
    assert not np.allclose(before["pred"], after["pred"])  # re-predicted with the new TTA
    assert not any(artifacts.epoch_preds(out, k).exists() for k in range(3))  # the old recipe's curves: gone
    return out, after, json.loads(artifacts.weights_json(out).read_text())


@pytest.mark.slow
def test_a_new_tta_re_derives_the_nested_nn_score_of_the_shipped_epoch(experiment_run, small_competition, tmp_path):
    """checkpoint last: the nested NN predictions are the shipped epoch's re-predicted OOF ones."""
    from pawpular.store import artifacts

    out, after, weights = _tta_off(experiment_run, small_competition, tmp_path / "run")
    nn = pd.read_parquet(artifacts.nested_preds(out, "nn")).merge(after, on=["Id", "fold"])
    assert len(nn) == len(after) and np.array_equal(nn["pred_x"], nn["pred_y"])
    assert weights["nested_rmse"]["nn"] == pytest.approx(weights["oof_rmse"]["nn"]) and weights["trusted"] is True


@pytest.mark.slow
def test_a_new_tta_leaves_no_nested_score_of_the_old_recipe(best_run, small_competition, tmp_path):
    """checkpoint best: the per-epoch predictions were the old recipe's and their weights are gone: no nested NN
    score rather than a stale one (the blend says which is missing)."""
    from pawpular.store import artifacts

    out, _, weights = _tta_off(best_run, small_competition, tmp_path / "run", *BEST)
    assert not artifacts.nested_preds(out, "nn").exists() and "ensemble" not in weights["nested_rmse"]
    assert "train/nested.parquet" in weights["nested_rmse"]["missing"]


@pytest.mark.slow
def test_nested_svr_picks_c_on_the_other_folds(experiment_run):
    import optuna

    from pawpular.stages.svr import FOLD_SSE
    from pawpular.store import artifacts

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
    assert best["nested_rmse"] >= best["oof_rmse"] - 1e-9  # C chosen without each fold never beats the all-rows C


@pytest.mark.slow
def test_runs_baseline_widens_by_the_seed_spread_of_its_repeats(experiment_run, small_competition, tmp_path, capsys):
    """The seed run retrains (another seed, same folds): given as the baseline's repeat, its distance from the
    baseline is the seed spread every verdict allows for. The bad-C run reuses the baseline's training and
    embeddings (copied) and retunes the SVR over C in [0.001, 0.003]: the SVR nearly predicts the mean."""
    from pawpular import api
    from pawpular.cli import main as cli

    seed = build_run(small_competition, tmp_path / "seed", "seed=1")
    bad = tmp_path / "bad_c"
    shutil.copytree(experiment_run, bad, ignore=shutil.ignore_patterns("svr", "ensemble", "submission.csv"))
    assert cli.main(["all", *tiny_args(small_competition, bad, "svr.c_min=0.001", "svr.c_max=0.003")]) == 0
    capsys.readouterr()
    plain = api.runs(experiment_run, seed, bad, baseline=experiment_run.name).set_index("experiment")
    df = api.runs(experiment_run, seed, bad, baseline=experiment_run.name, repeats=[str(seed)])
    by = df.set_index("experiment")
    rmse_of = {
        f: float(np.sqrt(compare.nested_table(f).eval("(pred - target) ** 2").mean())) for f in (experiment_run, seed)
    }
    spread = abs(rmse_of[seed] - rmse_of[experiment_run])
    assert spread > 0 and by.loc["seed", "verdict"] == "seed repeat"
    assert by.loc["seed", "vs_baseline"] == pytest.approx(rmse_of[seed] - rmse_of[experiment_run])
    assert (by.loc["bad_c", "low"], by.loc["bad_c", "high"]) == (plain.loc["bad_c", "low"], plain.loc["bad_c", "high"])
    expected = nested.Difference(0.0, by.loc["bad_c", "low"], by.loc["bad_c", "high"], 0, 0, spread=spread).verdict
    assert by.loc["bad_c", "verdict"] == expected  # the interval widened by the spread decides
    assert plain.loc["bad_c", "verdict"] == "worse" and plain.loc["bad_c", "low"] > 0
    assert by.loc[experiment_run.name, "verdict"] == "baseline"
    inside = {(r["experiment"], r["part"]): r for r in df.attrs["inside"]}
    assert inside[("bad_c", "svr head vs nn head")]["verdict"] == "worse"
    args = ["runs", str(experiment_run), str(seed), str(bad), "--baseline", experiment_run.name]
    assert cli.main([*args, "--repeats", "seed"]) == 0
    text = capsys.readouterr().out
    assert f"against {experiment_run.name}" in text and f"widened by the seed spread {spread:.3f}" in text
    assert "over duplicate groups (" in text  # the tiny competition has duplicates: groups were resampled
    assert cli.main(args) == 0
    assert "row noise only" in capsys.readouterr().out


def test_the_header_names_what_was_resampled_and_a_spread_widens_the_verdict(tmp_path):
    """Without folds/duplicates.csv (folds.group_duplicates: false) rows are resampled one by one, and the header
    says so; a difference beyond the row noise but within the seed spread is "within noise"."""
    rng = np.random.default_rng(0)
    y = rng.uniform(1, 100, 400)
    base = pd.DataFrame({"Id": [f"i{i}" for i in range(400)], "fold": np.arange(400) % 4, "target": y})
    for name, noise in (("base", 15.0), ("other", 12.0)):
        path = tmp_path / name / "ensemble" / "nested.parquet"
        path.parent.mkdir(parents=True)
        base.assign(pred=y + rng.normal(0, noise, 400)).to_parquet(path)
    rows = compare.against(tmp_path / "base", [tmp_path / "base", tmp_path / "other"])
    assert rows[1]["verdict"] == "better" and rows[1]["groups"] == rows[1]["rows"] == 400
    assert "over single rows (the baseline's folds hold no duplicate groups" in compare.text("base", rows, [])
    d = nested.Difference(rows[1]["delta"], rows[1]["low"], rows[1]["high"], 400, 400)
    wide = d.with_spread(-rows[1]["high"] + 0.01)
    assert wide.verdict == "within noise" and d.with_spread(-rows[1]["high"] - 0.01).verdict == "better"


def test_a_blend_member_on_a_start_of_select_starts_is_labelled_optimistic(tmp_path):
    """`select --starts` prints no nested score: its starts' sets were chosen on all rows. A blend whose member
    experiment holds start 2's sets (found in the source's selection.json) is optimistic, named for that member;
    sets no start chose leave it trusted."""
    from types import SimpleNamespace

    from pawpular.scores import trust
    from pawpular.store import artifacts
    from pawpular.store.files import write_json

    main, start2 = tmp_path / "main", tmp_path / "main-start2"
    starts = [{"start": "a", "features": ["a"]}, {"start": "b", "features": ["b", "c"]}]
    artifacts.selection_json(main).parent.mkdir(parents=True)
    write_json(artifacts.selection_json(main), {"chosen": ["a"], "starts": starts})
    start2.mkdir()
    cfg = SimpleNamespace(svr=SimpleNamespace(features=["d"]), embed=SimpleNamespace(source="pretrained"))
    members, heads = [("", main), ("s2_", start2)], {"": ["svr"], "s2_": ["svr"]}
    start_2 = "main-start2's svr.features ['c', 'b'] were chosen by pawpular select on all rows"
    for features, expected in ((["c", "b"], start_2), (["b"], None)):
        artifacts.config_yaml(start2).write_text(f"svr:\n  features: [{', '.join(features)}]\n")
        assert trust.optimistic_because(cfg, members, heads) == expected


@pytest.mark.slow
def test_precision_and_crop_retrain_the_folds_a_new_tta_does_not(experiment_run, small_competition, make_cfg):
    """What the nested NN score is built from stays current: a fold's weights key (what its best.pt and per-epoch
    predictions depend on) is the one its manifest recorded, and train.precision or model.square changes it (the
    folds retrain: new curves, new per-epoch predictions); train.tta_hflip does not (re-predicted, see above)."""
    from conftest import CONFIG, TINY

    from pawpular.runner import Context
    from pawpular.stages import train
    from pawpular.store import artifacts, manifest

    def key(*extra: str) -> str:
        return train.weights_key(
            Context(make_cfg(small_competition, *TINY, *extra, config=str(CONFIG), out=experiment_run)), 0
        )

    recorded = manifest.read(artifacts.train_fold_dir(experiment_run, 0) / "manifest.json").info["weights_key"]
    assert key() == recorded == key("train.tta_hflip=false")
    assert key("train.precision=bf16") != recorded and key("model.square=crop") != recorded
