"""Several SVR heads in one experiment (``svr.heads``) and the recommended recipe (configs/recommended.yaml).

An extra head is the svr block with its own keys replaced: the same code fits it, into svr/<name>/, and it is
blended, exported and predicted under its name. The recommended config (a fine-tuned model blended with SVR heads
on frozen logits) runs end to end on the embedded data with tiny random weights, and predict reproduces its
submission.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import FROZEN, REPO, config_args, frozen_args

from pawpular.cli import main as cli
from pawpular.config.schema import load_config
from pawpular.store.errors import ConfigError

RECOMMENDED = REPO / "configs" / "recommended.yaml"
RESNET = "{layers: [1, 1, 1, 1], channels: [16, 32, 64, 128], stem_width: 16"
# configs/recommended.yaml with its real weight files swapped for tiny random ones (the same kinds: a fine-tuned
# model, frozen logits sets), and a second SVR head on the fine-tuned folds' embeddings
TINY_RECOMMENDED = [
    "folds.n_folds=3",
    "model.name=resnet18",
    f"model.kwargs={RESNET}}}",
    "model.pretrained=none",
    "model.img_size=48",
    "train.epochs=2",
    "train.lr=4e-3",
    "train.head_lr=1e-2",
    "train.num_workers=0",
    "embed.num_workers=0",
    "embed.batch_size=32",
    f"embed.backbones=[{{name: lite0l, model: resnet18, kwargs: {RESNET}, num_classes: 10}}, img_size: 48, "
    f"output: logits}}, {{name: lite1l, model: resnet18, kwargs: {RESNET}, num_classes: 7}}, img_size: 56, "
    "output: logits}]",
    "svr.n_trials=6",
    "svr.heads=[{name: svr_tuned, features: [model], n_trials: 4}]",
    "ensemble.heads=[nn, svr, svr_tuned]",
]


@pytest.mark.parametrize(
    "head, problem",
    [
        ("{name: svr, features: [model]}", "'svr' is reserved"),
        ("{name: fold0, features: [model]}", "'fold0' is reserved"),
        ("{name: ../up, features: [model]}", "not a plain name"),
        ("{features: [model]}", "needs a name"),
        ("{name: x, storage: 'sqlite:///x.db'}", "storage is the svr block's for every head"),
        ("{name: x, feature: [model]}", "unknown config key 'svr.heads[0].feature'"),
        ("{name: x, features: []}", "features is empty"),
        ("{name: x, c_min: 500}", "svr.c_min must be < svr.c_max"),
    ],
)
def test_a_bad_head_is_refused_naming_it(head, problem):
    with pytest.raises(ConfigError) as e:
        load_config(FROZEN, [f"svr.heads=[{head}]"])
    assert problem in str(e.value) and "svr.heads" in str(e.value)


def test_heads_are_named_once_and_the_ensemble_names_only_declared_ones():
    from pawpular.stages import needed

    with pytest.raises(ConfigError, match="'x' is used twice"):
        load_config(FROZEN, ["svr.heads=[{name: x, features: [resnet]}, {name: x, features: [convnext]}]"])
    with pytest.raises(ConfigError, match="names of svr.heads"):
        load_config(FROZEN, ["ensemble.heads=[svr, x]"])
    assert "train" not in needed(load_config(FROZEN, ["svr.heads=[{name: x, features: [resnet]}]"]))
    cfg = load_config(FROZEN, ["svr.heads=[{name: x, features: [model]}]", "ensemble.heads=[svr, x]"])
    assert "train" in needed(cfg)  # head x reads the fine-tuned folds' embeddings: train is needed for it alone


def test_an_extra_head_is_the_svr_block_run_on_its_own_settings(small_competition, tmp_path, capsys):
    """Head both (features [resnet, convnext]) in one experiment predicts exactly what the svr block predicts in
    another experiment whose svr.features are those sets; each head has its own folder and study."""
    root = tmp_path / "runs"
    two = [
        "svr.features=[resnet]",
        "svr.heads=[{name: both, features: [resnet, convnext]}]",
        "ensemble.heads=[svr, both]",
    ]
    assert cli.main(["all", *frozen_args(small_competition, root / "two", *two)]) == 0
    assert cli.main(["all", *frozen_args(small_competition, root / "one", "svr.features=[resnet, convnext]")]) == 0
    two_dir, one_dir = root / "two", root / "one"
    for split in ("oof", "test", "nested"):
        got = pd.read_parquet(two_dir / "svr" / "both" / f"{split}.parquet")
        want = pd.read_parquet(one_dir / "svr" / f"{split}.parquet")
        pd.testing.assert_frame_equal(got, want)
    first = pd.read_parquet(two_dir / "svr" / "oof.parquet")
    assert not first["pred"].equals(pd.read_parquet(two_dir / "svr" / "both" / "oof.parquet")["pred"])
    assert {f"fold{k}" for k in range(3)} <= {p.name for p in (two_dir / "svr" / "both").iterdir()}
    weights = json.loads((two_dir / "ensemble" / "weights.json").read_text())
    assert set(weights["weights"]) == {"svr", "both"} and set(weights["nested_rmse"]) >= {"svr", "both", "ensemble"}
    best = json.loads((two_dir / "svr" / "both" / "best_params.json").read_text())
    assert best["features"] == ["resnet", "convnext"]
    assert best["study_name"] != json.loads((two_dir / "svr" / "best_params.json").read_text())["study_name"]
    capsys.readouterr()
    assert cli.main(["status", *frozen_args(small_competition, two_dir, *two)]) == 0
    printed = capsys.readouterr().out
    heads = next(line for line in printed.splitlines() if line.startswith("heads: "))
    assert all(
        f"{h} {weights['weights'][h]:.2f} (nested {weights['nested_rmse'][h]:.3f})" in heads for h in ("svr", "both")
    )
    assert "everything is done and current" in printed
    from pawpular.views.experiments import row

    assert row(two_dir)["svr_heads"] == f"both {weights['nested_rmse']['both']:.3f}"  # pawpular runs' column


def test_an_extra_head_alone_is_exported_and_predicted_under_its_name(small_competition, test_only, tmp_path):
    from test_predict import assert_predict_matches

    from pawpular.ship.exporter import export

    out = tmp_path / "runs" / "alone"
    alone = ["svr.features=[resnet]", "svr.heads=[{name: both, features: [resnet, convnext]}]", "ensemble.heads=[both]"]
    assert cli.main(["all", *frozen_args(small_competition, out, *alone)]) == 0
    assert json.loads((out / "ensemble" / "weights.json").read_text())["weights"] == {"both": 1.0}
    art = export(out, tmp_path / "art")
    shipped = json.loads((art / "manifest.json").read_text())["experiments"]["alone"]
    assert shipped["svr_heads"] == {"both": {"sets": ["resnet", "convnext"], "use_meta": True}}
    assert (art / "experiments" / "alone" / "svr" / "both" / "fold0" / "head.safetensors").is_file()
    assert not (art / "experiments" / "alone" / "svr" / "fold0").exists()  # weight 0: svr's own head not shipped
    assert_predict_matches(art, test_only, out, tmp_path)


def test_the_recommended_config_runs_end_to_end_and_predict_reproduces_it(small_competition, test_only, tmp_path):
    from test_predict import assert_predict_matches

    from pawpular.ship.exporter import export

    out = tmp_path / "recommended"
    assert cli.main(["all", *config_args(RECOMMENDED, small_competition, out, *TINY_RECOMMENDED)]) == 0
    weights = json.loads((out / "ensemble" / "weights.json").read_text())
    assert list(weights["weights"]) == ["nn", "svr", "svr_tuned"]
    assert json.loads((out / "svr" / "best_params.json").read_text())["features"] == ["lite0l", "lite1l"]
    for name, dim in (("lite0l", 10), ("lite1l", 7)):  # classifier outputs, not pooled features
        assert json.loads((out / "emb" / name / "manifest.json").read_text())["info"]["dim"] == dim
    assert (out / "svr" / "svr_tuned" / "fold2" / "head.safetensors").is_file()
    art = export(out, tmp_path / "art")
    shipped = json.loads((art / "manifest.json").read_text())["experiments"]["recommended"]
    used = [h for h, w in weights["weights"].items() if w > 0]
    assert sorted(shipped["svr_heads"]) == sorted(h for h in used if h != "nn")
    assert_predict_matches(art, test_only, out, tmp_path)
