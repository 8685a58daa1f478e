"""Adversarial cases, round four (issue 43; the path faults are in test_adversarial4_paths.py), one section per
class: no command writes over a user's file; no result mixes inputs it did not check; an error names its cause.

Each case runs the real CLI (or the function a command calls) and asserts the exit code, the one line naming
the cause, and, where the user had files, that every one of them is byte for byte what it was.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
from adversary import one_line, run_cli, tree
from conftest import tiny_args

import pawpular

SECRET = "p@ss/w0rd"  # a password with an '@' followed by a '/'


def _runs_row(capsys, folder: Path) -> tuple[int, dict]:
    """`pawpular runs FOLDER --json`: the exit code and the folder's row."""
    code, out = run_cli(capsys, "runs", folder, "--json")
    return code, json.loads(out[out.index('{\n "runs"') :])["runs"][0]


def _results(folder: Path) -> dict[str, str]:
    """``tree`` less the photos' digest cache (.data_check.json), which a stage command refreshes first."""
    return {k: v for k, v in tree(folder).items() if k != ".data_check.json"}


# ---------------------------------------------------------------------------------------------------------------
# 1. A command writes onto only what the project made, or a new path


def test_predict_out_replaces_only_a_submission_and_never_an_experiments_file(
    art, run, small_competition, tmp_path, capsys
):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    predict = ("predict", "--artifacts", art, "--data", small_competition, "--out")
    user_files = [notes, run / "config.yaml", run / "svr" / "oof.parquet", run / "submission.csv"]
    before = tree(tmp_path)
    for target in user_files:
        code, out = run_cli(capsys, *predict, target)
        assert code == 2 and one_line(out) and str(target) in out, out
    assert tree(tmp_path) == before  # the notes and the whole experiment as they were
    sub = tmp_path / "sub.csv"
    for _ in range(2):  # a new path, then predict's own submission there: replaced
        code, out = run_cli(capsys, *predict, sub)
        assert code == 0 and sub.read_text().startswith("Id,Pawpularity"), out


# ---------------------------------------------------------------------------------------------------------------
# 2. Members of a blend saw the same data; 3. one resolution of a configured path


@pytest.fixture(scope="module")
def other_test_photos(experiment_run, small_competition, tmp_path_factory) -> Path:
    """The experiment, rerun on the competition with one test photo's bytes replaced (same Id)."""
    import cv2

    root = tmp_path_factory.mktemp("adv4_other")
    comp = Path(shutil.copytree(small_competition, root / "comp"))
    photo = sorted((comp / "test").iterdir())[0]
    cv2.imwrite(str(photo), 255 - cv2.imread(str(photo)))
    member = Path(shutil.copytree(experiment_run, root / "member"))
    assert pawpular.cli.main.main(["all", *tiny_args(comp, member)]) == 0
    return member


def test_a_blend_member_made_on_other_test_photos_is_refused(
    run, other_test_photos, small_competition, monkeypatch, capsys
):
    from pawpular.stages import ensemble

    args = tiny_args(small_competition, run, f"ensemble.experiments=[{other_test_photos}]")
    before = tree(run)
    code, out = run_cli(capsys, "ensemble", *args)
    assert code == 2 and one_line(out) and str(other_test_photos) in out and "test photos differs" in out, out
    assert tree(run) == before
    monkeypatch.setattr(ensemble, "_check_same_data", lambda ctx: None)  # a blend made before members were compared
    assert run_cli(capsys, "ensemble", *args)[0] == 0
    monkeypatch.undo()
    code, out = run_cli(capsys, "status", *args)
    assert code == 0 and "ensemble  stale" in out and "made on other data: test photos differs" in out, out


def test_runs_marks_a_blend_with_a_member_made_on_other_data_stale(
    run, other_test_photos, small_competition, tmp_path, monkeypatch, capsys
):
    from pawpular.stages import ensemble

    args = tiny_args(small_competition, run, f"ensemble.experiments=[{other_test_photos}]")
    monkeypatch.setattr(ensemble, "_check_same_data", lambda ctx: None)  # a blend made before members were compared
    assert run_cli(capsys, "ensemble", *args)[0] == 0
    monkeypatch.undo()
    code, row = _runs_row(capsys, run)
    assert code == 0 and row["status"] == "stale" and row["stages"]["ensemble"] == "stale", row
    assert f"{other_test_photos} was made on other data: test photos differs" in row["why"], row
    page = tmp_path / "runs.html"
    code, out = run_cli(capsys, "runs", run, "--html", page)
    assert code == 0 and "made on other data: test photos differs" in page.read_text(), out


def test_a_relative_blend_member_is_read_where_the_config_resolved_it(
    run, small_competition, tmp_path, monkeypatch, capsys
):
    shutil.copytree(run, tmp_path / "member")
    monkeypatch.chdir(tmp_path)  # the config says "member": from here
    code, out = run_cli(capsys, "ensemble", *tiny_args(small_competition, run, "ensemble.experiments=[member]"))
    assert code == 0, out  # a member on the same data blends
    code, row = _runs_row(capsys, run)
    assert code == 0 and row["status"] == "done", row
    code, out = run_cli(capsys, "status", *tiny_args(small_competition, run, "ensemble.experiments=[member]"))
    assert code == 0 and "stale" not in out, out


# ---------------------------------------------------------------------------------------------------------------
# 4. Logits come from a classifier; pooled features whatever the classifier


def test_logits_without_a_classifier_are_refused_naming_the_set(tmp_path, capsys):
    sets = "embed.backbones=[{name: r, model: resnet18, pretrained: none, output: logits, kwargs: {num_classes: 0}}]"
    code, out = run_cli(capsys, "config", "show", "--set", sets, "--set", "svr.features=[r]", "--output", tmp_path)
    assert code == 2 and one_line(out) and "embed.backbones[0] (r)" in out and "num_classes: 0" in out, out
    assert "model.kwargs" not in out
    logits = ["model.output=logits", "embed.source=pretrained", "model.kwargs={num_classes: 0}"]
    code, out = run_cli(capsys, "config", "show", *[a for s in logits for a in ("--set", s)])
    assert code == 2 and one_line(out) and "model: output: logits" in out, out


def test_a_pooled_set_whose_kwargs_name_num_classes_gives_pooled_features():
    import torch

    from pawpular.config.schema import ModelConfig
    from pawpular.model.models import build_frozen, check_buildable

    tiny = {"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128], "stem_width": 16}
    shared = {**tiny, "num_classes": 10}  # one kwargs block (a YAML anchor) for a pooled and a logits set
    pooled = ModelConfig(name="resnet18", kwargs=shared, pretrained="none", img_size=48)
    check_buildable(pooled)  # once "model.kwargs ... rejects them"
    with torch.no_grad():
        got = build_frozen(pooled).eval().embed(torch.randn(2, 3, 48, 48))
    assert got.shape == (2, 128)  # the pooled features, not 10 logits


# ---------------------------------------------------------------------------------------------------------------
# 5. What reads a stage's outputs checks they are current; 12. a missing weight file is named


def _weights(path: Path, seed: int) -> Path:
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model("resnet18", num_classes=0, layers=[1, 1, 1, 1], channels=[16, 32, 64, 128], stem_width=16)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _frozen_args(data: Path, out: Path, weights: str, *extra: str) -> list[str]:
    from conftest import FROZEN, config_args

    sets = (
        "embed.backbones=[{name: r, model: resnet18, kwargs: {layers: [1, 1, 1, 1], channels: [16, 32, 64, 128], "
        f"stem_width: 16}}, pretrained: '{weights}', img_size: 48}}, {{name: q, model: resnet18, kwargs: {{layers: "
        "[1, 1, 1, 1], channels: [16, 32, 64, 128], stem_width: 16}, pretrained: none, img_size: 48}]"
    )
    settings = ["folds.n_folds=3", "embed.num_workers=0", "embed.tta_hflip=false", "svr.n_trials=4", sets]
    settings += ["svr.features=[r, q]", *extra]
    return config_args(FROZEN, data, out, *settings)


@pytest.fixture(scope="module")
def frozen_weights(small_competition, tmp_path_factory) -> tuple[Path, Path]:
    """A frozen experiment whose set ``r`` has a weight file (and ``q`` a seeded random init), and that file."""
    root = tmp_path_factory.mktemp("adv4_frozen")
    weights = _weights(root / "r.safetensors", seed=1)
    out = root / "frozen"
    assert pawpular.cli.main.main(["all", *_frozen_args(small_competition, out, str(weights))]) == 0
    return out, weights


@pytest.fixture
def replaced_weights(frozen_weights, tmp_path):
    """The experiment's weight file replaced by other weights for the test (put back after it)."""
    out, weights = frozen_weights
    kept = Path(shutil.copy(weights, tmp_path / "kept.safetensors"))
    _weights(weights, seed=2)
    yield out, weights
    shutil.copy(kept, weights)


def test_select_and_runs_never_pass_a_set_made_with_a_replaced_weight_file(
    replaced_weights, small_competition, tmp_path, capsys
):
    out, weights = replaced_weights
    exp = Path(shutil.copytree(out, tmp_path / "frozen"))
    before = tree(exp)
    code, said = run_cli(capsys, "select", *_frozen_args(small_competition, exp, str(weights)))
    assert code == 2 and one_line(said) and "'r'" in said and "stale" in said and "frozen backbone" in said, said
    assert tree(exp) == before
    code, row = _runs_row(capsys, exp)
    assert code == 0 and row["status"] == "stale" and "frozen backbone r changed" in row["why"], row


def test_select_and_runs_never_pass_a_set_made_before_a_test_photo_changed(
    run, frozen_weights, competition_copy, tmp_path, capsys
):
    import cv2

    out, weights = frozen_weights
    frozen = Path(shutil.copytree(out, tmp_path / "frozen"))
    tuned, sets = tiny_args(competition_copy, run), _frozen_args(competition_copy, frozen, str(weights))
    assert run_cli(capsys, "status", *tuned)[0] == 0  # the copy's photos hashed once: no change yet
    photo = sorted((competition_copy / "test").iterdir())[0]  # a train photo makes folds stale: refused there
    cv2.imwrite(str(photo), 255 - cv2.imread(str(photo)))
    # the photos' digest cache (.data_check.json) is refreshed by any stage command's upstream check: not a result
    before = {p: _results(p) for p in (run, frozen, competition_copy)}
    code, said = run_cli(capsys, "select", *sets)  # frozen sets: their own records name the photos
    assert code == 2 and one_line(said) and "'r'" in said and "emb/r: data:test photos changed" in said, said
    assert "stale" in said and "`pawpular embed`" in said, said
    code, said = run_cli(capsys, "select", *tuned)  # the folds' set: the folds it was made from are stale first
    assert code == 2 and one_line(said) and "'model'" in said and "upstream train is stale" in said, said
    assert "test photos changed" in said and "`pawpular train`" in said, said
    assert {p: _results(p) for p in before} == before
    for folder in (run, frozen):
        code, row = _runs_row(capsys, folder)
        assert code == 0 and row["status"] == "stale" and row["stages"]["embed"] == "stale", row
        assert "test photos changed" in row["why"], row


def test_select_and_runs_never_pass_a_model_set_whose_folds_were_retrained(run, small_competition, capsys):
    args = tiny_args(small_competition, run, "train.epochs=1")
    assert run_cli(capsys, "train", *args)[0] == 0  # the folds retrained; embed not rerun
    code, said = run_cli(capsys, "status", *args)
    assert code == 0 and "embed     stale" in said and "train/fold0/best.pt changed" in said, said
    before = tree(run)
    code, said = run_cli(capsys, "select", *args)
    assert code == 2 and one_line(said) and "'model'" in said and "train/fold0/best.pt changed" in said, said
    assert "stale" in said and "`pawpular embed`" in said, said
    assert tree(run) == before
    code, row = _runs_row(capsys, run)
    assert code == 0 and row["status"] == "stale" and row["stages"]["embed"] == "stale", row


def test_a_missing_weight_file_is_named_with_where_it_was_looked_for(
    frozen_weights, small_competition, tmp_path, monkeypatch, capsys
):
    out, weights = frozen_weights
    exp = Path(shutil.copytree(out, tmp_path / "frozen"))
    args = _frozen_args(small_competition, exp, str(weights))
    shutil.move(weights, tmp_path / "kept.safetensors")
    try:
        code, said = run_cli(capsys, "status", *args)
        row = _runs_row(capsys, exp)[1]
        exported = run_cli(capsys, "export", "--output", exp, "--to", tmp_path / "art")
    finally:
        shutil.move(tmp_path / "kept.safetensors", weights)
    assert code == 0 and f"weight file of r: {weights} is missing" in said, said
    assert exported[0] == 2 and one_line(exported[1]) and f"weight file of r: {weights} is missing" in exported[1]
    assert not (tmp_path / "art").exists()
    assert row["status"] == "stale" and f"the weight file of r is missing: {weights}" in row["why"], row
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a relative weight path, read from another working directory
    relative = os.path.relpath(weights, weights.parent.parent)
    code, said = run_cli(capsys, "embed", *_frozen_args(small_competition, exp, relative))
    assert code == 2 and one_line(said) and f"looked for at {elsewhere / relative}" in said, said
    assert "embed.backbones[0] (r): pretrained:" in said, said


# ---------------------------------------------------------------------------------------------------------------
# 6. Duplicate and empty names; 10. an unknown set name is refused before anything is touched


def test_a_set_listed_twice_is_a_config_error(tmp_path, capsys):
    code, out = run_cli(capsys, "config", "show", "--set", "svr.features=[model, model]", "--output", tmp_path)
    assert code == 2 and one_line(out) and "model listed twice" in out, out


def test_select_as_an_empty_name_is_refused(run, small_competition, capsys):
    before = tree(run.parent)
    code, said = run_cli(capsys, "select", *tiny_args(small_competition, run), "--as", "")
    assert code == 2 and one_line(said) and "empty" in said, said
    assert tree(run.parent) == before  # no selection run, no branch written


def test_an_unknown_set_in_svr_features_is_refused_before_svr_is_touched(run, small_competition, capsys):
    before = tree(run)
    code, out = run_cli(capsys, "svr", *tiny_args(small_competition, run, "svr.features=[model, nosuch]"))
    assert code == 2 and one_line(out) and "'nosuch'" in out and "embed.backbones" in out, out
    assert "pawpular embed" not in out
    assert tree(run) == before  # the finished svr stage is still finished


# ---------------------------------------------------------------------------------------------------------------
# 11. runs --baseline: an unfinished baseline and an ambiguous name


def test_an_unfinished_baseline_is_named_as_such(run, partial_run, tmp_path, capsys):
    partial = Path(shutil.copytree(partial_run, tmp_path / "partial"))
    code, out = run_cli(capsys, "runs", run, partial, "--baseline", "partial")
    assert code == 2 and one_line(out) and "not finished" in out and "version" not in out, out


def test_an_ambiguous_baseline_name_is_refused_naming_both(experiment_run, tmp_path, capsys):
    a = Path(shutil.copytree(experiment_run, tmp_path / "a" / "exp"))
    b = Path(shutil.copytree(experiment_run, tmp_path / "b" / "exp"))
    code, out = run_cli(capsys, "runs", a, b, "--baseline", "exp")
    assert code == 2 and one_line(out) and str(a) in out and str(b) in out, out
    code, out = run_cli(capsys, "runs", a, b, "--baseline", a)  # its path picks one
    assert code == 0, out


# ---------------------------------------------------------------------------------------------------------------
# 16. A password is masked whole, and in every line that reaches a log


@pytest.mark.parametrize("after", ["/", "?", "#"])
def test_a_password_with_an_at_sign_then_a_separator_is_masked_whole(after):
    from pawpular.store.masking import redact_url, url_password, without_password

    password = f"p@ss{after}w0rd"
    url = f"postgresql://u:{password}@host:5432/db"
    assert redact_url(url, "***") == "postgresql://u:***@host:5432/db"
    assert redact_url(url) == "postgresql://u@host:5432/db"  # what config.yaml keeps: the host, no password
    assert url_password(url) == password
    message = f"could not connect to {url}: ss{after}w0rd@host refused"
    shown = without_password(message, url)
    assert "w0rd" not in shown and shown.startswith("could not connect to postgresql://u:***@host:5432/db"), shown
    short = "postgresql://u:p@host/db"  # a one-letter password never masks every 'p' of the text
    assert without_password(f"{short} failed", short) == "postgresql://u:***@host/db failed"
    query = "postgresql://svr:pw@dbhost/optuna?options=a@b&sslmode=require"  # an '@' in a query value ends none
    assert redact_url(query, "***") == "postgresql://svr:***@dbhost/optuna?options=a@b&sslmode=require"


def test_a_traceback_reaching_a_log_is_masked(caplog):
    from pawpular.logs.progress import log, setup_logging

    url = f"postgresql://u:{SECRET}@host/db"
    with caplog.at_level(logging.DEBUG):
        setup_logging(True)
        try:
            raise ValueError(f"cannot connect to {url}")
        except ValueError:
            log.exception("failed")  # what `-v` logs for a user's error
            logging.getLogger("optuna.storages").exception("a library's own line")
    assert "w0rd" not in caplog.text and "ss/" not in caplog.text and "cannot connect to" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# 17. A photo rewritten with the same size and modification time is seen


def test_a_photo_rewritten_with_its_size_and_mtime_is_rehashed(competition_copy, tmp_path):
    from pawpular.data.digest import images_digest
    from pawpular.data.tables import read_competition

    comp, record = read_competition(competition_copy), tmp_path / ".data_check.json"
    first = images_digest(comp, record)
    photo = sorted((competition_copy / "test").iterdir())[0]
    st, data = photo.stat(), bytearray(photo.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte changed: the same size
    photo.write_bytes(bytes(data))
    os.utime(photo, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the modification time put back
    assert photo.stat().st_size == st.st_size and photo.stat().st_mtime_ns == st.st_mtime_ns
    again = images_digest(read_competition(competition_copy), record)
    assert again["test"] != first["test"] and again["train"] == first["train"]
