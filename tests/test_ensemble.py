"""Ensemble: weights are a convex combination never worse than the best model; submissions are validated."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import adopt_folds, plant_finished

from pawpular.data.tables import read_competition
from pawpular.runner import Context, run_planned
from pawpular.scores.blend import fit_weights
from pawpular.scores.metrics import rmse
from pawpular.scores.submission import SubmissionError, validate_submission, write_submission


@pytest.mark.parametrize("method", ["convex", "nnls", "hill"])
def test_weights_convex_and_never_worse_than_best_single(method):
    for seed in range(20):
        rng = np.random.default_rng(seed)
        y = rng.uniform(1, 100, 300)
        k = int(rng.integers(2, 25))  # up to 24 models
        P = y[:, None] + rng.normal(rng.uniform(-5, 5, k), rng.uniform(3, 30, k), (300, k))
        b = fit_weights(P, y, [f"m{j}" for j in range(k)], method)
        assert (b.weights >= 0).all() and b.weights.sum() == pytest.approx(1.0)
        best = min(rmse(P[:, j], y) for j in range(k))
        assert rmse(P @ b.weights, y) <= best + 1e-9
        assert all(b.steps[i][1] >= b.steps[i + 1][1] - 1e-12 for i in range(len(b.steps) - 1))


def _exact_convex_mse(P: np.ndarray, y: np.ndarray) -> float:
    """The best convex combination's MSE by brute force: on every support, the equality-constrained least squares
    (a linear KKT system), kept where its weights are non-negative."""
    from itertools import combinations

    k, best = P.shape[1], np.inf
    for r in range(1, k + 1):
        for support in combinations(range(k), r):
            A = P[:, support]
            kkt = np.block([[2 * A.T @ A, np.ones((r, 1))], [np.ones((1, r)), np.zeros((1, 1))]])
            w = np.linalg.lstsq(kkt, np.r_[2 * A.T @ y, 1], rcond=None)[0][:r]
            if (w >= -1e-12).all():
                best = min(best, float(np.mean((A @ w - y) ** 2)))
    return best


@pytest.mark.parametrize("seed", range(4))
def test_convex_blend_reaches_the_exact_optimum_without_a_warning(seed, caplog):
    rng = np.random.default_rng(seed)
    y = rng.uniform(1, 100, 400)
    P = y[:, None] + rng.normal(rng.uniform(-5, 5, 5), rng.uniform(3, 30, 5), (400, 5))
    P[:, 4] = 0.7 * P[:, 0] + 0.3 * P[:, 1]  # a model that is a blend of two others: weights are not unique
    with caplog.at_level("WARNING", logger="pawpular"):
        b = fit_weights(P, y, list("abcde"), "convex")
    assert np.mean((P @ b.weights - y) ** 2) == pytest.approx(_exact_convex_mse(P, y), rel=1e-6)
    assert "did not reach the optimum" not in caplog.text


def test_convex_blend_warns_when_its_solver_stops_short(monkeypatch, caplog):
    from scipy.optimize import OptimizeResult

    import pawpular.scores.blend as blend

    monkeypatch.setattr(
        blend, "minimize", lambda *a, **k: OptimizeResult(x=np.array([0.5, 0.5]), success=True, message="stopped early")
    )
    rng = np.random.default_rng(0)
    y = rng.uniform(1, 100, 500)
    P = np.stack([y + rng.normal(0, 3, 500), y + rng.normal(0, 20, 500)], axis=1)  # the optimum is far from 0.5
    with caplog.at_level("WARNING", logger="pawpular"):
        blend.fit_weights(P, y, ["a", "b"], "convex")
    assert "did not reach the optimum (stopped early; duality gap" in caplog.text


def test_complementary_models_get_blended():
    rng = np.random.default_rng(0)
    y = rng.uniform(1, 100, 2000)
    P = np.stack([y + rng.normal(0, 10, 2000), y + rng.normal(0, 10, 2000)], axis=1)  # independent errors
    b = fit_weights(P, y, ["a", "b"], "nnls")
    assert b.weights == pytest.approx([0.5, 0.5], abs=0.05)
    assert rmse(P @ b.weights, y) < 0.8 * min(rmse(P[:, 0], y), rmse(P[:, 1], y))


def test_hill_climbing_drops_useless_models():
    rng = np.random.default_rng(1)
    y = rng.uniform(1, 100, 1000)
    good = y + rng.normal(0, 5, 1000)
    junk = rng.uniform(1, 100, (1000, 10))
    b = fit_weights(np.column_stack([good, junk]), y, ["good"] + [f"j{i}" for i in range(10)], "hill", 1e-3)
    assert b.weights[0] > 0.9


@pytest.fixture
def sample():
    return pd.DataFrame({"Id": ["a", "b", "c"], "Pawpularity": 38.0})


@pytest.mark.parametrize(
    "sub, message",
    [
        (pd.DataFrame({"Id": ["a", "b"], "Pawpularity": [1, 2]}), "missing c"),
        (pd.DataFrame({"Id": ["a", "b", "z"], "Pawpularity": [1, 2, 3]}), "not in the sample z"),
        (pd.DataFrame({"Id": ["a", "b", "c"], "Pawpularity": [1, np.nan, 3]}), "non-numeric Pawpularity for Ids b"),
        (pd.DataFrame({"Id": ["a", "b", "c"], "Pawpularity": [1, 2, 100.5]}), "outside [1, 100] for Ids c"),
        (pd.DataFrame({"Id": ["a", "b", "c"], "Pawpularity": [0.2, 2, 3]}), "outside [1, 100] for Ids a"),
        (pd.DataFrame({"Id": ["a", "b", "c"], "score": [1, 2, 3]}), "columns must be exactly Id,Pawpularity"),
        (pd.DataFrame({"Id": ["a", "a", "c"], "Pawpularity": [1, 2, 3]}), "duplicated Ids: a"),
    ],
)
def test_submission_validation_names_the_problem(sample, sub, message):
    with pytest.raises(SubmissionError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate_submission(sub, sample)


def test_write_submission_orders_clips_and_refuses_bad(sample, tmp_path):
    path = tmp_path / "submission.csv"
    sub = write_submission(pd.DataFrame({"Id": ["c", "a", "b"], "pred": [120.0, 0.0, 50.0]}), sample, path)
    assert sub["Id"].tolist() == ["a", "b", "c"] and sub["Pawpularity"].tolist() == [1.0, 50.0, 100.0]
    assert pd.read_csv(path)["Id"].tolist() == ["a", "b", "c"]
    path.unlink()
    with pytest.raises(SubmissionError, match="missing c"):
        write_submission(pd.DataFrame({"Id": ["a", "b"], "pred": [3.0, 4.0]}), sample, path)
    assert not path.exists() and not list(tmp_path.iterdir())


def _fake_head(out, head, comp, noise, seed):
    rng = np.random.default_rng(seed)
    y = comp.train["Pawpularity"].to_numpy(float)
    folds = np.arange(len(y)) % 5
    (out / head).mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"Id": comp.train["Id"], "fold": folds, "pred": y + rng.normal(0, noise, len(y))}).to_parquet(
        out / head / "oof.parquet"
    )
    pd.DataFrame({"Id": comp.test["Id"], "pred": rng.uniform(-5, 110, len(comp.test))}).to_parquet(
        out / head / "test.parquet"
    )
    plant_finished(out, out / head)


def _cfg_with_folds(make_cfg, comp_dir):
    cfg = make_cfg(comp_dir)
    ids = read_competition(comp_dir).train["Id"]
    adopt_folds(cfg, pd.DataFrame({"Id": ids, "fold": np.arange(len(ids)) % 5}))
    return cfg


def _run(cfg):
    """The ensemble stage on planted heads (they stand in for train and svr)."""
    run_planned(Context(cfg, "cpu"), "ensemble")
    return cfg.out / "submission.csv"


def test_stage_blends_heads_and_writes_a_valid_submission(make_cfg, small_competition, tmp_path):
    cfg = _cfg_with_folds(make_cfg, small_competition)
    comp = read_competition(small_competition)
    _fake_head(cfg.out, "train", comp, 12, 0)
    _fake_head(cfg.out, "svr", comp, 12, 1)
    other = tmp_path / "other_exp"
    _fake_head(other, "svr", comp, 15, 2)
    cfg.ensemble.experiments = [str(other)]
    path = _run(cfg)
    sub = pd.read_csv(path)
    assert sub["Id"].tolist() == comp.sample["Id"].tolist() and sub["Pawpularity"].between(1, 100).all()
    w = pd.read_json(cfg.out / "ensemble" / "weights.json", typ="series")
    assert set(w["weights"]) == {"nn", "svr", "other_exp/svr"}
    assert w["oof_rmse"]["ensemble"] <= min(w["oof_rmse"][n] for n in ("nn", "svr", "other_exp/svr"))


def test_stage_refuses_mismatched_folds(make_cfg, small_competition):
    cfg = _cfg_with_folds(make_cfg, small_competition)
    comp = read_competition(small_competition)
    _fake_head(cfg.out, "train", comp, 12, 0)
    _fake_head(cfg.out, "svr", comp, 12, 1)
    oof = pd.read_parquet(cfg.out / "svr" / "oof.parquet")
    oof["fold"] = (oof["fold"] + 1) % 5
    oof.to_parquet(cfg.out / "svr" / "oof.parquet")
    with pytest.raises(ValueError, match="different folds"):
        _run(cfg)
    assert not (cfg.out / "submission.csv").exists()
