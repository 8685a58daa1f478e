"""Forward selection of embedding sets (`pawpular select`).

The fixture is a tiny competition (no images) whose target is a function of three latents plus noise, and four
embedding sets: "model" (per fold) encodes latents 0 and 1 (most of the signal), the frozen "partial" encodes
latent 2 (the rest), "noise" encodes nothing, and "absent" is listed in embed.backbones without embeddings.
A working selection starts from "model", adds "partial" (it lowers the RMSE by several points), never adds
"noise" (it only dilutes the RBF distances), and skips "absent" saying so.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import adopt_folds, plant_finished

from pawpular.api import run_config
from pawpular.cli import main as cli
from pawpular.config.schema import load_config
from pawpular.data.splits import read_folds
from pawpular.data.tables import ID, META_COLS, TARGET, read_competition
from pawpular.scores.metrics import rmse
from pawpular.stages import select, svr
from pawpular.svr import head as svr_head
from pawpular.svr import study as svr_study

N_TRAIN, N_TEST, N_FOLDS = 150, 10, 3
BACKBONES = [{"name": n, "model": "resnet18"} for n in ("noise", "partial", "absent")]


def _emb(folder: Path, ids: list[str], x: np.ndarray, n_train: int) -> None:
    folder.mkdir(parents=True)
    for split, rows in (("train", slice(0, n_train)), ("test", slice(n_train, None))):
        table = pd.DataFrame({ID: ids[rows], **{f"e{j}": x[rows, j].astype(np.float32) for j in range(x.shape[1])}})
        table.iloc[::-1].to_parquet(folder / f"{split}.parquet", index=False)  # another row order than the CSVs
    plant_finished(folder.parent.parent, folder)


@pytest.fixture
def sel_exp(tmp_path) -> tuple[Path, Path, Path]:
    """(competition folder, experiment folder, config file) with folds.csv and the four sets' embeddings."""
    rng = np.random.default_rng(0)
    comp, out = tmp_path / "comp", tmp_path / "exp"
    comp.mkdir()
    n = N_TRAIN + N_TEST
    ids = [f"id{i:05d}" for i in range(n)]
    z = rng.standard_normal((n, 3))
    target = np.clip(
        np.round(38 + 10 * (np.sin(2 * z[:, 0]) + z[:, 1]) + 9 * z[:, 2] + 2 * rng.standard_normal(n)), 1, 100
    )
    flags = pd.DataFrame(rng.integers(0, 2, size=(n, len(META_COLS))), columns=META_COLS)
    table = pd.concat([pd.DataFrame({ID: ids}), flags], axis=1)
    table.iloc[:N_TRAIN].assign(**{TARGET: target[:N_TRAIN].astype(int)}).to_csv(comp / "train.csv", index=False)
    table.iloc[N_TRAIN:].to_csv(comp / "test.csv", index=False)
    pd.DataFrame({ID: ids[N_TRAIN:], TARGET: 50}).to_csv(comp / "sample_submission.csv", index=False)
    mix = rng.standard_normal((2, 12))
    for k in range(N_FOLDS):
        _emb(out / "emb" / f"fold{k}", ids, np.tanh(z[:, :2] @ mix) + 0.05 * rng.standard_normal((n, 12)), N_TRAIN)
    _emb(
        out / "emb" / "partial",
        ids,
        np.tanh(z[:, 2:3] @ rng.standard_normal((1, 4))) + 0.05 * rng.standard_normal((n, 4)),
        N_TRAIN,
    )
    _emb(out / "emb" / "noise", ids, rng.standard_normal((n, 12)), N_TRAIN)
    config = tmp_path / "select.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "experiment": "sel",
                "device": "cpu",
                "data_dir": str(comp),
                "output_dir": str(out),
                "folds": {"n_folds": N_FOLDS, "group_duplicates": False},
                "embed": {"backbones": BACKBONES},
                "svr": {"c_min": 0.5, "c_max": 200.0, "epsilon": 0.5},
            }
        )
    )
    adopt_folds(load_config(config), pd.DataFrame({ID: ids[:N_TRAIN], "fold": np.arange(N_TRAIN) % N_FOLDS}))
    return comp, out, config


def test_selection_adds_the_informative_set_and_never_the_noise(sel_exp):
    _, out, config = sel_exp
    path = run_config("select", load_config(config))
    assert path == out / "select" / "selection.json"
    result = json.loads(path.read_text())
    assert result["candidates"] == ["model", "noise", "partial"]
    assert "absent" in result["skipped"] and "emb/absent/" in result["skipped"]["absent"]
    single = {name: v["oof_rmse"] for name, v in result["single"].items()}
    assert set(single) == {"model", "noise", "partial"}
    # The informative set wins alone; noise alone is about as bad as predicting the mean.
    assert single["model"] == min(single.values())
    assert single["noise"] > single["model"] + 3
    steps = result["steps"]
    assert [s["added"] for s in steps] == ["model", "partial"]
    assert result["chosen"] == ["model", "partial"] and "noise" not in result["chosen"]
    # Monotone, each step better by at least the minimum, never worse than the best single set.
    rmses = [s["oof_rmse"] for s in steps]
    assert rmses[0] == pytest.approx(min(single.values()))
    assert all(a - b >= select.MIN_IMPROVEMENT for a, b in itertools.pairwise(rmses))
    assert result["oof_rmse"] == rmses[-1] <= min(single.values()) - 1.0  # partial helps by over a point
    # The last step stopped because adding noise does not help, and says so.
    assert result["rejected"]["set"] == "noise" and result["rejected"]["improvement"] < select.MIN_IMPROVEMENT
    assert result["set_line"] == "--set 'svr.features=[model,partial]'"
    # Every C lies in the configured range.
    assert all(0.5 <= s["C"] <= 200.0 for s in steps)


def test_reported_rmse_is_what_the_svr_stage_gets_with_those_sets(sel_exp):
    """Two paths: the selection's score of its chosen sets at its C == svr.load_folds + svr.fit_predict."""
    _, out, config = sel_exp
    result = json.loads(run_config("select", load_config(config)).read_text())
    cfg = load_config(config, [f"svr.features={result['chosen']}"])
    data = read_competition(cfg.data)
    folds, _, _ = svr.load_folds(cfg, data, read_folds(cfg.out, data.train, cfg.folds), "cpu")  # plain RBF fits
    pred = svr_head.fit_predict({"C": result["C"], "epsilon": cfg.svr.epsilon}, folds, "cpu")
    assert rmse(pred, data.train[TARGET].to_numpy(float)) == pytest.approx(result["oof_rmse"], abs=1e-3)
    assert not (out / "svr").exists()  # select never writes the svr stage's outputs


def test_forward_select_stops_below_the_minimum_improvement():
    scores = {
        ("a",): 10.0,
        ("b",): 11.0,
        ("c",): 12.0,
        ("a", "b"): 9.0,
        ("a", "c"): 9.5,
        ("a", "b", "c"): 9.0 - select.MIN_IMPROVEMENT / 2,
    }  # a real but too small gain
    steps, rejected = select.forward_select(["a", "b", "c"], lambda names: (scores[tuple(sorted(names))], 1.0))
    assert [s.added for s in steps] == ["a", "b"]
    assert [s.oof_rmse for s in steps] == [10.0, 9.0]
    assert rejected["set"] == "c" and rejected["improvement"] == pytest.approx(select.MIN_IMPROVEMENT / 2)
    steps, rejected = select.forward_select(
        ["a", "b", "c"], lambda names: (scores[tuple(sorted(names))], 1.0), min_improvement=0.0
    )
    assert [s.added for s in steps] == ["a", "b", "c"] and rejected == {}


def test_tune_c_is_deterministic_and_beats_every_grid_point(sel_exp):
    _, _, config = sel_exp
    cfg = load_config(config)
    data_comp = read_competition(cfg.data)
    data = select.load_train_sets(cfg, data_comp, read_folds(cfg.out, data_comp.train, cfg.folds), ["model"], "cpu")
    folds = data.folds(["model"], cfg.svr.gamma, "cpu")
    svr_head.attach_kernels(folds)
    grid = select.c_grid(0.5, 200.0)
    assert len(grid) == select.C_GRID_POINTS and grid[0] == pytest.approx(0.5) and grid[-1] == pytest.approx(200.0)
    best, c = select.tune_c(folds, data.y, grid, 0.5)
    assert select.tune_c(folds, data.y, grid, 0.5) == (best, c)
    on_grid = [rmse(svr_head.fit_predict({"C": g, "epsilon": 0.5}, folds), data.y) for g in grid]
    assert best <= min(on_grid) and grid[0] <= c <= grid[-1]


def test_cli_runs_and_prints_the_table_and_the_set_line(sel_exp, capsys):
    _, out, config = sel_exp
    assert cli.main(["select", "--config", str(config)]) == 0
    printed = capsys.readouterr().out
    assert "OOF RMSE" in printed and "--set 'svr.features=[model,partial]'" in printed
    assert (out / "select" / "selection.json").is_file()
    assert not list((out / "select").glob(".*.tmp"))  # written atomically: no temporary file left


def test_without_embeddings_the_error_says_run_embed(sel_exp, capsys):
    _, out, config = sel_exp
    import shutil

    shutil.rmtree(out / "emb")
    assert cli.main(["select", "--config", str(config)]) == 2
    assert "run `pawpular embed` first" in capsys.readouterr().err
    assert not (out / "select" / "selection.json").exists()


def test_cli_prints_each_sets_own_score_and_every_step(sel_exp, capsys):
    _, out, config = sel_exp
    assert cli.main(["select", "--config", str(config)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "select" / "selection.json").read_text())
    alone = printed.split("each set alone:")[1].split("step 2:")[0]
    for name, r in result["single"].items():  # every candidate's own score, as the JSON has it
        assert re.search(rf"^\s+{name}\s+{r['oof_rmse']:.4f}\s", alone, re.M), (name, alone)
    assert "absent" not in alone  # not embedded: named in the log, never scored
    step2 = printed.split("step 2:")[1].split("step 3:")[0]
    assert {n for n in result["steps"][1]["tried"]} == set(re.findall(r"\+ (\w+)", step2)) == {"noise", "partial"}
    assert re.search(r"\+ partial .*<- added", step2)
    step3 = printed.split("step 3:")[1]
    assert "+ noise" in step3 and "none added" in step3  # the step that stopped, with its try


def test_select_as_writes_the_choice_as_a_new_experiment_and_leaves_this_one(sel_exp, capsys):
    from pawpular.store.files import file_digest

    _, out, config = sel_exp
    taken = out.parent / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert cli.main(["select", "--config", str(config), "--as", "taken"]) == 2  # refused before any work
    assert not (out / "select").exists() and (taken / "notes.txt").read_text() == "mine"
    before = {p: file_digest(p) for p in out.rglob("*") if p.is_file()}
    assert cli.main(["select", "--config", str(config), "--as", "best"]) == 0
    assert "pawpular all --output" in capsys.readouterr().out
    new = out.parent / "best"
    saved = yaml.safe_load((new / "config.yaml").read_text())
    assert saved["svr"]["features"] == ["model", "partial"] and saved["experiment"] == "best"
    assert saved["output_dir"] == str(new)
    for k in range(N_FOLDS):  # the chosen sets and the folds are the same files, not copies
        assert (new / "emb" / f"fold{k}" / "train.parquet").samefile(out / "emb" / f"fold{k}" / "train.parquet")
    assert (new / "emb" / "partial" / "manifest.json").samefile(out / "emb" / "partial" / "manifest.json")
    assert (new / "folds" / "folds.csv").samefile(out / "folds" / "folds.csv")
    assert (new / "emb" / "noise" / "train.parquet").samefile(out / "emb" / "noise" / "train.parquet")  # left out
    assert not (new / "svr").exists() and not (new / "emb" / "manifest.json").exists()  # stages of its own
    assert {p: file_digest(p) for p in before} == before  # the source experiment is as it was (plus select/)
    assert cli.main(["select", "--config", str(config), "--as", "best"]) == 2  # never onto an earlier branch


@pytest.mark.parametrize("c_min,c_max", [(0.1, 100.0), (0.5, 200.0), (1e-3, 1e3)])
def test_the_edge_warning_fires_at_a_bound_and_not_inside(c_min, c_max):
    grid = select.c_grid(c_min, c_max)
    top, bottom = svr_study.c_at_edge(grid[-1], c_min, c_max), svr_study.c_at_edge(grid[0], c_min, c_max)
    assert "raise svr.c_max" in top and f"svr.c_max={c_max * 10:g}" in top and "c_min" not in top
    assert "lower svr.c_min" in bottom and "c_max=" not in bottom
    inside = grid[1:-1] + [float(np.sqrt(a * b)) for a, b in itertools.pairwise(grid)]  # select's refinements too
    assert all(svr_study.c_at_edge(c, c_min, c_max) is None for c in inside)
    assert svr_study.c_at_edge(c_max * 0.974, c_min, c_max) is not None  # the 97.4 of 100
    assert svr_study.c_at_edge(5.0, 5.0, 5.0) is None  # one value: no range to widen


def test_nested_selection_redoes_the_choice_without_each_fold():
    """Set "a" is perfect on fold 0 and a little worse than "b" elsewhere: selected on all rows, "a" wins; without
    fold 0, "b" does, so fold 0 is scored with "b" and the nested RMSE is above the optimistic one. A combination
    the full selection never tried is scored on demand."""
    y, fold_of = np.zeros(6), np.array([0, 0, 1, 1, 2, 2])
    pred = {"a": np.array([0, 0, 1.2, 1.2, 1.2, 1.2]), "b": np.ones(6), "ab": np.full(6, 10.0)}
    evaluated = {("a",): {1.0: pred["a"]}, ("b",): {1.0: pred["b"]}, ("a", "b"): {1.0: pred["ab"]}}
    asked = []

    def rescore(names):
        asked.append(tuple(names))
        evaluated[tuple(names)] = {1.0: pred["ab"]}

    result, nested_pred = select.nested_selection(["a", "b"], evaluated, rescore, y, fold_of, [1.0])
    assert {k: v["features"] for k, v in result["folds"].items()} == {"0": ["b"], "1": ["a"], "2": ["a"]}
    assert asked == [("b", "a")]
    assert np.allclose(nested_pred, [1, 1, 1.2, 1.2, 1.2, 1.2])
    assert result["nested_rmse"] == pytest.approx(np.sqrt((2 + 4 * 1.44) / 6))
    assert result["nested_rmse"] > rmse(pred["a"], y)  # what the selection on all rows reports


def test_select_reports_the_nested_score_and_each_steps_gain_against_the_noise(sel_exp, monkeypatch):
    """Each fold's C and first set are the best on the other folds' rows (from the OOF predictions of every
    combination the run evaluated), the fold is predicted with what it chose, and the nested RMSE is theirs."""
    _, out, config = sel_exp
    seen = {}
    real = select.nested_selection

    def spy(candidates, evaluated, rescore, y, fold_of, grid):
        result, pred = real(candidates, evaluated, rescore, y, fold_of, grid)
        seen.update(evaluated=evaluated, y=y, fold_of=fold_of, grid=grid, pred=pred)
        return result, pred

    monkeypatch.setattr(select, "nested_selection", spy)
    result = json.loads(run_config("select", load_config(config)).read_text())
    evaluated, y, fold_of, pred = seen["evaluated"], seen["y"], seen["fold_of"], seen["pred"]
    assert set(result["nested"]["folds"]) == {"0", "1", "2"}

    def other_sse(names: tuple, c: float, k: int) -> float:
        rows = (fold_of != k) & (fold_of >= 0)
        return float(((evaluated[names][c][rows] - y[rows]) ** 2).sum())

    for key, chosen in result["nested"]["folds"].items():
        k, names, rows = int(key), tuple(chosen["features"]), fold_of == int(key)
        assert chosen["C"] == min(seen["grid"], key=lambda c: (other_sse(names, c, k), c))  # C without fold k
        singles = [(n,) for n in ("model", "noise", "partial")]
        first = min(singles, key=lambda s: min(other_sse(s, c, k) for c in seen["grid"]))
        assert names[0] == first[0]  # the first set: the best single one without fold k
        assert np.array_equal(pred[rows], evaluated[names][chosen["C"]][rows])
    assert result["nested"]["nested_rmse"] == pytest.approx(rmse(pred[fold_of >= 0], y[fold_of >= 0]))
    (gain,) = result["gains"]  # model, then partial: one step adds
    assert gain["added"] == "partial" and gain["verdict"] == "better" and gain["high"] < 0


def test_one_loader_reads_a_frozen_set_once_and_the_model_per_fold(tmp_path, monkeypatch):
    """embedding_sets.read_sets, what the SVR stage and select both load sets with: a frozen backbone's table is
    read once for all folds, "model" once per fold, and a missing file is a MissingArtifact naming it."""
    from pawpular.machine import backend
    from pawpular.store import artifacts
    from pawpular.store.files import MissingArtifact
    from pawpular.svr import embedding_sets
    from pawpular.svr.head import embedding_table

    for name, fold in (("model", 0), ("model", 1), ("convnext", 0)):
        path = artifacts.set_file(tmp_path, name, "train", fold)
        path.parent.mkdir(parents=True, exist_ok=True)
        backend.write_table(embedding_table(["a", "b"], np.full((2, 3), fold, np.float32)), path, "cpu")
    reads = []
    real = backend.read_table
    monkeypatch.setattr(backend, "read_table", lambda path, device: reads.append(path) or real(path, device))
    frozen: dict = {}
    per_fold = [embedding_sets.read_sets(tmp_path, ["model", "convnext"], "train", k, "cpu", frozen) for k in (0, 1)]
    assert per_fold[0]["convnext"] is per_fold[1]["convnext"] and len(reads) == 3
    assert [float(s["model"]["e0"][0]) for s in per_fold] == [0.0, 1.0]
    missing = artifacts.set_file(tmp_path, "model", "test", 0)
    with pytest.raises(MissingArtifact, match=re.escape(str(missing))):
        embedding_sets.read_sets(tmp_path, ["model"], "test", 0, "cpu", frozen)
