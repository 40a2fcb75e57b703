"""The only place that reads the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK, SLURM_*).

Everything else receives a :class:`DistInfo`. Rank and world size come from torch.distributed once the
group exists (``accelerate launch`` on CPU reports 1 process to Accelerate while forming a real group).
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def _env_int(*names: str, default: int | None = None) -> int | None:
    for name in names:
        if os.environ.get(name, "") != "":
            return int(os.environ[name])
    return default


def launch_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as the launcher set them: torchrun / accelerate / deepspeed set
    RANK etc.; under ``srun`` without them, Slurm's SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID."""
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    local = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    return rank, world, local


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_minutes: int = 30) -> DistInfo:
    """Join (or, for a single process, create) the process group; NCCL on GPUs, gloo on CPU."""
    rank, world, local = launch_env()
    if torch.cuda.is_available():
        torch.cuda.set_device(local % torch.cuda.device_count())
        device, backend = torch.device("cuda", torch.cuda.current_device()), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:  # a lone process takes a free port: two jobs on one machine never clash
            os.environ["MASTER_PORT"] = str(_free_port() if world == 1 else 29500)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
        dist.init_process_group(
            backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=timeout_minutes)
        )
    info = DistInfo(dist.get_rank(), dist.get_world_size(), local, device)
    if (info.rank, info.world_size) != (rank, world):
        raise RuntimeError(f"process group says rank {info.rank}/{info.world_size}, environment {rank}/{world}")
    return info


def unlink_deepspeed_shm(info: DistInfo) -> None:
    """Remove the names of DeepSpeed's shared-memory all-reduce segments, once every rank has mapped them.

    Under launchers that set LOCAL_SIZE (accelerate, deepspeed) DeepSpeed's CPU backend creates one
    ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`` (66 MB) per rank and never unlinks it:
    each CPU job left world x 66 MB of memory behind until reboot. A rank's initialisation returns after it has
    mapped every peer's segment, so past a barrier the names can go; the mappings live until the processes exit.
    Call it on every rank after ``deepspeed.initialize``."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    info.barrier()
    Path("/dev/shm", f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{info.rank}").unlink(missing_ok=True)


def connect_store(timeout_s: float = 10.0) -> dist.Store:
    """A new client of the job's rendezvous store (the TCPStore at MASTER_ADDR:MASTER_PORT that rank 0, or the
    launcher's agent, hosts). Its own connection: a store client must not be shared between threads."""
    return dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=datetime.timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )


@dataclass(frozen=True)
class JobIdentity:
    """Who is running: names the owner of a run directory in errors, and tells a live owner from a dead one."""

    host: str
    pid: int
    job: str = ""  # Slurm's job id ("" outside Slurm)
    restart: int = 0  # Slurm's restart count of that job

    def describe(self) -> str:
        job = f"Slurm job {self.job} (restart {self.restart}), " if self.job else ""
        return f"{job}host {self.host}, pid {self.pid}"


def job_identity() -> JobIdentity:
    return JobIdentity(
        host=socket.gethostname(),
        pid=os.getpid(),
        job=os.environ.get("SLURM_JOB_ID", ""),
        restart=_env_int("SLURM_RESTART_COUNT", default=0),
    )


class RankFilter(logging.Filter):
    """Prefixes records with the rank; drops INFO and below on ranks other than 0."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return self.rank == 0 or record.levelno > logging.INFO


def setup_logging(info: DistInfo, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s [rank%(rank)d] %(name)s: %(message)s", "%H:%M:%S"))
    handler.addFilter(RankFilter(info.rank))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
