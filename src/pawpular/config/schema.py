"""One typed config for every stage.

An experiment is a YAML file (``configs/*.yaml``) mapped onto the dataclasses below. Unknown keys and values of
the wrong type are errors that name the key; ``--set section.key=value`` overrides any field from the command
line; the resolved config is saved as ``output/<experiment>/config.yaml`` beside what the run writes.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..store.errors import ConfigError
from ..store.masking import redact_url, url_password, without_password  # noqa: F401 (the config's secrets: re-exported)
from . import heads as svr_heads
from .checks import build, validate
from .yaml_text import parse_yaml


@dataclass
class FoldsConfig:
    n_folds: int = 5
    seed: int = 42
    # Keep exact and near-duplicate images (perceptual hash) in one fold: StratifiedGroupKFold.
    group_duplicates: bool = True
    # Hamming distance (of 64 bits) under which two images count as duplicates.
    hash_threshold: int = 4
    # Fraction of train.csv set aside before the folds (stratified, fold -1): no stage fits on it, and the
    # ensemble scores the submission's recipe on it ("holdout RMSE"). 0 = none.
    holdout: float = 0.0
    # Your own split instead: a CSV of Id,fold (fold -1 = holdout), checked and copied to folds/folds.csv.
    file: str | None = None


@dataclass
class ModelConfig:
    # Any timm model name. Extra constructor arguments (a tiny Swin for tests and the embedded default) go in kwargs.
    name: str = "swin_large_patch4_window12_384"
    kwargs: dict = field(default_factory=dict)
    # none | hub | path to a .safetensors / .pth / .bin file
    pretrained: str = "none"
    # Input side; None takes it from the model's pretrained config (timm.data.resolve_data_config).
    img_size: int | None = None
    drop_rate: float = 0.1
    # Concatenate the 12 metadata flags to the pooled features before the head.
    use_meta: bool = False
    # full | fpt | ssf | head
    finetune: Literal["full", "fpt", "ssf", "head"] = "full"
    # What a frozen backbone's embedding set holds (embed.source: pretrained): the pooled pre-logit features, or
    # the outputs of the weight file's own classifier (e.g. 1,000 ImageNet logits; the first place's features).
    output: Literal["pooled", "logits"] = "pooled"
    # How a photo becomes the square input: squash (resize the whole photo), or crop (the centred square at
    # inference; in training a random square, the sixth place's choice). Recorded with the transform.
    square: Literal["squash", "crop"] = "squash"


@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 32
    lr: float = 2e-5
    head_lr: float | None = None
    weight_decay: float = 0.01
    warmup_epochs: float = 0.5
    accum_steps: int = 1
    amp: bool = True  # with precision auto: bf16 (or fp16) autocast on GPU; ignored on CPU
    # auto: bf16 on a GPU that has it, else fp16 (with amp), fp32 on a CPU; fp32 | bf16 | fp16 on any device
    # (fp16 adds a gradient scaler). Train's own OOF/test predictions use it too.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool | Literal["auto"] = "auto"  # auto: on a GPU; true: on any device
    compile: bool = False
    mixup_alpha: float = 0.0  # 0 disables mixup
    patience: int = 0  # early stopping on validation RMSE (only with checkpoint: best); 0 disables
    # Which epoch each fold ships (embedded, fed to the SVR, exported, scored): last = the fixed schedule's last
    # epoch (no choice made on any rows); best = the epoch best on the fold's own validation rows (every score built
    # on it is optimistic, and none is called the one to trust)
    checkpoint: Literal["last", "best"] = "last"
    tta_hflip: bool = True
    num_workers: int = 2
    # Only these folds (None = all); lets users spread folds over machines.
    folds: list | None = None
    grad_clip: float = 1.0
    save_every_epoch: bool = True  # epoch checkpoints for resume


@dataclass
class BackboneConfig:
    """One extra embedding source for the multi-backbone SVR (issue: several backbones)."""

    name: str = ""
    model: str = ""
    kwargs: dict = field(default_factory=dict)
    pretrained: str = "none"
    img_size: int | None = None
    output: Literal["pooled", "logits"] = "pooled"  # as model.output
    square: Literal["squash", "crop"] = "squash"  # as model.square


@dataclass
class EmbedConfig:
    # finetuned: each fold's best checkpoint from `train`; pretrained: the frozen backbone, no fine-tuning.
    source: Literal["finetuned", "pretrained"] = "finetuned"
    tta_hflip: bool = True
    batch_size: int = 64
    num_workers: int = 2
    backbones: list = field(default_factory=list)
    compress: str = "none"  # none | int8 | prune:<fraction> | bf16
    # How embed (and predict, from what embed recorded) computes: as train.precision / train.channels_last, but
    # auto is bf16 on a GPU that has it, else fp16, on a GPU whatever train.amp says; fp32 on a CPU.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool | Literal["auto"] = "auto"


@dataclass
class SvrConfig:
    n_trials: int = 30
    c_min: float = 0.1
    c_max: float = 100.0
    epsilon: float = 0.1
    tune_epsilon: bool = False
    epsilon_min: float = 0.01
    epsilon_max: float = 5.0
    # The RBF width's reference per fold: scale (1 / (n_features * X_train.var()), scikit-learn's) | auto
    # (1 / n_features) | a number. With tune_gamma (the default) Optuna tunes the width jointly with C as a
    # multiple of that reference, log-uniform in [gamma_min, gamma_max] ('scale' x 0.01 .. x 10); a fixed number
    # needs tune_gamma: false (a number with tune_gamma is refused as contradictory). Without tune_gamma the width
    # is the reference itself.
    gamma: float | str = "scale"
    tune_gamma: bool = True
    gamma_min: float = 0.01
    gamma_max: float = 10.0
    use_meta: bool = False
    # How the feature sets weigh in the RBF distance after z-scoring: columns (each column the same, so a set in
    # proportion to its width) | sets (each embedding set, and the 12 flags as one more, the same: its columns
    # scaled by 1/sqrt(width)).
    set_weighting: Literal["columns", "sets"] = "columns"
    # auto: precomputed RBF kernels when they fit in max_kernel_gb; plain: refit from features every trial.
    kernel_cache: Literal["auto", "precomputed", "plain"] = "auto"
    # What tuning may hold on this machine (its GPU, with cuML): every local worker's kernels (svr.workers) plus,
    # with cuML, the kernel cache (cache_size) each fit allocates.
    max_kernel_gb: float = 4.0
    # Optuna RDB URL shared by workers on several machines: postgresql://user@host:port/db with the password
    # from PGPASSWORD or ~/.pgpass (libpq's own conventions), or env:NAME = the whole URL from environment
    # variable NAME; a password written in the URL works too. No password is ever written to a file (masked).
    # None = the experiment's own sqlite file output/<experiment>/svr/study.db
    storage: str | None = None
    # Local worker processes on the study (each loads the folds; they share the trial budget exactly)
    workers: int = 1
    seed: int = 42
    # Embedding sets to concatenate (names from embed.backbones, "model" for this experiment's own).
    features: list = field(default_factory=lambda: ["model"])
    # [low, high]: the SVR is fit on the target clipped to this range (the first place clipped at 85); its
    # predictions are scored on the true target. None = no clip.
    target_clip: list | None = None
    # More SVR heads in this experiment: [{name: svr_logits, features: [...]}, ...], each the settings above with
    # its own keys replaced, blended by name in ensemble.heads (config/heads.py).
    heads: list = field(default_factory=list)


@dataclass
class SelectConfig:
    """`pawpular select` (on demand): forward selection of the SVR's embedding sets."""

    # Forward selection from each of the N best single sets (--starts N): up to N different feature sets, each an
    # SVR head of its own (the first place blended three).
    starts: int = 1
    # The inference budget (--budget-hours H --test-images N): only sets whose embedding of N test photos, at the
    # images per second each set recorded where it was made, fits in H hours (Kaggle: 9 h, about 6,800 photos).
    budget_hours: float | None = None
    test_images: int | None = None


@dataclass
class EnsembleConfig:
    # Extra experiment folders whose train/ and svr/ predictions join the blend.
    experiments: list = field(default_factory=list)
    # convex: the best convex combination (non-negative weights summing to 1, solved exactly by SLSQP); "nnls" is
    # its old name, still accepted. hill: Caruana hill climbing (keeps few of 20+ models).
    method: Literal["convex", "hill", "nnls"] = "convex"
    min_improvement: float = 1e-4
    # This experiment's heads to blend (e.g. [svr]: the NN head gets weight 0 and predict never runs it)
    heads: list = field(default_factory=lambda: ["nn", "svr"])


@dataclass
class Config:
    experiment: str = "default"
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data_dir: str = "input/synthetic"
    # Experiment folder; "" means output/<experiment>.
    output_dir: str = ""
    # Redo finished work (folds already trained, caches already valid) instead of skipping it.
    overwrite: bool = False
    # Curves and scores to TensorBoard and/or Weights & Biases: [tensorboard, wandb] (requirements-tracking.txt).
    # Logging only: it changes no result and no stage's cache key.
    tracking: list = field(default_factory=list)
    folds: FoldsConfig = field(default_factory=FoldsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    svr: SvrConfig = field(default_factory=SvrConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)

    @property
    def out(self) -> Path:
        """The experiment folder every stage writes into."""
        return Path(self.output_dir) if self.output_dir else Path("output") / self.experiment

    @property
    def data(self) -> Path:
        return Path(self.data_dir)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# Loading and overriding (the checks are in config/checks.py)


def _parse_value(text: str) -> Any:
    """`--set` values are YAML scalars: 1e-4, true, null, [a, b] and plain strings all work."""
    try:
        return parse_yaml(text)
    except yaml.YAMLError:
        return text


Override = str | tuple  # "key=value" (YAML-typed, as --set), or (key, value, how the caller wrote it)


def apply_overrides(data: dict, overrides: list[Override]) -> dict[str, str]:
    """Apply ``--set key=value`` items (or the API's typed ``(key, value, shown)``) to ``data`` in place; returns
    {key: the item as the caller wrote it} (for messages)."""
    given = {}
    if isinstance(overrides, (str, bytes)):
        raise ConfigError(
            f"overrides must be a list of 'key=value' strings, got the string {overrides!r} (write [{overrides!r}])"
        )
    for item in overrides:
        if isinstance(item, tuple):
            key, value, shown = item
        elif isinstance(item, str) and "=" in item:
            key, text = item.split("=", 1)
            try:
                value, shown = _parse_value(text), f"--set {item}"
            except ConfigError as e:
                raise ConfigError(redact_url(f"--set {item}: {e}", "***")) from None
        else:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key = key.strip()
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{shown}: '{part}' is not a section")
        node[parts[-1]] = value
        given[key] = shown
    return given


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, **top: Any) -> Config:
    """Read a YAML experiment, apply ``--set`` overrides and top-level keyword overrides, and check it all."""
    data: dict = {}
    if path is not None:
        from ..store.files import not_a_file

        path = Path(path)
        if why := not_a_file(path):  # "not found" only when it is not there
            raise ConfigError(f"config file {path} {why}" if why != "not found" else f"config file not found: {path}")
        try:
            data = parse_yaml(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}", e.keys) from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    given = apply_overrides(data, overrides or [])
    for key, value in top.items():
        if value is not None:
            data[key] = value
    try:
        cfg = build(Config, data)
        validate(cfg)
        svr_heads.heads(cfg)
    except ConfigError as e:
        raise ConfigError(redact_url(_blame(e, path, given, top), "***")) from None  # it may quote svr.storage
    return cfg


def _blame(e: ConfigError, path: Path | None, given: dict[str, str], top: dict) -> str:
    """The message with where the bad value came from: the --set item, the command-line flag, or the file."""
    keys = getattr(e, "keys", ())
    for key in keys:
        for k, item in given.items():
            if key == k or key.startswith(k + ".") or k.startswith(key + "."):
                return f"{item}: {e}"
        if key in top and top[key] is not None:
            return f"--{key.replace('_dir', '').replace('_', '-')} {top[key]}: {e}"
    return f"{path}: {e}" if path else str(e)


def load_config_dict(data: dict) -> Config:
    """A Config from a dict as ``Config.to_dict`` gives it (checked like a file)."""
    cfg = build(Config, data)
    validate(cfg)
    svr_heads.heads(cfg)
    return cfg


def public_dict(cfg: Config | dict, mask: str = "") -> dict:
    """The config as it may be written or shown anywhere: ``svr.storage`` with its password replaced by ``mask``
    (by default removed). Secrets never reach a file; a config read back from one connects with PGPASSWORD /
    ~/.pgpass, or ``env:NAME``."""
    data = copy.deepcopy(cfg if isinstance(cfg, dict) else cfg.to_dict())
    svr = data.get("svr")
    if isinstance(svr, dict) and isinstance(svr.get("storage"), str):
        svr["storage"] = redact_url(svr["storage"], mask)
    return data


def save_config(cfg: Config | dict, path: Path) -> None:
    """Write a config as YAML (``public_dict``: no password)."""
    from ..store.files import write_text

    write_text(path, yaml.safe_dump(public_dict(cfg), sort_keys=False))


def backbone_configs(cfg: Config) -> list[BackboneConfig]:
    """``embed.backbones`` checked against BackboneConfig (unknown keys are errors that name them)."""
    out = []
    for i, item in enumerate(cfg.embed.backbones):
        b = build(BackboneConfig, item, f"embed.backbones[{i}].")
        if not b.name or not b.model:
            raise ConfigError(f"embed.backbones[{i}]: 'name' and 'model' are required")
        if b.name.startswith("fold") or b.name == "model":
            raise ConfigError(f"embed.backbones[{i}]: name {b.name!r} is reserved")
        out.append(b)
    return out


def backbone_model_config(b: BackboneConfig) -> ModelConfig:
    """The ModelConfig of a frozen backbone of ``embed.backbones``."""
    return ModelConfig(
        name=b.model, kwargs=b.kwargs, pretrained=b.pretrained, img_size=b.img_size, output=b.output, square=b.square
    )


def config_hash(*parts: Any) -> str:
    """A short stable hash of config sections (plus any other values) for cache keys."""
    import hashlib
    import json

    def norm(x: Any) -> Any:
        return dataclasses.asdict(x) if dataclasses.is_dataclass(x) else x

    blob = json.dumps([norm(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
