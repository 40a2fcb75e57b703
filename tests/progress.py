"""Waiting on the tests' subprocesses by their progress instead of a fixed clock.

A job that keeps using CPU is making progress, however slow or loaded the machine: the wait goes on. One whose
processes (and their descendants) use no CPU for ``idle_s`` seconds is stuck, and the wait fails with that
reason; ``cap_s`` bounds a job that spins forever.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable

from pipeline.lifecycle import descendants

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: Iterable[int]) -> float:
    """CPU time (user + system) used so far by ``pids`` and every live descendant of theirs."""
    total = 0.0
    for pid in {p for root in pids for p in (root, *descendants(root))}:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        total += (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime
    return total


def wait_while_busy(
    pids: Callable[[], Iterable[int]], done: Callable[[], bool], what: str, idle_s: float = 120, cap_s: float = 3600
) -> None:
    """Poll ``done()`` until true; TimeoutError once ``pids()`` used no CPU for ``idle_s`` s, or after ``cap_s`` s."""
    start = last_change = time.monotonic()
    last_cpu = -1.0
    while not done():
        now = time.monotonic()
        cpu = cpu_seconds(pids())
        if cpu > last_cpu + 0.05:
            last_cpu, last_change = cpu, now
        elif now - last_change > idle_s:
            raise TimeoutError(f"{what}: no CPU used for {idle_s:.0f} s (stuck)")
        if now - start > cap_s:
            raise TimeoutError(f"{what}: still running after {cap_s:.0f} s")
        time.sleep(0.5)
