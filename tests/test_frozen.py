"""The frozen recipe (configs/frozen_svr.yaml): frozen backbones, the SVR head, no training stage.

`all` plans from what the config's outputs need: with `ensemble.heads: [svr]` on frozen sets nothing reads train,
so it is "not needed" and skipped; asking for it by name still runs it, and a config that comes to need it
(`ensemble.heads: [nn, svr]`) trains and re-blends, and recomputes nothing else.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import frozen_args
from test_notebooks import venv_kernel  # noqa: F401  (fixture)

# configs/frozen_svr.yaml has no model: a test that makes it train gives it the embedded default's tiny Swin
TINY_MODEL = [
    "model.name=swin_tiny_patch4_window7_224",
    "model.img_size=64",
    "model.kwargs={embed_dim: 24, depths: [1, 1], num_heads: [1, 2], img_size: 64, window_size: 4}",
]


@pytest.fixture(scope="module")
def frozen_run(small_competition, tmp_path_factory) -> Path:
    from pawpular.cli import main as cli

    out = tmp_path_factory.mktemp("frozen") / "frozen_svr"
    assert cli.main(["all", *frozen_args(small_competition, out)]) == 0
    return out


def _status(capsys, data: Path, out: Path, *extra: str) -> tuple[dict[str, str], str]:
    from pawpular.cli import main as cli

    capsys.readouterr()
    assert cli.main(["status", *frozen_args(data, out, *extra)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("scores: ")]
    states = {line.split()[0]: " ".join(line.split()[1:3]) for line in lines[1:-1]}
    return {k: v if v == "not needed" else v.split()[0] for k, v in states.items()}, lines[-1]  # less the why


def test_needed_follows_the_heads_and_the_embedding_sets(make_cfg, small_competition):
    from pawpular.stages import needed

    def stages(*sets: str) -> list[str]:
        return needed(make_cfg(small_competition, *sets))

    assert stages() == ["folds", "train", "embed", "svr", "ensemble"]  # the default: both heads, fine-tuned sets
    frozen = ["embed.backbones=[{name: r, model: resnet18}]", "svr.features=[r]"]
    assert stages(*frozen, "ensemble.heads=[svr]") == ["folds", "embed", "svr", "ensemble"]
    assert stages("embed.source=pretrained", "ensemble.heads=[svr]") == ["folds", "embed", "svr", "ensemble"]
    assert stages(*frozen) == ["folds", "train", "embed", "svr", "ensemble"]  # the NN head still needs train
    assert stages("ensemble.heads=[nn]") == ["folds", "train", "ensemble"]
    assert stages("ensemble.heads=[svr]") == ["folds", "train", "embed", "svr", "ensemble"]  # "model" is fine-tuned


def test_all_with_the_frozen_recipe_trains_nothing_and_submits(frozen_run, small_competition, capsys):
    assert not (frozen_run / "train").exists()
    sub = pd.read_csv(frozen_run / "submission.csv")
    test = pd.read_csv(small_competition / "sample_submission.csv")
    assert sub["Id"].tolist() == test["Id"].tolist() and sub["Pawpularity"].between(1, 100).all()
    weights = json.loads((frozen_run / "ensemble" / "weights.json").read_text())
    assert weights["weights"] == {"svr": 1.0} and weights["oof_rmse"]["svr"] < weights["oof_rmse"]["predict_mean"]
    assert sorted(p.name for p in (frozen_run / "emb").iterdir() if p.is_dir()) == ["convnext", "resnet"]  # no fold{k}
    states, last = _status(capsys, small_competition, frozen_run)
    assert states == {"folds": "done", "train": "not needed", "embed": "done", "svr": "done", "ensemble": "done"}
    assert last == "everything is done and current"


def test_the_report_and_the_runs_table_know_it_needs_no_training(frozen_run, small_competition):
    import re

    import pawpular
    from pawpular.views.reporting import write_report

    doc = write_report(frozen_run, small_competition).read_text()
    assert 'data-stage="train" data-state="not needed"' in doc
    assert "NN head" not in doc and 'data-model="nn"' not in doc and 'class="warn"' not in doc
    assert not re.findall(r'<p class="missing">', doc)
    # what ran: the frozen recipe, each set's backbone and size, no fine-tuned model; titled by its folder
    assert re.search(r'<p id="recipe">What ran: <b>frozen</b>; nothing is fine-tuned', doc)
    sets = re.findall(r'<tr data-set="(\w+)"><td>\w+</td><td>(\w+)</td><td>(\d+)</td><td>(\w+)</td>', doc)
    assert sets == [("resnet", "resnet18", "96", "pooled"), ("convnext", "convnext_atto", "96", "pooled")]
    assert f"<h1>pawpular report: {frozen_run.name}</h1>" in doc and "swin" not in doc.split('id="config"')[0]
    row = pawpular.runs(frozen_run).iloc[0]
    assert row["status"] == "done" and row["stages"]["train"] == "not needed"
    assert row["recipe"] == "frozen" and row["model"] is None


@pytest.mark.slow
def test_a_stage_asked_for_by_name_runs_and_a_config_that_needs_it_trains_and_reblends_only(
    frozen_run, small_competition, tmp_path, capsys, caplog
):
    from pawpular.cli import main as cli

    run = Path(shutil.copytree(frozen_run, tmp_path / "run"))
    before = {p: p.stat().st_mtime_ns for d in ("folds", "emb", "svr") for p in (run / d).rglob("*") if p.is_file()}
    old = json.loads((run / "ensemble" / "weights.json").read_text())
    with caplog.at_level(logging.INFO, logger="pawpular"):
        assert cli.main(["all", *frozen_args(small_competition, run, "ensemble.heads=[nn, svr]", *TINY_MODEL)]) == 0
    assert "== train done" in caplog.text and "== ensemble done" in caplog.text
    for stage in ("folds", "embed", "svr"):
        assert f"== {stage} cached" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing upstream of the blend was rewritten
    weights = json.loads((run / "ensemble" / "weights.json").read_text())
    assert set(weights["weights"]) == {"nn", "svr"} and weights != old
    states, _ = _status(capsys, small_competition, run, "ensemble.heads=[nn, svr]", *TINY_MODEL)
    assert set(states.values()) == {"done"}

    # back to the frozen config: train (done) is not needed again; by name it still runs (cached: nothing changed)
    states, _ = _status(capsys, small_competition, run)
    assert states["train"] == "not needed"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pawpular"):
        assert cli.main(["train", *frozen_args(small_competition, run, *TINY_MODEL)]) == 0
    assert "== train cached" in caplog.text


@pytest.mark.slow
def test_export_and_predict_of_the_frozen_recipe_reproduce_its_submission(frozen_run, test_only, tmp_path):
    from test_predict import assert_predict_matches

    from pawpular.ship.exporter import export

    art = export(frozen_run, tmp_path / "art")
    files = sorted(str(p.relative_to(art)) for p in (art / "experiments").rglob("*") if p.is_file())
    assert not [f for f in files if "/train/" in f]  # no fine-tuned model travels
    assert [f for f in files if f.endswith("model.safetensors")] == [
        "experiments/frozen_svr/backbones/convnext/model.safetensors",
        "experiments/frozen_svr/backbones/resnet/model.safetensors",
    ]
    assert_predict_matches(art, test_only, frozen_run, tmp_path)


@pytest.mark.slow
def test_the_results_notebook_shows_what_a_frozen_run_has(
    frozen_run, small_competition, venv_kernel, tmp_path, monkeypatch
):
    from test_notebooks import execute, outputs, text_of

    nb, _ = execute("02_results", small_competition, frozen_run, venv_kernel, tmp_path, monkeypatch)
    text = text_of(nb)
    assert "NN head: not needed" in text and "not run" not in text and "Traceback" not in text
    assert len([o for o in outputs(nb) if "image/png" in o.get("data", {})]) == 7  # all but the training curves
