"""Export + offline predict: a fresh process, the package from the artifact folder, no network, no training data."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pawpular.exporter import export

GUARD = """
import socket, sys
def _no_network(*a, **k):
    raise RuntimeError("predict tried to use the network")
socket.socket.connect = _no_network
socket.create_connection = _no_network
sys.path.insert(0, {src!r})
import pawpular
assert pawpular.__file__.startswith({src!r}), pawpular.__file__
from pawpular.cli import main
code = main({args!r})
stages = sorted(m for m in sys.modules if m.startswith(("pawpular.stages.", "pawpular.runner", "pawpular.training")))
assert not stages, f"predict imported pipeline-stage modules: {{stages}}"
sys.exit(code)
"""


def _predict_in_fresh_process(art: Path, data: Path, *args: str) -> subprocess.CompletedProcess:
    code = GUARD.format(src=str(art / "src"), args=["predict", "--artifacts", str(art), "--data", str(data), *args])
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=art.parent)


def assert_predict_matches(art: Path, data: Path, run: Path, tmp_path: Path) -> None:
    """predict in a fresh process writes the pipeline's submission.csv (same Ids in order, values within 1e-4)."""
    out = tmp_path / "submission.csv"
    r = _predict_in_fresh_process(art, data, "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    ours, pipeline = pd.read_csv(out), pd.read_csv(run / "submission.csv")
    assert ours["Id"].tolist() == pipeline["Id"].tolist()
    assert (ours["Pawpularity"] - pipeline["Pawpularity"]).abs().max() < 1e-4


@pytest.fixture(scope="module")
def test_only(small_competition, tmp_path_factory) -> Path:
    """The competition folder as a Kaggle notebook sees it at inference: test.csv, sample_submission.csv, test/."""
    root = tmp_path_factory.mktemp("kaggle") / "competition"
    shutil.copytree(small_competition / "test", root / "test")
    for name in ("test.csv", "sample_submission.csv"):
        shutil.copy(small_competition / name, root / name)
    return root


def test_export_holds_models_and_no_training_data(experiment_run, tmp_path):
    art = export(experiment_run, tmp_path / "art")
    files = {str(p.relative_to(art)) for p in art.rglob("*") if p.is_file()}
    manifest = json.loads((art / "manifest.json").read_text())
    name = experiment_run.name
    assert {f"experiments/{name}/train/fold{k}/best.pt" for k in range(3)} <= files
    assert {f"experiments/{name}/svr/fold{k}/model.pkl" for k in range(3)} <= files
    assert "src/pawpular/predictor.py" in files and f"experiments/{name}/config.yaml" in files
    assert not [f for f in files if f.endswith((".csv", "oof.parquet", "last.pt")) or "/emb/" in f]
    assert manifest["weights"] == json.loads((experiment_run / "ensemble" / "weights.json").read_text())["weights"]


def test_predict_round_trip_reproduces_the_pipeline(experiment_run, test_only, tmp_path):
    art = export(experiment_run, tmp_path / "art")
    assert_predict_matches(art, test_only, experiment_run, tmp_path)


def test_predict_estimate_and_bad_input(experiment_run, test_only, tmp_path):
    art = export(experiment_run, tmp_path / "art")
    r = _predict_in_fresh_process(art, test_only, "--estimate", "6800")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "6800 images ->" in r.stdout and "Kaggle's 9 h limit" in r.stdout
    broken = Path(shutil.copytree(test_only, tmp_path / "broken"))
    victim = pd.read_csv(broken / "test.csv")["Id"].iloc[2]
    (broken / "test" / f"{victim}.jpg").write_bytes(b"")
    out = tmp_path / "sub.csv"
    r = _predict_in_fresh_process(art, broken, "--out", str(out))
    assert r.returncode == 2 and f"test/{victim}.jpg: Id {victim}: empty file (0 bytes)" in r.stderr
    assert not out.exists()


def test_export_refuses_an_unfinished_experiment(partial_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="ensemble/weights.json"):
        export(partial_run, tmp_path / "art")
    assert not (tmp_path / "art").exists()


def test_round_trip_with_int8_compressed_embedder(experiment_run, small_competition, test_only, tmp_path):
    from pawpular import cli

    from conftest import tiny_args

    run = Path(shutil.copytree(experiment_run, tmp_path / "int8_run"))
    for stage in ("embed", "svr", "ensemble"):
        assert cli.main([stage, *tiny_args(small_competition, run), "--set", "embed.compress=int8"]) == 0
    art = export(run, tmp_path / "art")
    packed = sorted(art.rglob("embed_compressed.pt"))
    assert len(packed) == 3  # one int8 embedding model per fold travels
    import torch

    state = torch.load(packed[0], map_location="cpu", weights_only=False)
    assert state["compress"] == "int8" and any("_packed_params" in k for k in state["model"])
    assert_predict_matches(art, test_only, run, tmp_path)


def test_round_trip_with_frozen_random_backbones(experiment_run, small_competition, test_only, tmp_path):
    """Random-init frozen backbones must be rebuilt with the same weights at predict time (seeded init)."""
    from pawpular import cli

    from conftest import tiny_args

    run = Path(shutil.copytree(experiment_run, tmp_path / "mb_run"))
    backbones = ('embed.backbones=[{name: resnet, model: resnet18, pretrained: none, img_size: 64, '
                 'kwargs: {layers: [1, 1, 1, 1]}}]')
    sets = [backbones, "svr.features=[model, resnet]"]
    for stage in ("embed", "svr", "ensemble"):
        assert cli.main([stage, *tiny_args(small_competition, run), *[a for s in sets for a in ("--set", s)]]) == 0
    assert (run / "emb" / "resnet" / "test.parquet").is_file()
    assert_predict_matches(export(run, tmp_path / "art"), test_only, run, tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Every configuration the pipeline can produce: predict (fresh process, package from the folder, no network, test
# set only) reproduces the pipeline's submission.csv within 1e-4.

OTHER = "other_exp"
MATRIX = {
    "embed.source pretrained (frozen seeded backbone)": ["embed.source=pretrained"],
    "NN weight 0 (SVR head only)": ["ensemble.heads=[svr]"],
    "TTA in train, not in embed": ["embed.tta_hflip=false"],
    "TTA in embed, not in train": ["train.tta_hflip=false"],
    "bf16-compressed embedder": ["embed.compress=bf16"],
    "pretrained source, int8-compressed": ["embed.source=pretrained", "embed.compress=int8"],
    "two experiments blended": [f"ensemble.experiments=[{OTHER}]"],
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(MATRIX))
def test_predict_matrix_reproduces_the_pipeline(variant, experiment_run, small_competition, test_only, tmp_path):
    from pawpular import cli

    from conftest import tiny_args

    run = Path(shutil.copytree(experiment_run, tmp_path / "run"))
    sets = list(MATRIX[variant])
    if OTHER in variant or OTHER in " ".join(sets):
        other = Path(shutil.copytree(experiment_run, tmp_path / OTHER))  # its own SVR head (no flags, other C range)
        assert cli.main(["all", *tiny_args(small_competition, other), "--set", "svr.use_meta=false",
                         "--set", "svr.c_max=30"]) == 0
        sets = [f"ensemble.experiments=[{other}]"]
    assert cli.main(["all", *tiny_args(small_competition, run), *[a for s in sets for a in ("--set", s)]]) == 0
    weights = json.loads((run / "ensemble" / "weights.json").read_text())["weights"]
    if "NN weight 0" in variant:
        assert "nn" not in weights
    if "two experiments" in variant:
        assert f"{OTHER}/svr" in weights
    assert_predict_matches(export(run, tmp_path / "art"), test_only, run, tmp_path)
