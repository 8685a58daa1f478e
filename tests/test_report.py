"""`pawpular report` on a small finished run and on partial ones: embedded PNGs, numbers, "not run".

The run is built once per session (``experiment_run``): the real pipeline, `pawpular all` with a tiny config on
the 120-photo competition; the partial runs are copies of it with later stages' files removed.
The fixtures live in conftest.py (the notebooks and the fault suite reuse them).
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import CONFIG  # noqa: F401  (the run's config)
from PIL import Image

from pawpular.cli import main as cli
from pawpular.data.tables import ID, TARGET
from pawpular.scores.metrics import rmse
from pawpular.views import plots, plots_eda, results
from pawpular.views import reporting as report

N_FIGURES_FULL = 9  # folds, curves, OOF scatter, residuals, worst, Optuna, ensemble, target, flags
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------------------
# Reading the HTML back


class _Rows(HTMLParser):
    """Rows of the table with a given id: each row's attributes and its cells (text, data-value)."""

    def __init__(self, table_id: str):
        super().__init__()
        self.table_id, self.inside, self.rows = table_id, False, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.inside = a.get("id") == self.table_id
        elif self.inside and tag == "tr":
            self.rows.append({"attrs": a, "cells": []})
        elif self.inside and tag in ("td", "th") and self.rows:
            self.rows[-1]["cells"].append([a.get("data-value"), ""])

    def handle_endtag(self, tag):
        if tag == "table":
            self.inside = False

    def handle_data(self, data):
        if self.inside and self.rows and self.rows[-1]["cells"]:
            self.rows[-1]["cells"][-1][1] += data


def table_rows(doc: str, table_id: str) -> list[dict]:
    parser = _Rows(table_id)
    parser.feed(doc)
    return parser.rows


def embedded_pngs(doc: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', doc)]


def check_pngs(doc: str) -> int:
    pngs = embedded_pngs(doc)
    assert doc.count("<img") == len(pngs), "every image is an embedded PNG (no external files)"
    for png in pngs:
        assert png.startswith(PNG_SIGNATURE)
        with Image.open(io.BytesIO(png)) as im:
            im.verify()
        with Image.open(io.BytesIO(png)) as im:
            assert im.format == "PNG" and im.width > 100 and im.height > 100
            assert np.asarray(im.convert("L")).std() > 0, "not a blank image"
    return len(pngs)


def models_by_name(doc: str) -> dict[str, dict]:
    return {r["attrs"]["data-model"]: r for r in table_rows(doc, "models") if "data-model" in r["attrs"]}


# ---------------------------------------------------------------------------------------------------------------


def test_report_of_a_finished_run(experiment_run, small_competition, capsys):
    assert (
        cli.main(["report", "--config", str(CONFIG), "--output", str(experiment_run), "--data", str(small_competition)])
        == 0
    )
    path = experiment_run / "report.html"
    assert capsys.readouterr().out.strip() == str(path)
    doc = path.read_text()
    assert check_pngs(doc) == N_FIGURES_FULL
    assert "not run" not in doc

    weights = json.loads((experiment_run / "ensemble" / "weights.json").read_text())
    models = models_by_name(doc)
    assert abs(sum(weights["weights"].values()) - 1) < 1e-9
    for name, w in weights["weights"].items():
        row = models[name]
        assert float(row["attrs"]["data-weight"]) == w and float(row["attrs"]["data-rmse"]) == weights["oof_rmse"][name]
        assert row["cells"][1][1] == f"{weights['oof_rmse'][name]:.3f}" and row["cells"][2][1] == f"{w:.3f}"
    assert float(models["ensemble"]["attrs"]["data-rmse"]) == weights["oof_rmse"]["ensemble"]
    assert float(models["predict the mean"]["attrs"]["data-rmse"]) == weights["oof_rmse"]["predict_mean"]
    assert "data-weight" not in models["ensemble"]["attrs"]

    # Per-fold scores: recomputed here from the OOF files and folds.csv.
    truth = pd.read_csv(small_competition / "train.csv", dtype={ID: str})[[ID, TARGET]]
    folds = {r["cells"][0][1]: r["cells"] for r in table_rows(doc, "folds")[1:]}
    header = [c[1] for c in table_rows(doc, "folds")[0]["cells"]]
    assert header == ["fold", "nn", "svr", "ensemble"]
    for j, head in enumerate(["train", "svr", "ensemble"], start=1):
        oof = pd.read_parquet(experiment_run / head / "oof.parquet").merge(truth, on=ID)
        per_fold = np.sqrt(oof.assign(se=(oof["pred"] - oof[TARGET]) ** 2).groupby("fold")["se"].mean())
        for k, value in per_fold.items():
            assert float(folds[str(k)][j][0]) == pytest.approx(value, rel=1e-12)
        assert float(folds["all (OOF)"][j][0]) == pytest.approx(rmse(oof["pred"], oof[TARGET]), rel=1e-12)

    timings = json.loads((experiment_run / "timings.json").read_text())
    shown = {r["cells"][0][1]: r["cells"][1][0] for r in table_rows(doc, "timings")[1:]}
    for stage, seconds in timings.items():
        assert float(shown[stage]) == seconds
    assert f"output_dir: {experiment_run}" in doc  # the resolved config


def test_partial_run_says_not_run(partial_run, small_competition):
    path = report.write_report(partial_run, small_competition)
    assert path == partial_run / "report.html"
    doc = path.read_text()
    models = models_by_name(doc)
    for name in ("svr", "ensemble"):
        assert models[name]["attrs"]["data-status"] == "not run"
        assert "data-rmse" not in models[name]["attrs"]
    assert models["nn"]["attrs"]["data-status"] == "ok" and "data-weight" not in models["nn"]["attrs"]
    assert "SVR: not run" in doc and "ensemble: not run" in doc
    # The NN figures and the competition's are still there; Optuna and the blend are not.
    assert check_pngs(doc) == N_FIGURES_FULL - 2
    shown = {r["cells"][0][1]: r["cells"][2][1] for r in table_rows(doc, "timings")[1:]}
    assert shown["svr"] == "not run" and shown["ensemble"] == "not run"


def test_unfinished_training_is_partial(partial_run, small_competition, tmp_path):
    """Two of three folds trained: no train/oof.parquet yet, the fold files are shown as a partial head."""
    run = Path(shutil.copytree(partial_run, tmp_path / "run"))
    (run / "train" / "oof.parquet").unlink()
    (run / "train" / "test.parquet").unlink()
    shutil.rmtree(run / "train" / "fold2")
    res = results.load_results(run, small_competition)
    assert res.status["nn"] == "partial: folds 0, 1 of 3"
    assert sorted(res.oof.dropna(subset=["nn"])["fold"].unique()) == [0, 1]
    doc = report.write_report(run, small_competition).read_text()
    assert models_by_name(doc)["nn"]["attrs"]["data-status"] == "partial: folds 0, 1 of 3"
    folds = {r["cells"][0][1]: r["cells"][1] for r in table_rows(doc, "folds")[1:]}
    assert list(folds) == ["0", "1", "2", "all (OOF)"]
    assert folds["2"] == [None, "\u2013"] and float(folds["1"][0]) > 0  # fold 2 untrained: a dash, no number


def test_report_without_the_competition_data(experiment_run, tmp_path):
    """Photos and train.csv gone: the tables from the run's own files remain, and the report says why."""
    run = Path(shutil.copytree(experiment_run, tmp_path / "run"))
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(re.sub(r"(?m)^data_dir: .*$", f"data_dir: {tmp_path / 'gone'}", config))
    doc = report.write_report(run, tmp_path / "missing").read_text()
    assert "competition data not found" in doc
    weights = json.loads((run / "ensemble" / "weights.json").read_text())
    models = models_by_name(doc)
    for name, w in weights["weights"].items():
        assert float(models[name]["attrs"]["data-weight"]) == w
    assert check_pngs(doc) == 3  # training curves, Optuna, ensemble: the figures that need no photos


def test_study_chosen_by_name_else_newest(tmp_path):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{tmp_path / 'svr' / 'study.db'}"
    (tmp_path / "svr").mkdir()
    for name, n in (("older", 2), ("newer", 3)):
        optuna.create_study(study_name=name, storage=storage).optimize(
            lambda t: t.suggest_float("C", 0.1, 10, log=True), n_trials=n
        )
    study = results.load_study(tmp_path, name="older")
    assert (study.name, len(study.trials), study.minimize, study.note) == ("older", 2, True, "")
    assert "params_C" in study.trials
    assert results.load_study(tmp_path).name == "newer"
    assert results.load_study(tmp_path, name="gone").name == "newer"
    assert results.load_study(tmp_path / "elsewhere") == results.Study(None, None, True, "not run")


def test_figures_say_what_is_missing_instead_of_failing():
    empty = pd.DataFrame(columns=[ID, TARGET, "fold"])
    figures = [
        plots.fold_scores(pd.DataFrame()),
        plots.training_curves(pd.DataFrame()),
        plots.oof_scatter(empty, ["nn"]),
        plots.residuals_by_target(empty, ["svr"]),
        plots.optuna_study(None),
        plots.ensemble_weights({}, {}),
        plots.worst_predictions(None, empty, "ensemble"),
        plots.stage_timings({}),
        plots_eda.duplicate_pairs("nowhere", pd.DataFrame(columns=[ID, "group"]), empty),
    ]
    for fig in figures:
        assert plots.to_png(fig).startswith(PNG_SIGNATURE)
        assert any(t.get_text() for ax in fig.axes for t in ax.texts), "the figure says why it is empty"


def test_report_finds_the_runs_own_data(experiment_run, small_competition, tmp_path):
    """`pawpular report --output X` without --data: the config's default competition is another one; the report
    notices (its Ids are not those of folds.csv) and uses the data_dir saved in the run's config.yaml."""
    from pawpular.data.synthetic import make_synthetic

    other = make_synthetic(tmp_path / "other", n_train=20, n_test=4, seed=11)
    res = results.load_results(experiment_run, other)
    assert res.data == small_competition and len(res.train) == 120
    assert any("not those of folds.csv" in n for n in res.notes)
