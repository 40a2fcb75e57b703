"""Helpers for the end-to-end tests: rank processes of ``pipeline.train`` started as srun or torchrun would
(RANK / WORLD_SIZE set, one process each, so exit codes and signals reach the tests directly), their logs,
and the TensorBoard scalars they wrote."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.pipeline.ds_helpers import free_port
from tests.progress import wait_while_busy

REPO = Path(__file__).resolve().parents[1]


def launch(run_dir, shards, *overrides, world=2, script=None, extra_env=None, log_name=None):
    """Start ``world`` rank processes of ``python -m pipeline.train`` (or of ``script``); returns the Popen objects.
    Rank r logs to ``<log_name or run_dir's name>.rank<r>.log`` beside the run directory."""
    args = [
        f"data.train={shards}",
        f"data.val={shards}",
        f"run.output_dir={run_dir}",
        "model.name=dinat_debug",
        "data.image_size=32",
        "data.workers=1",
        "data.auto_augment=null",
        "data.mixup=0",
        "data.cutmix=0",
        "data.re_prob=0",
        "train.global_batch_size=16",
        "train.log_every=1",
        "train.eval_every=1000",
        "optim.lr=3e-3",
        "optim.warmup_steps=2",
        "train.precision=fp32",
        *overrides,
    ]
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            PYTHONUNBUFFERED="1",
            **(extra_env or {}),
        )
        log = open(Path(run_dir).parent / f"{log_name or Path(run_dir).name}.rank{rank}.log", "w")
        entry = [script] if script else ["-m", "pipeline.train"]
        procs.append(
            subprocess.Popen([sys.executable, *entry, *args], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        )
    return procs


def wait(procs, idle_s=120):
    """The exit codes of ``procs``, however long they take while they use CPU (see tests.progress)."""
    wait_while_busy(lambda: [p.pid for p in procs], lambda: all(p.poll() is not None for p in procs), "the job", idle_s)
    return [p.returncode for p in procs]


def until(procs, predicate, what, idle_s=120):
    """Wait (while ``procs`` use CPU) for ``predicate()``; fails if a process ends first."""

    def check() -> bool:
        assert all(p.poll() is None for p in procs), f"a process ended while waiting for {what}"
        return predicate()

    wait_while_busy(lambda: [p.pid for p in procs], check, what, idle_s)


def logs(run_dir):
    return [p.read_text() for p in sorted(Path(run_dir).parent.glob(f"{Path(run_dir).name}.rank*.log"))]


def scalars(run_dir):
    acc = EventAccumulator(str(Path(run_dir) / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def run_then_resume(run, shards, args, resume_step):
    """Run to the end with an export; delete every checkpoint after ``resume_step`` and the export; run again,
    which must resume at ``resume_step``. Returns both exports (uninterrupted, resumed)."""
    assert wait(launch(run, shards, *args)) == [0, 0], logs(run)
    uninterrupted = load_file(run / "export" / "model.safetensors")
    for later in (run / "checkpoints").glob("step_*"):
        if int(later.name.split("_")[1]) > resume_step:
            shutil.rmtree(later)
    shutil.rmtree(run / "export")
    assert wait(launch(run, shards, *args)) == [0, 0], logs(run)
    assert f"resumed from {run / 'checkpoints' / f'step_{resume_step:08d}'} at step {resume_step}" in logs(run)[0]
    return uninterrupted, load_file(run / "export" / "model.safetensors")
