"""Adversarial cases (issue 23), one section per class of failure: writes onto what the project did not make,
values that passed the config check and crashed later, errors that blamed the wrong thing, hostile images, a
record that was not true, and bugs shown as user errors.

Each case runs the real CLI (or the Python API) and asserts the exit code, that the message names the cause, and,
where the user had files, that every one of them is byte for byte what it was (``_tree`` before and after).
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from adversary import PEAK_OF_CHECK_DATA, fails_to_read, one_line, png_bomb, run_cli, tree, watched_budget
from conftest import CONFIG, REPO, tiny_args
from PIL import Image

import pawpular
from pawpular.cli import main as cli
from pawpular.config.schema import load_config
from pawpular.data import tables as data_module
from pawpular.data.splits import read_folds
from pawpular.store import artifacts
from pawpular.store.errors import ConfigError, MissingArtifact, ReadError, UsageError, WriteError
from pawpular.store.files import TEMP_GLOB, atomic_path, read_json, temp_path
from pawpular.store.lock import experiment_lock

# ---------------------------------------------------------------------------------------------------------------
# 1. A command deletes or replaces only what it provably wrote


def test_make_synthetic_replaces_only_a_folder_it_made(tmp_path, capsys, monkeypatch):
    thesis = tmp_path / "thesis"
    (thesis / "figures").mkdir(parents=True)
    (thesis / "chapter1.tex").write_text("years of work")
    monkeypatch.chdir(thesis / "figures")
    before = tree(tmp_path)
    for out in (thesis, "..", thesis / "chapter1.tex"):  # a user's folder, the parent of the cwd, a file
        code, err = run_cli(capsys, "make-synthetic", "--out", out, "--n-train", 20, "--n-test", 2)
        assert code == 2 and "make-synthetic --out" in err and one_line(err), err
    assert tree(tmp_path) == before
    ours = tmp_path / "syn"
    assert run_cli(capsys, "make-synthetic", "--out", ours, "--n-train", 20, "--n-test", 2)[0] == 0
    first = tree(ours)
    assert run_cli(capsys, "make-synthetic", "--out", ours, "--n-train", 20, "--n-test", 2, "--seed", 1)[0] == 0
    assert tree(ours) != first and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # replaced whole
    (ours / "train" / "notes.txt").write_text("mine")  # a file it did not write makes the folder not only its own
    before = tree(tmp_path)
    code, err = run_cli(capsys, "make-synthetic", "--out", ours, "--n-train", 20, "--n-test", 2)
    assert code == 2 and "train/notes.txt" in err and tree(tmp_path) == before


def test_the_lock_sweeps_only_the_projects_own_temporary_names(tmp_path):
    exp = tmp_path / "exp"
    (exp / "svr").mkdir(parents=True)
    for name in (".notes.tmp", "svr/.draft.md.tmp", ".cache.tmp/x"):  # a user's own dot-tmp files and folders
        (exp / name).parent.mkdir(parents=True, exist_ok=True)
        (exp / name).write_text("mine")
    with atomic_path(exp / "svr" / "oof.parquet") as tmp:
        killed = tmp.name  # the name a writer killed here leaves
        assert fnmatch.fnmatch(killed, TEMP_GLOB)
    mine = tree(exp)
    (exp / "svr" / killed).write_text("half")
    temp_path(exp / "train", "trash-123").mkdir()  # a removal killed between its rename and its delete
    with experiment_lock(exp, "test"):
        pass
    assert tree(exp) == mine  # the project's litter gone, the user's files all there


def test_export_never_replaces_the_experiment_or_a_folder_that_is_no_export(run, small_competition, tmp_path, capsys):
    data = Path(shutil.copytree(small_competition, tmp_path / "comp"))
    before = tree(tmp_path)
    for to in (run, tmp_path, data, run / "train"):  # the experiment, a folder above it, the data, its stage folder
        for flags in ((), ("--overwrite",)):
            code, err = run_cli(capsys, "export", "--output", run, "--to", to, *flags)
            assert code == 2 and f"--to {to}" in err and one_line(err), err
    assert tree(tmp_path) == before
    target = tmp_path / "art"
    assert run_cli(capsys, "export", "--output", run, "--to", target)[0] == 0
    (target / "my_notes.txt").write_text("mine")  # an export a user added to: --overwrite would delete it
    before = tree(tmp_path)
    code, err = run_cli(capsys, "export", "--output", run, "--to", target, "--overwrite")
    assert code == 2 and "my_notes.txt" in err and tree(tmp_path) == before


def test_predict_never_writes_onto_its_inputs(art, small_competition, tmp_path, capsys):
    data = Path(shutil.copytree(small_competition, tmp_path / "comp"))
    exported = Path(shutil.copytree(art, tmp_path / "art"))
    link = tmp_path / "test_link.csv"
    os.link(data / "test.csv", link)  # the same file under another name
    some_photo = next((data / "test").iterdir())
    targets = [
        data / "test.csv",
        data / "sample_submission.csv",
        data / "new.csv",
        some_photo,
        link,
        exported / "manifest.json",
        exported / "submission.csv",
        next(exported.rglob("config.yaml")),
    ]
    before = tree(tmp_path)
    for out in targets:
        code, err = run_cli(capsys, "predict", "--artifacts", exported, "--data", data, "--out", out)
        assert code == 2 and f"predict --out {out}" in err and "inputs" in err and one_line(err), err
    assert tree(tmp_path) == before


def test_a_stage_never_writes_into_the_data_or_a_users_folder(small_competition, tmp_path, capsys):
    data = Path(shutil.copytree(small_competition, tmp_path / "comp"))
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "cv.pdf").write_bytes(b"%PDF mine")
    before = tree(tmp_path)
    for out in (data, data / "out", docs):
        code, err = run_cli(capsys, "folds", *tiny_args(data, out))
        assert code == 2 and f"--output {out}" in err and one_line(err), err
    code, err = run_cli(capsys, "report", "--output", docs)  # nor a report.html into it
    assert code == 2 and "holds no pawpular experiment" in err and tree(tmp_path) == before


# ---------------------------------------------------------------------------------------------------------------
# 2. Values that passed the config check and crashed later


@pytest.mark.parametrize(
    "item, key",
    [
        ("svr.c_max=.inf", "svr.c_max"),
        ("train.lr=.inf", "train.lr"),
        ("train.lr=nan", "train.lr"),
        ("svr.gamma=-.inf", "svr.gamma"),
        ("model.kwargs={drop_path_rate: .nan}", "model.kwargs.drop_path_rate"),
    ],
)
def test_nan_and_infinite_values_are_refused_naming_the_key(small_competition, tmp_path, capsys, item, key):
    code, err = run_cli(capsys, "folds", *tiny_args(small_competition, tmp_path / "exp"), "--set", item)
    assert code == 2 and f"'{key}'" in err and "finite" in err and one_line(err), err
    assert not (tmp_path / "exp").exists()


def test_model_kwargs_timm_rejects_fail_before_the_stage_touches_anything(run, small_competition, capsys):
    before = tree(run)
    kwargs = "model.kwargs={embed_dim: 24, depths: [1, 1], num_heads: [1, 2], img_size: 64, bogus: 1}"
    code, err = run_cli(capsys, "train", *tiny_args(small_competition, run), "--set", kwargs)
    assert code == 2 and "model.kwargs" in err and "bogus" in err and one_line(err), err
    assert tree(run) == before  # the finished folds are still finished


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_one_line(small_competition, tmp_path, capsys):
    code, err = run_cli(capsys, "folds", *tiny_args(small_competition, tmp_path / "exp"), "--set", "device=cuda")
    assert code == 2 and "device: cuda" in err and one_line(err), err


def test_a_key_given_twice_in_a_yaml_file_is_an_error_naming_it(tmp_path, capsys):
    config = tmp_path / "my.yaml"
    config.write_text(CONFIG.read_text() + "\ntrain:\n  epochs: 1\n")  # the second train: would replace the first
    before = tree(tmp_path)
    code, err = run_cli(capsys, "config", "show", "--config", config)
    line = len(CONFIG.read_text().splitlines()) + 2
    assert code == 2 and f"line {line}: duplicate key 'train'" in err and str(config) in err, err
    code, err = run_cli(capsys, "config", "show", "--set", "model.kwargs={a: 1, a: 2}")
    assert code == 2 and "--set model.kwargs" in err and "duplicate key 'a'" in err
    assert tree(tmp_path) == before


@pytest.mark.parametrize(
    "kw, named",
    [
        ({"svr": {"features": "model"}}, "svr.features"),
        ({"ensemble": {"heads": "svr"}}, "ensemble.heads"),
        ({"ensemble__experiments": "output/other"}, "ensemble.experiments"),
        ({"set": "train.epochs=3"}, "set="),
    ],
)
def test_the_api_refuses_a_string_where_a_list_belongs(small_competition, tmp_path, kw, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        pawpular.run("folds", config=CONFIG, output=tmp_path / "exp", data=small_competition, **kw)
    assert not (tmp_path / "exp").exists()


# ---------------------------------------------------------------------------------------------------------------
# 3. Errors that blamed the wrong thing


def test_os_errors_say_whether_a_read_or_a_write_failed(small_competition, tmp_path, capsys):
    assert cli._os_error(ReadError(errno.EIO, "I/O", "a.csv")) == "cannot read a.csv: input/output error"
    assert cli._os_error(WriteError(errno.ENOSPC, "full", "b.pt")) == "cannot write b.pt: no space left on device"
    assert cli._os_error(PermissionError(errno.EACCES, "denied", "c")) == "c: permission denied"  # no verb guessed
    (tmp_path / "file").write_text("not a folder")
    code, err = run_cli(capsys, "folds", *tiny_args(small_competition, tmp_path / "file"))
    assert (
        code == 2
        and err.strip() == f"error: --output {tmp_path / 'file'}: is a file, not a folder; choose another --output"
    )


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="no /proc/self/mem (Linux) to fail a read with")
def test_a_real_read_error_is_named_as_a_read(small_competition, tmp_path, capsys):
    assert fails_to_read("/proc/self/mem") == errno.EIO  # address 0 is unmapped: an I/O error, even for root
    code, err = run_cli(
        capsys, "folds", *tiny_args(small_competition, tmp_path / "exp"), "--set", "folds.file=/proc/self/mem"
    )
    assert code == 2 and "cannot be read (input/output error)" in err and "write" not in err, err


def test_an_os_error_in_the_image_check_is_one_listed_problem(competition_copy, capsys):
    train = pd.read_csv(competition_copy / "train.csv", dtype=str, keep_default_na=False)
    train.loc[0, "Id"] = "a" * 300  # its photo's name is too long for the file system: stat fails (ENAMETOOLONG)
    train.loc[1, "Eyes"] = "2"
    train.to_csv(competition_copy / "train.csv", index=False)
    before = tree(competition_copy)
    code, err = run_cli(capsys, "check-data", "--data", competition_copy)
    assert code == 2 and "cannot be read (file name too long)" in err and "'Eyes' must be 0 or 1" in err, err
    assert "Traceback" not in err and tree(competition_copy) == before


def test_an_id_na_is_an_id_not_an_empty_cell(competition_copy, tmp_path, capsys):
    train = pd.read_csv(competition_copy / "train.csv", dtype=str, keep_default_na=False)
    old = train.loc[0, "Id"]
    train.loc[0, "Id"] = "NA"
    train.to_csv(competition_copy / "train.csv", index=False)
    (competition_copy / "train" / f"{old}.jpg").rename(competition_copy / "train" / "NA.jpg")
    code, out = run_cli(capsys, "check-data", "--data", competition_copy)
    assert code == 0 and "valid" in out, out
    exp = tmp_path / "exp"
    assert run_cli(capsys, "folds", *tiny_args(competition_copy, exp))[0] == 0
    cfg = load_config(CONFIG, ["folds.n_folds=3"], data_dir=str(competition_copy), output_dir=str(exp))
    folds = read_folds(exp, data_module.read_competition(competition_copy).train, cfg.folds)
    assert "NA" in set(folds["Id"]) and folds["Id"].notna().all()


def test_a_header_only_test_set_is_a_clear_error(art, competition_copy, tmp_path, capsys):
    for name in ("test.csv", "sample_submission.csv"):  # the header line alone
        (competition_copy / name).write_text((competition_copy / name).read_text().splitlines()[0] + "\n")
    code, err = run_cli(capsys, "predict", "--artifacts", art, "--data", competition_copy, "--out", tmp_path / "s.csv")
    assert code == 2 and "test.csv: file: has no rows" in err and not (tmp_path / "s.csv").exists(), err


def test_a_text_file_as_model_pretrained_is_named_as_no_weight_file(run, small_competition, capsys):
    notes = run.parent / "notes.txt"
    notes.write_text("my notes, not weights\n")
    before = tree(run.parent)
    code, err = run_cli(capsys, "train", *tiny_args(small_competition, run), "--set", f"model.pretrained={notes}")
    assert code == 2 and f"model.pretrained: {notes} is not a weight file" in err and one_line(err), err
    assert tree(run.parent) == before


def test_a_nan_loss_says_where_and_what_to_lower(small_competition, tmp_path, capsys):
    exp = tmp_path / "exp"
    assert run_cli(capsys, "folds", *tiny_args(small_competition, exp))[0] == 0
    code, err = run_cli(
        capsys,
        "train",
        *tiny_args(small_competition, exp),
        "--set",
        "train.lr=1e30",
        "--set",
        "train.head_lr=1e30",
        "--set",
        "train.grad_clip=0",
    )
    assert code == 2 and re.search(r"fold 0: the loss became (NaN|infinite) at epoch 1 step \d+", err), err
    assert "lower train.lr" in err and "checkpoint not found" not in err and one_line(err)
    assert not artifacts.best_checkpoint(exp, 0).exists()


def test_status_after_n_folds_changes_says_the_folds_are_stale(run, small_competition, capsys):
    before = tree(run)
    code, out = run_cli(capsys, "status", *tiny_args(small_competition, run), "--set", "folds.n_folds=4")
    assert code == 0 and re.search(r"folds\s+stale\s+folds.n_folds 3 -> 4", out) and "data problem" not in out, out
    assert tree(run) == before


def test_a_damaged_study_db_goes_with_overwrite_or_delete_study(run, small_competition, capsys):
    db = artifacts.study_db(run)
    db.write_bytes(os.urandom(4096))
    code, err = run_cli(capsys, "svr", *tiny_args(small_competition, run), "--set", "svr.c_max=50")
    assert code == 2 and str(db) in err and "damaged" in err and "--overwrite" in err and "svr.storage" not in err
    upstream = {k: v for k, v in tree(run).items() if k.startswith(("folds", "train", "emb"))}
    assert run_cli(capsys, "svr", *tiny_args(small_competition, run), "--overwrite")[0] == 0
    db.write_bytes(b"not a database")
    code, out = run_cli(capsys, "delete-study", *tiny_args(small_competition, run))
    assert code == 0 and f"removed {db}" in out and not db.exists(), out
    assert upstream == {k: v for k, v in tree(run).items() if k in upstream}


def test_after_train_folds_the_suggested_command_works(small_competition, tmp_path, capsys):
    args = [*tiny_args(small_competition, tmp_path / "exp"), "--set", "train.epochs=1", "--set", "train.folds=[0]"]
    code, err = run_cli(capsys, "all", *args)  # fold 0 trained, then embed refuses: train is partial
    assert code == 2 and "embed needs train, which is partial" in err and one_line(err), err
    code, out = run_cli(capsys, "status", *args)
    assert "next: pawpular all --set train.folds=null" in out, out
    suggested = re.search(r"run `pawpular ([^`]+)`", err).group(1).split()
    assert suggested[0] == "train"
    assert run_cli(capsys, *suggested[:1], *args, *suggested[1:])[0] == 0  # the user's flags, then the suggestion
    assert run_cli(capsys, "all", *args)[0] == 0  # every fold trained: the rest runs


@pytest.mark.parametrize("n", ["-5", "0"])
def test_predict_estimate_must_count_images(art, small_competition, tmp_path, capsys, n):
    code, err = run_cli(
        capsys, "predict", "--artifacts", art, "--data", small_competition, "--out", tmp_path / "s.csv", "--estimate", n
    )
    assert code == 2 and f"--estimate {n}" in err and one_line(err) and not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# 4. Hostile images: refused from the header, decoded within a bounded memory


def test_a_png_bomb_is_refused_from_its_header_quickly_and_in_little_memory(competition_copy):
    if not Path("/proc/self/status").is_file():
        pytest.skip("no /proc/self/status (VmHWM) on this system")
    victim = sorted((competition_copy / "train").iterdir())[0]
    png_bomb(victim, 20000, 20000)  # 400 megapixels: decoding it took 4.8 GB
    assert victim.stat().st_size < 1_000_000
    r = subprocess.run(
        [sys.executable, "-c", PEAK_OF_CHECK_DATA, str(competition_copy)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    code, mib, seconds = r.stdout.split("RESULT")[1].split()
    assert int(code) == 2 and f"train/{victim.name}: Id {victim.stem}: 20000x20000 pixels" in r.stderr, r.stderr
    assert "over the cap" in r.stderr and "PAWPULAR_MAX_PIXELS" in r.stderr
    assert float(mib) < 150 and float(seconds) < 30, (mib, seconds)  # the decode alone would need > 1.5 GB


def test_check_data_decodes_at_most_one_cap_of_pixels_at_a_time(tmp_path, monkeypatch, capsys):
    from pawpular.data.synthetic import make_synthetic

    comp = make_synthetic(tmp_path / "comp", n_train=20, n_test=1, seed=0)
    noise = np.random.default_rng(0).integers(0, 255, (1000, 1000, 3), dtype=np.uint8)
    for p in sorted((comp / "train").iterdir())[:8]:
        Image.fromarray(noise).save(p, format="PNG", compress_level=1)  # 1 MP each, 8 for 8 threads
    in_flight: list[int] = []
    monkeypatch.setattr(data_module, "PixelBudget", watched_budget(in_flight))
    for cap, bounded in ((2_500_000, True), (1_000_000_000, False)):
        monkeypatch.setenv("PAWPULAR_MAX_PIXELS", str(cap))
        in_flight.clear()
        assert run_cli(capsys, "check-data", "--data", comp)[0] == 0
        # at 2.5 MP two 1 MP photos (and small ones) at a time, never three; without a tight cap three or more
        # decode together (so the bound is what keeps them apart)
        assert (max(in_flight) <= 2_500_000) == bounded, in_flight
    monkeypatch.setenv("PAWPULAR_MAX_PIXELS", "lots")
    code, err = run_cli(capsys, "check-data", "--data", comp)
    assert code == 2 and "PAWPULAR_MAX_PIXELS='lots'" in err and one_line(err)


# ---------------------------------------------------------------------------------------------------------------
# 5. The record is true


def test_config_yaml_shows_the_trials_that_made_the_svr(run, small_competition, capsys):
    assert run_cli(capsys, "svr", *tiny_args(small_competition, run), "--set", "svr.n_trials=10")[0] == 0
    assert run_cli(capsys, "svr", *tiny_args(small_competition, run), "--set", "svr.n_trials=8")[0] == 0  # cached
    saved = load_config(artifacts.config_yaml(run))
    assert saved.svr.n_trials == read_json(artifacts.best_params(run))["n_trials"] == 10


def test_a_hand_edited_manifest_is_not_trusted(run, small_competition, capsys):
    path = artifacts.manifest(run, "svr")
    record = json.loads(path.read_text())
    record["config"]["svr"]["c_max"] = 50.0  # "the outputs were made with c_max 50": they were not
    path.write_text(json.dumps(record))
    legacy = artifacts.manifest(run, "folds")  # as versions before the digest wrote them: trusted as then
    legacy.write_text(json.dumps({k: v for k, v in json.loads(legacy.read_text()).items() if k != "digest"}))
    upstream = {k: v for k, v in tree(run).items() if k.startswith(("folds", "train", "emb"))}
    code, out = run_cli(capsys, "status", *tiny_args(small_competition, run), "--set", "svr.c_max=50")
    assert code == 0 and re.search(r"svr\s+damaged\s+svr/manifest.json was changed after it was written", out), out
    assert re.search(r"folds\s+done", out), out
    assert run_cli(capsys, "svr", *tiny_args(small_competition, run), "--set", "svr.c_max=50")[0] == 0
    code, out = run_cli(capsys, "status", *tiny_args(small_competition, run), "--set", "svr.c_max=50")
    assert re.search(r"svr\s+done", out) and upstream == {k: v for k, v in tree(run).items() if k in upstream}


# ---------------------------------------------------------------------------------------------------------------
# 6. A bug is not a user error


@pytest.mark.parametrize(
    "error, code",
    [
        (ValueError("boom"), 70),
        (KeyError("boom"), 70),
        (FileNotFoundError(errno.ENOENT, "No such file", "x.parquet"), 70),
        (ConfigError("train.lr: boom"), 2),
        (OSError(errno.ENOSPC, "No space", "y.pt"), 2),
    ],
)
def test_a_bug_shows_its_traceback_and_a_user_error_one_line(
    small_competition, tmp_path, capsys, monkeypatch, error, code
):
    def status(cfg, names=None):
        raise error

    monkeypatch.setattr("pawpular.runner.status", status)
    got, err = run_cli(capsys, "status", *tiny_args(small_competition, tmp_path / "exp"))
    assert got == code, err
    if code == 70:
        assert "Traceback" in err and "this is a bug in pawpular" in err and type(error).__name__ in err, err
    else:
        assert one_line(err) and ("boom" in err or "y.pt: no space left on device" in err)


def test_user_errors_keep_the_bases_callers_catch():
    from pawpular.data.tables import DataError
    from pawpular.machine.backend import DeviceError
    from pawpular.store.errors import ArtifactError, PawpularError

    assert issubclass(MissingArtifact, FileNotFoundError) and issubclass(MissingArtifact, ArtifactError)
    assert issubclass(UsageError, ValueError) and issubclass(DeviceError, RuntimeError)
    assert all(issubclass(e, PawpularError) for e in (ConfigError, DataError, ArtifactError, UsageError, DeviceError))
