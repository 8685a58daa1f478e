"""Fast unit tests of the maths under the stages (no pipeline run): fold assignment, blend weights and their
cross-validated score. The SVR head's kernel, scaler and arrays: tests/test_heads.py."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pawpular.data.splits import make_folds, sturges_bins
from pawpular.data.tables import TARGET
from pawpular.scores.blend import canonical, cross_validated, fit_weights
from pawpular.scores.metrics import rmse


def _train(n: int = 600, seed: int = 0) -> pd.DataFrame:
    y = np.clip(np.random.default_rng(seed).gamma(3.0, 12.0, n), 1, 100).round()
    return pd.DataFrame({"Id": [f"id{i}" for i in range(n)], TARGET: y})


def test_folds_every_row_once_balanced_stratified_and_seeded():
    train = _train()
    fold = make_folds(train, 5, seed=7)
    assert sorted(set(fold)) == [0, 1, 2, 3, 4]
    sizes = np.bincount(fold)
    assert sizes.max() - sizes.min() <= 1
    bins = sturges_bins(train[TARGET].to_numpy())
    for b in np.unique(bins):  # every target bin is spread over the folds as evenly as its size allows
        per_fold = np.bincount(fold[bins == b], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1
    assert (make_folds(train, 5, seed=7) == fold).all() and not (make_folds(train, 5, seed=8) == fold).all()


def test_groups_stay_together_and_the_holdout_is_its_share():
    train = _train()
    groups = np.arange(len(train)) // 3  # 200 groups of 3 photos
    fold = make_folds(train, 4, seed=1, groups=groups, holdout=0.2)
    assert all(len(set(fold[groups == g])) == 1 for g in np.unique(groups))
    held = fold == -1
    assert abs(held.mean() - 0.2) < 0.02 and sorted(set(fold[~held])) == [0, 1, 2, 3]
    assert abs(train[TARGET][held].mean() - train[TARGET].mean()) < 3  # stratified like the folds


def test_sturges_bins_count():
    y = np.linspace(1, 100, 1000)
    bins = sturges_bins(y)
    assert len(np.unique(bins)) == int(np.ceil(np.log2(1000))) + 1


def test_convex_weights_are_the_exact_constrained_least_squares():
    """Two models: the best w in [0, 1] of w a + (1 - w) b has a closed form; SLSQP must find it."""
    rng = np.random.default_rng(3)
    y = rng.uniform(1, 100, 500)
    a, b = y + rng.normal(0, 9, 500), y + rng.normal(2, 14, 500)
    w = np.clip(np.dot(b - y, b - a) / np.dot(b - a, b - a), 0, 1)
    blend = fit_weights(np.c_[a, b], y, ["a", "b"], "convex")
    assert blend.weights == pytest.approx([w, 1 - w], abs=1e-6) and blend.weights.sum() == pytest.approx(1)
    assert (fit_weights(np.c_[a, b], y, ["a", "b"], "nnls").weights == blend.weights).all()  # the old name
    assert canonical("nnls") == "convex" and canonical("hill") == "hill"


def test_cross_validated_score_refits_without_each_fold():
    rng = np.random.default_rng(4)
    y = rng.uniform(1, 100, 400)
    oof = y[:, None] + rng.normal(0, [8, 12, 30], (400, 3))
    fold = np.arange(400) % 4
    score, pred = cross_validated(oof, y, fold, list("abc"))
    for k in range(4):  # each fold's rows are predicted by weights that never saw them
        w = fit_weights(oof[fold != k], y[fold != k], list("abc")).weights
        assert np.allclose(pred[fold == k], np.clip(oof[fold == k] @ w, 1, 100))
    assert score == pytest.approx(rmse(pred, y))
    assert score < min(rmse(oof[:, j], y) for j in range(3))  # the blend of three noisy copies beats each
