"""One writer per run directory: live claims refuse, stale ones (dead process, silent node, earlier restart of
the same Slurm job) are taken over, and only one of several jobs racing for a stale claim gets it."""

import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict

import pytest

from pipeline.distributed import JobIdentity
from pipeline.run_claim import CLAIM_NAME, RunClaim, RunDirBusy

ME = JobIdentity(host="node-a", pid=os.getpid())


def fake_claim(run_dir, owner: JobIdentity, age_s: float = 0.0, token: str = "t0"):
    path = run_dir / CLAIM_NAME
    path.write_text(json.dumps({"owner": asdict(owner), "token": token, "since": "2026-12-01 10:00:00"}))
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_a_live_claim_refuses_naming_its_owner(tmp_path):
    first = RunClaim(tmp_path, ME, heartbeat=0.1)
    first.acquire()
    other = JobIdentity(host="node-b", pid=4242, job="9001", restart=0)
    with pytest.raises(RunDirBusy) as e:
        RunClaim(tmp_path, other).acquire()
    assert str(e.value).startswith(f"run.output_dir: {tmp_path} is in use by host node-a, pid {os.getpid()} (claimed ")
    time.sleep(0.35)  # heartbeats keep it fresh
    assert time.time() - (tmp_path / CLAIM_NAME).stat().st_mtime < 0.3
    first.release()
    assert not (tmp_path / CLAIM_NAME).exists()
    RunClaim(tmp_path, other).acquire()  # free again


def test_slurm_owner_named(tmp_path):
    fake_claim(tmp_path, JobIdentity(host="node-b", pid=77, job="1234", restart=2))
    with pytest.raises(RunDirBusy, match=r"in use by Slurm job 1234 \(restart 2\), host node-b, pid 77 \(claimed "):
        RunClaim(tmp_path, ME).acquire()


@pytest.mark.parametrize(
    "owner,age,me,reason",
    [
        # a node that stopped heartbeating (node failure): another node takes over once it is stale
        (JobIdentity("node-b", 77), 500.0, ME, "no heartbeat for 500 s"),
        # kill -9 on this host: no need to wait
        (JobIdentity("node-a", 2**22 + 17), 0.0, ME, f"process {2**22 + 17} on this host is gone"),
        # a requeued Slurm job: the earlier restart is over, whichever node it ran on
        (JobIdentity("node-b", 77, "55", 0), 0.0, JobIdentity("node-c", 5, "55", 1), "restart 0 of this Slurm job"),
    ],
)
def test_stale_claims_are_taken_over(tmp_path, caplog, owner, age, me, reason):
    fake_claim(tmp_path, owner, age_s=age)
    claim = RunClaim(tmp_path, me, stale_after=120)
    claim.acquire()
    assert json.loads((tmp_path / CLAIM_NAME).read_text())["token"] == claim.token
    assert reason in caplog.text
    claim.release()


@pytest.mark.parametrize(
    "owner,me",
    [
        (JobIdentity("node-b", 77), ME),  # fresh heartbeat on another node
        (JobIdentity("node-a", os.getppid()), ME),  # a live process on this host
        (JobIdentity("node-b", 77, "55", 1), JobIdentity("node-c", 5, "55", 1)),  # the same restart: two copies
        (JobIdentity("node-b", 77, "56", 0), JobIdentity("node-c", 5, "55", 3)),  # another job
    ],
)
def test_fresh_claims_of_others_are_respected(tmp_path, owner, me):
    fake_claim(tmp_path, owner, age_s=5)
    with pytest.raises(RunDirBusy):
        RunClaim(tmp_path, me, stale_after=120).acquire()


def test_a_half_written_claim_is_judged_by_its_age(tmp_path):
    (tmp_path / CLAIM_NAME).write_text('{"owner": ')
    with pytest.raises(RunDirBusy, match=r"in use by host \?, pid 0"):
        RunClaim(tmp_path, ME).acquire()
    then = time.time() - 1000
    os.utime(tmp_path / CLAIM_NAME, (then, then))
    RunClaim(tmp_path, ME).acquire()


def _race(run_dir: str, i: int, start: float, results) -> None:
    time.sleep(max(0.0, start - time.time()))
    claim = RunClaim(run_dir, JobIdentity(f"node-{i}", 1000 + i), stale_after=120)
    try:
        claim.acquire()
        results.put((i, claim.token))
        time.sleep(2)  # hold it while the others try
        claim._stop.set()
    except RunDirBusy:
        results.put((i, None))


def test_only_one_of_racing_jobs_takes_over_a_stale_claim(tmp_path):
    fake_claim(tmp_path, JobIdentity("node-dead", 1), age_s=1000)
    ctx = multiprocessing.get_context("fork")
    results, start = ctx.Queue(), time.time() + 1.0
    procs = [ctx.Process(target=_race, args=(str(tmp_path), i, start, results)) for i in range(6)]
    for p in procs:
        p.start()
    got = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    winners = [(i, token) for i, token in got if token is not None]
    assert len(winners) == 1, got
    assert json.loads((tmp_path / CLAIM_NAME).read_text())["token"] == winners[0][1]


def test_the_owner_notices_when_its_claim_is_taken(tmp_path):
    lost = threading.Event()
    messages = []
    claim = RunClaim(tmp_path, ME, heartbeat=0.05, on_lost=lambda m: (messages.append(m), lost.set()))
    claim.acquire()
    fake_claim(tmp_path, JobIdentity("node-b", 77, "12", 0), token="someone else")
    assert lost.wait(5)
    assert messages == [
        f"lost the claim on {tmp_path} (now held by Slurm job 12 (restart 0), host node-b, pid 77); stopping"
    ]
    claim.release()
    assert (tmp_path / CLAIM_NAME).is_file()  # not ours: left alone


def test_claim_across_processes_on_a_shared_directory(tmp_path):
    """Two processes (as two nodes would, through the shared filesystem): the second is refused while the first
    holds the claim, and gets it once the first has released it."""
    code = (
        "import sys, time; from pipeline.run_claim import RunClaim; from pipeline.distributed import JobIdentity; "
        f"c = RunClaim({str(tmp_path)!r}, JobIdentity('node-x', 1), heartbeat=0.1); c.acquire(); print('held', "
        "flush=True); sys.stdin.readline(); c.release()"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunDirBusy, match="in use by host node-x, pid 1"):
        RunClaim(tmp_path, ME).acquire()
    holder.communicate("\n", timeout=30)
    RunClaim(tmp_path, ME).acquire()
