#!/usr/bin/env bash
# The GPU check: GPU tests, dinat-bench speed (DiNAT-L vs Swin-L / ConvNeXt-L, every attention backend,
# --compile, checkpointing), micro-batch searches for ZeRO 1/2/3 and the bf16 training loop, each step a
# subprocess with its own time limit, within a total budget (default 480 s); one JSON record and one
# markdown table under --out. All options: python -m pipeline.bench.gpu_check --help.
#
#   bash launch/gpu_check.sh --out runs/gpu_check                     # in the project's .venv (venv.sh)
#   bash launch/gpu_check.sh --system-python --wheels .whl/gpu-cp312 --out /tmp/gpu_check
#
# --system-python   use the machine's own Python and torch ($PYTHON, default python3) instead of .venv;
#                   the project runs from this checkout (PYTHONPATH), nothing is installed into it.
# --wheels DIR      with --system-python: install the wheels of DIR (launch/gpu_wheels.sh builds them)
#                   into a temporary folder first, for a machine without registry access.
# Paths (--out, --wheels) are taken from the current directory. Exit codes: 0 passed, 1 a step failed or
# ran out of time, 2 usage, 3 no CUDA GPU (nothing was run).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export GPU_CHECK_COMMAND="bash launch/gpu_check.sh $*"  # for the record
system=0
wheels=""
args=()
while (($#)); do
  case "$1" in
    --system-python) system=1 ;;
    --wheels) wheels="$(realpath -m "${2:?--wheels needs a folder}")"; shift ;;
    --out) args+=(--out "$(realpath -m "${2:?--out needs a folder}")"); shift ;;
    *) args+=("$1") ;;
  esac
  shift
done
if ((system == 0)); then
  [[ -z "$wheels" ]] || { echo "gpu_check.sh: --wheels goes with --system-python (.venv installs from the registry)" >&2; exit 2; }
  exec bash "$root/launch/venv.sh" python -m pipeline.bench.gpu_check "${args[@]}"
fi

py="${PYTHON:-python3}"
cd "$root"
if [[ -n "$wheels" ]]; then
  compgen -G "$wheels/*.whl" >/dev/null || { echo "gpu_check.sh: no wheels in $wheels (bash launch/gpu_wheels.sh)" >&2; exit 2; }
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  site="$tmp/site"
  "$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
"$py" -m pipeline.bench.gpu_check "${args[@]}"
