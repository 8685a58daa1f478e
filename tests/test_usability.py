"""Where Kagglers work: progress in piped output, an API that raises, help that names inputs and outputs, config
errors that blame the right place, Ctrl-C / SIGTERM that leave a resumable run, the generated Kaggle notebook
run offline, run.sh's own help and its --set pass-through."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import CONFIG, REPO, tiny_args

import pawpular
from pawpular.cli import main as cli
from pawpular.config.schema import load_config
from pawpular.data.tables import DataError
from pawpular.store.errors import ConfigError
from pawpular.store.files import ArtifactError


def _env(**extra: str) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


# ---------------------------------------------------------------------------------------------------------------
# Progress without a terminal


@pytest.mark.slow
def test_progress_lines_in_piped_output(experiment_run, small_competition, tmp_path):
    run = Path(shutil.copytree(experiment_run, tmp_path / "run"))
    r = subprocess.run(
        [sys.executable, "-m", "pawpular", "all", *tiny_args(small_competition, run), "--overwrite"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=_env(PAWPULAR_PROGRESS_SECONDS="0"),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stderr.splitlines()
    train = [x for x in lines if re.search(r"fold 0 epoch 1/2: \d+/\d+ \(\d+%\), [\d.]+ img/s, (ETA|took) ", x)]
    assert train and all("loss " in x and "lr " in x for x in train), "\n".join(lines[:40])
    assert any(re.search(r"fold\d/train: \d+/\d+ .* batch/s", x) for x in lines)  # embed
    assert any(re.search(r"svr trials: \d+/8 .* trial/s.*best [\d.]+", x) for x in lines)
    assert "\r" not in r.stderr  # no bar escape codes in a log


def test_a_progress_line_is_logged_once(caplog, monkeypatch):
    """The closing line is not the last update's line again (it used to print twice)."""
    from pawpular.logs import progress

    monkeypatch.setattr(progress, "_bar_class", lambda: None)  # a log, as in piped output
    with caplog.at_level("INFO", logger="pawpular"):
        with progress.Progress(desc="job", total=3, unit="it", every=0) as bar:
            for _ in range(3):
                bar.update()
        with progress.Progress(desc="slow", total=3, unit="it", every=3600) as bar:
            for _ in range(3):
                bar.update()  # nothing logged on the way: no closing line either
    lines = [r.getMessage() for r in caplog.records]
    assert [x.split(",")[0] for x in lines] == ["job: 1/3 (33%)", "job: 2/3 (67%)", "job: 3/3 (100%)"], lines


# ---------------------------------------------------------------------------------------------------------------
# The Python API raises; the CLI keeps its exit codes


def test_api_raises_where_the_cli_returns_2(experiment_run, small_competition, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        pawpular.predict(tmp_path / "no-export", tmp_path / "no-data", tmp_path / "sub.csv")
    assert cli.main(["predict", "--artifacts", str(tmp_path / "no-export"), "--data", str(tmp_path)]) == 2
    assert "manifest.json" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="did you mean 'train.epochs'"):
        pawpular.run("train", config=CONFIG, output=tmp_path / "exp", train__epoch=1)
    with pytest.raises(ArtifactError, match="run `pawpular folds`"):
        pawpular.run("train", config=CONFIG, output=tmp_path / "exp", data=small_competition)
    art = pawpular.export(experiment_run, tmp_path / "art")
    with pytest.raises(DataError, match="competition folder does not exist"):
        pawpular.predict(art, tmp_path / "wrong-data", tmp_path / "sub.csv")
    assert not (tmp_path / "sub.csv").exists()


def test_api_overrides_reach_the_config(tmp_path):
    from pawpular.api import config_from

    cfg = config_from(
        CONFIG, output=tmp_path, train={"epochs": 3, "lr": 1e-3}, svr__n_trials=7, set=["model.use_meta=false"]
    )
    assert (cfg.train.epochs, cfg.train.lr, cfg.svr.n_trials, cfg.model.use_meta) == (3, 1e-3, 7, False)
    assert cfg.out == tmp_path


def test_estimate_says_it_wrote_no_submission(experiment_run, small_competition, tmp_path, capsys):
    art = pawpular.export(experiment_run, tmp_path / "art")
    assert (
        cli.main(
            [
                "predict",
                "--artifacts",
                str(art),
                "--data",
                str(small_competition),
                "--out",
                str(tmp_path / "sub.csv"),
                "--estimate",
                "6800",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "6800 images ->" in out and "No submission written" in out and not (tmp_path / "sub.csv").exists()


def test_export_refuses_a_non_empty_target_without_overwrite(experiment_run, tmp_path, capsys):
    target = tmp_path / "art"
    assert cli.main(["export", "--output", str(experiment_run), "--to", str(target)]) == 0
    assert cli.main(["export", "--output", str(experiment_run), "--to", str(target)]) == 2
    assert "exists and is not empty: pass --overwrite" in capsys.readouterr().err
    before = (target / "manifest.json").stat().st_ino
    assert cli.main(["export", "--output", str(experiment_run), "--to", str(target), "--overwrite"]) == 0
    assert (target / "manifest.json").stat().st_ino != before  # a new export, written beside the old one
    mine = tmp_path / "mine"  # a folder that is no export is never replaced (tests/test_adversarial.py: the rest)
    mine.mkdir()
    (mine / "mine.txt").write_text("not an export")
    assert cli.main(["export", "--output", str(experiment_run), "--to", str(mine), "--overwrite"]) == 2
    assert "not an export" in capsys.readouterr().err and (mine / "mine.txt").read_text() == "not an export"


# ---------------------------------------------------------------------------------------------------------------
# Help that teaches; config that checks itself


@pytest.mark.parametrize(
    "stage, names",
    [
        ("folds", ["folds/folds.csv", "train.csv"]),
        ("train", ["train/fold{k}/best.pt", "folds/folds.csv", "train.lr"]),
        ("embed", ["emb/fold{k}/{train,test}.parquet", "best.pt", "embed.tta_hflip"]),
        ("svr", ["svr/fold{k}/head.safetensors", "svr.n_trials", "emb/"]),
        ("ensemble", ["submission.csv", "ensemble/weights.json", "ensemble.method"]),
        ("select", ["select/selection.json", "embed.backbones"]),
    ],
)
def test_stage_help_says_what_it_reads_writes_and_needs(stage, names, capsys):
    with pytest.raises(SystemExit):
        cli.main([stage, "--help"])
    text = capsys.readouterr().out
    for word in ("Reads", "Writes", "Needs" if stage != "folds" else "Run", *names):
        assert word in text, f"{stage} --help lacks {word!r}"


def test_stage_help_read_from_the_sources_is_each_modules_own():
    """The parser reads stage help from the sources (so predict imports no stage; test_predict checks that), and
    what it reads is exactly each module's SUMMARY and docstring."""
    from pawpular import stages

    for name in (*stages.PIPELINE, *stages.ON_DEMAND):
        module = stages.get(name)
        assert stages.describe(name) == (module.SUMMARY, module.HELP), name


def test_top_help_and_report_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert "Each pipeline stage is a module" not in text and "pawpular status" in text and "doctor" in text
    with pytest.raises(SystemExit):
        cli.main(["report", "--help"])
    text = capsys.readouterr().out
    assert "--set" not in text and "--overwrite" not in text and "--output" in text


@pytest.mark.parametrize(
    "where, value, blamed, message",
    [
        ("set", "train.epoch=1", "--set train.epoch=1", "did you mean 'train.epochs'"),
        ("file", "train: {epoch: 1}", "bad.yaml", "did you mean 'train.epochs'"),
        ("set", "model.img_size=-3", "--set model.img_size=-3", "model.img_size=-3: must be > 0"),
        (
            "set",
            "train.folds=[0, 7]",
            "--set train.folds=[0, 7]",
            "train.folds must list distinct folds in 0..folds.n_folds-1",
        ),
        ("file", "svr: {c_min: 500, c_max: 100}", "bad.yaml", "svr.c_min must be < svr.c_max"),
        ("set", "svr.c_min=500", "--set svr.c_min=500", "svr.c_min must be < svr.c_max"),
        ("set", "embed.compress=int4", "--set embed.compress=int4", "must be none, int8, bf16"),
    ],
)
def test_config_errors_blame_the_right_place(tmp_path, where, value, blamed, message):
    path = tmp_path / "bad.yaml"
    path.write_text(value + "\n" if where == "file" else "experiment: x\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, [value] if where == "set" else [])
    text = str(e.value)
    assert text.startswith(blamed if where == "set" else str(path)) and message in text, text


def test_config_show_prints_every_key_with_default_and_type(capsys):
    assert cli.main(["config", "show", "--config", str(CONFIG), "--set", "train.epochs=3"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^train.epochs\s+3\s+\(default 5\)\s+\[int\]$", text, re.M)
    assert re.search(r"^svr.storage\s+null\s+\[str or null\]$", text, re.M)
    assert cli.main(["config", "show", "--key", "out", "--config", str(CONFIG), "--output", "/x/y"]) == 0
    assert capsys.readouterr().out.strip() == "/x/y"


# ---------------------------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM: one line, the lock released, the rerun resumes


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_leaves_a_resumable_run(experiment_run, small_competition, tmp_path, sig, code, caplog):
    run = Path(
        shutil.copytree(
            experiment_run,
            tmp_path / "run",
            ignore=shutil.ignore_patterns("train", "emb", "svr", "ensemble", "submission.csv"),
        )
    )
    # fold 0 alone, 8 epochs: the signal lands while it trains (with 2 epochs and 3 folds, a busy machine could let
    # it finish them all between the poll that saw fold 0's first checkpoint and the signal); the rerun trains the
    # epochs left of that one fold
    argv = [
        sys.executable,
        "-m",
        "pawpular",
        "train",
        *tiny_args(small_competition, run, "train.epochs=8", "train.folds=[0]"),
    ]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO, env=_env())
    deadline = time.time() + 300
    while not (run / "train" / "fold0" / "last.pt").is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == code, err[-2000:]
    assert err.strip().splitlines()[-1] == "interrupted; rerun the same command to resume"
    assert "Traceback" not in err and not (run / ".lock").exists() and not list(run.rglob(".*.tmp"))
    with caplog.at_level("INFO", logger="pawpular"):  # the same command again, in this process
        assert cli.main(argv[3:]) == 0
    assert re.search(r"resuming after epoch [1-7]\b", caplog.text), caplog.text[-2000:]


# ---------------------------------------------------------------------------------------------------------------
# The Kaggle notebook that export writes, run offline


@pytest.mark.slow
def test_generated_notebook_runs_offline_against_the_export(experiment_run, small_competition, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    art = pawpular.export(experiment_run, tmp_path / "art")
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    guard = (
        "import socket\ndef _no(*a, **k):\n    raise RuntimeError('the notebook used the network')\n"
        "socket.socket.connect = _no\nsocket.create_connection = _no\n"
    )
    (tmp_path / "guard").mkdir()
    (tmp_path / "guard" / "sitecustomize.py").write_text(guard)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "test",
                "language": "python",
                "env": {"PYTHONPATH": str(tmp_path / "guard")},
            }
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    for key, value in (
        ("PAWPULAR_ARTIFACTS", art),
        ("PAWPULAR_DATA", small_competition),
        ("PAWPULAR_OUT", tmp_path / "submission.csv"),
    ):
        monkeypatch.setenv(key, str(value))
    nb = nbformat.read(art / "inference.ipynb", as_version=4)
    NotebookClient(nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert f"from {art}/src/pawpular" in text  # the package shipped in the folder, not the installed one
    ours, pipeline = pd.read_csv(tmp_path / "submission.csv"), pd.read_csv(experiment_run / "submission.csv")
    assert (ours["Pawpularity"] - pipeline["Pawpularity"]).abs().max() < 1e-4
    broken = nbformat.read(art / "inference.ipynb", as_version=4)
    monkeypatch.setenv("PAWPULAR_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(Exception, match="competition folder does not exist"):  # fails loudly, not a silent pass
        NotebookClient(
            broken, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(tmp_path)}}
        ).execute()


# ---------------------------------------------------------------------------------------------------------------
# run.sh


def test_run_sh_help_is_its_own():
    r = subprocess.run(["bash", str(REPO / "run.sh"), "help"], capture_output=True, text=True)
    assert r.returncode == 0 and "./run.sh test [ARGS]" in r.stdout and "[setup]" not in r.stdout
    assert subprocess.run(["bash", str(REPO / "run.sh"), "--help"], capture_output=True, text=True).stdout == r.stdout


@pytest.mark.slow
def test_run_sh_passes_set_data_and_output_to_the_pipeline(small_competition, tmp_path):
    out = tmp_path / "exp"
    smaller = ["folds.n_folds=2", "train.epochs=1", "svr.n_trials=3"]  # what is passed matters, not the run's size
    r = subprocess.run(
        ["bash", str(REPO / "run.sh"), *tiny_args(small_competition, out, *smaller)[2:], "--config", str(CONFIG)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=_env(),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"submission: {out}/submission.csv" in r.stdout and (out / "report.html").is_file()
    cfg = load_config(out / "config.yaml")
    assert (cfg.svr.n_trials, cfg.folds.n_folds, cfg.train.epochs) == (3, 2, 1)


def test_offline_hub_fails_in_seconds_with_the_local_file_hint(small_competition, tmp_path, capsys):
    """Old: about a minute of retries, then a generic Hugging Face error that never named model.pretrained."""
    out = tmp_path / "exp"
    assert cli.main(["folds", *tiny_args(small_competition, out)]) == 0
    t0 = time.time()
    code = cli.main(["train", *tiny_args(small_competition, out), "--set", "model.pretrained=hub"])
    seconds = time.time() - t0
    err = capsys.readouterr().err
    if "unreachable" not in err:
        pytest.skip("this machine reaches huggingface.co: the offline path cannot be shown here")
    assert code == 2 and seconds < 30
    assert "model.pretrained: hub" in err and "local .safetensors" in err and "Traceback" not in err
