"""Adversarial cases, round three (issue 32), one section per class: a secret never reaches a tracker, log or
file; writes only onto what the project made; a refused command changes nothing; what ships and what is done is
verified; user input never ends in a traceback; no unclear or silently wrong answer.

Each case runs the real CLI (or the Python API) and asserts the exit code, the one line naming the cause, and,
where the user had files, that every one of them is byte for byte what it was (``tree`` before and after).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from adversary import one_line, run_cli, tree
from conftest import tiny_args

import pawpular
import pawpular.store.errors
from pawpular.config.schema import load_config, public_dict, redact_url, url_password
from pawpular.store import artifacts

SECRET = "s3cr@t-P@ss"  # a password that itself holds '@'


def _holding(root: Path, secret: str) -> list[str]:
    return sorted(str(p) for p in Path(root).rglob("*") if p.is_file() and secret.encode() in p.read_bytes())


# ---------------------------------------------------------------------------------------------------------------
# 1. A secret never reaches a tracker, a log or a file


def test_a_password_holding_at_signs_is_masked_whole():
    url = f"postgresql://svr:{SECRET}@dbhost:5432/optuna"
    for shown in (redact_url(url), redact_url(url, "***"), json.dumps(public_dict({"svr": {"storage": url}}))):
        assert "P@ss" not in shown and "s3cr" not in shown and "dbhost:5432/optuna" in shown, shown
    assert url_password(url) == SECRET
    query = "postgresql://svr@dbhost/optuna?password=a@b&sslmode=require"
    assert "a@b" not in redact_url(query, "***") and "sslmode=require" in redact_url(query, "***")


def test_config_show_and_errors_never_print_a_password_with_an_at_sign(tmp_path, capsys):
    url = f"postgresql://svr:{SECRET}@dbhost:5432/optuna"
    code, out = run_cli(capsys, "config", "show", "--set", f"svr.storage={url}", "--output", tmp_path / "x")
    assert code == 0 and "svr:***@dbhost" in out and "P@ss" not in out and "s3cr" not in out
    code, out = run_cli(
        capsys, "config", "show", "--set", f"svr.storage={url}", "--set", "svr.n_trials=-1", "--output", tmp_path / "x"
    )
    assert code == 2 and one_line(out) and "P@ss" not in out and "s3cr" not in out


@pytest.mark.parametrize(
    "items", [["svr.storag={url}"], ["svr.storage=[{url}]"], ["svr.storage={url}", "svr.storage.x=1"]]
)
def test_an_error_quoting_a_set_item_masks_its_password(items, tmp_path, capsys):
    url = f"postgresql://svr:{SECRET}@dbhost/optuna"
    args = [a for item in items for a in ("--set", item.format(url=url))]
    code, out = run_cli(capsys, "config", "show", *args, "--output", tmp_path / "x")
    assert code == 2 and one_line(out) and "P@ss" not in out and "s3cr" not in out, out
    with pytest.raises(pawpular.store.errors.ConfigError) as e:  # the Python API's message too
        load_config(None, [item.format(url=url) for item in items])
    assert "P@ss" not in str(e.value) and "s3cr" not in str(e.value)


def test_a_log_line_quoting_a_url_masks_its_password(caplog):
    import logging

    from pawpular.logs.progress import log

    with caplog.at_level(logging.INFO, logger="pawpular"):
        log.info("opening %s", f"postgresql://svr:{SECRET}@dbhost/optuna")
    assert "svr:***@dbhost" in caplog.text and "P@ss" not in caplog.text and "s3cr" not in caplog.text


def test_wandb_never_records_the_password_of_the_command_line(tmp_path, monkeypatch, make_cfg, small_competition):
    pytest.importorskip("wandb")
    from test_tracking import wandb_env

    from pawpular.logs import tracking
    from pawpular.runner import Context

    wandb_env(monkeypatch, tmp_path)
    url = f"postgresql://svr:{SECRET}@dbhost:5432/optuna"
    argv = ["pawpular", "svr", "--set", f"svr.storage={url}", "--set", "tracking=[wandb]"]
    monkeypatch.setattr(sys, "argv", argv)
    cfg = make_cfg(small_competition, f"svr.storage={url}", "tracking=[wandb]", out=tmp_path / "exp")
    tracker = tracking.start(Context(cfg), "svr")
    tracker.log({"trial/C": 1.5}, 0, axis="trial")
    tracker.close()
    assert sys.argv == argv  # the process's own arguments are given back as they were
    files = [p for p in cfg.out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files)
    assert _holding(tmp_path, "P@ss") == [] and _holding(tmp_path, "s3cr") == []


# ---------------------------------------------------------------------------------------------------------------
# 2. Writes only onto what the project made; a name from the config stays inside its folder


def test_runs_html_never_replaces_a_file_it_did_not_write(run, tmp_path, capsys):
    notes, csv = tmp_path / "notes.html", tmp_path / "train.csv"
    notes.write_text("<html>my notes</html>")
    csv.write_text("Id,Pawpularity\na,1\n")
    before = tree(tmp_path)
    for target in (notes, csv, tmp_path):  # a user's page, a competition CSV, a folder
        code, out = run_cli(capsys, "runs", run, "--html", target)
        assert code == 2 and f"--html {target}" in out and one_line(out), out
    assert tree(tmp_path) == before
    page = tmp_path / "runs.html"
    assert run_cli(capsys, "runs", run, "--html", page)[0] == 0
    assert run_cli(capsys, "runs", run, "--html", page)[0] == 0  # its own page: replaced
    assert "pawpular runs" in page.read_text()


@pytest.mark.parametrize(
    "setting",
    [
        "experiment=../../escaped",
        "experiment=/tmp/abs",
        "experiment=a/b",
        "experiment=..",
        "svr.features=[../../x]",
        "svr.features=[/abs]",
        "ensemble.experiments=[..]",
        "ensemble.experiments=[/]",
        "embed.backbones=[{name: ../up, model: resnet18}]",
        "embed.backbones=[{name: a/b, model: resnet18}]",
    ],
)
def test_a_config_name_that_would_leave_its_folder_is_refused(setting, tmp_path, capsys):
    key = setting.split("=")[0]
    code, out = run_cli(capsys, "config", "show", "--set", setting)
    assert code == 2 and key in out and "folder" in out and one_line(out), out
    before = tree(tmp_path)
    code, out = run_cli(capsys, "folds", "--set", setting, "--data", tmp_path / "none", "--output", tmp_path / "o")
    assert code == 2 and one_line(out) and tree(tmp_path) == before, out


def test_lowering_n_folds_keeps_the_users_files_in_a_fold_folder(run, small_competition, capsys):
    mine = {run / "train" / "fold2" / "my_notes.txt": "fold 2 looked odd", run / "emb" / "fold2" / "plot.png": "x"}
    for path, text in mine.items():
        path.write_text(text)
    code, out = run_cli(capsys, "folds", *tiny_args(small_competition, run, "folds.n_folds=2"))
    assert code == 0, out
    for path, text in mine.items():
        assert path.read_text() == text  # the user's files stay
    assert not (run / "train" / "fold2" / "best.pt").exists() and not (run / "svr" / "fold2").exists()
    assert not (run / "emb" / "fold2" / "train.parquet").exists()  # nothing of the project's is left to pick up


# ---------------------------------------------------------------------------------------------------------------
# 3. A refused command changes nothing: every check that can refuse runs before a manifest is cleared


def _refused_unchanged(capsys, run: Path, small_competition: Path, command: str, setting: str, says: str) -> None:
    before = tree(run)
    code, out = run_cli(capsys, command, *tiny_args(small_competition, run, setting))
    assert code == 2 and says in out and one_line(out), out
    assert tree(run) == before  # the finished stage is still finished: nothing cleared, nothing written


def test_weights_that_do_not_fit_are_refused_before_train_clears_anything(run, small_competition, tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    weights = tmp_path / "other.safetensors"
    save_file({"patch_embed.proj.weight": torch.zeros(7, 3, 2, 2)}, str(weights))
    _refused_unchanged(capsys, run, small_competition, "train", f"model.pretrained={weights}", "does not fit")


def test_a_missing_blend_experiment_is_refused_before_ensemble_clears_anything(
    run, small_competition, tmp_path, capsys
):
    missing = tmp_path / "no_such_experiment"
    _refused_unchanged(capsys, run, small_competition, "ensemble", f"ensemble.experiments=[{missing}]", str(missing))
    user_folder = tmp_path / "holiday"  # a folder, but no experiment
    user_folder.mkdir()
    _refused_unchanged(
        capsys, run, small_competition, "ensemble", f"ensemble.experiments=[{user_folder}]", "no pawpular experiment"
    )


def test_blend_members_on_other_folds_are_refused_before_ensemble_clears_anything(
    run, holdout_run, small_competition, capsys
):
    _refused_unchanged(
        capsys,
        run,
        small_competition,
        "ensemble",
        f"ensemble.experiments=[{holdout_run}]",
        "predictions do not cover the same Ids",
    )


def test_a_folds_file_that_is_a_folder_is_refused_before_folds_clears_anything(
    run, small_competition, tmp_path, capsys
):
    _refused_unchanged(capsys, run, small_competition, "folds", f"folds.file={tmp_path}", "is a folder")


# ---------------------------------------------------------------------------------------------------------------
# 4. What ships is verified before it is used; a unit without its record is never "done"


def _edit_manifest(path: Path, change) -> None:
    found = json.loads(path.read_text())
    change(found)
    path.write_text(json.dumps(found))


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m["experiments"][m["main"]]["nn"]["0"].update(tta_hflip=False),  # changes the predictions silently
        lambda m: m["experiments"][m["main"]].pop("embeddings"),  # once a KeyError
        lambda m: m.update(weights={k: 1.0 if k == "nn" else 0.0 for k in m["weights"]}),
    ],
    ids=["setting", "key", "weights"],
)
def test_an_edited_export_manifest_is_refused(change, art, small_competition, tmp_path, capsys):
    exported = Path(shutil.copytree(art, tmp_path / "art"))
    _edit_manifest(artifacts.export_manifest(exported), change)
    out_csv = tmp_path / "submission.csv"
    code, out = run_cli(capsys, "predict", "--artifacts", exported, "--data", small_competition, "--out", out_csv)
    assert code == 2 and "manifest.json" in out and "changed" in out and one_line(out), out
    assert not out_csv.exists()


@pytest.mark.parametrize("where", ["src/pawpular/ship/predictor.py", "inference.ipynb"])
def test_the_shipped_source_and_notebook_are_verified(where, art, small_competition, tmp_path, capsys):
    exported = Path(shutil.copytree(art, tmp_path / "art"))
    with open(exported / where, "a") as f:
        f.write("\n# edited\n")
    code, out = run_cli(
        capsys, "predict", "--artifacts", exported, "--data", small_competition, "--out", tmp_path / "s.csv"
    )
    assert code == 2 and where in out and "damaged" in out and one_line(out), out


def test_a_unit_whose_manifest_is_removed_or_replaced_is_never_done(run, small_competition, tmp_path, capsys):
    args = tiny_args(small_competition, run)
    (run / "train" / "fold0" / "manifest.json").unlink()
    shutil.copy(run / "emb" / "fold0" / "manifest.json", run / "emb" / "fold1" / "manifest.json")
    code, out = run_cli(capsys, "status", *args)
    assert code == 0 and "everything is done" not in out, out
    for stage, unit in (("train", "train/fold0/manifest.json"), ("embed", "emb/fold1/manifest.json")):
        line = next(x for x in out.splitlines() if x.strip().startswith(stage))
        assert "damaged" in line and unit in line, line
    before = tree(tmp_path)
    code, out = run_cli(capsys, "export", "--output", run, "--to", tmp_path / "art")
    assert code == 2 and "train is damaged" in out and one_line(out) and tree(tmp_path) == before, out


# ---------------------------------------------------------------------------------------------------------------
# 5. User input never ends in a traceback: exit 2 and one line


@pytest.fixture(scope="module")
def few_rows(tmp_path_factory) -> Path:
    from pawpular.data.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("few") / "few", n_train=20, n_test=2, seed=1)


@pytest.mark.parametrize(
    "settings, key",
    [
        (["folds.n_folds=25"], "folds.n_folds"),
        (["folds.n_folds=10"], "folds.n_folds"),
        (["folds.n_folds=5", "folds.holdout=0.4"], "folds.n_folds"),
        (["folds.n_folds=10", "folds.group_duplicates=false"], "folds.n_folds"),
    ],
)
def test_fewer_training_rows_than_folds(settings, key, few_rows, tmp_path, capsys):
    args = [a for s in settings for a in ("--set", s)]
    code, out = run_cli(capsys, "folds", "--data", few_rows, "--output", tmp_path / "exp", *args)
    assert code == 2 and key in out and "lower" in out and one_line(out), out
    assert not (tmp_path / "exp" / "folds" / "folds.csv").exists()


@pytest.mark.parametrize("setting", ["seed=4294967296", "folds.seed=-1", "svr.seed=99999999999"])
def test_a_seed_out_of_range(setting, capsys, tmp_path):
    code, out = run_cli(capsys, "config", "show", "--set", setting, "--output", tmp_path / "x")
    assert code == 2 and setting.split("=")[0] in out and "2**32" in out and one_line(out), out


@pytest.mark.parametrize(
    "name, content",
    [("ensemble/weights.json", "[1, 2]"), ("svr/best_params.json", '"C"'), ("ensemble/weights.json", "{not json")],
)
def test_a_results_file_of_the_wrong_json_type(name, content, run, capsys):
    (run / name).write_text(content)
    code, out = run_cli(capsys, "report", "--output", run)
    assert code == 2 and name in out and one_line(out), out
    (run / "timings.json").write_text("[1]")
    assert run_cli(capsys, "runs", run)[0] == 0


@pytest.mark.parametrize("knob", ["PAWPULAR_PROGRESS_SECONDS", "PAWPULAR_SVR_THREADS", "WORLD_SIZE", "RANK"])
def test_an_environment_knob_that_is_not_a_number(knob, run, small_competition, monkeypatch, capsys):
    monkeypatch.setenv(knob, "many")
    before = tree(run)
    code, out = run_cli(capsys, "svr", *tiny_args(small_competition, run), "--overwrite")
    assert code == 2 and knob in out and "'many'" in out and one_line(out), out
    assert tree(run) == before


def test_a_multi_host_postgresql_url(run, small_competition, capsys):
    url = "postgresql://u:pw-1234@h1:5432,h2:5432/db"
    before = tree(run)
    for command in ("svr", "delete-study"):
        extra = ["--overwrite"] if command == "svr" else []
        code, out = run_cli(capsys, command, *tiny_args(small_competition, run, f"svr.storage={url}"), *extra)
        assert code == 2 and "multi-host" in out and "pw-1234" not in out and one_line(out), out
    assert tree(run) == before


@pytest.mark.parametrize(
    "text, says",
    [
        (
            "model:\n  kwargs:\n    a: &a [x, x, x, x, x, x, x, x, x, x]\n"
            + "".join(
                f"    {c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=False)
            ),
            "alias",
        ),
        ("a: &a [1, *a]\n", "loop"),
        ("experiment: x\n" + "# padding\n" * 200_000, "characters"),
    ],
)
def test_a_yaml_alias_bomb_is_refused_in_bounded_time(text, says, tmp_path, capsys):
    import time

    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    t0 = time.time()
    code, out = run_cli(capsys, "config", "show", "--config", path)
    assert code == 2 and says in out and str(path) in out and one_line(out), out
    assert time.time() - t0 < 5


def test_a_non_utf8_locale_writing_a_unicode_path(small_competition, tmp_path):
    import subprocess

    config = tmp_path / "café.yaml"  # read as UTF-8 whatever the locale; the folder it names cannot be written
    config.write_text(
        f"output_dir: {tmp_path / 'exp_é'}\ndata_dir: {small_competition}\nfolds: {{group_duplicates: false}}\n",
        encoding="utf-8",
    )
    env = {**os.environ, "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "LC_ALL": "C", "LANG": "C"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    done = subprocess.run(
        [sys.executable, "-m", "pawpular", "folds", "--config", "café.yaml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=120,
    )
    assert done.returncode == 2 and "LC_ALL=C.UTF-8" in done.stderr and one_line(done.stderr), done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["café.yaml"]


# ---------------------------------------------------------------------------------------------------------------
# 6. No unclear or silently wrong answer


def test_a_path_that_is_there_but_no_file_is_not_called_missing(run, art, small_competition, tmp_path, capsys):
    (tmp_path / "loop_a").symlink_to(tmp_path / "loop_b")
    (tmp_path / "loop_b").symlink_to(tmp_path / "loop_a")
    a_file = small_competition / "train.csv"
    cases = [
        (("config", "show", "--config", tmp_path), "is a folder"),
        (("config", "show", "--config", tmp_path / "loop_a"), "loops"),
        (("train", *tiny_args(small_competition, run, "model.pretrained=/dev/zero")), "not a regular file"),
        (("train", *tiny_args(small_competition, run, f"model.pretrained={tmp_path}")), "is a folder"),
        (("predict", "--artifacts", art, "--data", a_file, "--out", tmp_path / "s.csv"), "is a file, not a folder"),
    ]
    for args, says in cases:
        code, out = run_cli(capsys, *args)
        assert code == 2 and says in out and "not found" not in out and one_line(out), out
    code, out = run_cli(capsys, "check-data", "--data", a_file)
    assert code == 2 and "is a file, not a folder" in out and "does not exist" not in out, out
    code, out = run_cli(capsys, "check-data", "--data", tmp_path / "loop_a")
    assert code == 2 and "loops" in out, out
    config = (run / "config.yaml").read_text().replace(str(small_competition), str(tmp_path / "gone"))
    (run / "config.yaml").write_text(config)
    assert run_cli(capsys, "report", "--output", run, "--data", a_file)[0] == 0
    page = (run / "report.html").read_text()
    assert f"{a_file} is a file, not a folder" in page and f"{tmp_path / 'gone'} does not exist" in page


def test_a_device_as_folds_file_is_refused_not_read(run, small_competition, capsys):
    import time

    t0 = time.time()
    _refused_unchanged(capsys, run, small_competition, "folds", "folds.file=/dev/zero", "not a regular file")
    assert time.time() - t0 < 30


@pytest.mark.parametrize("flag", ["--n-train", "--n-test"])
def test_make_synthetic_with_zero_rows_is_refused_not_defaulted(flag, tmp_path, capsys):
    code, out = run_cli(capsys, "make-synthetic", "--out", tmp_path / "syn", flag, 0)
    assert code == 2 and "got" in out and " 0" in out and one_line(out) and not (tmp_path / "syn").exists(), out


def test_a_float_tiff_named_jpg_is_not_decoded_to_black(tmp_path):
    import numpy as np
    from PIL import Image

    from pawpular.data.images import load_image

    ramp = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (48, 1))  # float in [0, 1], the usual convention
    Image.fromarray(ramp, mode="F").save(tmp_path / "photo.jpg", format="TIFF")
    rgb = load_image(tmp_path / "photo.jpg")
    assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8
    assert rgb[:, 0].max() == 0 and rgb[:, -1].min() == 255 and abs(float(rgb.mean()) - 127.5) < 3


def test_a_refused_export_leaves_no_partial_folder(experiment_run, tmp_path, monkeypatch, capsys):
    from pawpular.ship import exporter
    from pawpular.store.errors import ArtifactError

    def refuse(found):
        raise ArtifactError("the blend weighs a model the export holds not (simulated refusal)")

    monkeypatch.setattr(exporter, "check_weights", refuse)
    code, out = run_cli(capsys, "export", "--output", experiment_run, "--to", tmp_path / "art")
    assert code == 2 and "simulated refusal" in out and one_line(out), out
    assert list(tmp_path.iterdir()) == []  # no hidden .art.pawpular-partial folder left behind


def test_a_second_config_never_takes_over_another_experiments_folder(run, small_competition, capsys):
    before = tree(run)
    code, out = run_cli(capsys, "folds", *tiny_args(small_competition, run, "experiment=other"))
    assert code == 2 and "'default'" in out and "'other'" in out and one_line(out) and tree(run) == before, out


def test_runs_says_why_an_unreadable_config_hides_the_data(run, capsys):
    (run / "config.yaml").write_bytes(b"\xff\xfe: [unclosed")
    code, out = run_cli(capsys, "runs", run)
    assert code == 0 and "None" not in out and "config.yaml" in out, out
