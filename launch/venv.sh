#!/usr/bin/env bash
# Create the project environment in .venv (when missing or incomplete), then run "$@" inside it.
#   bash launch/venv.sh pytest
#   bash launch/venv.sh dinat-smoke
# Environment knobs (all optional):
#   TORCH_SPEC        pip spec for torch + torchvision (default: the pair this project is tested with)
#   NATTEN_SPEC       pip spec or wheel path/URL for NATTEN (default natten==0.21.7, built from source),
#                     e.g. a wheel from launch/natten_wheel.sh. Both specs are remembered in .venv: set
#                     one to change it (the environment is updated), leave it unset to keep it.
#   NATTEN_CUDA_ARCH  GPU archs to compile NATTEN's kernels for, e.g. "9.0" (H100) or "8.0;9.0";
#                     without it a GPU machine builds for the detected GPU only, a CPU machine builds
#                     no kernels (seconds). NATTEN_N_WORKERS sets the build's parallel jobs.
#   PYTHON            interpreter used to create the venv (default python3)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.dinat-installed"
remembered() { [[ -f "$venv/.dinat-$1" ]] && cat "$venv/.dinat-$1"; }
torch_spec="${TORCH_SPEC:-$(remembered torch-spec || echo "torch==2.14.1 torchvision==0.29.1")}"
natten_spec="${NATTEN_SPEC:-$(remembered natten-spec || echo "natten==0.21.7")}"
want="$(cat "$root/pyproject.toml" "$root/launch/venv.sh" <(echo "$torch_spec|$natten_spec") | sha256sum | cut -c1-16)"

up_to_date() { [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; }

if ! up_to_date; then
  # Jobs started together (a Slurm array, several ranks) must not install at once: one does, the
  # others wait for it and find the stamp up to date.
  mkdir -p "$venv"
  exec 9>"$venv/.lock"
  flock 9
fi
if ! up_to_date; then
  echo "[venv.sh] setting up $venv" >&2
  [[ -x "$venv/bin/python" ]] || "${PYTHON:-python3}" -m venv "$venv"
  pip=("$venv/bin/python" -m pip --disable-pip-version-check)
  "${pip[@]}" install -q --upgrade pip setuptools wheel
  # PyPI's torch is the CUDA build; it also runs on CPU-only machines (there is no CPU torchvision there).
  read -ra specs <<<"$torch_spec"
  "${pip[@]}" install -q "${specs[@]}"
  # NATTEN imports torch in its setup.py: build against the torch above, without build isolation.
  read -ra specs <<<"$natten_spec"
  "${pip[@]}" install -q --no-build-isolation "${specs[@]}"
  "${pip[@]}" install -q --no-build-isolation -e "${root}[dev]"
  echo "$torch_spec" >"$venv/.dinat-torch-spec"
  echo "$natten_spec" >"$venv/.dinat-natten-spec"
  echo "$want" >"$stamp"
fi
exec 9>&-

export PATH="$venv/bin:$PATH" VIRTUAL_ENV="$venv"
cd "$root"
exec "$@"
