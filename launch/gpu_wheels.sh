#!/usr/bin/env bash
# Build the wheel bundle that takes deepspeed, natten (pure Python, FlexAttention), webdataset and their
# dependencies missing there to a GPU machine without registry access, into a git-ignored folder
# (default .whl/gpu-cp312: CPython 3.12, manylinux x86_64; under 64 MiB, checked). Needs the registry and
# the project's .venv (natten and deepspeed are built here against its torch). Then, on the GPU machine:
#   bash launch/gpu_check.sh --system-python --wheels .whl/gpu-cp312
#
#   bash launch/gpu_wheels.sh                                   # for the H200 machines (Python 3.12)
#   bash launch/gpu_wheels.sh --python-version 3.11 --out .whl/gpu-cp311 --verify-with python3.11
#   bash launch/gpu_wheels.sh --present theirs.txt              # theirs: pip list --format=freeze there
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec bash "$root/launch/venv.sh" python -m pipeline.bench.gpu_check.wheels "$@"
