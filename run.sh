#!/usr/bin/env bash
# pawpular: set up, then run the pipeline or the tests.
#
#   ./run.sh                 set up (.venv + requirements), build the embedded competition if absent, print where
#                            each stage will run (pawpular doctor --short), run every stage on configs/default.yaml
#                            -> output/default/submission.csv
#   ./run.sh test [ARGS]     set up, then the test suite (ARGS go to pytest, e.g. -k svr)
#   ./run.sh STAGE [ARGS]    set up, then one command: ./run.sh train --config configs/my.yaml
#
# What gets installed is decided by src/pawpular/install_plan.py (run with the system python; it prints its plan):
#   - no NVIDIA GPU: requirements.txt at the tested versions in constraints.txt (what CI runs);
#   - an NVIDIA GPU (nvidia-smi lists one): a torch in .venv that already uses it is kept; otherwise torch comes
#     from PyTorch's index for the driver's CUDA major (cu126 for CUDA 12, cu130 for CUDA 13), and
#     requirements-gpu.txt adds cuml-cuXX / cudf-cuXX for the same major.
# The install reruns only when the requirement files, pyproject.toml, the installer or that choice change.
#
# Environment: CONFIG (default configs/default.yaml), PYTHON (interpreter for the venv, default python3),
# PAWPULAR_GPU=0|1 (force the CPU or the GPU install), PAWPULAR_CUDA=12|13 (force the CUDA major of the GPU builds),
# PAWPULAR_TORCH_INDEX (a torch wheel index instead of download.pytorch.org/whl/cuXXX).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
CONFIG=${CONFIG:-configs/default.yaml}
VENV=.venv

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  # -I: standard library only, whatever the environment; the installer imports nothing else.
  local plan=("$PYTHON" -I src/pawpular/install_plan.py --python "$VENV/bin/python")
  local key want stamp="$VENV/.pawpular-installed"
  key=$("${plan[@]}" --key)  # cpu | gpu cu12 | gpu cu13: nvidia-smi and the overrides, no torch import (fast)
  # Reinstall only when the requirements, the package metadata, the installer or its choice changed: a no-op
  # takes well under a second.
  want=$({ cat requirements.txt requirements-gpu.txt constraints.txt pyproject.toml src/pawpular/install_plan.py
           echo "$key"; } | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! "$VENV/bin/python" -c "import pawpular" 2>/dev/null; then
    echo "[setup] installing for: $key (a first run downloads torch: a few minutes)"
    "${plan[@]}" --run --quiet
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e .
    echo "$want" > "$stamp"
  fi
}

data_dir() {
  "$VENV/bin/python" -c "from pawpular.config import load_config; print(load_config('$CONFIG').data_dir)"
}

setup
case "${1:-pipeline}" in
  pipeline)
    DATA=$(data_dir)
    if [ ! -f "$DATA/train.csv" ]; then
      if [ "$DATA" = input/synthetic ]; then
        "$VENV/bin/pawpular" make-synthetic --out "$DATA"
      else
        echo "error: $DATA/train.csv not found: put the competition there (see README)" >&2; exit 2
      fi
    fi
    # Where each stage runs. A GPU that torch cannot use is printed loudly but does not stop the run (it goes on
    # on the CPU, as a machine without a GPU does); `pawpular doctor` prints the full report and the fix.
    if ! "$VENV/bin/python" -m pawpular.doctor --short --config "$CONFIG"; then
      echo "[run.sh] WARNING: the doctor found a problem (above); the run goes on. Details and fix:" \
           "$VENV/bin/python -m pawpular.doctor --config $CONFIG" >&2
    fi
    "$VENV/bin/pawpular" all --config "$CONFIG"
    OUT=$("$VENV/bin/python" -c "from pawpular.config import load_config; print(load_config('$CONFIG').out)")
    "$VENV/bin/pawpular" report --config "$CONFIG" >/dev/null
    echo
    echo "submission: $OUT/submission.csv"
    echo "report:     $OUT/report.html"
    ;;
  test)
    shift
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  *)
    exec "$VENV/bin/pawpular" "$@"
    ;;
esac
