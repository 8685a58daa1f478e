"""Embedding sets shared across experiments (store/embedding_cache.py): computed once under the output root, hard-linked
into each experiment; a second experiment with the same backbones embeds nothing; one experiment's --overwrite
never touches the files another one uses; the key is the set's own manifest key (plus the policy)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FROZEN, config_args, run_stages

TINY = ["folds.n_folds=3", "embed.num_workers=0", "svr.n_trials=2"]


def args(data: Path, out: Path, *extra: str) -> list[str]:
    return config_args(FROZEN, data, out, *TINY, *extra)


def _embed(data: Path, out: Path, *extra: str) -> None:
    run_stages(("folds", "embed"), args(data, out, *extra))


def _made_by(out: Path) -> dict[str, str]:
    """Each set's maker, as its shared entry records it (the folder name of the experiment that computed it); the
    experiment's own record names the entry and whether it reused it, never a path."""
    from pawpular.store.embedding_cache import entry_record

    found = {}
    for name in ("resnet", "convnext"):
        assert "made_by" not in json.loads((out / "emb" / name / "manifest.json").read_text())["info"]
        found[name] = Path(entry_record(out, out / "emb" / name).info["made_by"]).name
    return found


def _digests(out: Path) -> dict[str, str]:
    from pawpular.store.files import file_digest

    return {str(p.relative_to(out)): file_digest(p) for p in sorted((out / "emb").rglob("*.parquet"))}


def _inodes(out: Path) -> dict[str, int]:
    """Each embedding file's inode: which file it is, whatever its bytes (a recompute writes the same ones)."""
    return {str(p.relative_to(out)): p.stat().st_ino for p in sorted((out / "emb").rglob("*.parquet"))}


@pytest.fixture(scope="module")
def shared(small_competition, tmp_path_factory) -> tuple[Path, Path]:
    """Experiment a embeds both frozen sets; b (same backbones, another folder) must embed nothing."""
    from pawpular.cli import main as cli
    from pawpular.stages import embed

    root = tmp_path_factory.mktemp("root")
    a, b = root / "a", root / "b"
    assert cli.main(["all", *args(small_competition, a)]) == 0

    def refuse(*_, **__):
        raise AssertionError("experiment b ran a backbone: its sets are a's")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(embed, "run_backbone", refuse)
        assert cli.main(["all", *args(small_competition, b)]) == 0
    return a, b


def test_a_second_experiment_with_the_same_sets_embeds_nothing(shared, small_competition, capsys):
    from pawpular import recipe
    from pawpular.cli import main as cli

    a, b = shared
    assert _made_by(a) == _made_by(b) == {"resnet": "a", "convnext": "a"}
    for name in ("resnet", "convnext"):  # the same bytes, held once: links into the one cache entry
        for split in ("train", "test"):
            assert os.path.samefile(a / "emb" / name / f"{split}.parquet", b / "emb" / name / f"{split}.parquet")
    cached = {json.loads((e / "manifest.json").read_text())["key"]: e for e in (a.parent / ".embeddings").iterdir()}
    assert sorted(cached) == sorted(e.name for e in cached.values()) and len(cached) == 2  # named by their key
    recorded = json.loads((b / "emb" / "manifest.json").read_text())["info"]["cache"]  # which sets b used
    assert sorted(recorded) == ["emb/convnext", "emb/resnet"] and sorted(recorded.values()) == sorted(cached)
    assert [s["reused"] for s in recipe.sets(b)] == [True, True] and not any(s["reused"] for s in recipe.sets(a))
    capsys.readouterr()
    assert cli.main(["status", *args(small_competition, b)]) == 0
    printed = capsys.readouterr().out
    assert "reused from the shared cache: resnet, convnext" in printed and "frozen:" in printed.splitlines()[0]


def test_overwrite_of_one_experiment_keeps_the_sets_another_uses(shared, small_competition, tmp_path, caplog):
    from pawpular.cli import main as cli

    a, b = shared
    before, inodes = _digests(b), _inodes(b)
    assert inodes == _inodes(a)  # one file each, linked into both experiments
    with caplog.at_level("INFO", logger="pawpular"):
        assert cli.main(["embed", *args(small_competition, a), "--overwrite"]) == 0
    assert "embed summary: resnet=computed, convnext=computed" in caplog.text  # --overwrite trusts no cache
    # a's sets are new files (recomputed: the same bytes on this CPU); b's links still hold the files it recorded
    assert _inodes(b) == inodes and _digests(b) == before
    assert all(_inodes(a)[f] != inodes[f] for f in inodes)
    caplog.clear()
    with caplog.at_level("INFO", logger="pawpular"):
        assert cli.main(["embed", *args(small_competition, b)]) == 0
    assert "== embed cached" in caplog.text  # b's sets are whole and current: nothing to redo


@pytest.mark.slow
def test_the_key_follows_the_recorded_settings_and_an_unfinished_entry_is_never_reused(
    shared, small_competition, caplog
):
    a, _ = shared
    root = a.parent
    caplog.set_level("INFO", logger="pawpular")
    # a setting the set's manifest records (TTA) makes another set: computed, not reused
    _embed(small_competition, root / "no_tta", "embed.tta_hflip=false")
    assert "embed summary: resnet=computed, convnext=computed" in caplog.text
    # a kill between an entry's files and its manifest leaves an entry without a manifest: recomputed
    entry = root / ".embeddings" / json.loads((a / "emb" / "resnet" / "manifest.json").read_text())["info"]["cache"]
    (entry / "manifest.json").unlink()
    caplog.clear()
    _embed(small_competition, root / "c")
    assert "embed summary: resnet=computed, convnext=reused" in caplog.text
    assert _made_by(root / "c") == {"resnet": "c", "convnext": "a"}
    assert (entry / "manifest.json").is_file()


def test_a_writer_of_the_same_set_waits_for_the_one_holding_it(tmp_path, monkeypatch):
    from pawpular.store import embedding_cache

    entry = tmp_path / ".embeddings" / "0123abcd"
    entry.mkdir(parents=True)
    hold = (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
        "print('held', flush=True); time.sleep(1.5)"
    )
    proc = subprocess.Popen([sys.executable, "-c", hold, str(entry / ".lock")], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    monkeypatch.setattr(embedding_cache, "WAIT_SECONDS", 0.1)
    t0 = time.monotonic()
    with embedding_cache.entry_lock(entry, "test"):
        waited = time.monotonic() - t0
    proc.wait()
    assert waited > 0.5 and proc.returncode == 0


def test_runs_names_the_frozen_backbones_and_no_fine_tuned_model(shared, capsys):
    from pawpular.cli import main as cli

    a, b = shared
    capsys.readouterr()
    assert cli.main(["runs", str(a), str(b), "--json"]) == 0
    rows = {r["experiment"]: r for r in json.loads(capsys.readouterr().out)["runs"]}
    for name, row in rows.items():
        assert row["recipe"] == "frozen" and row["model"] is None and row["epochs"] is None
        assert [(s["name"], s["backbone"], s["img_size"], s["kind"]) for s in row["sets"]] == [
            ("resnet", "resnet18", 96, "pooled"),
            ("convnext", "convnext_atto", 96, "pooled"),
        ]
        assert [s["reused"] for s in row["sets"]] == [name == "b"] * 2
    assert cli.main(["runs", str(a), str(b)]) == 0
    text = capsys.readouterr().out
    assert "resnet=resnet18@96 pooled (reused)" in text and "swin" not in text


def test_settings_differ_key_by_key_for_named_backbones():
    from pawpular.store import manifest
    from pawpular.views import experiments

    old = {
        "embed": {
            "backbones": [
                {"name": "resnet", "model": "resnet18", "img_size": 96},
                {"name": "convnext", "model": "convnext_atto", "img_size": 96},
            ]
        }
    }
    new = {
        "embed": {
            "backbones": [
                {"name": "resnet", "model": "resnet18", "img_size": 128},
                {"name": "convnext", "model": "convnext_atto", "img_size": 96},
            ]
        }
    }
    assert manifest.config_changes(old, new) == ["embed.backbones.resnet.img_size 96 -> 128"]
    flat = [experiments._flatten(c) for c in (old, new)]
    assert experiments.differing(flat) == ["embed.backbones.resnet.img_size"]
    # a list without unique names stays one value
    assert manifest.by_name([{"name": "x"}, {"name": "x"}]) is None and manifest.by_name([1, 2]) is None


def test_a_branch_from_select_fits_its_svr_on_the_same_sets_and_embeds_nothing(
    shared, small_competition, capsys, caplog
):
    from pawpular.cli import main as cli
    from pawpular.stages import embed
    from pawpular.svr import study as svr_study

    a, _ = shared
    assert cli.main(["select", *args(small_competition, a), "--as", "a_best"]) == 0
    printed = capsys.readouterr().out
    branch = a.parent / "a_best"
    assert f"next: pawpular all --output {branch}" in printed and "'model'" not in caplog.text  # no fine-tuned set
    selection = json.loads((a / "select" / "selection.json").read_text())
    assert selection["candidates"] == ["resnet", "convnext"] and selection["skipped"] == {}
    with pytest.MonkeyPatch.context() as mp, caplog.at_level("INFO", logger="pawpular"):
        mp.setattr(embed, "run_backbone", lambda *_, **__: pytest.fail("the branch ran a backbone"))
        mp.setattr(svr_study, "C_EDGE_SHARE", 0.5)  # every C is "at an edge" (2 trials never reach a real one)
        assert cli.main(["all", "--output", str(branch)]) == 0
    assert re.search(r"svr: the best C \(\S+\) is at the (top|bottom) .*(raise svr.c_max|lower svr.c_min)", caplog.text)
    assert "embed summary: resnet=" in caplog.text and "=computed" not in caplog.text  # linked or reused
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"report: pawpular report --output {branch}")
    assert yaml_features(branch) == selection["chosen"]
    # the sets were chosen on all of a's rows: the branch's blend is never called the one to trust
    weights = json.loads((branch / "ensemble" / "weights.json").read_text())
    assert weights["trusted"] is False and "were chosen by pawpular select on all rows" in weights["trust"]
    assert json.loads((branch / "select" / "selected_from.json").read_text())["chosen"] == selection["chosen"]
    assert json.loads((a / "svr" / "best_params.json").read_text())["features"] == ["resnet", "convnext"]  # a kept


def yaml_features(out: Path) -> list[str]:
    import yaml

    return yaml.safe_load((out / "config.yaml").read_text())["svr"]["features"]


def test_the_frozen_config_holds_only_what_the_recipe_reads_and_says_frozen(small_competition, make_cfg, caplog):
    import yaml

    from pawpular import recipe

    sections = yaml.safe_load(FROZEN.read_text())
    assert "model" not in sections and "train" not in sections
    cfg = make_cfg(small_competition, config=str(FROZEN))
    assert recipe.kind(cfg) == "frozen" and recipe.describe(cfg).startswith("frozen: frozen backbones resnet, convnext")
    old = make_cfg(small_competition, "embed.source=pretrained", "ensemble.heads=[svr]")  # svr.features: [model]
    assert recipe.kind(old) == "frozen" and "embed.source: pretrained" in recipe.describe(old)
    assert recipe.kind(make_cfg(small_competition)) == "fine-tuned"


def test_a_set_left_out_by_choice_is_no_longer_used_not_missing():
    from pawpular.store import manifest

    old = {"resnet: frozen backbone": "ab12", "convnext: frozen backbone": "cd34", "data:train.csv": "ef56"}
    new = {"resnet: frozen backbone": "ab12", "data:train.csv": None}
    assert manifest.input_changes(old, new) == [
        "convnext: frozen backbone is no longer used",
        "data:train.csv is missing",
    ]
