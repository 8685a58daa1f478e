from pathlib import Path

import pytest
import yaml

from pawpular.config.schema import Config, config_hash, load_config, save_config
from pawpular.store.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_default_config_loads_and_round_trips(tmp_path):
    cfg = load_config(REPO / "configs" / "default.yaml")
    assert cfg.experiment == "default" and cfg.out == Path("output/default")
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg


def test_every_config_in_configs_loads():
    files = sorted((REPO / "configs").glob("*.yaml"))
    assert files
    for f in files:
        assert isinstance(load_config(f), Config)


@pytest.mark.parametrize(
    "text, message",
    [
        ("modle: {name: x}\n", "unknown config key 'modle'"),
        ("train: {epoch: 3}\n", "unknown config key 'train.epoch'"),
        ("train: {epochs: three}\n", "config key 'train.epochs': expected an integer"),
        ("train: {amp: 1}\n", "config key 'train.amp': expected a boolean"),
        ("model: {finetune: lora}\n", "config key 'model.finetune': must be one of"),
        ("folds: 5\n", "config section 'folds': expected a mapping"),
        ("train: {checkpoint: nested}\n", "config key 'train.checkpoint': must be one of"),
        ("train: {patience: 2}\n", "early stopping chooses the last epoch on the fold's own validation rows"),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        load_config(path)
    assert str(path) in str(e.value)


def test_early_stopping_needs_the_own_best_checkpoint_rule():
    """train.checkpoint: last ships the schedule's last epoch: a stop decided on the fold's own rows would make
    that epoch a choice on them, so patience > 0 needs checkpoint: best (whose scores are labelled optimistic)."""
    with pytest.raises(ConfigError, match=r"train.patience.*train.checkpoint: best"):
        load_config(None, ["train.patience=2"])
    assert load_config(None, ["train.patience=2", "train.checkpoint=best"]).train.patience == 2
    assert load_config(None).train.checkpoint == "last"


def test_overrides_are_typed_and_checked():
    cfg = load_config(
        None, ["train.lr=3e-4", "train.epochs=7", "model.use_meta=true", "svr.storage=null", "train.folds=[0, 2]"]
    )
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.train.epochs == 7 and cfg.model.use_meta is True
    assert cfg.svr.storage is None and cfg.train.folds == [0, 2]
    with pytest.raises(ConfigError, match="train.epochz"):
        load_config(None, ["train.epochz=2"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.epochs"])


def test_top_level_overrides_and_missing_file(tmp_path):
    cfg = load_config(None, [], data_dir="x", output_dir=str(tmp_path / "o"))
    assert cfg.data == Path("x") and cfg.out == tmp_path / "o"
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_config_hash_depends_on_values():
    a, b = load_config(None, []), load_config(None, ["svr.c_max=10"])
    assert config_hash(a.svr) != config_hash(b.svr)
    assert config_hash(a.svr) == config_hash(load_config(None, []).svr)
    assert yaml.safe_load(yaml.safe_dump(a.to_dict()))["svr"]["c_max"] == 100.0


def test_the_rbf_width_settings_refuse_what_contradicts(tmp_path):
    """svr.gamma as a number is a fixed width: tuning it too is refused, naming both keys; a width range must be a
    range; 'scale' (the default) with tune_gamma and a fixed number without it load."""
    with pytest.raises(ConfigError, match=r"svr.gamma.*svr.tune_gamma=false") as e:
        load_config(None, ["svr.gamma=0.05"])
    assert "svr.tune_gamma" in str(e.value)
    with pytest.raises(ConfigError, match="svr.gamma_min must be < svr.gamma_max"):
        load_config(None, ["svr.gamma_min=2", "svr.gamma_max=1"])
    with pytest.raises(ConfigError, match="svr.gamma_min"):
        load_config(None, ["svr.gamma_min=0"])
    fixed = load_config(None, ["svr.gamma=0.05", "svr.tune_gamma=false"]).svr
    assert (fixed.gamma, fixed.tune_gamma) == (0.05, False)
    tuned = load_config(None, []).svr
    assert (tuned.gamma, tuned.tune_gamma, tuned.gamma_min, tuned.gamma_max) == ("scale", True, 0.01, 10.0)
