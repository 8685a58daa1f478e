"""What predict checks of the machine it runs on: library versions, the device and precision of each model, and
an inference transform that needs no training library."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from lowest_env import lower_bounds

from pawpular.model.inference import Policy, model_device
from pawpular.ship import versions


def test_minimum_versions_are_the_requirements_lower_bounds():
    bounds = lower_bounds()
    for name, low in versions.MINIMUM.items():
        assert bounds[versions.REQUIREMENT_NAMES.get(name, name)] == low, name


def test_versions_here_are_recorded_and_parsed():
    here = versions.installed()
    assert {"python", *versions.MODULES} <= set(here) and "missing" not in here.values()
    assert versions.parse("2.14.1+cu130") == (2, 14, 1) and versions.parse("1.0.15.dev0") == (1, 0, 15)
    assert versions.parse("4.9.0.80") > versions.parse("4.9") > versions.parse("4.8.1")


def test_differences_are_logged_and_only_too_old_libraries_fail(caplog):
    made = {"python": "3.11.7", "torch": "2.14.1", "numpy": "2.4.6", "pandas": "3.1.1", "timm": "1.0.31"}
    here = dict(made, python="3.12.1", numpy="1.26.4")
    with caplog.at_level(logging.WARNING, logger="pawpular"):
        differ = versions.check(made, here)
    assert differ == ["numpy 2.4.6 (export) vs 1.26.4 (here)", "python 3.11.7 (export) vs 3.12.1 (here)"]
    assert "numpy 2.4.6 (export) vs 1.26.4 (here)" in caplog.text
    assert versions.check(made, dict(made)) == []
    with pytest.raises(
        versions.VersionError,
        match=r"pandas 2\.1\.4 is older than 2\.2, the oldest pawpular "
        r"supports .*pandas 3\.1\.1.*pip install 'pandas>=2\.2'",
    ):
        versions.check(made, dict(made, pandas="2.1.4"))
    with pytest.raises(versions.VersionError, match=r"opencv is missing"):
        versions.check(made, dict(made, opencv="missing"))


def test_each_model_runs_where_its_precision_can(caplog):
    assert model_device("int8", "cuda") == "cpu" and model_device("int8", "cpu") == "cpu"
    assert model_device("bf16", "cuda") == "cuda" and model_device("none", "cuda") == "cuda"
    bf16 = Policy("bf16", channels_last=True)
    assert bf16.usable_on("cuda", bf16=True) == bf16
    with caplog.at_level(logging.WARNING, logger="pawpular"):
        assert bf16.usable_on("cuda", bf16=False) == Policy("fp16", channels_last=True)  # a T4, a V100
        assert bf16.usable_on("cuda", bf16=False) == Policy("fp16", channels_last=True)
        assert bf16.usable_on("cpu", native=False) == Policy("fp32", True)  # a CPU without bf16 instructions
    assert caplog.text.count("no native bf16") == 1  # one warning, however many models
    assert Policy("fp16").usable_on("cuda", bf16=False) == Policy("fp16")


def test_inference_transform_equals_albumentations_and_needs_none():
    """Every inference (train's predictions, embed, predict) resizes and normalizes with plain OpenCV: the same
    values as albumentations' Resize + Normalize + ToTensorV2, which predict therefore does not import."""
    import albumentations as A
    from albumentations.pytorch import ToTensorV2

    from pawpular.data.dataset import build_transform

    rng = np.random.default_rng(0)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ours = build_transform(64, mean, std, train=False)
    theirs = A.Compose([A.Resize(64, 64), A.Normalize(mean=mean, std=std), ToTensorV2()])
    for shape in ((97, 131, 3), (64, 64, 3), (300, 40, 3)):
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        a, b = ours(image=img)["image"], theirs(image=img)["image"]
        assert a.shape == b.shape == (3, 64, 64) and float((a - b).abs().max()) < 1e-5


def test_weights_another_timm_names_otherwise_say_so(tmp_path):
    """A model file whose parameter names this timm does not build (a renamed key) fails naming both timm versions."""
    import json

    import timm

    from pawpular.config.schema import ModelConfig
    from pawpular.model.models import build_model
    from pawpular.ship.model_file import MODEL_FORMAT, load_model_file, model_file_bytes
    from pawpular.store.files import ArtifactError, read_safetensors, safetensors_bytes

    cfg = ModelConfig(name="resnet18", kwargs={"layers": [1, 1, 1, 1]}, img_size=32)
    model = build_model(cfg, pretrained=False)
    data_cfg = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}
    good = tmp_path / "good.safetensors"
    good.write_bytes(model_file_bytes(model.state_dict(), json.loads(json.dumps(cfg.__dict__)), data_cfg))
    loaded, loaded_cfg = load_model_file(good)
    assert loaded_cfg["input_size"] == (3, 32, 32)
    assert all((a == b).all() for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True))

    meta, state = read_safetensors(good, "pt", "a model file", MODEL_FORMAT)
    state["backbone.fc_renamed.weight"] = state.pop("backbone.conv1.weight")
    old = tmp_path / "old.safetensors"
    old.write_bytes(safetensors_bytes(state, dict(meta, timm="0.9.2"), "pt"))
    with pytest.raises(
        ArtifactError,
        match=rf"old.safetensors: the weights do not fit resnet18: it was made with "
        rf"timm 0\.9\.2 and this is timm {timm.__version__}.*pip install timm==0\.9\.2",
    ):
        load_model_file(old)
