#!/usr/bin/env bash
# pawpular: set up, then run the pipeline or the tests.
#
#   ./run.sh [--config FILE] [--data DIR] [--output DIR] [--set KEY=VALUE ...] [--overwrite]
#                            set up (.venv + requirements), build the embedded competition if absent, print where
#                            each stage will run (pawpular doctor --short), run every stage (configs/default.yaml
#                            unless --config), write the report -> output/<experiment>/submission.csv
#   ./run.sh test [ARGS]     set up (with the PostgreSQL driver the tests use), then the test suite (ARGS go to
#                            pytest, e.g. -k svr, -m "not slow")
#   ./run.sh COMMAND [ARGS]  set up, then one pawpular command: ./run.sh train --config configs/my.yaml,
#                            ./run.sh status, ./run.sh doctor, ./run.sh all --help (every command has --help)
#   ./run.sh help            this text
#
# What gets installed is decided by src/pawpular/machine/install_plan.py (run with the system python; it prints its plan):
#   - no NVIDIA GPU: requirements.txt at the tested versions in constraints.txt (what CI runs);
#   - an NVIDIA GPU (nvidia-smi lists one): a torch in .venv that already uses it is kept; otherwise torch comes
#     from PyTorch's index for the driver's CUDA major (cu126 for CUDA 12, cu130 for CUDA 13), and
#     requirements-gpu.txt adds cuml-cuXX / cudf-cuXX for the same major;
#   - requirements-distributed.txt (the PostgreSQL driver) for `./run.sh test` and for a config whose
#     svr.storage is a postgresql:// URL;
#   - requirements-tracking.txt (TensorBoard, Weights & Biases) for `./run.sh test` and for a config (or --set)
#     that turns `tracking` on.
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

usage() {
  sed -n '2,/^$/p' "$0" | sed -e 's/^# \{0,1\}//'
}

case "${1:-}" in
  help|-h|--help) usage; exit 0 ;;
esac

# The PostgreSQL driver: for the tests (a throwaway server) and for a config that names a postgresql:// study.
wants_distributed() {
  [ "${1:-}" = test ] && return 0
  grep -Eqs 'storage:[[:space:]]*["'"'"']?postgres' "$CONFIG" && return 0
  case " $* " in *svr.storage=postgres*) return 0 ;; esac
  return 1
}

# TensorBoard and W&B: for the tests (they read the logs back) and for a config or --set that asks for them
# (`tracking: [tensorboard]` on one line in the config, or --set tracking=[wandb]).
wants_tracking() {
  [ "${1:-}" = test ] && return 0
  grep -Eqs '^tracking:[[:space:]]*\[?[[:space:]]*[A-Za-z]' "$CONFIG" && return 0
  case " $* " in *" tracking=["[A-Za-z]*|*" tracking=[ "[A-Za-z]*|*" tracking="[A-Za-z]*) return 0 ;; esac
  return 1
}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  # -I: standard library only, whatever the environment; the installer imports nothing else.
  local plan=("$PYTHON" -I src/pawpular/machine/install_plan.py --python "$VENV/bin/python")
  local key want stamp="$VENV/.pawpular-installed"
  key=$("${plan[@]}" --key)  # cpu | gpu cu12 | gpu cu13: nvidia-smi and the overrides, no torch import (fast)
  # Reinstall only when the requirements, the package metadata, the installer or its choice changed: a no-op
  # takes well under a second. The stamp also lists the add-ons installed: asking for fewer installs nothing, and
  # asking for one more installs only that one.
  local extra="" e reqs=() base have_base="" have_extras="" missing=""
  if wants_distributed "$@"; then extra=distributed; fi
  if wants_tracking "$@"; then extra="${extra:+$extra }tracking"; fi
  base=$({ cat requirements.txt requirements-gpu.txt requirements-distributed.txt requirements-tracking.txt \
               constraints.txt pyproject.toml src/pawpular/machine/install_plan.py src/pawpular/machine/cuda_builds.py
               echo "$key"; } | sha256sum | cut -d' ' -f1)
  if [ -f "$stamp" ]; then read -r have_base have_extras < "$stamp" || true; fi
  if [ "$have_base" != "$base" ]; then have_extras=""; fi
  for e in $extra; do
    case " $have_extras " in *" $e "*) ;; *) missing="${missing:+$missing }$e" ;; esac
  done
  if [ "$have_base" != "$base" ] || ! "$VENV/bin/python" -c "import pawpular" 2>/dev/null; then
    echo "[setup] installing for: $key${extra:+ + $extra} (a first run downloads torch: a few minutes)"
    "${plan[@]}" --run --quiet
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e .
  elif [ -n "$missing" ]; then
    echo "[setup] installing the add-ons: $missing"
  fi
  if [ -n "$missing" ]; then
    for e in $missing; do reqs+=(-r "requirements-$e.txt"); done
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${reqs[@]}" -c constraints.txt
  fi
  if [ "$have_base" != "$base" ] || [ -n "$missing" ]; then
    echo "$base $have_extras${missing:+ $missing}" > "$stamp"
  fi
}

# The resolved setting KEY of the pipeline's config, --set / --data / --output included.
setting() {
  "$VENV/bin/pawpular" config show --key "$1" --config "$CONFIG" "${ARGS[@]}"
}

# The add-ons follow the config the pipeline will read: --config FILE among the arguments, else $CONFIG.
for ((i = 1; i <= $#; i++)); do
  case "${!i}" in
    --config) j=$((i + 1)); CONFIG=${!j:-$CONFIG} ;;
    --config=*) CONFIG=${!i#--config=} ;;
  esac
done
setup "$@"
case "${1:---}" in
  --*)  # the pipeline, with any --config / --data / --output / --set / --overwrite given
    ARGS=()
    while [ $# -gt 0 ]; do
      case "$1" in
        --config) CONFIG=$2; shift 2 ;;
        --config=*) CONFIG=${1#--config=}; shift ;;
        *) ARGS+=("$1"); shift ;;
      esac
    done
    DATA=$(setting data_dir)
    if [ ! -f "$DATA/train.csv" ]; then
      if [ "$DATA" = input/synthetic ]; then
        "$VENV/bin/pawpular" make-synthetic --out "$DATA"
      else
        echo "error: $DATA/train.csv not found: put the competition there (see README)" >&2; exit 2
      fi
    fi
    # Where each stage runs. A GPU that torch cannot use is printed loudly but does not stop the run (it goes on
    # on the CPU, as a machine without a GPU does); `pawpular doctor` prints the full report and the fix.
    if ! "$VENV/bin/python" -m pawpular.cli.doctor --short --config "$CONFIG"; then
      echo "[run.sh] WARNING: the doctor found a problem (above); the run goes on. Details and fix:" \
           "./run.sh doctor --config $CONFIG" >&2
    fi
    "$VENV/bin/pawpular" all --config "$CONFIG" "${ARGS[@]}"
    OUT=$(setting out)
    "$VENV/bin/pawpular" report --output "$OUT" --data "$DATA" >/dev/null
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
