"""Export + offline predict: a fresh process, the package from the artifact folder, no network, no training data,
no unpickling, and no scikit-learn, albumentations or Optuna imported."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pawpular.ship.exporter import export

GUARD = """
import socket, sys
def _no_network(*a, **k):
    raise RuntimeError("predict tried to use the network")
socket.socket.connect = _no_network
socket.create_connection = _no_network
import pickle
def _no_unpickling(*a, **k):
    raise RuntimeError("predict tried to unpickle something")
pickle.load = pickle.loads = _no_unpickling
class _NoUnpickler:
    def __init__(self, *a, **k):
        _no_unpickling()
pickle.Unpickler = _NoUnpickler
sys.path.insert(0, {src!r})
import pawpular
assert pawpular.__file__.startswith({src!r}), pawpular.__file__
from pawpular.cli.main import main
codes = [main(args) for args in {argvs!r}]
print("exit codes:", codes, file=sys.stderr)
pipeline = ("pawpular.stages.", "pawpular.runner", "pawpular.model.training")
stages = sorted(m for m in sys.modules if m.startswith(pipeline))
assert not stages, f"predict imported pipeline-stage modules: {{stages}}"
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & {{"sklearn", "albumentations", "optuna", "scipy", "cuml"}})
assert not heavy, f"predict imported {{heavy}}: it needs neither scikit-learn nor cuML, nor training libraries"
sys.exit(max(codes))
"""


def _predict_in_fresh_process(
    art: Path, data: Path, *args: str, python: str | Path = sys.executable, more: tuple[Path, ...] = ()
) -> subprocess.CompletedProcess:
    """predict from ``art`` in a fresh process, its package imported from ``art/src``; the folders in ``more``
    predicted after it by the same process (the same arguments; each writes ``<folder>.csv`` beside it)."""
    argvs = [["predict", "--artifacts", str(a), "--data", str(data), *args] for a in (art, *more)]
    for argv, folder in zip(argvs[1:], more, strict=True):
        argv[argv.index("--out") + 1] = str(folder.with_suffix(".csv"))
    code = GUARD.format(src=str(art / "src"), argvs=argvs)
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=env, cwd=art.parent)


def assert_predict_matches(
    art: Path, data: Path, run: Path, tmp_path: Path, python: str | Path = sys.executable
) -> subprocess.CompletedProcess:
    """predict in a fresh process writes the pipeline's submission.csv (same Ids in order, values within 1e-4)."""
    out = tmp_path / "submission.csv"
    r = _predict_in_fresh_process(art, data, "--out", str(out), python=python)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_submission(out, run)
    return r


def assert_same_submission(ours: Path, run: Path) -> None:
    """``ours`` is the run's submission.csv: the same Ids in order, values within 1e-4."""
    ours, pipeline = pd.read_csv(ours), pd.read_csv(run / "submission.csv")
    assert ours["Id"].tolist() == pipeline["Id"].tolist()
    assert (ours["Pawpularity"] - pipeline["Pawpularity"]).abs().max() < 1e-4


def test_export_holds_models_as_data_and_no_training_data(experiment_run, tmp_path):
    art = export(experiment_run, tmp_path / "art")
    files = {str(p.relative_to(art)) for p in art.rglob("*") if p.is_file()}
    manifest = json.loads((art / "manifest.json").read_text())
    name = experiment_run.name
    assert {f"experiments/{name}/train/fold{k}/model.safetensors" for k in range(3)} <= files
    assert {f"experiments/{name}/svr/fold{k}/head.safetensors" for k in range(3)} <= files
    assert "src/pawpular/ship/predictor.py" in files and f"experiments/{name}/config.yaml" in files
    assert not [f for f in files if f.endswith((".csv", "oof.parquet", "last.pt")) or "/emb/" in f]
    # Nothing but the package source is code: no pickle (torch .pt/.pth, .pkl) anywhere, only arrays and settings
    data_files = [f for f in files if not f.startswith("src/")]
    assert {Path(f).suffix for f in data_files} <= {".safetensors", ".yaml", ".json", ".ipynb"}, data_files
    assert not [f for f in data_files if _is_pickle(art / f)]
    assert manifest["weights"] == json.loads((experiment_run / "ensemble" / "weights.json").read_text())["weights"]
    assert {"python", "torch", "timm", "numpy", "pandas"} <= set(manifest["versions"])
    fold0 = manifest["experiments"][name]
    assert fold0["nn"]["0"]["policy"] == {"precision": "fp32", "channels_last": False}
    assert fold0["embeddings"]["fold0"] == {
        "policy": {"precision": "fp32", "channels_last": False},
        "compress": "none",
        "tta_hflip": True,
    }


def _is_pickle(path: Path) -> bool:
    """A pickle, bare or inside a zip (torch.save's format holds data.pkl)."""
    import zipfile

    head = path.read_bytes()[:2]
    return head[:1] == b"\x80" or (
        zipfile.is_zipfile(path) and any(n.endswith(".pkl") for n in zipfile.ZipFile(path).namelist())
    )


@pytest.mark.slow
def test_predict_round_trip_reproduces_the_pipeline(experiment_run, test_only, tmp_path):
    art = export(experiment_run, tmp_path / "art")
    assert_predict_matches(art, test_only, experiment_run, tmp_path)


@pytest.mark.slow
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


@pytest.mark.slow
def test_round_trip_with_int8_compressed_embedder(experiment_run, small_competition, test_only, tmp_path):
    """int8 travels as the weights it was quantized from plus the setting; predict quantizes them again and runs
    the int8 model on the CPU, even when predict's device is a GPU."""
    from conftest import tiny_args

    from pawpular.cli import main as cli
    from pawpular.data.tables import read_test_set
    from pawpular.ship.experiment import Experiment
    from pawpular.ship.predictor import read_manifest
    from pawpular.store import artifacts

    run = Path(shutil.copytree(experiment_run, tmp_path / "int8_run"))
    sets = ["embed.compress=int8", "ensemble.heads=[svr]"]
    for stage in ("embed", "svr", "ensemble"):
        assert cli.main([stage, *tiny_args(small_competition, run), *[a for s in sets for a in ("--set", s)]]) == 0
    art = export(run, tmp_path / "art")
    info = read_manifest(art)["experiments"][run.name]
    assert {e["compress"] for e in info["embeddings"].values()} == {"int8"} and len(info["embeddings"]) == 3
    assert len(list(art.rglob("model.safetensors"))) == 3
    assert_predict_matches(art, test_only, run, tmp_path)
    # device "cuda" on this CPU-only machine: only an int8 model kept on the CPU can run at all
    test, _ = read_test_set(test_only)
    svr = Experiment(artifacts.export_experiment(art, run.name), info, "cuda").run(test, test_only)["svr"]
    pipeline = pd.read_parquet(run / "svr" / "test.parquet")
    assert pipeline["Id"].tolist() == test["Id"].tolist()
    assert abs(svr - pipeline["pred"].to_numpy()).max() < 1e-4


@pytest.mark.slow
def test_round_trip_with_frozen_random_backbones(experiment_run, small_competition, test_only, tmp_path):
    """Random-init frozen backbones must be rebuilt with the same weights at predict time (seeded init)."""
    from conftest import tiny_args

    from pawpular.cli import main as cli

    run = Path(shutil.copytree(experiment_run, tmp_path / "mb_run"))
    backbones = (
        "embed.backbones=[{name: resnet, model: resnet18, pretrained: none, img_size: 64, "
        "kwargs: {layers: [1, 1, 1, 1]}}]"
    )
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


def _matrix_run(variant: str, experiment_run: Path, comp: Path, root: Path) -> Path:
    """The session's run copied and finished again with the variant's settings; exported to ``root/art``."""
    from conftest import tiny_args

    from pawpular.cli import main as cli

    run = Path(shutil.copytree(experiment_run, root / "run"))
    sets = list(MATRIX[variant])
    if OTHER in " ".join(sets):
        other = Path(shutil.copytree(experiment_run, root / OTHER))  # its own SVR head (no flags, other C range)
        assert cli.main(["all", *tiny_args(comp, other), "--set", "svr.use_meta=false", "--set", "svr.c_max=30"]) == 0
        sets = [f"ensemble.experiments=[{other}]"]
    assert cli.main(["all", *tiny_args(comp, run), *[a for s in sets for a in ("--set", s)]]) == 0
    export(run, root / "art")
    return run


@pytest.fixture(scope="module")
def matrix(experiment_run, small_competition, test_only, tmp_path_factory):
    """Every variant's run and export, then one fresh process predicting them all (the import guard over every
    variant's path; a process each would spend 4-5 s on imports), built once for the session: {variant: (run, its
    predict's csv)}, and what that process printed and returned."""
    from conftest import built_once

    def build(root: Path) -> None:
        runs = [_matrix_run(v, experiment_run, small_competition, root / f"v{i}") for i, v in enumerate(MATRIX)]
        arts = [run.parent / "art" for run in runs]
        r = _predict_in_fresh_process(arts[0], test_only, "--out", str(arts[0].with_suffix(".csv")), more=arts[1:])
        (root / "predict.json").write_text(json.dumps({"returncode": r.returncode, "stderr": r.stderr}))

    root = built_once(tmp_path_factory, "predict_matrix", build)
    found = {v: (root / f"v{i}" / "run", root / f"v{i}" / "art.csv") for i, v in enumerate(MATRIX)}
    return found, json.loads((root / "predict.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(MATRIX))
def test_predict_matrix_reproduces_the_pipeline(variant, matrix):
    found, r = matrix
    run, sub = found[variant]
    codes = re.search(r"exit codes: \[(.*)\]", r["stderr"])  # one per variant, printed before the guard's checks
    assert codes and codes.group(1).split(", ")[list(MATRIX).index(variant)] == "0", r["stderr"][-3000:]
    assert r["returncode"] == 0 and sub.is_file(), r["stderr"][-3000:]  # the guard held
    weights = json.loads((run / "ensemble" / "weights.json").read_text())["weights"]
    if "NN weight 0" in variant:
        assert "nn" not in weights
    if "two experiments" in variant:
        assert f"{OTHER}/svr" in weights
    assert_same_submission(sub, run)


@pytest.mark.slow
def test_experiments_sharing_a_folder_name_are_refused_at_ensemble(experiment_run, small_competition, tmp_path, capsys):
    """Two blended experiments called alike would be one in weights.json and in the export: refused, nothing written."""
    from conftest import tiny_args

    from pawpular.cli import main as cli

    run = Path(shutil.copytree(experiment_run, tmp_path / "run"))
    a = Path(shutil.copytree(experiment_run, tmp_path / "a" / OTHER))
    b = Path(shutil.copytree(experiment_run, tmp_path / "b" / OTHER))
    before = (run / "ensemble" / "weights.json").read_bytes()
    for listed, why in (
        ([a, b], f"{a} and {b} are both called '{OTHER}'"),
        ([a, a], f"{a} is listed twice"),
        ([run], "is listed twice (or is this experiment itself)"),
    ):
        code = cli.main(
            [
                "ensemble",
                *tiny_args(small_competition, run),
                "--set",
                f"ensemble.experiments=[{', '.join(map(str, listed))}]",
            ]
        )
        err = capsys.readouterr().err
        assert code == 2 and "ensemble.experiments" in err and why in err, err
    assert (run / "ensemble" / "weights.json").read_bytes() == before


@pytest.mark.slow
def test_predict_refuses_weights_it_cannot_honour(experiment_run, test_only, tmp_path):
    """A weighted model missing from the folder, or weights not summing to 1: refused, no submission."""
    from pawpular.ship.predictor import manifest_digest

    art = export(experiment_run, tmp_path / "art")
    manifest = json.loads((art / "manifest.json").read_text())
    out = tmp_path / "sub.csv"
    for change, why in (
        (lambda m: m["weights"].update({"other/svr": 0.25}), "the blend weighs other/svr"),
        (lambda m: m["weights"].update(nn=m["weights"]["nn"] + 0.1), "weights sum to"),
    ):
        broken = json.loads(json.dumps(manifest))
        change(broken)
        broken["digest"] = manifest_digest(broken)  # as an export that wrote them would sign them
        (art / "manifest.json").write_text(json.dumps(broken))
        r = _predict_in_fresh_process(art, test_only, "--out", str(out))
        assert r.returncode == 2 and why in r.stderr, r.stderr[-2000:]
        assert not out.exists()


@pytest.mark.slow
def test_predict_at_the_lowest_supported_versions(experiment_run, test_only, tmp_path):
    """predict in an environment at requirements.txt's lower bounds (numpy, pandas, pyarrow, timm, pillow,
    safetensors, opencv, pyyaml, tqdm; torch stays), with no scikit-learn, albumentations or Optuna installed,
    reproduces the pipeline's submission, and says which versions differ from the export's."""
    from lowest_env import _release, build, lower_bounds

    python = build()
    found = subprocess.run(  # the installed versions, read without importing them (predict below imports them)
        [
            str(python),
            "-c",
            "from importlib.metadata import version as v; "
            "print(*(v(n) for n in ('numpy', 'pandas', 'timm', 'pillow', 'pyarrow')))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    bounds = lower_bounds()
    for version, name in zip(found, ("numpy", "pandas", "timm", "pillow", "pyarrow"), strict=True):
        assert _release(version)[: len(_release(bounds[name]))] == _release(bounds[name]), (name, version)
    missing = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.util as u; print([m for m in ('sklearn', 'albumentations', 'optuna') if u.find_spec(m)])",
        ],
        capture_output=True,
        text=True,
    )
    assert missing.stdout.strip() == "[]"
    r = assert_predict_matches(export(experiment_run, tmp_path / "art"), test_only, experiment_run, tmp_path, python)
    assert "library versions differ from the export's" in r.stderr and "numpy" in r.stderr


@pytest.mark.slow
def test_each_model_ships_and_uses_its_own_policy(experiment_run, small_competition, test_only, tmp_path, caplog):
    """Folds made on another machine keep their policy: the manifests of one fold's model and of another fold's
    embeddings say bf16 (as on an A100); the ensemble says the blend mixes policies, the export ships each
    model's own, and predict on this CPU runs those in bf16 where it has the instructions, else in fp32 with a
    warning; the others as recorded."""
    import logging

    from conftest import tiny_args

    from pawpular.cli import main as cli
    from pawpular.store import manifest

    run = Path(shutil.copytree(experiment_run, tmp_path / "run"))
    gpu = {"precision": "bf16", "channels_last": True}
    for unit in ("train/fold2", "emb/fold1"):
        path = run / unit / "manifest.json"
        record = manifest.read(path)
        record.info["policy"] = gpu
        manifest.commit(path, run, record, [run / p for p in record.outputs])
    for stage in ("train", "embed"):  # a replaced unit manifest leaves its stage damaged: the rerun takes it in
        assert cli.main([stage, *tiny_args(small_competition, run)]) == 0
    with caplog.at_level(logging.WARNING, logger="pawpular"):
        assert cli.main(["ensemble", *tiny_args(small_competition, run), "--overwrite"]) == 0
    assert "made under different inference policies" in caplog.text and "bf16: emb/fold1, train/fold2" in caplog.text
    precision = json.loads((run / "ensemble" / "weights.json").read_text())["precision"]
    assert precision["train/fold2"] == precision["emb/fold1"] == "bf16" and precision["train/fold0"] == "fp32"
    art = export(run, tmp_path / "art")
    info = json.loads((art / "manifest.json").read_text())["experiments"][run.name]
    assert info["nn"]["2"]["policy"] == gpu and info["nn"]["1"]["policy"]["precision"] == "fp32"
    assert info["embeddings"]["fold1"]["policy"] == gpu and info["embeddings"]["fold2"]["policy"]["precision"] == "fp32"
    from pawpular.model.inference import cpu_native

    if not cpu_native("bf16"):  # this CPU would only emulate bf16: predict runs those models in fp32, warned once
        r = assert_predict_matches(art, test_only, run, tmp_path)
        assert r.stderr.count("the pipeline ran this model in bf16; this cpu has no bf16 instructions") == 1
        return
    # this CPU has bf16 instructions (AVX512-BF16 / AMX): predict honours the recorded bf16, which the pipeline
    # did not in fact use here (the manifests were edited), so the submission moves a little, with no warning
    r = _predict_in_fresh_process(art, test_only, "--out", str(tmp_path / "submission.csv"))
    assert r.returncode == 0, r.stderr[-3000:]
    ours, pipeline = (pd.read_csv(p)["Pawpularity"] for p in (tmp_path / "submission.csv", run / "submission.csv"))
    moved = (ours - pipeline).abs()
    assert 0 < moved.max() < 0.5 and "instructions" not in r.stderr
