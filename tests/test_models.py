"""Models: shapes, data config, the fine-tuning modes' parameter sets, the SSF merge, pretrained files, checkpoints."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pawpular.config.schema import ModelConfig
from pawpular.model.finetune import add_ssf, count_parameters, export_state_dict, has_ssf, merge_ssf, setup_finetune
from pawpular.model.models import PretrainedWeightsError, build_model, data_config, load_checkpoint
from pawpular.store.errors import ConfigError

SWIN = dict(
    name="swin_tiny_patch4_window7_224",
    img_size=32,
    kwargs=dict(embed_dim=16, depths=[1, 1], num_heads=[1, 2], img_size=32, window_size=4),
)
VIT = dict(name="vit_tiny_patch16_224", img_size=32, kwargs=dict(patch_size=8, embed_dim=32, depth=2, num_heads=2))
CONVNEXT = dict(name="convnext_atto", img_size=32, kwargs=dict(dims=(8, 16, 24, 32), depths=(1, 1, 1, 1)))
TINY = {"swin": SWIN, "vit": VIT, "convnext": CONVNEXT}


def cfg_of(kind: str, **over) -> ModelConfig:
    return ModelConfig(**{**TINY[kind], **over})


def _inputs(n: int = 3, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 2, (n, 12), generator=g).float()


@pytest.mark.parametrize("kind", ["swin", "vit"])
def test_forward_and_embed_shapes(kind):
    model = build_model(cfg_of(kind, use_meta=True), pretrained=False).eval()
    x, meta = _inputs()
    emb = model.embed(x)
    assert emb.shape == (3, model.backbone.num_features)
    assert model(x, meta).shape == (3,)
    assert model.head.in_features == model.backbone.num_features + 12
    with pytest.raises(ValueError, match="metadata"):
        model(x)


def test_data_config_takes_img_size_over_timm():
    from timm.data import resolve_data_config

    model = build_model(cfg_of("swin"), pretrained=False)
    assert resolve_data_config(model=model.backbone)["input_size"] == (3, 224, 224)  # why the override exists
    dc = data_config(cfg_of("swin"), model.backbone)
    assert dc["input_size"] == (3, 32, 32)
    assert dc["mean"] == pytest.approx((0.485, 0.456, 0.406)) and len(dc["std"]) == 3
    vit = build_model(cfg_of("vit", img_size=None, kwargs={**VIT["kwargs"], "img_size": 48}), pretrained=False)
    assert data_config(cfg_of("vit", img_size=None, kwargs={**VIT["kwargs"], "img_size": 48}), vit.backbone)[
        "input_size"
    ] == (3, 48, 48)
    assert data_config(ModelConfig(name="vit_tiny_patch16_224", kwargs=VIT["kwargs"]), vit.backbone)["mean"] == (
        0.5,
        0.5,
        0.5,
    )
    with pytest.raises(ConfigError, match="disagree"):
        build_model(cfg_of("swin", img_size=64), pretrained=False)
    cnn = build_model(cfg_of("convnext", img_size=40), pretrained=False)  # a CNN has no img_size argument
    assert data_config(cfg_of("convnext", img_size=40), cnn.backbone)["input_size"] == (3, 40, 40)


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_fpt_trains_norms_patch_embed_positions_and_head_only():
    swin = build_model(cfg_of("swin"), pretrained=False)
    setup_finetune(swin, "fpt")
    names = _trainable(swin)
    rule = re.compile(r"(^head\.|\.norm\d?\.|^backbone\.norm\.|^backbone\.patch_embed\.|relative_position_bias_table$)")
    assert names == {n for n, _ in swin.named_parameters() if rule.search(n)}
    assert {
        "backbone.patch_embed.proj.weight",
        "backbone.layers.0.blocks.0.attn.relative_position_bias_table",
        "backbone.layers.1.blocks.0.norm2.bias",
        "backbone.norm.weight",
        "head.weight",
    } <= names
    frozen = {n for n, _ in swin.named_parameters()} - names
    assert frozen and all(re.search(r"\.(qkv|proj|fc1|fc2|reduction)\.", n) for n in frozen)
    assert any(".attn.qkv." in n for n in frozen) and any(".mlp.fc1." in n for n in frozen)

    vit = build_model(cfg_of("vit"), pretrained=False)
    setup_finetune(vit, "fpt")
    names = _trainable(vit)
    assert {
        "backbone.pos_embed",
        "backbone.cls_token",
        "backbone.patch_embed.proj.weight",
        "backbone.blocks.0.norm1.weight",
        "backbone.norm.bias",
        "head.bias",
    } <= names
    assert not any(re.search(r"\.(qkv|proj|fc1|fc2)\.", n) and "patch_embed" not in n for n in names)

    cnn = build_model(cfg_of("convnext"), pretrained=False)
    setup_finetune(cnn, "fpt")
    names = _trainable(cnn)
    assert {"backbone.stem.0.weight", "backbone.stem.1.weight", "backbone.stages.0.blocks.0.norm.weight"} <= names
    assert not any(".conv_dw." in n or ".mlp." in n for n in names)


def test_head_and_full_modes():
    model = build_model(cfg_of("swin"), pretrained=False)
    trainable, total = setup_finetune(model, "head")
    assert _trainable(model) == {"head.weight", "head.bias"} and trainable == model.head.weight.numel() + 1
    trainable, total = setup_finetune(model, "full")
    assert trainable == total == count_parameters(model)
    with pytest.raises(ConfigError):
        setup_finetune(model, "lora")


@pytest.mark.parametrize("kind", ["swin", "vit", "convnext"])
def test_ssf_merge_keeps_outputs_and_base_architecture(kind):
    torch.manual_seed(0)
    model = build_model(cfg_of(kind, use_meta=True), pretrained=False).eval()
    base_keys, base_count = set(model.state_dict()), count_parameters(model)
    trainable, total = setup_finetune(model, "ssf")
    assert has_ssf(model) and total > base_count
    assert all(".ssf." in n or n.startswith("head.") for n in _trainable(model))
    with torch.no_grad():  # adapters away from identity, or the test proves nothing
        for n, p in model.named_parameters():
            if ".ssf." in n:
                p.copy_(1 + 0.3 * torch.randn_like(p) if n.endswith("scale") else 0.3 * torch.randn_like(p))
    x, meta = _inputs()
    plain = build_model(cfg_of(kind, use_meta=True), pretrained=False).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if ".ssf." not in k})
    with torch.no_grad():
        y_ssf, y_plain = model(x, meta), plain(x, meta)
    assert (y_ssf - y_plain).abs().max() > 1e-3  # the adapters change the function

    state = export_state_dict(model)
    assert set(state) == base_keys
    merge_ssf(model)
    with torch.no_grad():
        y_merged = model(x, meta)
    assert torch.allclose(y_merged, y_ssf, atol=1e-5, rtol=0)
    assert not has_ssf(model) and count_parameters(model) == base_count and set(model.state_dict()) == base_keys
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_ssf_scales_the_channel_dim_of_channels_last_outputs():
    """Swin applies LayerNorm / Linear to (B, H, W, C) tensors and ConvNeXt LayerNorm2d to (B, C, H, W)."""
    for kind, get in (
        ("swin", lambda b: b.layers[0].blocks[0].norm1),
        ("convnext", lambda b: b.stages[1].downsample[0]),
    ):
        model = build_model(cfg_of(kind), pretrained=False).eval()
        assert add_ssf(model) > 5
        layer = get(model.backbone)
        seen = {}
        layer.register_forward_hook(
            lambda m, a, out, seen=seen: seen.__setitem__("out", out.detach())
        )  # runs after the SSF hook
        with torch.no_grad():
            layer.ssf.scale.zero_()
            layer.ssf.shift.copy_(torch.arange(layer.ssf.shift.numel()).float())
            model(_inputs()[0])
        out = seen["out"]
        assert out.ndim == 4
        dim = 1 if kind == "convnext" else -1
        channel = torch.arange(out.shape[dim]).float().view([-1 if d == dim % 4 else 1 for d in range(4)])
        assert torch.equal(out, channel.expand_as(out))


def _save_backbone(model, path: Path, extra: dict | None = None, wrap: bool = False) -> dict:
    state = {k: v.clone().contiguous() for k, v in model.backbone.state_dict().items()}
    state.update(extra or {})
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}} if wrap else state, path)
    return state


def test_local_pretrained_files_load(tmp_path):
    torch.manual_seed(1)
    source = build_model(cfg_of("swin"), pretrained=False)
    head = {"head.fc.weight": torch.randn(1000, 32), "head.fc.bias": torch.randn(1000)}  # dropped silently
    st = _save_backbone(source, tmp_path / "w.safetensors", extra=head)
    _save_backbone(source, tmp_path / "w.pth", extra=head, wrap=True)
    for name in ("w.safetensors", "w.pth"):
        model = build_model(cfg_of("swin", pretrained=str(tmp_path / name)))
        got = model.backbone.state_dict()
        assert all(torch.equal(got[k], st[k]) for k in got)
        assert not torch.equal(
            build_model(cfg_of("swin")).backbone.patch_embed.proj.weight, got["patch_embed.proj.weight"]
        )
    # our own best.pt (PawModel keys under backbone.) also works as pretrained weights
    torch.save({"model": source.state_dict()}, tmp_path / "best.pt")
    model = build_model(cfg_of("swin", pretrained=str(tmp_path / "best.pt")))
    assert torch.equal(model.backbone.norm.weight, source.backbone.norm.weight)
    # pretrained=False never loads (load_checkpoint relies on it)
    unloaded = build_model(cfg_of("swin", pretrained=str(tmp_path / "missing.pth")), pretrained=False)
    assert isinstance(unloaded.backbone, torch.nn.Module)


def test_pretrained_errors_name_the_problem(tmp_path):
    with pytest.raises(PretrainedWeightsError, match="not found.*missing.safetensors"):
        build_model(cfg_of("swin", pretrained=str(tmp_path / "missing.safetensors")))
    assert issubclass(PretrainedWeightsError, ConfigError)

    source = build_model(cfg_of("swin"), pretrained=False)
    state = {k: v.clone() for k, v in source.backbone.state_dict().items()}
    del state["layers.0.blocks.0.attn.qkv.weight"]
    state["layers.0.blocks.0.attn.extra.weight"] = torch.zeros(3)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(PretrainedWeightsError) as e:
        build_model(cfg_of("swin", pretrained=str(tmp_path / "bad.safetensors")))
    msg = str(e.value)
    assert "missing key(s): layers.0.blocks.0.attn.qkv.weight" in msg
    assert "unexpected key(s): layers.0.blocks.0.attn.extra.weight" in msg

    wider = build_model(cfg_of("swin", kwargs={**SWIN["kwargs"], "embed_dim": 24}), pretrained=False)
    _save_backbone(wider, tmp_path / "wide.safetensors")
    with pytest.raises(
        PretrainedWeightsError,
        match=r"shape mismatch.*layers\.0\.blocks\.0\.attn\.qkv\.weight \(72, 24\) vs \(48, 16\)",
    ):
        build_model(cfg_of("swin", pretrained=str(tmp_path / "wide.safetensors")))

    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainedWeightsError, match="model.pretrained: .*junk.bin is not a weight file"):
        build_model(cfg_of("swin", pretrained=str(tmp_path / "junk.bin")))
    (tmp_path / "torn.pth").write_bytes(b"PK\x03\x04 a torch zip cut short")
    with pytest.raises(PretrainedWeightsError, match="model.pretrained: cannot read .*torn.pth"):
        build_model(cfg_of("swin", pretrained=str(tmp_path / "torn.pth")))


def test_load_checkpoint_rebuilds_the_model(tmp_path):
    import dataclasses

    cfg = cfg_of("swin", use_meta=True, finetune="ssf")
    model = build_model(cfg, pretrained=False).eval()
    setup_finetune(model, "ssf")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".ssf." in n:
                p.add_(0.2 * torch.randn_like(p))
    dc = data_config(cfg, model.backbone)
    torch.save(
        {
            "model": export_state_dict(model),
            "model_cfg": dataclasses.asdict(cfg),
            "data_cfg": dc,
            "epoch": 1,
            "val_rmse": 1.0,
        },
        tmp_path / "best.pt",
    )
    loaded, data_cfg = load_checkpoint(tmp_path / "best.pt")
    assert data_cfg == dc and not loaded.training and not has_ssf(loaded)
    x, meta = _inputs()
    with torch.no_grad():
        assert torch.allclose(loaded(x, meta), model(x, meta), atol=1e-5)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nope.pt")


def test_weights_load_as_torch_loads_them(tmp_path):
    """Old: a converted ResNet file without BatchNorm's num_batches_tracked was refused as "missing keys", though
    torch's own strict load takes it; a Swin file carrying its non-persistent relative_position_index likewise."""
    cnn_cfg = ModelConfig(name="resnet18", kwargs={"layers": [1, 1, 1, 1]}, img_size=32)
    torch.manual_seed(3)
    source = build_model(cnn_cfg, pretrained=False).backbone
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(state) < len(source.state_dict())  # the file really lacks them
    build_model(cnn_cfg, pretrained=False).backbone.load_state_dict(state, strict=True)  # torch accepts it
    save_file(state, str(tmp_path / "resnet.safetensors"))
    loaded = build_model(
        ModelConfig(**{**cnn_cfg.__dict__, "pretrained": str(tmp_path / "resnet.safetensors")})
    ).backbone
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    assert all(int(v) == 0 for k, v in loaded.state_dict().items() if k.endswith("num_batches_tracked"))

    swin = build_model(cfg_of("swin"), pretrained=False).backbone
    index = dict(swin.named_buffers())["layers.0.blocks.0.attn.relative_position_index"]
    assert "layers.0.blocks.0.attn.relative_position_index" not in swin.state_dict()  # non-persistent
    state = {
        **{k: v.clone() for k, v in swin.state_dict().items()},
        "layers.0.blocks.0.attn.relative_position_index": index,
    }
    save_file(state, str(tmp_path / "swin.safetensors"))
    model = build_model(cfg_of("swin", pretrained=str(tmp_path / "swin.safetensors")))
    assert torch.equal(model.backbone.norm.weight, swin.norm.weight)
    del state["layers.0.blocks.0.attn.qkv.weight"]  # a real mismatch still names its key
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(PretrainedWeightsError, match="missing key.*layers.0.blocks.0.attn.qkv.weight"):
        build_model(cfg_of("swin", pretrained=str(tmp_path / "bad.safetensors")))


def test_timm_loads_without_the_wandb_client_which_still_imports_after():
    """A command that builds a model does not pay for W&B's import through timm (0.5-0.7 s where it is installed);
    tracking can still import it afterwards."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("wandb") is None:
        pytest.skip("wandb is not installed (requirements-tracking.txt): nothing for timm to load")
    code = (
        "import sys; from pawpular.model.models import import_timm; import_timm(); "
        "print('wandb' in sys.modules); import wandb; print(wandb.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "wandb"], out
