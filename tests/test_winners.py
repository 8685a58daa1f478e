"""What won the competition, as settings: classifier outputs as features (``output: logits``), several selection
starts (``select --starts``), the SVR's target clip (``svr.target_clip``), square crops (``square: crop``), and an
inference budget (``select --budget-hours``). Each is checked on tiny data; one end-to-end run uses them all and
export/predict reproduces its submission."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_select import sel_exp  # noqa: F401  (fixture)

from pawpular.cli import main as cli
from pawpular.config.schema import ModelConfig, load_config
from pawpular.data.dataset import EvalTransform, RandomSquare, square_crop
from pawpular.data.tables import ID
from pawpular.model.models import PretrainedWeightsError, build_frozen, data_config, frozen_description
from pawpular.scores.metrics import rmse
from pawpular.store import embedding_cache, manifest
from pawpular.svr import head as svr_head
from pawpular.svr import selection

TINY_RESNET = {"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128], "stem_width": 16}


def _weights(path: Path, classifier: bool = True, num_classes: int = 10) -> Path:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    model = timm.create_model("resnet18", num_classes=num_classes, **TINY_RESNET)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if classifier or not k.startswith("fc.")}
    save_file(state, str(path))
    return path


def _reference(path: Path, num_classes: int = 10) -> torch.nn.Module:
    """The weight file's own model, classifier included, as timm builds it (not through pawpular)."""
    import timm
    from safetensors.torch import load_file

    model = timm.create_model("resnet18", num_classes=num_classes, **TINY_RESNET)
    model.load_state_dict(load_file(str(path)), strict=False)  # only num_batches_tracked may be absent
    return model.eval()


def test_logits_are_the_weight_files_own_classifier_outputs(tmp_path):
    path = _weights(tmp_path / "r.safetensors")
    kw = dict(name="resnet18", kwargs={**TINY_RESNET, "num_classes": 10}, pretrained=str(path), img_size=64)
    logits, pooled = (
        build_frozen(ModelConfig(**kw, output="logits")).eval(),
        build_frozen(ModelConfig(name="resnet18", kwargs=TINY_RESNET, pretrained=str(path), img_size=64)).eval(),
    )
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        got, want, feats = logits.embed(x), _reference(path)(x), pooled.embed(x)
    assert got.shape == (3, 10) and feats.shape == (3, 128)
    assert torch.allclose(got, want, atol=1e-5)
    # the same file's pooled features are what its classifier reads
    assert torch.allclose(feats @ _reference(path).fc.weight.T + _reference(path).fc.bias, want, atol=1e-4)


def test_a_weight_file_without_a_classifier_is_an_error_naming_the_missing_keys(tmp_path):
    path = _weights(tmp_path / "headless.safetensors", classifier=False)
    cfg = ModelConfig(name="resnet18", kwargs={**TINY_RESNET, "num_classes": 10}, pretrained=str(path), output="logits")
    with pytest.raises(PretrainedWeightsError) as e:
        build_frozen(cfg)
    assert "fc.weight" in str(e.value) and "fc.bias" in str(e.value) and "output: logits" in str(e.value)
    build_frozen(ModelConfig(name="resnet18", kwargs=TINY_RESNET, pretrained=str(path)))  # pooled needs none


def test_output_and_square_key_the_embedding_set_and_defaults_keep_old_keys():
    base = ModelConfig(name="resnet18", kwargs=TINY_RESNET, img_size=64)
    assert "output" not in frozen_description(base) and "square" not in frozen_description(base)
    assert frozen_description(ModelConfig(**{**base.__dict__, "output": "logits"}))["output"] == "logits"
    crop = ModelConfig(**{**base.__dict__, "square": "crop"})
    assert frozen_description(crop)["square"] == "crop"
    import timm

    backbone = timm.create_model("resnet18", num_classes=0, **TINY_RESNET)
    assert data_config(crop, backbone)["square"] == "crop" and "square" not in data_config(base, backbone)
    with pytest.raises(Exception, match="embed.source"):
        load_config(None, ["model.output=logits"])  # a fine-tuned model has no classifier to read


def test_the_centred_square_is_what_inference_resizes():
    import cv2

    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (40, 70, 3), dtype=np.uint8)
    t = EvalTransform(16, (0.5,) * 3, (0.5,) * 3, "crop")
    want = cv2.resize(np.ascontiguousarray(img[:, 15:55]), (16, 16), interpolation=cv2.INTER_LINEAR)
    got = t(image=img)["image"].numpy().transpose(1, 2, 0) * 0.5 * 255 + 0.5 * 255
    assert np.abs(got - want).max() < 1e-3
    squash = EvalTransform(16, (0.5,) * 3, (0.5,) * 3)(image=img)["image"]
    assert not torch.allclose(squash, t(image=img)["image"])
    tall = img.transpose(1, 0, 2)
    assert square_crop(tall).shape == (40, 40, 3) and np.array_equal(square_crop(tall), tall[15:55])


def test_the_random_square_in_training_is_a_square_of_the_photo_at_varied_places():
    img = np.arange(30 * 90, dtype=np.int64).reshape(30, 90)[..., None].repeat(3, axis=2)
    seen = set()
    for _ in range(40):
        out = RandomSquare(lambda image: {"image": image})(img)["image"]
        assert out.shape == (30, 30, 3) and (out[:, :, 0] == img[:, out[0, 0, 0] : out[0, 0, 0] + 30, 0]).all()
        seen.add(int(out[0, 0, 0]))
    assert len(seen) > 10


def test_the_clip_changes_the_fit_and_not_the_scoring():
    rng = np.random.default_rng(0)
    n = 90
    x = rng.standard_normal((n, 5))
    y = np.clip(40 + 25 * x[:, 0] + 5 * rng.standard_normal(n), 1, 100)
    fold_of = np.arange(n) % 3
    plain = [svr_head.make_fold(k, x, y, fold_of, "scale", "cpu") for k in range(3)]
    clipped = [svr_head.make_fold(k, x, y, fold_of, "scale", "cpu", [1, 50]) for k in range(3)]
    assert all(f.y_train.max() <= 50 for f in clipped) and max(f.y_train.max() for f in plain) > 50
    assert all(
        np.array_equal(a.x_train, b.x_train) for a, b in zip(plain, clipped, strict=False)
    )  # only the target changes
    params = {"C": 20.0, "epsilon": 0.1}
    p_plain, p_clip = (svr_head.fit_predict(params, f) for f in (plain, clipped))
    assert np.abs(p_plain - p_clip).max() > 1  # another fit
    assert svr_head.oof_rmse(params, clipped, y) == pytest.approx(rmse(p_clip, y))  # scored on the true target
    assert rmse(p_clip, y) != pytest.approx(rmse(p_clip, np.clip(y, 1, 50)))


def test_the_clip_is_checked_and_names_its_own_study():
    from pawpular.stages.svr import study_name

    plain, clipped = load_config(None, []), load_config(None, ["svr.target_clip=[1, 85]"])
    assert study_name(plain, "v") != study_name(clipped, "v")  # trials on another target never mix
    for bad in ("[85, 1]", "[1]", "[a, b]", "5"):
        with pytest.raises(Exception, match="svr.target_clip"):
            load_config(None, [f"svr.target_clip={bad}"])


def _score_table(table: dict) -> selection.Score:
    """A score from a table of combinations (frozensets of names -> RMSE); anything else scores 99."""
    return lambda names: (table.get(frozenset(names), 99.0), 1.0)


def test_several_starts_give_different_sets_when_the_data_says_so_and_one_when_not():
    two_ways = {
        frozenset("a"): 10.0,
        frozenset("c"): 10.5,
        frozenset("b"): 11.0,
        frozenset("d"): 12.0,
        frozenset("ab"): 9.0,
        frozenset("cd"): 9.2,
        frozenset("ac"): 9.9,
        frozenset("bc"): 10.4,
    }
    runs = selection.multi_start("abcd", _score_table(two_ways), 2, 0.01)
    assert [r.features for r in runs] == [["a", "b"], ["c", "d"]] and [r.oof_rmse for r in runs] == [9.0, 9.2]
    assert runs[0].path == [("a", 10.0), ("b", 9.0)]
    one_way = {frozenset("a"): 10.0, frozenset("b"): 10.5, frozenset("ab"): 9.0}
    runs = selection.multi_start("ab", _score_table(one_way), 2, 0.01)
    assert [sorted(r.features) for r in runs] == [["a", "b"]]  # both starts end on the same sets: kept once
    calls = []

    def counted(names: list[str]) -> tuple[float, float]:
        calls.append(frozenset(names))
        return two_ways.get(frozenset(names), 99.0), 1.0

    selection.multi_start("abcd", counted, 3, 0.01)
    assert len(calls) == len(set(calls))  # each combination is fit once


def test_the_budget_keeps_out_what_does_not_fit():
    table = {
        frozenset("a"): 10.0,
        frozenset("b"): 10.5,
        frozenset("ab"): 9.0,
        frozenset("c"): 11.0,
        frozenset("bc"): 9.5,
    }
    runs = selection.multi_start("abc", _score_table(table), 3, 0.01, allowed=lambda n: "a" not in n)
    assert [r.features for r in runs] == [["b", "c"]]
    with pytest.raises(ValueError, match="budget"):
        selection.multi_start("abc", _score_table(table), 1, 0.01, allowed=lambda n: False)


def _plant_speed(out: Path, folder: str, ips: float) -> None:
    """The set's shared cache entry records ``ips`` (where embed measured it); the experiment's record names it."""
    from pawpular.store import artifacts

    files = sorted(p for p in (out / "emb" / folder).iterdir() if p.is_file() and p.name != "manifest.json")
    entry = artifacts.emb_cache_entry(out.parent, f"planted{folder}")
    entry.mkdir(parents=True, exist_ok=True)
    manifest.commit(entry / "manifest.json", entry, manifest.Record({}, {}, info={"images_per_second": ips}), [])
    record = manifest.Record({}, {}, info={"cache": entry.name})
    manifest.commit(out / "emb" / folder / "manifest.json", out, record, files)


def test_select_with_starts_and_a_budget_writes_every_feature_set(sel_exp, capsys):  # noqa: F811
    _, out, config = sel_exp
    assert cli.main(["select", "--config", str(config), "--starts", "3"]) == 0
    printed = capsys.readouterr().out
    found = json.loads((out / "select" / "selection.json").read_text())
    sets = [s["features"] for s in found["starts"]]
    assert 1 <= len(sets) <= 3 and len({frozenset(s) for s in sets}) == len(sets)
    assert found["chosen"] == sets[0] and [s["start"] for s in found["starts"]] == [s[0] for s in sets]
    assert "start 1" in printed and "--set 'svr.features=[" in printed
    several = len(sets) > 1  # a blend line exactly when another start found another set
    assert ("ensemble.experiments=[" in printed) == several and (f"{out}-start2" in found["blend_line"]) == several
    assert "no nested score: the starts' sets were chosen on all rows" in printed
    assert found["nested"]["missing"].startswith("no nested score")
    for folder, ips in (("fold0", 100.0), ("fold1", 100.0), ("fold2", 100.0), ("partial", 1.0), ("noise", 50.0)):
        _plant_speed(out, folder, ips)
    # 3,600 photos: "model" (3 folds at 100/s: 0.03 h) and "noise" fit in 0.9 h, "partial" (1/s: 1 h) does not
    assert (
        cli.main(["select", "--config", str(config), "--starts", "2", "--budget-hours", "0.9", "--test-images", "3600"])
        == 0
    )
    found = json.loads((out / "select" / "selection.json").read_text())
    assert all("partial" not in s["features"] for s in found["starts"])
    assert all(s["inference_hours"] <= 0.9 for s in found["starts"])
    assert cli.main(["select", "--config", str(config), "--budget-hours", "1"]) == 2  # --test-images missing


@pytest.mark.slow
def test_a_run_with_all_of_it_exports_and_predicts_its_submission(small_competition, test_only, tmp_path, capsys):
    """Logits of a classifier file on centred squares, a pooled set squashed, the target clipped, and a second
    start's head in its own experiment blended by ensemble.experiments: predict reproduces the submission."""
    import cv2
    from conftest import FROZEN, config_args
    from test_predict import assert_predict_matches

    from pawpular.data.images import load_image
    from pawpular.data.tables import read_competition
    from pawpular.ship.exporter import export

    path = _weights(tmp_path / "r.safetensors")
    backbones = (
        f"embed.backbones=[{{name: rl, model: resnet18, kwargs: {{layers: [1, 1, 1, 1], channels: [16, 32, "
        f"64, 128], stem_width: 16, num_classes: 10}}, pretrained: '{path}', img_size: 48, output: logits, "
        "square: crop}, {name: rp, model: resnet18, kwargs: {layers: [1, 1, 1, 1], channels: [16, 32, 64, "
        "128], stem_width: 16}, pretrained: none, img_size: 48}]"
    )
    common = [
        "folds.n_folds=3",
        "embed.num_workers=0",
        "embed.tta_hflip=false",
        "svr.n_trials=4",
        backbones,
        "svr.target_clip=[1, 60]",
    ]

    def args(out: Path, *extra: str) -> list[str]:
        return config_args(FROZEN, small_competition, out, *common, *extra)

    second, main = tmp_path / "start2", tmp_path / "main"
    assert cli.main(["all", *args(second, "svr.features=[rp]")]) == 0
    assert cli.main(["all", *args(main, "svr.features=[rl, rp]", f"ensemble.experiments=[{second}]")]) == 0
    info = json.loads((main / "emb" / "rl" / "manifest.json").read_text())["info"]
    assert (info["output"], info["square"], info["dim"]) == ("logits", "crop", 10) and "images_per_second" not in info
    entry = embedding_cache.entry_record(main, main / "emb" / "rl")  # the speed: in the shared entry's record only
    assert entry.info["images_per_second"] > 0 and entry.info["machine"]
    weights = json.loads((main / "ensemble" / "weights.json").read_text())
    assert len([m for m in weights["weights"] if "svr" in m]) == 2  # both starts' heads are in the blend
    # the set holds the file's own classifier outputs on the centred square of every photo
    comp, ref = read_competition(small_competition), _reference(path)
    table = pd.read_parquet(main / "emb" / "rl" / "test.parquet").set_index("Id")
    for i in comp.test["Id"].astype(str)[:4]:
        img = square_crop(load_image(small_competition / "test" / f"{i}.jpg", 48))
        x = (
            cv2.resize(np.ascontiguousarray(img), (48, 48), interpolation=cv2.INTER_LINEAR).astype(np.float32)
            - np.array([0.485, 0.456, 0.406], np.float32) * 255
        ) / (np.array([0.229, 0.224, 0.225], np.float32) * 255)
        with torch.no_grad():
            want = ref(torch.from_numpy(x.transpose(2, 0, 1))[None].float())[0].numpy()
        assert np.abs(table.loc[i].to_numpy() - want).max() < 1e-4
    art = export(main, tmp_path / "art")
    meta = json.loads((art / "manifest.json").read_text())
    assert len(meta["experiments"]) == 2  # the second start's head travels too
    assert_predict_matches(art, test_only, main, tmp_path)
    capsys.readouterr()
    assert cli.main(["predict", "--artifacts", str(art), "--data", str(test_only), "--estimate", "6800"]) == 0
    printed = capsys.readouterr().out
    assert all(
        f"{e}/{s}: " in printed and "ms/image" in printed for e, s in (("main", "rl"), ("main", "rp"), ("start2", "rp"))
    )


def test_one_pass_gives_pooled_and_logits_as_their_own_passes_and_the_other_kind_embeds_nothing(
    small_competition, tmp_path, monkeypatch
):
    """A backbone listed as pooled and as logits runs over the photos once (2 calls: train and test) and both sets
    equal their own passes' (the logits within float tolerance); another experiment asking for the other kind of a
    set one pass already gave embeds nothing."""
    import yaml
    from conftest import FROZEN, config_args, run_stages

    from pawpular.model.inference import Policy
    from pawpular.runner import Context
    from pawpular.stages import embed

    path = _weights(tmp_path / "r.safetensors")
    kw = {"model": "resnet18", "kwargs": TINY_RESNET, "pretrained": str(path), "img_size": 48}
    rp = {"name": "rp", **kw}
    rl = {**rp, "name": "rl", "kwargs": {**TINY_RESNET, "num_classes": 10}, "output": "logits"}
    calls = []
    real = embed.run_backbone
    monkeypatch.setattr(embed, "run_backbone", lambda *a, **k: (calls.append(k.get("both")), real(*a, **k))[1])

    def run(out: Path, sets: list[dict]) -> None:
        flow = yaml.safe_dump(sets, default_flow_style=True).strip()
        extra = ["folds.n_folds=3", "embed.num_workers=0", f"embed.backbones={flow}"]
        extra.append(f"svr.features=[{', '.join(s['name'] for s in sets)}]")
        run_stages(("folds", "embed"), config_args(FROZEN, small_competition, out, *extra))

    a, b = tmp_path / "root" / "a", tmp_path / "root" / "b"
    run(a, [rp, rl])
    assert calls == [True, True]  # one pass (train, test) made both sets
    run(b, [rl])  # the other kind of a set a made: nothing to embed
    assert calls == [True, True]
    tables = {(o, n): pd.read_parquet(o / "emb" / n / "train.parquet") for o, n in ((a, "rp"), (a, "rl"), (b, "rl"))}
    pd.testing.assert_frame_equal(tables[(a, "rl")], tables[(b, "rl")])

    # each set as its own pass computes it (the model built for its kind alone)
    flow = yaml.safe_dump([rp, rl], default_flow_style=True).strip()
    sets = ["folds.n_folds=3", "embed.num_workers=0", f"embed.backbones={flow}", "svr.features=[rp, rl]"]
    ctx = Context(load_config(FROZEN, sets, data_dir=str(small_competition), output_dir=str(a)), "cpu")
    for unit in embed.units(ctx):
        name = unit.name
        own, _, _ = embed._compute(ctx, unit, Policy())
        assert calls[-1] is False  # a pass of its own
        mine = tables[(a, name)]
        assert list(own["train"][ID]) == list(mine[ID])
        width = 10 if name == "rl" else 128
        assert mine.shape[1] == width + 1
        np.testing.assert_allclose(own["train"].drop(columns=ID), mine.drop(columns=ID), rtol=1e-5, atol=1e-5)
