"""A real Slurm on localhost for the tests: munge + slurmctld + two slurmd ("nodes" n1 and n2) from
Debian's packages, installed with apt when missing, configured and started by hand (no systemd), with
all state under one temporary directory.

Two slurmd on one host is how a 2-node job runs on one machine: both nodes share this host's
filesystem and hostname; jobs tell them apart by SLURMD_NODENAME / SLURM_NODEID. The node names are
added to /etc/hosts (127.0.0.1) when they do not resolve, and stay there.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
NODES = ("n1", "n2")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


class SlurmUnavailable(RuntimeError):
    """Raised when a local Slurm cannot be started here (the tests skip with this reason)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(*cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def install() -> None:
    """apt-get install the daemons when they are missing (root only)."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("Slurm is not installed and installing it needs root")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("Slurm is not installed and there is no apt-get to install it")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if _run(*cmd, env=env).returncode != 0:  # a fresh machine may have no package lists yet
        _run("apt-get", "update", "-q", env=env)
        r = _run(*cmd, env=env)
        if r.returncode != 0:
            raise SlurmUnavailable(f"apt-get install {' '.join(PACKAGES)} failed: {r.stderr.strip()[-300:]}")


def _ensure_hosts(names: tuple[str, ...]) -> None:
    """The node names must resolve (torch rendezvous on MASTER_ADDR=n1)."""
    missing = []
    for name in names:
        try:
            socket.gethostbyname(name)
        except OSError:
            missing.append(name)
    if missing:
        with open("/etc/hosts", "a") as f:
            f.write(f"127.0.0.1 {' '.join(missing)}  # dinat tests: local Slurm nodes\n")


class LocalSlurm:
    """``with LocalSlurm(tmp) as slurm: jid = slurm.sbatch(...); slurm.wait(jid)``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self._procs: list[subprocess.Popen] = []
        self._munged_pid: int | None = None

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> LocalSlurm:
        if os.geteuid() != 0:
            raise SlurmUnavailable("starting slurmd and munged needs root")
        install()
        _ensure_hosts(NODES)
        self._start_munge()
        self._write_conf()
        self._spawn("slurmctld", "-D", "-f", str(self.conf))
        for node in NODES:
            self._spawn("slurmd", "-D", "-f", str(self.conf), "-N", node)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.nodes_idle():
                return self
            time.sleep(0.5)
        self.stop()
        raise SlurmUnavailable(f"nodes did not come up: sinfo says {self.node_states()}; see {self.root}/*.log")

    def node_states(self) -> dict[str, str]:
        out = _run("sinfo", "-h", "-N", "-o", "%N %t", env=self.env).stdout.split()
        return dict(zip(out[::2], out[1::2]))

    def nodes_idle(self) -> bool:
        states = self.node_states()
        return all(states.get(n) == "idle" for n in NODES)

    def _start_munge(self) -> None:
        if _run("munge", "-n").returncode == 0:
            return  # a munged is already running
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        r = _run("runuser", "-u", "munge", "--", "munged", "--force")
        if r.returncode != 0:
            raise SlurmUnavailable(f"munged did not start: {r.stderr.strip()}")
        pidfile = Path("/run/munge/munged.pid")
        self._munged_pid = int(pidfile.read_text()) if pidfile.is_file() else None

    def _write_conf(self) -> None:
        cpus, mem_mb = os.cpu_count() or 1, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        for d in ("state", *(f"spool-{n}" for n in NODES)):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        ports = [_free_port() for _ in range(1 + len(NODES))]
        lines = [
            "ClusterName=dinat-test",
            f"SlurmctldHost={socket.gethostname()}(127.0.0.1)",
            f"SlurmctldPort={ports[0]}",
            "SlurmUser=root",
            "AuthType=auth/munge",
            f"StateSaveLocation={self.root}/state",
            f"SlurmdSpoolDir={self.root}/spool-%n",
            f"SlurmctldPidFile={self.root}/slurmctld.pid",
            f"SlurmdPidFile={self.root}/slurmd-%n.pid",
            f"SlurmctldLogFile={self.root}/slurmctld.log",
            f"SlurmdLogFile={self.root}/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            "MinJobAge=600",  # keep finished jobs visible to scontrol
            "KillWait=30",
        ]
        for node, port in zip(NODES, ports[1:]):
            lines.append(
                f"NodeName={node} NodeAddr=127.0.0.1 Port={port} CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN"
            )
        lines.append(f"PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, *cmd: str) -> None:
        log = open(self.root / f"{cmd[0]}-{len(self._procs)}.out", "w")  # noqa: SIM115 (closed with the daemon)
        self._procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def stop(self) -> None:
        _run("scancel", "--full", "--user", "root", env=self.env)
        for p in reversed(self._procs):
            p.terminate()
        for p in self._procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        self._procs.clear()
        if self._munged_pid:  # only the munged this object started
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._munged_pid, signal.SIGTERM)
            self._munged_pid = None

    def __enter__(self) -> LocalSlurm:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- jobs -----------------------------------------------------------------------------------------
    def sbatch(self, *args: str, cwd: Path) -> int:
        r = _run("sbatch", "--parsable", *args, cwd=cwd, env=self.env)
        if r.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {r.stderr.strip()}")
        return int(r.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, NodeList, Restarts, ...)."""
        out = _run("scontrol", "show", "job", "-o", str(job_id), env=self.env).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def array_jobs(self, job_id: int) -> list[dict[str, str]]:
        out = _run("scontrol", "show", "job", "-o", str(job_id), env=self.env).stdout
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]

    def wait(self, job_id: int, timeout: float = 600, until=None) -> dict[str, str]:
        """Poll until the job reaches a terminal state (or ``until(job)`` is true); returns the job."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            jobs = self.array_jobs(job_id)
            if jobs and (until(jobs[0]) if until else all(j.get("JobState") in TERMINAL for j in jobs)):
                return jobs[0]
            time.sleep(1)
        raise TimeoutError(
            f"job {job_id} still {[j.get('JobState') for j in self.array_jobs(job_id)]} after {timeout} s"
        )

    def scontrol(self, *args: str) -> None:
        r = _run("scontrol", *args, env=self.env)
        if r.returncode != 0:
            raise RuntimeError(f"scontrol {' '.join(args)} failed: {r.stderr.strip()}")

    def scancel(self, *args: str) -> None:
        r = _run("scancel", *args, env=self.env)
        if r.returncode != 0:
            raise RuntimeError(f"scancel {' '.join(args)} failed: {r.stderr.strip()}")
