"""The SVR head: backend choice, cached-kernel vs plain fits, the resumable study, the stage's cache and outputs.

The fixture is a tiny competition (no images) with embedding files whose target is a nonlinear function of a
latent the embeddings encode, so a working SVR beats predicting the mean and misaligned rows would not.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pawpular.config.schema import load_config
from pawpular.data.splits import read_folds
from pawpular.data.tables import ID, META_COLS, TARGET, read_competition
from pawpular.machine import backend
from pawpular.runner import Context, run_planned
from pawpular.scores.metrics import rmse
from pawpular.stages import svr
from pawpular.stages.svr import make_objective
from pawpular.store import artifacts
from pawpular.store.files import read_json
from pawpular.svr import head as svr_head
from pawpular.svr.head import SvrHead, assemble_features, rbf_kernel
from pawpular.svr.study import storage_url

N_TRAIN, N_TEST, DIM, N_FOLDS = 90, 12, 16, 3


def _emb_table(ids: list[str], x: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({ID: ids, **{f"e{j}": x[:, j].astype(np.float32) for j in range(x.shape[1])}})


def _write_comp(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """A competition folder and an experiment folder with folds.csv and embeddings ('model' per fold, 'frozen')."""
    rng = np.random.default_rng(seed)
    comp, out = root / "comp", root / "exp"
    comp.mkdir(parents=True)
    n = N_TRAIN + N_TEST
    ids = [f"{i:04x}{rng.integers(1 << 16):04x}" for i in range(n)]
    z = rng.standard_normal((n, 3))
    flags = rng.integers(0, 2, size=(n, len(META_COLS)))
    signal = np.sin(2 * z[:, 0]) + z[:, 1] ** 2 - 1 + 0.5 * z[:, 2]
    target = np.clip(np.round(38 + 15 * signal + 3 * rng.standard_normal(n)), 1, 100)
    table = pd.DataFrame({ID: ids, **{c: flags[:, j] for j, c in enumerate(META_COLS)}})
    table.iloc[:N_TRAIN].assign(**{TARGET: target[:N_TRAIN].astype(int)}).to_csv(comp / "train.csv", index=False)
    table.iloc[N_TRAIN:].to_csv(comp / "test.csv", index=False)
    pd.DataFrame({ID: ids[N_TRAIN:], TARGET: 50}).to_csv(comp / "sample_submission.csv", index=False)
    (out / "folds").mkdir(parents=True)
    pd.DataFrame({ID: ids[:N_TRAIN], "fold": np.arange(N_TRAIN) % N_FOLDS}).to_csv(
        out / "folds" / "folds.csv", index=False
    )
    mix = rng.standard_normal((3, DIM))
    sets = {f"fold{k}": None for k in range(N_FOLDS)} | {"frozen": None}
    for name in sets:  # each fold's "fine-tuned" backbone sees the latent through its own noise
        x = np.tanh(z @ mix) + 0.05 * rng.standard_normal((n, DIM))
        order = rng.permutation(n)  # rows in another order than the CSVs: the stage must join on Id
        folder = out / "emb" / name
        folder.mkdir(parents=True)
        tr = [i for i in order if i < N_TRAIN]
        te = [i for i in order if i >= N_TRAIN]
        _emb_table([ids[i] for i in tr], x[tr]).to_parquet(folder / "train.parquet", index=False)
        _emb_table([ids[i] for i in te], x[te]).to_parquet(folder / "test.parquet", index=False)
    return comp, out


@pytest.fixture
def svr_exp(tmp_path):
    return _write_comp(tmp_path)


# The planted 'frozen' set, as a config lists it (svr.features names only sets of embed.backbones, or 'model')
FROZEN_SET = "embed.backbones=[{name: frozen, model: resnet18}]"


def _cfg(comp: Path, out: Path, *overrides: str):
    base = [
        "device=cpu",
        "svr.n_trials=3",
        "svr.c_min=0.5",
        "svr.c_max=200",
        "svr.epsilon=0.5",
        f"folds.n_folds={N_FOLDS}",
    ]
    return load_config(None, [*base, *overrides], data_dir=str(comp), output_dir=str(out))


def _run(cfg):
    """The SVR stage with its manifest (cache) logic; the planted embeddings stand in for the embed stage."""
    return run_planned(Context(cfg, "cpu"), "svr")


def _folds(cfg):
    comp = read_competition(cfg.data)
    folds, columns, _ = svr.load_folds(cfg, comp, read_folds(cfg.out, comp.train, cfg.folds), "cpu")
    return comp, folds, columns


def _study(cfg):
    import optuna

    return optuna.load_study(
        study_name=read_json(artifacts.best_params(cfg.out))["study_name"],
        storage=storage_url(None, artifacts.study_db(cfg.out)),
    )


def test_cpu_device_builds_scikit_learn_svr_with_shared_args():
    from sklearn.svm import SVR

    model = backend.build_svr("cpu", C=3.0, epsilon=0.2)
    assert type(model) is SVR
    assert (model.C, model.epsilon, model.kernel) == (3.0, 0.2, "rbf")
    assert model.cache_size == backend.SVR_ARGS["cache_size"] and model.tol == backend.SVR_ARGS["tol"]
    assert backend.build_svr("cpu", kernel="precomputed").kernel == "precomputed"  # params override shared args
    assert backend.array_module("cpu") is np and backend.svr_precomputed_ok("cpu")


def test_rbf_kernel_and_gamma_match_scikit_learn():
    from sklearn.metrics.pairwise import rbf_kernel as sklearn_rbf
    from sklearn.svm import SVR

    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((40, 7)) * 3, rng.standard_normal((9, 7)) * 3
    np.testing.assert_allclose(rbf_kernel(a, b, 0.05), sklearn_rbf(a, b, gamma=0.05), rtol=1e-10, atol=1e-12)
    gamma = svr_head.resolve_gamma(a, "scale")
    assert gamma == pytest.approx(SVR(gamma="scale").fit(a, rng.standard_normal(40))._gamma, rel=1e-12)
    assert svr_head.resolve_gamma(a, 0.3) == 0.3 and svr_head.resolve_gamma(a, "auto") == pytest.approx(1 / 7)
    with pytest.raises(ValueError, match="svr.gamma"):
        svr_head.resolve_gamma(a, "wide")


def test_precomputed_kernels_and_plain_fits_agree(svr_exp):
    cfg = _cfg(*svr_exp)
    comp, folds, columns = _folds(cfg)
    y = comp.train[TARGET].to_numpy(float)
    assert len(columns) == DIM and [len(f.val_rows) for f in folds] == [N_TRAIN // N_FOLDS] * N_FOLDS
    scores = []
    for params in ({"C": 30.0, "epsilon": 0.5}, {"C": 2.0, "epsilon": 3.0}):
        plain = svr_head.fit_predict(params, folds)
        svr_head.attach_kernels(folds)
        cached = svr_head.fit_predict(params, folds)
        for f in folds:
            f.k_train = f.k_val = None
        assert rmse(plain, cached) < 1e-3
        assert not np.isnan(plain).any() and plain.min() >= 1 and plain.max() <= 100
        scores.append(rmse(plain, y))
    # The features reach the SVR aligned with their targets: it clearly beats the mean, and C matters.
    assert scores[0] < 0.75 * rmse(np.full_like(y, y.mean()), y)
    assert scores[0] < scores[1] - 2
    # The Optuna objective is only sampling + fit_predict: a fixed trial scores exactly what fit_predict gives.
    from optuna.trial import FixedTrial

    objective = make_objective(folds, y, cfg.svr, "cpu")
    trial = {"C": 30.0, "gamma_x": 0.3}
    assert objective(FixedTrial(trial)) == rmse(svr_head.fit_predict({**trial, "epsilon": 0.5}, folds), y)
    assert objective(FixedTrial(trial)) == svr_head.oof_rmse({**trial, "epsilon": 0.5}, folds, y)


def test_a_tuned_width_fits_from_cached_distances_as_from_features(svr_exp):
    """A trial's width is the fold's reference width x gamma_x: exp of the cached squared distances gives the same
    kernel bits as computing it, the same fit as SVR(kernel='rbf', gamma=...) on the features, and another
    gamma_x gives another fit."""
    cfg = _cfg(*svr_exp)
    comp, folds, _ = _folds(cfg)
    y = comp.train[TARGET].to_numpy(float)
    f = folds[0]
    np.testing.assert_array_equal(
        svr_head.kernel_of_distances(svr_head.squared_distances(f.x_val, f.x_train), 0.7 * f.gamma),
        rbf_kernel(f.x_val, f.x_train, 0.7 * f.gamma),
    )
    preds = {}
    for gamma_x in (1.0, 0.1, 5.0):
        params = {"C": 30.0, "epsilon": 0.5, "gamma_x": gamma_x}
        plain = svr_head.fit_predict(params, folds)
        svr_head.attach_distances(folds)
        assert all(f.d_train is not None and f.k_train is None for f in folds)
        cached = svr_head.fit_predict(params, folds)
        svr_head.detach_kernels(folds)
        assert all(f.d_train is None and f.d_val is None for f in folds)
        assert rmse(plain, cached) < 1e-3
        preds[gamma_x] = cached
    assert rmse(preds[1.0], preds[0.1]) > 1 and rmse(preds[1.0], preds[5.0]) > 1  # the width changes the fit
    assert rmse(preds[1.0], svr_head.fit_predict({"C": 30.0, "epsilon": 0.5}, folds)) < 1e-3  # gamma_x 1 = the ref
    svr_head.attach_kernels(folds)  # kernels cached at the reference width cannot serve another width
    with pytest.raises(ValueError, match="reference width"):
        svr_head.fit_predict({"C": 30.0, "gamma_x": 0.5}, folds)
    assert np.isfinite(svr_head.oof_rmse({"C": 30.0}, folds, y))


def test_stage_writes_every_id_once_and_heads_reproduce_test_predictions(svr_exp):
    cfg = _cfg(*svr_exp, FROZEN_SET, "svr.features=[model, frozen]", "svr.use_meta=true")
    result = _run(cfg)
    assert artifacts.svr_head(cfg.out, 0) in result.outputs and not result.cached
    comp = read_competition(cfg.data)
    oof = pd.read_parquet(artifacts.preds(cfg.out, "svr", "oof"))
    assert list(oof.columns) == [ID, "fold", "pred"]
    assert sorted(oof[ID]) == sorted(comp.train[ID]) and oof[ID].is_unique
    folds = pd.read_csv(artifacts.folds_csv(cfg.out), dtype={ID: str})
    assert oof.merge(folds, on=ID, suffixes=("", "_csv")).eval("fold == fold_csv").all()
    assert oof["pred"].between(1, 100).all()
    test = pd.read_parquet(artifacts.preds(cfg.out, "svr", "test"))
    assert list(test[ID]) == list(comp.test[ID]) and test["pred"].between(1, 100).all()
    best = read_json(artifacts.best_params(cfg.out))
    assert 0.5 <= best["C"] <= 200 and best["n_trials"] == 3 and best["n_features"] == 2 * DIM + len(META_COLS)
    assert 0.01 <= best["gamma_x"] <= 10 and best["gamma_x"] != 1.0  # the width was tuned (svr.tune_gamma)
    _, folds, _ = _folds(cfg)
    assert best["gamma"] == {str(f.fold): pytest.approx(f.gamma * best["gamma_x"], rel=1e-12) for f in folds}
    y = comp.train.set_index(ID).loc[oof[ID], TARGET].to_numpy(float)
    assert best["oof_rmse"] == pytest.approx(rmse(oof["pred"], y), rel=1e-9)
    assert best["oof_rmse"] == pytest.approx(best["best_trial_rmse"], abs=1e-3)  # final fit = best trial's model

    # Each fold's head file, applied to freshly assembled test features, gives the stage's test predictions.
    sets = {name: pd.read_parquet(artifacts.set_file(cfg.out, name, "test", 0)) for name in ("frozen",)}
    preds = []
    for k in range(N_FOLDS):
        head = SvrHead.load(artifacts.svr_head(cfg.out, k))
        assert head.fold == k and head.params == {
            "C": best["C"],
            "epsilon": best["epsilon"],
            "gamma_x": best["gamma_x"],
        }
        assert head.gamma == best["gamma"][str(k)]  # the tuned width is what ships
        assert head.columns[:DIM] == [f"model/e{j}" for j in range(DIM)] and head.columns[-12:] == META_COLS
        features = assemble_features(
            {**sets, "model": pd.read_parquet(artifacts.set_file(cfg.out, "model", "test", k))},
            comp.test,
            cfg.svr.features,
            cfg.svr.use_meta,
        )
        preds.append(head.predict(features))
    np.testing.assert_allclose(np.mean(preds, axis=0), test["pred"], rtol=1e-6)


def test_nested_score_rechooses_the_width_with_c_per_fold(svr_exp):
    """Fold k of svr/nested.parquet is predicted with the trial (C and width) best on the other folds' errors:
    refitting that fold with those parameters gives its nested predictions."""
    import optuna

    from pawpular.scores import nested

    cfg = _cfg(*svr_exp, "svr.n_trials=6")
    _run(cfg)
    best = read_json(artifacts.best_params(cfg.out))
    trials = [t for t in _study(cfg).trials if t.state == optuna.trial.TrialState.COMPLETE]
    keys = sorted(best["nested_C"])
    choice = nested.leave_one_out(np.array([[t.user_attrs[svr.FOLD_SSE][k] for k in keys] for t in trials]))
    assert best["nested_gamma_x"] == {k: trials[c].params["gamma_x"] for k, c in zip(keys, choice, strict=True)}
    comp, folds, _ = _folds(cfg)
    table = pd.read_parquet(artifacts.nested_preds(cfg.out, "svr"))
    for f, c in zip(folds, choice, strict=True):
        params = {**trials[c].params, "epsilon": cfg.svr.epsilon}
        ids = comp.train[ID].iloc[f.val_rows].astype(str)
        got = table.set_index(ID).loc[ids, "pred"].to_numpy()
        np.testing.assert_allclose(got, svr_head.fit_predict(params, [f])[f.val_rows], atol=1e-2)


def test_width_edge_warning_names_its_keys(svr_exp, caplog):
    from pawpular.svr.study import at_edge

    top = at_edge("width (x scale)", 9.8, 0.01, 10.0, "svr.gamma_min", "svr.gamma_max")
    bottom = at_edge("width (x scale)", 0.0105, 0.01, 10.0, "svr.gamma_min", "svr.gamma_max")
    assert "raise svr.gamma_max (e.g. --set svr.gamma_max=100)" in top
    assert "lower svr.gamma_min (e.g. --set svr.gamma_min=0.001)" in bottom
    assert at_edge("width (x scale)", 0.2, 0.01, 10.0, "svr.gamma_min", "svr.gamma_max") is None
    # the stage's summary warns of a width at the edge as it warns of C there
    best = {"C": 3.0, "epsilon": 0.1, "gamma_x": 9.9, "oof_rmse": 1.0, "n_trials": 1, "n_features": 2}
    with caplog.at_level(logging.INFO, logger="pawpular"):
        svr._log_summary(_cfg(*svr_exp), {**best, "kernel_cache": "plain", "device": "cpu"}, 1.0, 1, 0.1, 0.2, 0.0)
    assert "the best width (x scale) (9.9) is at the top" in caplog.text and "svr.gamma_max=100" in caplog.text
    assert "the best C" not in caplog.text


def test_study_resumes_with_more_trials(svr_exp):
    cfg = _cfg(*svr_exp)
    _run(cfg)
    first = [(t.params, t.value) for t in _study(cfg).trials]
    assert len(first) == 3
    _run(_cfg(*svr_exp, "svr.n_trials=5"))
    trials = _study(cfg).trials
    assert len(trials) == 5 and all(t.state.name == "COMPLETE" for t in trials)
    assert [(t.params, t.value) for t in trials[:3]] == first
    assert len({t.params["C"] for t in trials}) == 5  # the resumed sampler does not replay the first C values


def test_second_run_skips_and_changed_embeddings_recompute(svr_exp, caplog, monkeypatch):
    import optuna

    cfg = _cfg(*svr_exp, "svr.n_trials=2")
    _run(cfg)
    oof_path = artifacts.preds(cfg.out, "svr", "oof")
    stamp = oof_path.stat().st_mtime_ns
    name = read_json(artifacts.manifest(cfg.out, "svr"))["info"]["study_name"]

    def boom(*args, **kwargs):
        raise AssertionError("a cached stage must not refit")

    with monkeypatch.context() as m:
        m.setattr(svr_head, "fit_predict", boom)
        m.setattr(svr_head, "fit_head", boom)
        with caplog.at_level(logging.INFO, logger="pawpular"):
            _run(cfg)
    assert "cached" in caplog.text and oof_path.stat().st_mtime_ns == stamp

    emb = artifacts.emb_file(cfg.out, "train", fold=1)
    table = pd.read_parquet(emb)
    table["e0"] = table["e0"] * 2
    table.to_parquet(emb, index=False)
    _run(cfg)
    new_name = read_json(artifacts.manifest(cfg.out, "svr"))["info"]["study_name"]
    assert new_name != name and oof_path.stat().st_mtime_ns != stamp
    storage = storage_url(None, artifacts.study_db(cfg.out))
    studies = {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(storage)}
    assert studies == {name: 2, new_name: 2}  # trials on different inputs never share a study


def test_plain_path_when_kernels_exceed_the_memory_budget(svr_exp, caplog):
    cfg = _cfg(
        *svr_exp,
        "svr.n_trials=2",
        "svr.max_kernel_gb=1e-6",
        "svr.gamma=0.05",
        "svr.tune_gamma=false",
        "svr.tune_epsilon=true",
    )
    with caplog.at_level(logging.INFO, logger="pawpular"):
        _run(cfg)
    assert "kernel_cache: auto -> plain" in caplog.text
    best = read_json(artifacts.best_params(cfg.out))
    assert best["kernel_cache"] == "plain" and set(best["gamma"].values()) == {0.05}
    assert 0.01 <= best["epsilon"] <= 5.0 and best["epsilon"] != 0.5  # tuned, not the fixed svr.epsilon
    head = SvrHead.load(artifacts.svr_head(cfg.out, 0))
    assert head.gamma == 0.05 and head.params["epsilon"] == best["epsilon"]


def test_missing_embedding_set_names_the_file(svr_exp):
    cfg = _cfg(*svr_exp, "embed.backbones=[{name: dinov2, model: resnet18}]", "svr.features=[model, dinov2]")
    with pytest.raises(FileNotFoundError, match=r"emb/dinov2/train.parquet"):
        _run(cfg)


@pytest.mark.gpu
def test_cuml_svr_on_gpu_matches_scikit_learn(svr_exp):
    pytest.importorskip("cuml", reason="cuML is not installed (requirements-gpu.txt)")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    cfg = _cfg(*svr_exp, "device=cuda")
    comp = read_competition(cfg.data)
    folds_df = read_folds(cfg.out, comp.train, cfg.folds)
    gpu, _, _ = svr.load_folds(cfg, comp, folds_df, "cuda")
    cpu, _, _ = svr.load_folds(cfg, comp, folds_df, "cpu")
    assert type(backend.build_svr("cuda")).__module__.startswith("cuml")
    params = {"C": 20.0, "epsilon": 0.5}
    plain_gpu, plain_cpu = svr_head.fit_predict(params, gpu, "cuda"), svr_head.fit_predict(params, cpu, "cpu")
    assert rmse(plain_gpu, plain_cpu) < 0.1  # two SMO solvers, both stopped at tol=1e-3
    if backend.svr_precomputed_ok("cuda"):
        svr_head.attach_kernels(gpu)
        assert rmse(svr_head.fit_predict(params, gpu, "cuda"), plain_gpu) < 1e-2


def test_killed_study_resumes_to_the_uninterrupted_sequence(tmp_path):
    """A worker killed mid-trial leaves it RUNNING with a heartbeat; the rerun fails it as stale, retries its C and
    then samples exactly what an uninterrupted study samples (each trial's sampler is seeded by the progress)."""
    import optuna

    from pawpular.svr import study as st

    def objective(trial):
        c = trial.suggest_float("C", 0.1, 100, log=True)
        return (np.log(c) - 1.7) ** 2

    def study(db: str):
        return st.open_study("s", st.make_storage(None, tmp_path / db, heartbeat_interval=1, grace_period=1), seed=3)

    whole = study("a.db")
    st.run_trials(whole, objective, 14, poll=0.2)
    part = study("b.db")
    st.run_trials(part, objective, 6, poll=0.2)
    _, killed, _ = st._claim(part, part.storage.get_study_id_from_name("s"), 14)  # claimed, sampled, then killed
    c = killed.suggest_float("C", 0.1, 100, log=True)
    time.sleep(2.5)  # its heartbeat goes stale
    resumed = study("b.db")
    assert st.run_trials(resumed, objective, 14, poll=0.2) == 8

    def done(handle) -> list[float]:
        return [t.params["C"] for t in handle.study.trials if t.state == optuna.trial.TrialState.COMPLETE]

    assert done(resumed) == done(whole) and done(resumed)[6] == c  # the killed trial's C, retried
    assert len(set(done(whole))) == 14  # the seeding does not make trials repeat each other


def test_set_weighting_sets_gives_every_set_and_the_flags_the_same_share_of_the_distance(svr_exp):
    """svr.set_weighting: with 'sets' the z-scored columns of each set (the 12 flags as one) sum to the same
    variance, 1 (its share of the expected squared distance); with 'columns' a set's share is its width. The
    weights live in the shipped scaler: the stage's heads reproduce its test predictions."""
    shares = {}
    for weighting in ("columns", "sets"):
        cfg = _cfg(
            *svr_exp, FROZEN_SET, "svr.features=[model, frozen]", "svr.use_meta=true", f"svr.set_weighting={weighting}"
        )
        _, folds, columns = _folds(cfg)
        var = svr_head.backend.to_numpy(folds[0].x_train).var(axis=0)
        group = np.array([c.split("/")[0] if "/" in c else "flags" for c in columns])
        shares[weighting] = {g: float(var[group == g].sum()) for g in ("model", "frozen", "flags")}
    assert shares["columns"] == pytest.approx({"model": DIM, "frozen": DIM, "flags": len(META_COLS)}, rel=1e-6)
    assert shares["sets"] == pytest.approx({"model": 1.0, "frozen": 1.0, "flags": 1.0}, rel=1e-6)

    cfg = _cfg(*svr_exp, FROZEN_SET, "svr.features=[model, frozen]", "svr.use_meta=true", "svr.set_weighting=sets")
    _run(cfg)
    comp = read_competition(cfg.data)
    test = pd.read_parquet(artifacts.preds(cfg.out, "svr", "test"))
    frozen = pd.read_parquet(artifacts.set_file(cfg.out, "frozen", "test", 0))
    preds = []
    for k in range(N_FOLDS):
        head = SvrHead.load(artifacts.svr_head(cfg.out, k))
        model = pd.read_parquet(artifacts.set_file(cfg.out, "model", "test", k))
        preds.append(
            head.predict(assemble_features({"frozen": frozen, "model": model}, comp.test, cfg.svr.features, True))
        )
    np.testing.assert_allclose(np.mean(preds, axis=0), test["pred"], rtol=1e-6)
