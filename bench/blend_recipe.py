"""Benchmark: which blend beats the fine-tuned NN head, measured on real photos with real weights.

    python bench/blend_recipe.py --prepare             # folds, fine-tune, embed (the long part; cached)
    python bench/blend_recipe.py --trials 25           # then the tables (SVR heads and blends: about a minute)

docs/winners.md's table: both commands with the defaults below (3 folds, 160 px, 3 epochs, lr 2e-4, bf16), the second
with ``--trials 25 --svr-set c_max=1000``.

Reads ``--data`` (default ``../shared/data/clive``: 930 real photos with a crowd-rated score, 232 held-out test
photos and their ``answers.csv``) and ``--weights`` (default ``input/weights``, where ../shared/tools/real-weights
writes timm's tf_efficientnet_lite0/1 with their ImageNet classifiers). Writes one experiment, ``--out``/tuned
(default ``input/bench_blend``: git-ignored):
EfficientNet-Lite0 fine-tuned per fold (``--img-size`` px, ``--epochs`` epochs, ``--folds`` folds: the NN head),
embedded by its folds (svr.features ``model``) and by frozen backbones whose sets are the weight files' own 1,000
ImageNet classifier outputs (``lite0l``: Lite0 at 224 px, ``lite1l``: Lite1 at 240 px; no TTA), and three SVR
heads (``svr.heads``): ``svr`` on the fine-tuned embeddings (the RAPIDS write-up's), ``svr_l0`` on ``lite0l``,
``svr_l01`` on ``lite0l + lite1l``, each tuned by ``--trials`` Optuna trials.

Prints each SVR head's own nested, OOF and held-out RMSE, then one row per blend: ``pawpular ensemble`` with the
row's ``ensemble.heads``, its nested RMSE (every choice, epoch, C and blend weights, made without the fold
scored), the cross-validated one (optimistic: the heads' epoch and C were chosen on those rows), and the held-out
RMSE of its submission.csv against answers.csv (photos no stage and no choice saw). ``--svr-set KEY=VALUE`` passes
a setting to every SVR head (e.g. the RBF width's tuning, where it exists).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import winners_recipe as recipe  # noqa: E402  (the CLIVE arguments and the quiet runner)

from pawpular import api  # noqa: E402
from pawpular.logs.progress import setup_logging  # noqa: E402
from pawpular.scores.metrics import rmse  # noqa: E402
from pawpular.store import artifacts  # noqa: E402

FROZEN = {"lite0l": ("tf_efficientnet_lite0", "lite0", 224), "lite1l": ("tf_efficientnet_lite1", "lite1", 240)}
LOGIT_HEADS = {"svr_l0": ["lite0l"], "svr_l01": ["lite0l", "lite1l"]}  # svr.heads: SVR heads on frozen logits


def write_configs(args: argparse.Namespace) -> dict[str, Path]:
    """The three experiments' configs (YAML beside ``--out``); {experiment: config file}."""
    backbones = [
        {
            "name": name,
            "model": model,
            "img_size": size,
            "pretrained": str(args.weights / f"efficientnet_{w}.safetensors"),
            "output": "logits",
        }
        for name, (model, w, size) in FROZEN.items()
    ]
    common = {
        "seed": 42,
        "device": "cpu",
        "data_dir": str(args.data),
        "folds": {"n_folds": args.folds, "seed": 42, "group_duplicates": True},
        "embed": {"tta_hflip": False, "batch_size": 32, "num_workers": 1, "backbones": backbones},
    }
    svr = {"n_trials": args.trials, "c_min": 0.1, "c_max": 100.0}
    tuned = {
        "experiment": "tuned",
        **common,
        "output_dir": str(args.out / "tuned"),
        "model": {
            "name": "tf_efficientnet_lite0",
            "pretrained": str(args.weights / "efficientnet_lite0.safetensors"),
            "img_size": args.img_size,
            "drop_rate": 0.1,
            "finetune": "full",
        },
        "train": {
            "epochs": args.epochs,
            "batch_size": 32,
            "lr": args.lr,
            "head_lr": args.lr * 5,
            "weight_decay": 0.01,
            "warmup_epochs": 0.5,
            "precision": args.precision,
            "patience": 0,
            "tta_hflip": False,
            "num_workers": 1,
        },
        "embed": {**common["embed"], "source": "finetuned"},
        "svr": {
            **svr,
            "features": ["model"],
            "heads": [{"name": n, "features": f} for n, f in LOGIT_HEADS.items()],
        },
        "ensemble": {"heads": ["nn", "svr"]},
    }
    configs = {"tuned": tuned}
    args.out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, cfg in configs.items():
        paths[name] = args.out / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(cfg, sort_keys=False))
    return paths


def row(config: Path, out: Path, heads: list[str], answers: pd.Series, svr_sets: list[str]) -> dict:
    """``pawpular ensemble`` with these heads: its nested and cross-validated RMSE, and the held-out RMSE of its
    submission.csv."""
    recipe.quiet(api.run, "ensemble", config=str(config), set=[f"ensemble.heads=[{','.join(heads)}]", *svr_sets])
    weights = json.loads((out / "ensemble" / "weights.json").read_text())
    sub = pd.read_csv(out / "submission.csv").astype({"Id": str}).set_index("Id")["Pawpularity"]
    return {
        "weights": weights["weights"],
        "nested": weights["nested_rmse"].get("ensemble", float("nan")),
        "cv": weights["oof_rmse"]["ensemble_cv"],
        "test": rmse(sub.loc[answers.index].to_numpy(np.float64), answers.to_numpy(np.float64)),
    }


def svr_alone(out: Path, head: str, answers: pd.Series) -> dict:
    """An SVR head's own scores (its files): nested and OOF RMSE, and its test predictions' RMSE."""
    best = json.loads(artifacts.best_params(out, head).read_text())
    test = pd.read_parquet(artifacts.preds(out, head, "test")).astype({"Id": str}).set_index("Id")["pred"]
    pred = np.clip(test.loc[answers.index].to_numpy(np.float64), 1, 100)
    return {"nested": best.get("nested_rmse", float("nan")), "oof": best["oof_rmse"], "test": rmse(pred, answers)}


def main(argv: list[str] | None = None) -> None:
    p = recipe.clive_parser(__doc__, "bench_blend")
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--img-size", type=int, default=160)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--precision", default="bf16", help="train.precision (bf16: autocast, fast on a CPU with AMX)")
    p.add_argument("--trials", type=int, default=15)
    p.add_argument("--svr-set", action="append", default=[], help="KEY=VALUE for every SVR head (svr.KEY)")
    p.add_argument("--prepare", action="store_true", help="folds, train and embed only")
    args = p.parse_args(argv)
    setup_logging(False)  # the stages' progress lines on stderr
    for path in (
        args.data / "answers.csv",
        *(args.weights / f"efficientnet_{w}.safetensors" for w in ("lite0", "lite1")),
    ):
        if not path.is_file():
            sys.exit(f"{path} is absent: this benchmark needs the shared real photos and weights")
    configs = write_configs(args)
    svr_sets = [f"svr.{s}" for s in args.svr_set]
    t0 = time.time()
    for stage in ("folds", "train", "embed"):
        api.run(stage, config=str(configs["tuned"]))
    print(f"folds, train, embed of tuned: {time.time() - t0:.0f} s", flush=True)
    if args.prepare:
        return
    answers = pd.read_csv(args.data / "answers.csv").astype({"Id": str}).set_index("Id")["Pawpularity"]
    y = pd.read_csv(args.data / "train.csv")["Pawpularity"].to_numpy(np.float64)
    out, config = args.out / "tuned", configs["tuned"]
    t = time.time()
    recipe.quiet(api.run, "svr", config=str(config), set=svr_sets)
    print(f"svr (3 heads): {time.time() - t:.0f} s", flush=True)
    print(
        f"clive: {len(y)} train photos ({args.folds} folds), {len(answers)} held-out test photos; predicting the "
        f"train mean: test {rmse(np.full(len(answers), y.mean()), answers.to_numpy(np.float64)):.3f}; NN head: "
        f"tf_efficientnet_lite0 fine-tuned at {args.img_size} px, {args.epochs} epochs, lr {args.lr:g}; SVR heads: "
        f"{args.trials} Optuna trials{', ' + ', '.join(svr_sets) if svr_sets else ''}"
    )
    print("\n| SVR head alone | nested RMSE | OOF RMSE (optimistic) | held-out RMSE |\n|---|---|---|---|")
    for label, head in (
        ("`svr`: fine-tuned Lite0 embeddings (`model`)", "svr"),
        *((f"`{h}`: frozen logits {' + '.join(f'`{n}`' for n in sets)}", h) for h, sets in LOGIT_HEADS.items()),
    ):
        s = svr_alone(out, head, answers)
        print(f"| {label} | {s['nested']:.3f} | {s['oof']:.3f} | {s['test']:.3f} |", flush=True)
    rows = [
        ("NN head alone", ["nn"]),
        ("NN + SVR on the fine-tuned embeddings (the write-up)", ["nn", "svr"]),
        ("NN + SVR on frozen logits, Lite0", ["nn", "svr_l0"]),
        ("NN + SVR on frozen logits, Lite0 + Lite1", ["nn", "svr_l01"]),
        ("NN + both SVR heads (fine-tuned embeddings; logits Lite0 + Lite1)", ["nn", "svr", "svr_l01"]),
    ]
    print(
        "\n| blend (`ensemble.heads`) | weights | nested RMSE | cross-validated (optimistic) | held-out RMSE | "
        "held-out vs NN |\n|---|---|---|---|---|---|"
    )
    first = None
    for label, heads in rows:
        r = row(config, out, heads, answers, svr_sets)
        first = first or r["test"]
        w = ", ".join(f"{k} {v:.2f}" for k, v in r["weights"].items())
        print(
            f"| {label} | {w} | {r['nested']:.3f} | {r['cv']:.3f} | {r['test']:.3f} | {r['test'] / first:.3f}x |",
            flush=True,
        )
    print(f"\n{time.time() - t0:.0f} s in all")


if __name__ == "__main__":
    sys.exit(main())
