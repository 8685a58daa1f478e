"""Benchmark: the SVR head's search space on real photos: C only vs C + the RBF width vs + each set weighed the same.

    nice python bench/svr_width.py --weights /work/weights                # embed once (cached), then the table
    nice python bench/svr_width.py --weights /work/weights --embed-only   # only the embeddings

Reads ``--data`` (default ``../shared/data/clive``: 930 real photos with a crowd-rated score, 5 folds; 232 test
photos and their answers) and ``--weights`` (tf_efficientnet_lite0/1/2 with their classifiers, ImageNet). Writes
one frozen-recipe experiment under ``--out`` (default ``input/bench_width``: git-ignored) whose
``embed.backbones`` hold each backbone (``--models``) x feature kind (pooled | logits), squash, no TTA, each
embedded once by ``pawpular embed`` (pooled and logits of a backbone from one pass) and reused by every row. Each
row is ``pawpular svr`` (``--trials`` Optuna trials) on that folder with the row's ``svr.features`` and search
space: C only (``svr.tune_gamma: false``, the width 'scale'), C + the width (``gamma_x`` x 'scale' in [0.01, 10]),
and for several sets C + the width with ``svr.set_weighting: sets`` (each set weighs the same in the distance) and
C + the width + epsilon (``svr.tune_epsilon``, in [0.01, 5]). It prints per row:

- OOF RMSE of the best trial's parameters (optimistic: chosen on those rows), the nested RMSE (fold k predicted
  with the parameters best on the other folds: ``svr/nested.parquet``, the score to trust) and
- test RMSE: the heads' test predictions against ``answers.csv`` (photos no choice of this benchmark saw);
- the chosen C and width (``gamma_x`` x 'scale').
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import winners_recipe as recipe  # noqa: E402  (the same config writer and quiet runner)

from pawpular import api  # noqa: E402
from pawpular.logs.progress import setup_logging  # noqa: E402
from pawpular.scores.metrics import rmse  # noqa: E402

# (label, settings): the search spaces compared on every feature group
SPACES = [
    ("C only (gamma = 'scale')", ["svr.tune_gamma=false", "svr.set_weighting=columns", "svr.tune_epsilon=false"]),
    ("C + width", ["svr.tune_gamma=true", "svr.set_weighting=columns", "svr.tune_epsilon=false"]),
    ("C + width, sets weighed the same", ["svr.tune_gamma=true", "svr.set_weighting=sets", "svr.tune_epsilon=false"]),
    ("C + width + epsilon", ["svr.tune_gamma=true", "svr.set_weighting=columns", "svr.tune_epsilon=true"]),
]


def head_scores(config: Path, out: Path, features: list[str], space: list[str], trials: int, answers: pd.Series):
    sets = [f"svr.features=[{','.join(features)}]", f"svr.n_trials={trials}", *space]
    recipe.quiet(api.run, "svr", config=str(config), set=sets)
    best = json.loads((out / "svr" / "best_params.json").read_text())
    test = pd.read_parquet(out / "svr" / "test.parquet")
    test_rmse = rmse(test["pred"].to_numpy(), answers.loc[test["Id"].astype(str)].to_numpy(np.float64))
    return best, test_rmse


def main(argv: list[str] | None = None) -> None:
    p = recipe.clive_parser(__doc__, "bench_width")
    p.add_argument("--trials", type=int, default=30)
    p.add_argument("--models", default="lite0,lite1,lite2")
    p.add_argument("--embed-only", action="store_true")
    args = p.parse_args(argv)
    setup_logging(False)  # the stages' log lines (embedding progress) on stderr
    if not (args.data / "answers.csv").is_file():
        sys.exit(f"{args.data}/answers.csv not found: this benchmark needs ../shared/data/clive")
    recipe.MODELS.clear()
    recipe.MODELS.update({m: recipe.ALL_MODELS[m] for m in args.models.split(",")})
    recipe.CROPPED = ()  # squash only (CLIVE's photos are square: a crop changes nothing there)
    config = recipe.write_config(args.out, args.data, args.weights)
    api.run("folds", config=str(config))
    api.run("embed", config=str(config), set=["embed.num_workers=0"])  # decoding in the process: 2 shared cores
    if args.embed_only:
        return
    answers = pd.read_csv(args.data / "answers.csv").astype({"Id": str}).set_index("Id")["Pawpularity"]
    models = list(recipe.MODELS)
    pooled, logits = [f"{m}p" for m in models], [f"{m}l" for m in models]
    groups = [
        ("lite0 pooled", ["lite0p"]),
        ("lite0 logits", ["lite0l"]),
        (f"{len(models)} backbones, pooled", pooled),
        (f"{len(models)} backbones, logits", logits),
        (f"{len(models)} backbones, pooled + logits", pooled + logits),
    ]
    print(f"clive: {args.trials} Optuna trials a row; OOF is optimistic (parameters chosen on those rows)")
    print("| features | search space | OOF RMSE | nested RMSE | test RMSE | C | width (x 'scale') | epsilon |")
    print("|---|---|---|---|---|---|---|---|")
    for label, features in groups:
        for space_label, space in SPACES if len(features) > 1 else SPACES[:2]:  # one set: 'sets' = 'columns'
            best, test_rmse = head_scores(config, args.out, features, space, args.trials, answers)
            print(
                f"| {label} | {space_label} | {best['oof_rmse']:.3f} | {best.get('nested_rmse', float('nan')):.3f} "
                f"| {test_rmse:.3f} | {best['C']:.3g} | {best.get('gamma_x', 1.0):.3g} | {best['epsilon']:.3g} |",
                flush=True,
            )


if __name__ == "__main__":
    sys.exit(main())
