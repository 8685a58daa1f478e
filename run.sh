#!/usr/bin/env bash
# pawpular: set up, then run the pipeline or the tests.
#
#   ./run.sh                 set up (.venv + requirements), build the embedded competition if absent,
#                            run every stage on configs/default.yaml -> output/default/submission.csv
#   ./run.sh test [ARGS]     set up, then the test suite (ARGS go to pytest, e.g. -k svr)
#   ./run.sh STAGE [ARGS]    set up, then one command: ./run.sh train --config configs/my.yaml
#
# Environment: CONFIG (default configs/default.yaml), PYTHON (interpreter for the venv, default python3),
# PAWPULAR_GPU=1 installs requirements-gpu.txt (cuML/cuDF) as well; it is also chosen when nvidia-smi sees a GPU.
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
  local reqs=requirements.txt
  if [ "${PAWPULAR_GPU:-}" = 1 ] || { [ -z "${PAWPULAR_GPU:-}" ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then
    [ -f requirements-gpu.txt ] && reqs=requirements-gpu.txt
  fi
  # Reinstall only when the requirements or the package metadata changed: a no-op takes well under a second.
  local want stamp="$VENV/.pawpular-installed"
  want=$(cat requirements.txt "$reqs" pyproject.toml | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! "$VENV/bin/python" -c "import pawpular" 2>/dev/null; then
    echo "[setup] installing $reqs (first run downloads torch: a few minutes)"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$reqs"
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
