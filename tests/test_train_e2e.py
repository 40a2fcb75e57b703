"""End-to-end: real 2-rank DeepSpeed training on CPU (gloo), from synthetic shards to an HF export.

Each rank is its own ``python -m pipeline.train`` process with RANK / WORLD_SIZE set, as srun or
torchrun would, so exit codes and signals reach the tests directly.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline.data.synthetic import make_synthetic
from tests.pipeline.ds_helpers import free_port

REPO = Path(__file__).resolve().parents[1]
TAGS = [
    "train/loss",
    "train/lr",
    "train/grad_norm",
    "eval/loss",
    "eval/top1",
    "eval/top5",
    "perf/images_per_sec",
    "perf/images_per_sec_per_gpu",
    "perf/data_wait_fraction",
    "mem/peak_gib",
    "data/skipped_samples",
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    make_synthetic(out, num_classes=4, train_per_class=48, val_per_class=8, image_size=48, shard_samples=24)
    return out


def launch(run_dir, shards, *overrides, world=2):
    """Start ``world`` rank processes; returns the Popen objects."""
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
        )
        log = open(Path(run_dir).parent / f"{Path(run_dir).name}.rank{rank}.log", "w")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "pipeline.train", *args], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        )
    return procs


def wait(procs, timeout=420):
    codes = [p.wait(timeout=timeout) for p in procs]
    return codes


def logs(run_dir):
    return [p.read_text() for p in sorted(Path(run_dir).parent.glob(f"{Path(run_dir).name}.rank*.log"))]


def scalars(run_dir):
    acc = EventAccumulator(str(Path(run_dir) / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_rank_training_with_zero(stage, shards, tmp_path):
    run = tmp_path / f"zero{stage}"
    procs = launch(
        run,
        shards,
        "train.steps=60",
        f"deepspeed.zero_optimization.stage={stage}",
        "train.eval_every=60",
        "train.checkpoint_every=30",
        "run.export=true",
        *(["model.activation_checkpointing=all"] if stage == 3 else []),
    )
    assert wait(procs) == [0, 0], logs(run)
    rank0, rank1 = logs(run)
    assert "2 ranks" in rank0 and "rank0" in rank0
    assert "step 60/60" in rank0 and "step 60/60" not in rank1  # INFO lines only from rank 0
    loss = [v for _, v in scalars(run)["train/loss"]]
    assert len(loss) == 60
    assert sum(loss[-15:]) / 15 < 0.85 * sum(loss[:15]) / 15, loss  # measured: ~0.75 on ZeRO-2
    # rank-0-only outputs exist once
    assert len(list((run / "tensorboard").rglob("events.out.tfevents.*"))) == 1
    assert (run / "config.yaml").is_file() and (run / "export" / "model.safetensors").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000030", "step_00000060"]


def test_metrics_reach_tensorboard(shards, tmp_path):
    run = tmp_path / "tb"
    assert wait(launch(run, shards, "train.steps=4", "train.eval_every=2", "run.export=false")) == [0, 0], logs(run)
    found = scalars(run)
    for tag in TAGS:
        assert tag in found, (tag, sorted(found))
    assert [s for s, _ in found["eval/top1"]] == [2, 4]
    assert all(0 <= v <= 100 for _, v in found["eval/top1"])
    lr = dict(found["train/lr"])
    assert lr[1] == pytest.approx(lr[2] / 2)  # warmup over 2 steps: lr(0) = peak / 2, lr(1) = peak
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    assert acc.Tags()["images"], "no augmented-input grid"


@pytest.mark.parametrize("mode", ["epoch", "resampled"])
def test_resume_is_bitwise_exact(mode, shards, tmp_path):
    """Interrupted after step 6 and resumed, a run reaches bitwise the parameters of the uninterrupted
    run at step 16 (epoch mode crosses an epoch boundary at step 12)."""
    run = tmp_path / "run"
    args = ["train.steps=16", "train.checkpoint_every=6", "run.export=true", f"data.mode={mode}"]
    assert wait(launch(run, shards, *args)) == [0, 0], logs(run)
    uninterrupted = load_file(run / "export" / "model.safetensors")
    for later in ("step_00000012", "step_00000016"):
        shutil.rmtree(run / "checkpoints" / later)
    shutil.rmtree(run / "export")
    assert wait(launch(run, shards, *args)) == [0, 0], logs(run)
    assert f"resumed from {run / 'checkpoints' / 'step_00000006'} at step 6" in logs(run)[0]
    resumed = load_file(run / "export" / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for k in resumed:
        assert torch.equal(resumed[k], uninterrupted[k]), k


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_checkpoints_and_exits_for_requeue(signum, shards, tmp_path):
    run = tmp_path / "sig"
    procs = launch(run, shards, "train.steps=100000", "train.checkpoint_every=100000", "run.export=false")
    deadline = time.time() + 300
    while "step 3/" not in (logs(run) or [""])[0]:
        assert time.time() < deadline and all(p.poll() is None for p in procs), logs(run)
        time.sleep(0.5)
    for p in procs:
        p.send_signal(signum)
    assert wait(procs) == [75, 75], logs(run)
    ckpts = sorted((run / "checkpoints").iterdir())
    assert len(ckpts) == 1 and (ckpts[0] / "COMPLETE").exists()
    step = int(ckpts[0].name.split("_")[1])
    assert step >= 3
    # requeued: resumes from that checkpoint rather than restarting
    procs = launch(run, shards, f"train.steps={step + 2}", "train.checkpoint_every=100000", "run.export=false")
    assert wait(procs) == [0, 0], logs(run)
    assert f"resumed from {ckpts[0]} at step {step}" in logs(run)[0]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["data.train=/nonexistent/shards"], "data: .*nonexistent"),
        (["run.output_dir=/proc/forbidden"], "run.output_dir: /proc/forbidden is not writable"),
        (["train.global_batch_size=20", "train.micro_batch_size=8"], "train.global_batch_size: 20 is not divisible"),
        (["optim.warmup_steps=50", "train.steps=10"], "optim.warmup: 50 warmup steps >= 10"),
    ],
)
def test_runtime_config_errors_stop_before_training(overrides, message, shards, tmp_path):
    procs = launch(tmp_path / "bad", shards, "train.steps=2", *overrides)
    assert wait(procs, timeout=300) == [2, 2], logs(tmp_path / "bad")
    import re

    assert all(re.search(message, text) for text in logs(tmp_path / "bad")), logs(tmp_path / "bad")
    assert not (tmp_path / "bad" / "checkpoints").exists()
