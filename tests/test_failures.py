"""Every failure ends the whole job promptly and leaves no process behind (real 2-rank jobs on CPU).

Faults are injected by tests/fault_inject.py; the times they fire are written to a file, so each test measures
how long the job took to end after the fault. The bound, 30 s, is loose on purpose: ending takes about 4 s here
(a failing rank publishes, the other rank's watcher ends it, torchrun sees both exit); a hang runs into the
test's own timeout instead.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e import REPO, launch, logs, until, wait
from tests.pipeline.ds_helpers import free_port
from tests.progress import wait_while_busy

END_BOUND_S = 30
INJECT = str(REPO / "tests" / "fault_inject.py")


def tiny(run_dir, shards, workers):
    return [
        "--config", "configs/demo_cpu.yaml", f"data.train={shards}", f"data.val={shards}", "data.synthetic=false",
        f"run.output_dir={run_dir}", "data.image_size=32", "train.global_batch_size=8", f"data.workers={workers}",
        "train.log_every=1", "optim.warmup_steps=2", "train.steps=1000",
    ]  # fmt: skip


def processes_of(marker: str) -> list[str]:
    """Command lines of live processes that mention ``marker`` (a run directory unique to the test)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in text and int(cmdline.parent.name) != os.getpid():
            found.append(f"{cmdline.parent.name}: {text[:150]}")
    return found


def fault_times(mark: Path) -> list[float]:
    return [float(t) for t in mark.read_text().split()] if mark.exists() else []


def rank_logs(log_dir: Path) -> dict[int, str]:
    """torchrun --redirects 3 --log-dir: .../attempt_0/<rank>/stderr.log."""
    return {int(p.parent.name): p.read_text() for p in log_dir.rglob("stderr.log")}


@pytest.mark.parametrize(
    "where,rank,workers",
    # an error in the main process (the hang at exit came with workers), in a DataLoader worker, on every rank
    [("main", "1", 2), ("worker", "1", 2), ("main", "all", 0)],
)
def test_an_error_on_any_rank_ends_every_process(where, rank, workers, shards, tmp_path):
    run, mark, log_dir = tmp_path / "run", tmp_path / "fault", tmp_path / "logs"
    env = dict(os.environ, DINAT_FAULT=f"{where}:{rank}:3", DINAT_FAULT_MARK=str(mark), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        "--log-dir", str(log_dir), "--redirects", "3", INJECT, *tiny(run, shards, workers),
    ]  # fmt: skip
    out = open(tmp_path / "torchrun.log", "w")
    job = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    wait_while_busy(lambda: [job.pid], lambda: job.poll() is not None, "the job")
    code, ended = job.returncode, time.time()
    per_rank = rank_logs(log_dir)
    assert code == 1, (tmp_path / "torchrun.log").read_text()[-3000:]
    assert fault_times(mark), per_rank
    assert ended - min(fault_times(mark)) < END_BOUND_S
    deadline = time.time() + 5  # the kernel reaps SIGKILLed workers asynchronously
    while processes_of(str(run)) and time.time() < deadline:
        time.sleep(0.2)
    assert processes_of(str(run)) == []
    # The first error is reported once, with its traceback; the other rank says why it stopped.
    reports = {r: len(re.findall(r"pipeline.lifecycle: RuntimeError: injected fault", t)) for r, t in per_rank.items()}
    assert sum(reports.values()) == 1, per_rank
    assert all(("Traceback" in per_rank[r]) == bool(n) for r, n in reports.items()), per_rank
    if rank == "1":
        assert reports[1] == 1
        assert re.search(r"\[rank0\] pipeline.lifecycle: rank 1 failed \(RuntimeError: injected fault", per_rank[0])


def test_a_stop_signal_during_start_up_ends_at_once(shards, tmp_path):
    run, mark = tmp_path / "run", tmp_path / "fault"
    env = {"DINAT_FAULT": "startup:all:600", "DINAT_FAULT_MARK": str(mark)}
    procs = launch(run, shards, script=INJECT, extra_env=env)
    until(procs, lambda: len(fault_times(mark)) == 2, "both ranks in start-up")
    sent = time.time()
    for p in procs:
        p.send_signal(signal.SIGTERM)
    assert wait(procs) == [128 + signal.SIGTERM] * 2, logs(run)
    assert time.time() - sent < END_BOUND_S
    assert "SIGTERM (during start-up): stopping without a checkpoint" in "".join(logs(run))
    assert not (run / "checkpoints").exists()


def test_a_second_stop_signal_ends_a_stuck_run(shards, tmp_path):
    """Rank 0 loops forever in step 3 (rank 1 waits for it in a collective). The first TERM only asks for a
    checkpoint at the end of the step, which never comes; the second ends the job."""
    run, mark = tmp_path / "run", tmp_path / "fault"
    env = {"DINAT_FAULT": "loop:0:3", "DINAT_FAULT_MARK": str(mark)}
    procs = launch(run, shards, "train.steps=1000", script=INJECT, extra_env=env)
    until(procs, lambda: bool(fault_times(mark)), "rank 0 stuck in step 3")
    for p in procs:
        p.send_signal(signal.SIGTERM)
    time.sleep(3)
    assert [p.poll() for p in procs] == [None, None]  # waiting for the end of a step that never ends
    sent = time.time()
    procs[0].send_signal(signal.SIGTERM)
    assert wait(procs) == [128 + signal.SIGTERM] * 2, logs(run)
    assert time.time() - sent < END_BOUND_S
    rank0, rank1 = logs(run)
    assert "SIGTERM (a second stop signal): stopping without a checkpoint" in rank0
    assert not (run / "checkpoints").exists()


def test_one_job_per_run_directory(shards, tmp_path):
    """A second job on a run directory in use is refused, naming the first; once the first is killed (-9, no
    clean-up), its claim does not block the resume."""
    run = tmp_path / "run"
    first = launch(run, shards, "train.steps=100000", "train.checkpoint_every=2", "run.export=false")
    until(first, lambda: "step 3/" in logs(run)[0], "step 3")
    second = launch(tmp_path / "run", shards, "train.steps=4", world=1, log_name="second")
    assert wait(second) == [2]
    text = (tmp_path / "second.rank0.log").read_text()
    owner = f"host {socket.gethostname()}, pid {first[0].pid}"
    assert re.search(rf"run.output_dir: {run} is in use by {owner} \(claimed .*, last heartbeat \d+ s ago\)", text)
    assert "Traceback" not in text
    for p in first:
        p.kill()
    wait(first)
    assert (run / ".owner").is_file()  # left behind by the killed job
    third = launch(run, shards, "train.steps=6", "train.checkpoint_every=2", "run.export=false", log_name="third")
    assert wait(third) == [0, 0], (tmp_path / "third.rank0.log").read_text()
    text = (tmp_path / "third.rank0.log").read_text()
    assert f"process {first[0].pid} on this host is gone" in text
    assert "resumed from" in text
    assert not (run / ".owner").exists()  # released at the end
