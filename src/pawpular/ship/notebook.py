"""The Kaggle inference notebook that ``export`` writes into the artifact folder (``inference.ipynb``).

Upload the artifact folder as a Kaggle dataset, add it and the competition to a notebook (internet off), and run
this notebook: it finds the folder under /kaggle/input, imports the package shipped inside it (Kaggle's image
already has what predict needs: torch, timm, numpy, pandas, pillow, opencv, safetensors, pyyaml; neither
scikit-learn nor albumentations is used), calls ``pawpular.predict``,
which raises on any problem (so the commit fails visibly, not with "Submission CSV Not Found" hours later), and
checks the written submission.csv. ``PAWPULAR_ARTIFACTS`` / ``PAWPULAR_DATA`` / ``PAWPULAR_OUT`` override the
paths (the tests run it that way).
"""

from __future__ import annotations

import json

FIND = """import glob, os, sys
from pathlib import Path

# The exported folder (a Kaggle dataset): the one under /kaggle/input holding manifest.json and src/pawpular.
ART = os.environ.get("PAWPULAR_ARTIFACTS") or next(
    (str(Path(m).parent) for m in sorted(glob.glob("/kaggle/input/*/manifest.json")
                                          + glob.glob("/kaggle/input/*/*/manifest.json"))
     if (Path(m).parent / "src" / "pawpular").is_dir()), None)
if ART is None:
    raise FileNotFoundError("no exported pawpular folder under /kaggle/input: add the artifact dataset "
                            "(made by `pawpular export`) to this notebook, or set PAWPULAR_ARTIFACTS")
DATA = os.environ.get("PAWPULAR_DATA", "/kaggle/input/petfinder-pawpularity-score")
OUT = os.environ.get("PAWPULAR_OUT", "submission.csv")
sys.path.insert(0, str(Path(ART) / "src"))
import pawpular
print(f"pawpular {pawpular.__version__} from {pawpular.__file__}; artifacts {ART}; data {DATA}")"""

PREDICT = """# Raises with a clear message on any problem (bad data, a damaged file): the notebook run fails visibly.
path = pawpular.predict(ART, DATA, OUT)
import pandas as pd
sub = pd.read_csv(path)
assert list(sub.columns) == ["Id", "Pawpularity"] and sub["Pawpularity"].between(1, 100).all(), sub.head()
print(f"{path}: {len(sub)} rows, Pawpularity {sub['Pawpularity'].min():.2f}-{sub['Pawpularity'].max():.2f}")
sub.head()"""


def _cell(kind: str, source: str, cell_id: str) -> dict:
    cell = {"cell_type": kind, "id": cell_id, "metadata": {}, "source": source.splitlines(keepends=True)}
    if kind == "code":
        cell.update(execution_count=None, outputs=[])
    return cell


def kaggle_notebook(name: str) -> str:
    """The notebook's JSON for the artifact folder called ``name``."""
    cells = [
        _cell(
            "markdown",
            f"# Pawpularity inference: `{name}`\n\nMade by `pawpular export`. Add this folder as a "
            "dataset and the competition's data, keep internet off, run all. Writes `submission.csv`.",
            "about",
        ),
        _cell("code", FIND, "find-the-export"),
        _cell("code", PREDICT, "predict"),
    ]
    nb = {
        "cells": cells,
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    return json.dumps(nb, indent=1) + "\n"
