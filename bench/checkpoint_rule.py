"""What the honest checkpoint rule costs or gains: the same fine-tuned pipeline under ``train.checkpoint: last``
(each fold ships the schedule's last epoch) and ``best`` (the epoch best on its own validation rows).

    python bench/checkpoint_rule.py                                   # the embedded default (input/synthetic)
    python bench/checkpoint_rule.py --data ../shared/data/clive --config bench/clive_lite0.yaml

Runs ``pawpular all`` once per rule (``--rules``, default both) into ``--out``/{last,best} (the folds are the same:
folds.seed) and prints, per rule: the epochs the folds shipped, the NN head's OOF RMSE, the blend's cross-validated
and nested RMSE, and with an ``answers.csv`` in the data folder (CLIVE's test scores) the submission's RMSE on those
held-out photos. Under ``last`` the nested blend is the score to trust; under ``best`` every score is optimistic
(the checkpoint was chosen on the rows scored) and the held-out RMSE is the only honest one.

Then, from the first rule's per-epoch validation predictions (``train/fold{k}/epochs.parquet``: every epoch of one
training, whatever ships), the NN head's OOF RMSE under three epoch rules: the last epoch (no choice), the epoch
best on the other folds' mean curve (nested) and each fold's own best (optimistic).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pawpular import api
from pawpular.scores import nested
from pawpular.scores.metrics import rmse
from pawpular.store import artifacts

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=REPO / "configs" / "default.yaml")
    p.add_argument("--data", type=Path, default=None, help="competition folder (default: the config's data_dir)")
    p.add_argument("--out", type=Path, default=REPO / "output" / "bench_checkpoint_rule")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more settings for both runs")
    p.add_argument("--rules", nargs="+", default=["last", "best"], choices=["last", "best"])
    args = p.parse_args()
    answers_csv = args.data / "answers.csv" if args.data else None
    rows = []
    for rule in args.rules:
        out, t0 = args.out / rule, time.time()
        api.run("all", config=args.config, output=out, data=args.data, set=[*args.set, f"train.checkpoint={rule}"])
        shipped = json.loads(artifacts.shipped_json(out).read_text())
        weights = json.loads(artifacts.weights_json(out).read_text())
        row = {
            "rule": rule,
            "epochs shipped": ",".join(str(e) for _, e in sorted(shipped["epochs"].items())),
            "NN OOF": weights["oof_rmse"]["nn"],
            "blend cv": weights["oof_rmse"]["ensemble_cv"],
            "blend nested": weights["nested_rmse"].get("ensemble", np.nan),
            "trusted": weights["trusted"],
        }
        if answers_csv is not None and answers_csv.is_file():
            answers = pd.read_csv(answers_csv, dtype={"Id": str}).set_index("Id")["Pawpularity"]
            sub = pd.read_csv(artifacts.submission(out), dtype={"Id": str}).set_index("Id")["Pawpularity"]
            row["held-out test"] = float(np.sqrt(((sub - answers.loc[sub.index]) ** 2).mean()))
        row["seconds"] = round(time.time() - t0)
        rows.append(row)
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print()
    print(epoch_rules(args.out / args.rules[0], args.data or REPO / "input" / "synthetic"))


def epoch_rules(out: Path, data: Path) -> str:
    """The NN head's OOF RMSE under the three epoch rules, from one training's per-epoch predictions."""
    target = pd.read_csv(data / "train.csv", dtype={"Id": str}).set_index("Id")["Pawpularity"]
    folds = sorted(int(k) for k in json.loads(artifacts.shipped_json(out).read_text())["epochs"])
    tables = [pd.read_parquet(artifacts.epoch_preds(out, k)) for k in folds]
    curves = [[rmse(t[c], target.loc[t["Id"]]) for c in t.columns if c != "Id"] for t in tables]
    picks = {
        "last epoch (no choice)": [len(c) for c in curves],
        "other folds' mean curve (nested)": nested.epoch_choice(curves),
        "own best (optimistic)": [int(np.argmin(c)) + 1 for c in curves],
    }
    lines = [f"NN head OOF RMSE by epoch rule ({out}, one training):"]
    for name, epochs in picks.items():
        pred = pd.concat(
            [t[["Id", f"epoch_{e}"]].set_axis(["Id", "pred"], axis=1) for t, e in zip(tables, epochs, strict=True)]
        )
        lines.append(f"  {name:<34} {rmse(pred['pred'], target.loc[pred['Id']]):.3f}  epochs {epochs}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
