"""Benchmark: what won the PetFinder competition, as settings, measured on real photos with real weights.

    ../shared/tools/real-weights input/weights                       # three ImageNet EfficientNet-Lite files
    nice python bench/winners_recipe.py                              # embed once (cached), then the table
    nice python bench/winners_recipe.py --models lite0,lite1,lite2   # the three backbones (2x the CPU time)
    python bench/winners_recipe.py --embed-only                      # only the embeddings (start them early)

Reads ``--data`` (default ``../shared/data/clive``: 930 real photos with a crowd-rated score in the competition's
layout, a test split of 232 and its answers), ``--weights`` (tf_efficientnet_lite0/1/2 with their classifiers).
Writes one frozen-recipe experiment under ``--out`` (default ``input/bench_winners``: git-ignored) whose
``embed.backbones`` hold every backbone x feature kind (pooled | logits) x square rule (squash; centre crop for
lite0), each embedded once by ``pawpular embed`` (no TTA) and reused by every row. Each row is then the
project's own commands on that folder: ``pawpular select`` (``--starts``) on all the sets where the row
selects, and ``pawpular svr`` (Optuna, ``--trials`` trials) per head with the row's ``svr.features`` /
``svr.target_clip``; the heads of a row are blended as the ensemble stage blends heads (``blend.fit_weights``,
convex) and scored the same way. Prints per row:

- OOF RMSE of the SVR head (its folds' out-of-fold predictions), and the cross-validated blend RMSE (the weights
  refit on the other folds, ``blend.cross_validated``; the same as the head's for one head);
- test RMSE: the submission (or the blend of the heads' test predictions) against ``answers.csv``: rows no stage
  and no choice of this benchmark ever saw. The selection rows choose their sets on the OOF (optimistic OOF).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image

from pawpular import api
from pawpular.scores import blend, budget
from pawpular.scores.metrics import rmse

ALL_MODELS = {
    "lite0": ("tf_efficientnet_lite0", 224),
    "lite1": ("tf_efficientnet_lite1", 240),
    "lite2": ("tf_efficientnet_lite2", 260),
}
MODELS = dict(ALL_MODELS)  # --models
KINDS = {"p": "pooled", "l": "logits"}
SQUARES = {"": "squash", "c": "crop"}
CROPPED = ("lite0",)  # the crop rule is measured on this one (2 shared CPU cores)


def set_name(model: str, kind: str, square: str = "") -> str:
    return f"{model}{kind}{square}"  # lite0p, lite0l, lite0pc, ...


def write_config(out: Path, data: Path, weights: Path) -> Path:
    backbones = [
        {
            "name": set_name(m, k, s),
            "model": name,
            "img_size": size,
            "pretrained": str(weights / f"efficientnet_{m}.safetensors"),
            "output": kind,
            "square": square,
        }
        for s, square in SQUARES.items()
        for m, (name, size) in MODELS.items()
        for k, kind in KINDS.items()
        if not (square == "crop" and m not in CROPPED)
    ]
    backbones.sort(key=lambda b: b["name"].startswith("lite2"))  # embedded last: the slowest, on 2 shared cores
    cfg = {
        "experiment": "bench_winners",
        "data_dir": str(data),
        "output_dir": str(out),
        "device": "cpu",
        "folds": {"n_folds": 5, "seed": 42, "group_duplicates": True},
        "embed": {"tta_hflip": False, "batch_size": 32, "num_workers": 1, "backbones": backbones},
        "svr": {"n_trials": 15, "c_min": 0.1, "c_max": 100.0, "features": ["lite0p"]},
        "ensemble": {"heads": ["svr"]},
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def quiet(fn, *a, **kw):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*a, **kw)


def head_run(config: Path, out: Path, features: list[str], clip: list | None, trials: int) -> dict:
    """svr + ensemble on ``features``: {'oof': OOF predictions, 'test': test predictions, 'fold': folds}."""
    sets = [
        f"svr.features=[{','.join(features)}]",
        f"svr.target_clip={clip if clip else 'null'}",
        f"svr.n_trials={trials}",
    ]
    quiet(api.run, "svr", config=str(config), set=sets)
    oof = pd.read_parquet(out / "svr" / "oof.parquet")
    test = pd.read_parquet(out / "svr" / "test.parquet")
    return {"oof": oof, "test": test}


def score(heads: list[dict], y_train: pd.Series, answers: pd.Series) -> tuple[float, float, float]:
    """(OOF RMSE of the first head, cross-validated blend RMSE, test RMSE of the blend)."""
    ids = heads[0]["oof"]["Id"].astype(str)
    y = y_train.loc[ids].to_numpy(np.float64)
    fold = heads[0]["oof"]["fold"].to_numpy()
    oof = np.column_stack([h["oof"].set_index("Id").loc[ids, "pred"].to_numpy() for h in heads])
    names = [f"h{i}" for i in range(len(heads))]
    cv, _ = blend.cross_validated(oof, y, fold, names)
    w = blend.fit_weights(oof, y, names).weights
    tids = heads[0]["test"]["Id"].astype(str)
    test = np.column_stack([h["test"].set_index("Id").loc[tids, "pred"].to_numpy() for h in heads])
    return (
        rmse(oof[:, 0], y) if len(heads) == 1 else rmse(oof @ w, y),
        cv,
        rmse(np.clip(test @ w, 1, 100), answers.loc[tids].to_numpy(np.float64)),
    )


def selected(config: Path, out: Path, candidates: list[str], starts: int) -> list[list[str]]:
    """``pawpular select --starts N`` among ``candidates``: the feature sets of its starts, best first."""
    backbones = yaml.safe_dump(only(config, candidates), default_flow_style=True).strip()
    quiet(api.run, "select", config=str(config), set=[f"select.starts={starts}", f"embed.backbones={backbones}"])
    found = json.loads((out / "select" / "selection.json").read_text())
    return [s["features"] for s in found["starts"]] if "starts" in found else [found["chosen"]]


def only(config: Path, names: list[str]) -> list[dict]:
    """The config's embed.backbones restricted to ``names`` (select's candidates)."""
    backbones = yaml.safe_load(config.read_text())["embed"]["backbones"]
    return [b for b in backbones if b["name"] in names]


def print_rows(config: Path, args: argparse.Namespace) -> None:
    out, clip = args.out, [1, 85]
    y = pd.read_csv(args.data / "train.csv").astype({"Id": str}).set_index("Id")["Pawpularity"]
    answers = pd.read_csv(args.data / "answers.csv").astype({"Id": str}).set_index("Id")["Pawpularity"]
    kinds = {kind: [set_name(m, k) for m in MODELS] for k, kind in KINDS.items()}
    six = kinds["pooled"] + kinds["logits"]
    rows: list[tuple[str, list[list[str]], list | None]] = [
        (f"pooled, {len(MODELS)} backbones", [kinds["pooled"]], None),
        (f"logits, {len(MODELS)} backbones", [kinds["logits"]], None),
        (f"pooled + logits (both), {len(MODELS)} backbones", [six], None),
    ]
    every = [b["name"] for b in yaml.safe_load(config.read_text())["embed"]["backbones"]]
    one, several = selected(config, out, every, 1), selected(config, out, every, args.starts)
    rows += [
        (f"select, 1 start (of all {len(every)} sets)", one, None),
        (f"select, {args.starts} starts -> {len(several)} heads, blended", several, None),
    ]
    results = {}

    def measure(label: str, heads: list[list[str]], clip_: list | None) -> None:
        runs = [head_run(config, out, h, clip_, args.trials) for h in heads]
        results[label] = score(runs, y, answers)
        oof, cv, test = results[label]
        sets = " | ".join("+".join(h) for h in heads)
        print(f"| {label} | {sets} | {oof:.3f} | {cv:.3f} | {test:.3f} |", flush=True)

    mean_oof = rmse(np.full(len(y), y.mean()), y.to_numpy())
    mean_test = rmse(np.full(len(answers), y.mean()), answers.to_numpy())
    print(
        f"clive: {len(y)} train photos (5 folds), {len(answers)} test photos; predicting the train mean: OOF "
        f"{mean_oof:.3f}, test {mean_test:.3f}; target clip {clip} clips {(y > clip[1]).mean():.1%} of the train "
        "rows"
    )
    sizes = [Image.open(f).size for split in ("train", "test") for f in sorted((args.data / split).glob("*.jpg"))]
    print(
        f"photos: {sum(w == h for w, h in sizes)} of {len(sizes)} square (the centre crop of a square photo is the "
        "whole photo: crop and squash differ only on the others)"
    )
    speeds = {n: budget.set_speed(out, n, [0]) for n in every}
    print(
        "images/s recorded by embed (this CPU, no TTA); hours for 6,800 photos: "
        + ", ".join(
            f"{n} {ips:.1f} ({budget.inference_hours(speeds, [n], 6800):.2f} h)" for n, (ips, _) in speeds.items()
        )
    )
    print("| row | feature sets | OOF RMSE | cross-validated blend | test RMSE |\n|---|---|---|---|---|")
    for label, heads, c in rows:
        measure(label, heads, c)
    best = min(rows[:3], key=lambda r: results[r[0]][0])
    measure(f"{best[0]}, target clip {clip}", best[1], clip)
    measure(f"{rows[4][0]}, target clip {clip}", several, clip)
    for kind, names in kinds.items():
        squash = [n for n in names if n[:5] in CROPPED]
        if not squash:
            continue
        measure(f"{kind}, {' + '.join(CROPPED)}, squash", [squash], None)
        measure(f"{kind}, {' + '.join(CROPPED)}, centre crop", [[n + "c" for n in squash]], None)


def clive_parser(doc: str, out: str) -> argparse.ArgumentParser:
    """The arguments of every CLIVE benchmark (this one, svr_width.py, blend_recipe.py): the photos and their
    answers, the real weights, and the benchmark's own working folder under input/."""
    here = Path(__file__).resolve().parent.parent
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--data", type=Path, default=here.parent / "shared" / "data" / "clive")
    p.add_argument("--weights", type=Path, default=here / "input" / "weights")
    p.add_argument("--out", type=Path, default=here / "input" / out)
    return p


def main(argv: list[str] | None = None) -> None:
    p = clive_parser(__doc__, "bench_winners")
    p.add_argument("--trials", type=int, default=15)
    p.add_argument("--starts", type=int, default=3)
    p.add_argument(
        "--models",
        default="lite0,lite1",
        help="of lite0,lite1,lite2 (lite2 costs as much as the other two together on a CPU)",
    )
    p.add_argument("--embed-only", action="store_true")
    args = p.parse_args(argv)
    MODELS.clear()
    MODELS.update({m: ALL_MODELS[m] for m in args.models.split(",")})
    config = write_config(args.out, args.data, args.weights)
    api.run("folds", config=str(config))
    api.run("embed", config=str(config))
    if args.embed_only:
        return
    print_rows(config, args)


if __name__ == "__main__":
    sys.exit(main())
