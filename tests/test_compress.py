"""Inference compression (``embed.compress``): what each setting does to a tiny timm model's embeddings.

The model is the tiny random-weight Swin of configs/default.yaml (seeded), the inputs 48 synthetic pet photos.
Agreement with the uncompressed embeddings is the Pearson r per embedding dimension across images (what the SVR
sees after standardizing each column), averaged over dimensions. Bounds, with the values measured over seeds 0-3:

- int8: mean r > 0.995 (measured 0.9998-0.9999) and every dimension r > 0.98 (measured >= 0.997);
- prune:0.3: mean r > 0.95 (measured 0.975-0.991): 30% of the weights gone moves the features, not much;
- bf16: mean r > 0.999 (measured 1.0000), finite, returned as float32 by the embed stage's loop.

A broken setting (int8 with a wrong scale, pruning more than asked or the wrong layers, bf16 inputs not cast)
falls far below these bounds or fails outright.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from pawpular.config.checks import compress_spec as parse
from pawpular.config.schema import ModelConfig
from pawpular.data.dataset import PetDataset, build_transform
from pawpular.data.tables import read_competition
from pawpular.model.compress import _prunable, compress_model
from pawpular.model.inference import input_dtype, run_backbone
from pawpular.model.models import build_model, data_config


def embed_dataset(model, ds, device, batch_size, num_workers, tta_hflip):
    """Embeddings through the one inference path (what the embed stage and predict run)."""
    return run_backbone(model, ds, device, batch_size=batch_size, num_workers=num_workers, emb_tta=tta_hflip).emb


TINY_SWIN = ModelConfig(
    name="swin_tiny_patch4_window7_224",
    pretrained="none",
    img_size=64,
    kwargs={"embed_dim": 24, "depths": [1, 1], "num_heads": [1, 2], "img_size": 64, "window_size": 4},
)


def dim_correlation(ref: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """(mean, min) over dimensions of the Pearson r across images (dimensions constant in ``ref`` skipped)."""
    a, b = ref - ref.mean(0), other - other.mean(0)
    keep = (a * a).sum(0) > 1e-12
    r = (a * b).sum(0)[keep] / np.sqrt((a * a).sum(0)[keep] * (b * b).sum(0)[keep])
    return float(r.mean()), float(r.min())


@pytest.fixture(scope="module")
def tiny(small_competition):
    """(base model, dataset of 48 train photos, their embeddings stacked as one input tensor)."""
    torch.manual_seed(0)
    model = build_model(TINY_SWIN).eval()
    dc = data_config(TINY_SWIN, model.backbone)
    comp = read_competition(small_competition)
    ds = PetDataset(
        comp.train.iloc[:48], comp.root / "train", build_transform(64, dc["mean"], dc["std"], train=False), min_side=64
    )
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    return model, ds, images


@torch.inference_mode()
def _embed(model: nn.Module, images: torch.Tensor) -> np.ndarray:
    return model.embed(images.to(input_dtype(model))).float().numpy()


def test_int8_embeddings_agree_with_uncompressed(tiny):
    model, _, images = tiny
    q = compress_model(copy.deepcopy(model), "int8", "cpu")
    assert not any(type(m) is nn.Linear for m in q.modules())  # every Linear was swapped for a quantized one
    mean_r, min_r = dim_correlation(_embed(model, images), _embed(q, images))
    assert mean_r > 0.995 and min_r > 0.98, (mean_r, min_r)


def test_pruned_embeddings_agree_with_uncompressed(tiny):
    model, _, images = tiny
    pruned = compress_model(copy.deepcopy(model), "prune:0.3", "cpu")
    mean_r, _ = dim_correlation(_embed(model, images), _embed(pruned, images))
    assert 0.95 < mean_r < 0.99999, mean_r  # close, and not identical: something was pruned


@pytest.mark.parametrize("fraction", [0.3, 0.6])
def test_pruning_reaches_the_asked_sparsity_in_the_pruned_layers(tiny, fraction):
    model, _, _ = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = compress_model(copy.deepcopy(model), f"prune:{fraction}", "cpu")
    weights = [getattr(m, name) for m, name in _prunable(pruned)]
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros / total == pytest.approx(fraction, abs=1.0 / total + 1e-9)  # global pruning: exact overall
    # Permanent: a plain state dict with the same keys (no weight_orig / weight_mask) and no pruning hooks left.
    assert set(pruned.state_dict()) == set(before)
    assert not any(m._forward_pre_hooks for m in pruned.modules())
    # Only the backbone's Linear / Conv2d weights are pruned: the head, norms and biases are untouched.
    state = pruned.state_dict()
    pruned_keys = {
        f"backbone.{n}.weight" for n, m in pruned.backbone.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
    }
    assert pruned_keys and all(torch.equal(state[k], before[k]) for k in before if k not in pruned_keys)
    # What was zeroed is the smallest magnitudes: every zeroed weight was at most as large as every kept one.
    old = torch.cat([before[k].flatten().abs() for k in sorted(pruned_keys)])
    new = torch.cat([state[k].flatten() for k in sorted(pruned_keys)])
    assert old[new == 0].max() <= old[new != 0].min()


def test_bf16_gives_finite_float32_embeddings_through_the_embed_loop(tiny):
    model, ds, _ = tiny
    ref = embed_dataset(model, ds, "cpu", batch_size=16, num_workers=0, tta_hflip=True)
    half = compress_model(copy.deepcopy(model), "bf16", "cpu")
    assert input_dtype(half) == torch.bfloat16
    emb = embed_dataset(half, ds, "cpu", batch_size=16, num_workers=0, tta_hflip=True)
    assert emb.dtype == np.float32 and emb.shape == ref.shape == (48, model.backbone.num_features)
    assert np.isfinite(emb).all()
    assert dim_correlation(ref, emb)[0] > 0.999


def test_none_returns_the_model_unchanged(tiny):
    model, _, _ = tiny
    assert compress_model(model, "none", "cpu") is model


def test_int8_on_a_cuda_device_is_refused(tiny):
    """Dynamic quantization has CPU kernels only: asking for it on a GPU must fail, naming the alternative."""
    model, _, _ = tiny
    with pytest.raises(ValueError, match="int8.*CPU only.*bf16"):
        compress_model(copy.deepcopy(model), "int8", "cuda")


@pytest.mark.parametrize("native, dtype", [(True, torch.bfloat16), (False, torch.float16)])
def test_bf16_becomes_fp16_on_a_gpu_without_native_bf16(tiny, monkeypatch, native, dtype):
    """A T4 / P100 / V100 has no native bf16: the weights run in fp16 there (the model stays where it is: the
    device only decides the dtype, so this runs on a CPU)."""
    from pawpular.model import inference

    model, _, _ = tiny
    monkeypatch.setattr(inference, "gpu_has_bf16", lambda: native)
    squeezed = compress_model(copy.deepcopy(model), "bf16", "cuda")
    assert {p.dtype for p in squeezed.parameters()} == {dtype}


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("none", ("none", 0.0)),
        ("", ("none", 0.0)),
        (" int8 ", ("int8", 0.0)),
        ("bf16", ("bf16", 0.0)),
        ("prune:0.3", ("prune", 0.3)),
        ("prune:.6", ("prune", 0.6)),
    ],
)
def test_parse_accepts_the_settings(spec, expected):
    assert parse(spec) == expected


@pytest.mark.parametrize(
    "spec",
    [
        "int4",
        "fp16",
        "INT8",
        "prune",
        "prune:",
        "prune:0",
        "prune:1",
        "prune:1.5",
        "prune:-0.2",
        "prune:abc",
        "prune:0.3:x",
        "prune:nan",
    ],
)
def test_parse_rejects_bad_specs_with_a_clear_message(spec):
    with pytest.raises(ValueError) as err:
        parse(spec)
    message = str(err.value)
    assert repr(spec.strip()) in message  # names what was given
    assert all(word in message for word in ("none", "int8", "bf16", "prune:<fraction in (0, 1)>"))  # and what is valid
