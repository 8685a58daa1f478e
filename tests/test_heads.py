"""The SVR head as arrays: what ships computes what the fitted estimator computes, and loading runs no code."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
from sklearn.svm import SVR

from pawpular.store.files import ArtifactError
from pawpular.svr.head import HI, LO, RbfKernel, Standardizer, SvrHead, rbf_kernel


def _data(n: int = 300, d: int = 7, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(3.0, [1, 2, 5, 0.5, 1, 1, 3], (n, d))
    y = 40 + 8 * x[:, 0] - 3 * x[:, 2] + rng.normal(0, 4, n)
    return x, y


def test_rbf_kernel_is_the_definition():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(9, 4)), rng.normal(size=(5, 4))
    want = np.exp(-0.3 * ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    np.testing.assert_allclose(rbf_kernel(a, b, 0.3), want, rtol=1e-12, atol=1e-15)
    diag = rbf_kernel(a, a, 0.3).diagonal()
    assert (diag <= 1.0).all() and np.allclose(diag, 1.0, atol=1e-12)  # the clamp: never exp of a negative distance


def test_standardizer_matches_scikit_learn_and_keeps_constant_columns():
    from sklearn.preprocessing import StandardScaler

    x, _ = _data()
    x[:, 3] = 2.5  # a constant column: scale 1, as scikit-learn
    ours, theirs = Standardizer.fit(x), StandardScaler().fit(x)
    np.testing.assert_allclose(ours.transform(x), theirs.transform(x), atol=1e-12)
    assert ours.scale[3] == 1.0


@pytest.mark.parametrize("kernel", ["rbf", "callable"])
def test_shipped_head_predicts_what_the_estimator_predicts(kernel, tmp_path):
    x, y = _data()
    scaler = Standardizer.fit(x[:240])
    x_train, x_new = scaler.transform(x[:240]), scaler.transform(x[240:])
    gamma = 1.0 / (x.shape[1] * x_train.var())
    reference = SVR(kernel="rbf", gamma=gamma, C=30.0, epsilon=0.5).fit(x_train, y[:240])  # scikit-learn's own
    model = reference if kernel == "rbf" else SVR(kernel=RbfKernel(gamma), C=30.0, epsilon=0.5).fit(x_train, y[:240])
    columns = [f"f{j}" for j in range(x.shape[1])]
    head = SvrHead.from_fitted(model, x_train, scaler, gamma, columns, fold=2, params={"C": 30.0, "epsilon": 0.5})
    assert 0 < len(head.dual_coef) < 240  # an SVR keeps only some rows: the arrays hold exactly those
    np.testing.assert_allclose(head.decision(x_new), model.predict(x_new), atol=1e-6)
    np.testing.assert_allclose(head.decision(x_new), reference.predict(x_new), atol=1e-6)  # our kernel = sklearn's rbf

    path = tmp_path / "head.safetensors"
    path.write_bytes(head.to_bytes())
    loaded = SvrHead.load(path)
    assert (loaded.columns, loaded.fold, loaded.gamma, loaded.params) == (
        columns,
        2,
        gamma,
        {"C": 30.0, "epsilon": 0.5},
    )
    table = pd.DataFrame(x[240:], columns=columns).assign(extra=1.0)[["extra", *columns[::-1]]]  # any column order
    np.testing.assert_allclose(loaded.predict(table), np.clip(model.predict(x_new), LO, HI), atol=1e-6)
    assert head.to_bytes() == loaded.to_bytes()  # deterministic bytes: a rerun writes the same file


def test_decision_in_blocks_equals_one_block(monkeypatch):
    from pawpular.svr import head as heads

    x, y = _data(400)
    model = SVR(gamma=0.1, C=10.0).fit(x[:300], y[:300])
    head = SvrHead.from_fitted(model, x[:300], Standardizer(np.zeros(7), np.ones(7)), 0.1, list("abcdefg"), 0)
    whole = head.decision(x[300:])
    monkeypatch.setattr(heads, "ROWS_PER_BLOCK", 7)
    np.testing.assert_allclose(head.decision(x[300:]), whole, rtol=1e-12)  # BLAS rounds per block size


def test_missing_columns_and_foreign_files_are_named(tmp_path):
    x, y = _data(60)
    model = SVR(gamma=0.1).fit(x, y)
    head = SvrHead.from_fitted(model, x, Standardizer(np.zeros(7), np.ones(7)), 0.1, list("abcdefg"), 0)
    with pytest.raises(ValueError, match=r"SVR fold 0: 2 feature columns missing"):
        head.predict(pd.DataFrame(x[:, :5], columns=list("abcde")))
    evil = tmp_path / "model.pkl"
    evil.write_bytes(pickle.dumps(head))  # a pickle under any name is refused, never unpickled
    with pytest.raises(ArtifactError, match=r"model.pkl: not an SVR head file"):
        SvrHead.load(evil)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(head.to_bytes()[:-40])
    with pytest.raises(ArtifactError, match=r"cut.safetensors: not an SVR head file"):
        SvrHead.load(cut)
