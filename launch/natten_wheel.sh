#!/usr/bin/env bash
# Build a NATTEN wheel with its fused CUDA kernels, for chosen GPU architectures, against the torch of an
# environment (default: this project's .venv). No GPU is needed to build: a CPU node with the CUDA toolkit
# does it, and the wheel installs on any machine with the same Python, torch and CUDA major version.
#
#   NATTEN_CUDA_ARCH=9.0 bash launch/natten_wheel.sh                 # H100/H200 -> .whl/natten-*.whl
#   NATTEN_SPEC=.whl/natten-0.21.7+torch2141cu130-cp311-cp311-linux_x86_64.whl bash launch/venv.sh pytest -m gpu
#
# Knobs:
#   NATTEN_CUDA_ARCH   required: "9.0" (Hopper), "8.0" (A100), "8.0;9.0", "10.0" (Blackwell). Each arch
#                      adds its own kernels; Hopper and Blackwell also get their dedicated fwd+bwd kernels.
#   NATTEN_N_WORKERS   parallel compile jobs (default: all cores; each needs about 2-4 GB of memory)
#   NATTEN_VERSION     default 0.21.7;  PYTHON: the interpreter whose torch to build against
#   OUT                wheel directory (default .whl, git-ignored)
# Needs nvcc from a CUDA toolkit with torch's CUDA major version (torch.version.cuda), cmake and ninja.
# Time is dominated by the kernel count: one arch builds far faster than several.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-$root/.venv/bin/python}"
out="${OUT:-$root/.whl}"
: "${NATTEN_CUDA_ARCH:?set NATTEN_CUDA_ARCH, e.g. 9.0 for H100/H200 (without it NATTEN builds no CUDA kernels)}"

die() { echo "natten_wheel.sh: $*" >&2; exit 2; }
[[ -x "$py" ]] || die "$py not found: create the environment first (bash launch/venv.sh true) or set PYTHON"
command -v nvcc >/dev/null || die "nvcc not on PATH: install a CUDA toolkit (or add its bin/ to PATH)"
command -v cmake >/dev/null || die "cmake not on PATH (pip install cmake)"
torch_cuda="$("$py" -c 'import torch; print(torch.version.cuda or "")')"
[[ -n "$torch_cuda" ]] || die "the torch in $py is a CPU build; NATTEN's CUDA kernels need a CUDA build of torch"
nvcc_cuda="$(nvcc --version | sed -n 's/.*release \([0-9]*\.[0-9]*\).*/\1/p')"
[[ "${nvcc_cuda%%.*}" == "${torch_cuda%%.*}" ]] || die "nvcc is CUDA $nvcc_cuda but torch was built with CUDA $torch_cuda"

mkdir -p "$out"
start=$SECONDS
echo "natten_wheel.sh: NATTEN ${NATTEN_VERSION:-0.21.7} for arch $NATTEN_CUDA_ARCH, torch CUDA $torch_cuda, nvcc $nvcc_cuda" >&2
# NATTEN_IS_BUILDING_DIST tags the version with torch and CUDA (natten-0.21.7+torch2141cu130), so wheels
# for different stacks cannot be mistaken for each other.
NATTEN_IS_BUILDING_DIST=1 NATTEN_N_WORKERS="${NATTEN_N_WORKERS:-$(nproc)}" \
  "$py" -m pip wheel --no-build-isolation --no-deps --no-binary natten -w "$out" "natten==${NATTEN_VERSION:-0.21.7}"
wheel="$(find "$out" -maxdepth 1 -name 'natten-*.whl' -printf '%T@ %p\n' | sort -n | tail -n 1 | cut -d' ' -f2-)"
echo "natten_wheel.sh: built $wheel in $(((SECONDS - start) / 60)) min; install it with:" >&2
echo "NATTEN_SPEC=$wheel bash launch/venv.sh true"
