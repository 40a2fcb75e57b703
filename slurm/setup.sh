# Sourced by the sbatch scripts after they cd to the repository root: checks where they are and makes
# sure the project environment (.venv) exists, creating it once, in the batch step, never per rank.
# shellcheck shell=bash

if [[ ! -f pipeline/train.py || ! -f launch/venv.sh ]]; then
  echo "slurm job: $(pwd) is not the dinat-pretrain repository: submit from its root or set DINAT_ROOT" >&2
  exit 2
fi
# A no-op when .venv is up to date; otherwise it installs (compute nodes then need the package index).
bash launch/venv.sh true
PY="$(pwd)/.venv/bin/python"
export PY
# Where the job started from, for the log: several restarts append to one file.
echo "[$(date '+%F %T')] job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-$(hostname)}: $*"
