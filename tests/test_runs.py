"""`pawpular runs` / `pawpular.runs()` on real tiny experiments: done, with a holdout, stale, damaged, partial.

Every number is checked against the experiment's own result files (weights.json, best_params.json,
timings.json, the manifests), and every status against ``pawpular status``'s full verdict.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

import pawpular
from pawpular.api import config_from
from pawpular.cli import main as cli
from pawpular.runner import status as full_status
from pawpular.views import experiments

SCORES = {"nn": "nn", "blend": "ensemble", "blend_cv": "ensemble_cv", "mean": "predict_mean"}  # weights.json's oof_rmse


@pytest.fixture(scope="module")
def runs_dir(experiment_run, holdout_run, partial_run, tmp_path_factory) -> Path:
    """A folder of experiments: the finished run, the holdout run, a stale, a damaged and a partial one."""
    root = tmp_path_factory.mktemp("runs")
    shutil.copytree(experiment_run, root / "done")
    shutil.copytree(holdout_run, root / "holdout")
    shutil.copytree(partial_run, root / "partial")
    shutil.copytree(experiment_run, root / "stale")  # svr rerun with another C range: the ensemble is stale
    assert cli.main(["svr", "--output", str(root / "stale"), "--set", "svr.c_max=50"]) == 0
    shutil.copytree(experiment_run, root / "damaged")
    weights = root / "damaged" / "ensemble" / "weights.json"
    weights.write_text(weights.read_text().replace('"method": "convex"', '"method": "hill"'))
    (root / "notes").mkdir()  # not an experiment: skipped when the parent folder is listed
    (root / "notes" / "todo.txt").write_text("try a bigger model")
    return root


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def test_each_row_holds_its_own_result_files_numbers(runs_dir):
    df = pawpular.runs(runs_dir).set_index("experiment")
    assert list(df.index) == ["damaged", "done", "holdout", "partial", "stale"]  # notes/ is not an experiment
    for name in ("done", "holdout", "stale"):
        out, row = runs_dir / name, df.loc[name]
        weights, best = read(out / "ensemble" / "weights.json"), read(out / "svr" / "best_params.json")
        for column, key in SCORES.items():
            assert row[column] == weights["oof_rmse"][key], (name, column)
        assert row["svr"] == best["oof_rmse"] and row["best_C"] == best["C"] and row["path"] == str(out)
        assert row["nested"] == weights["nested_rmse"]["ensemble"]  # the score to trust
        timings = read(out / "timings.json")
        assert all(row[f"t_{s}"] == timings[s] for s in timings) and row["t_total"] == pytest.approx(
            sum(timings.values())
        )
        config = yaml.safe_load((out / "config.yaml").read_text())
        assert (row["model"], row["img_size"], row["finetune"], row["epochs"]) == (
            config["model"]["name"],
            config["model"]["img_size"],
            config["model"]["finetune"],
            config["train"]["epochs"],
        )
        info = read(out / "train" / "fold0" / "manifest.json")["info"]  # every unit of these runs: one policy
        assert (row["device"], row["precision"]) == (info["device"], info["policy"]["precision"]) == ("cpu", "fp32")
    held = read(runs_dir / "holdout" / "ensemble" / "weights.json")["holdout_rmse"]
    assert df.loc["holdout", "holdout"] == held["ensemble"] and held["rows"] > 0
    assert df.loc[["done", "stale"], "holdout"].isna().all()
    assert df.loc["stale", "best_C"] <= 50  # the rerun's own best C; its blend numbers are the stale ones


def test_status_is_the_full_status_without_rehashing(runs_dir):
    df = pawpular.runs(runs_dir).set_index("experiment")
    expected = {"done": "done", "holdout": "done", "stale": "stale", "damaged": "damaged", "partial": "partial"}
    assert df["status"].to_dict() == expected
    for name in expected:
        verdicts = full_status(config_from(output=runs_dir / name))
        assert df.loc[name, "stages"] == {s: v.state for s, v in verdicts.items()}, name
    assert "svr/oof.parquet changed" in df.loc["stale", "why"] and "ensemble/weights.json" in df.loc["damaged", "why"]
    assert df.loc["partial", "why"].startswith("svr: ")


def test_runs_hashes_no_photo_and_no_big_output(runs_dir, small_competition, monkeypatch):
    from pawpular.store import files

    seen: list[Path] = []
    real = files.file_digest
    monkeypatch.setattr(files, "file_digest", lambda p, *a: (seen.append(Path(p)), real(p, *a))[1])
    monkeypatch.setattr(experiments, "SMALL", 20_000)  # best.pt and the embedding tables are now "big"
    df = experiments.table([runs_dir / "done"])
    assert df.loc[0, "status"] == "done" and seen
    photos = (small_competition / "train").resolve(), (small_competition / "test").resolve()
    assert not [p for p in seen if p.resolve().parent in photos]
    assert not [p for p in seen if p.stat().st_size > 20_000 and p.is_relative_to(runs_dir)]


def test_a_changed_photo_makes_the_run_stale(experiment_run, small_competition, tmp_path):
    from PIL import Image

    comp, out = Path(shutil.copytree(small_competition, tmp_path / "comp")), tmp_path / "exp"
    shutil.copytree(experiment_run, out)
    config = yaml.safe_load((out / "config.yaml").read_text())
    (out / "config.yaml").write_text(yaml.safe_dump({**config, "data_dir": str(comp)}, sort_keys=False))
    pawpular.run("folds", output=out)  # a stage run hashes the copy's photos once and records their digests
    assert experiments.table([out]).loc[0, "status"] == "done"
    photo = sorted((comp / "train").iterdir())[0]
    Image.new("RGB", (70, 70), "red").save(photo, format="JPEG")
    row = experiments.table([out]).loc[0]
    assert row["status"] == "stale" and "train photos changed" in row["why"]
    assert full_status(config_from(output=out))["folds"].state == "stale"  # the full status agrees


def test_settings_that_differ_are_listed_and_only_those(runs_dir):
    df = pawpular.runs(runs_dir / "done", runs_dir / "holdout", runs_dir / "stale")
    assert df.attrs["settings"] == ["folds.holdout", "svr.c_max"]
    assert df[["folds.holdout", "svr.c_max"]].values.tolist() == [[0.0, 100.0], [0.2, 100.0], [0.0, 50.0]]
    assert pawpular.runs(runs_dir / "done").attrs["settings"] == []


def test_the_command_line_table_sort_json_and_page(runs_dir, tmp_path, capsys):
    assert cli.main(["runs", str(runs_dir), "--sort=-blend_cv"]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert lines[0].split()[:7] == [
        "experiment",
        "status",
        "recipe",
        "nested",
        "holdout",
        "nn",
        "opt.",
    ]  # opt.: optimistic
    order = [line.split()[0] for line in lines[1:6]]
    cv = {n: pawpular.runs(runs_dir / n).loc[0, "blend_cv"] for n in order if n != "partial"}
    assert order[-1] == "partial" and [cv[n] for n in order[:-1]] == sorted(cv.values(), reverse=True)
    assert re.search(r"stale\s+stale\s+ensemble: svr/oof.parquet changed", printed)
    assert "settings that differ:" in printed and "svr.c_max" in printed and "folds.holdout" in printed

    page = tmp_path / "runs.html"
    assert cli.main(["runs", str(runs_dir / "done"), str(runs_dir / "holdout"), "--json", "--html", str(page)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["experiment"] for r in data["runs"]] == ["done", "holdout"] and data["settings"] == ["folds.holdout"]
    assert data["runs"][0]["holdout"] is None
    assert (
        data["runs"][1]["holdout"]
        == read(runs_dir / "holdout" / "ensemble" / "weights.json")["holdout_rmse"]["ensemble"]
    )
    html = page.read_text()
    assert 'data-experiment="done"' in html and 'data-experiment="holdout"' in html
    assert not re.search(r'(src|href)="(https?:|//)', html)  # self-contained: nothing fetched
    from PIL import Image

    png = base64.b64decode(re.search(r'src="data:image/png;base64,([^"]+)"', html).group(1))
    assert Image.open(io.BytesIO(png)).size[0] > 500


def test_bad_input_is_one_line_and_exit_2(runs_dir, tmp_path, capsys):
    for args, message in (
        (["runs", str(runs_dir / "notes")], "not an experiment folder"),
        (["runs", str(tmp_path / "nowhere")], "no such folder"),
        (["runs", str(runs_dir / "done"), "--sort", "blendcv"], "no such column"),
    ):
        assert cli.main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
