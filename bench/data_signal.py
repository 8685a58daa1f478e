"""docs/data.md's data table: the synthetic competition against the real CSVs, in one run.

    python bench/data_signal.py [--synthetic input/synthetic] [--real ../shared/data/petfinder]

Prints target mean/std, flag frequencies and 5-fold CV RMSE of three baselines: predicting the mean, ridge on the
12 flags, ridge on 8x8 thumbnails (synthetic only: the real photos are not shipped). Builds the default synthetic
competition first if it is absent.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import RidgeCV
from sklearn.model_selection import KFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pawpular.data.synthetic import baseline_scores, make_synthetic
from pawpular.data.tables import META_COLS, TARGET
from pawpular.scores.metrics import rmse

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synthetic", type=Path, default=REPO / "input" / "synthetic")
    p.add_argument("--real", type=Path, default=REPO.parent / "shared" / "data" / "petfinder")
    args = p.parse_args()
    if not (args.synthetic / "train.csv").is_file():
        make_synthetic(args.synthetic)
    syn = pd.read_csv(args.synthetic / "train.csv")
    scores = baseline_scores(args.synthetic)
    rows = {
        "target mean": [syn[TARGET].mean()],
        "target std": [syn[TARGET].std()],
        "RMSE: predict the mean": [scores["mean"]],
        "RMSE: ridge on the 12 flags": [scores["metadata"]],
        "RMSE: ridge on 8x8 thumbnails": [scores["image"]],
    }
    freq = {"synthetic": syn[META_COLS].mean()}
    if (args.real / "train.csv").is_file():
        real = pd.read_csv(args.real / "train.csv")
        y = real[TARGET].to_numpy(float)
        model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 13)))  # as baseline_scores
        flags = cross_val_predict(model, real[META_COLS].to_numpy(float), y, cv=KFold(5, shuffle=True, random_state=0))
        for key, value in zip(rows, [y.mean(), y.std(ddof=1), y.std(), rmse(flags, y), np.nan], strict=False):
            rows[key].append(value)
        freq["real"] = real[META_COLS].mean()
    else:
        print(f"({args.real} absent: synthetic column only)")
    cols = ["synthetic", "real"][: len(next(iter(rows.values())))]
    print(pd.DataFrame(rows, index=cols).T.round(2).to_string())
    print("\nflag frequencies\n" + pd.DataFrame(freq).round(3).to_string())


if __name__ == "__main__":
    main()
