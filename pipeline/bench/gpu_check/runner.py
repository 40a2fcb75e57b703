"""Running the steps: each a subprocess in its own session with a time limit, the record saved after each.

A step that runs past its limit gets SIGTERM, then SIGKILL after :data:`GRACE_S`, for its whole process
group (DataLoader workers, compile workers), so nothing of it holds GPU memory when the next step starts.
The total budget bounds the check: a step gets the smaller of its own limit and what is left, and one that
would get less than :data:`MIN_START_S` is skipped. A step whose ``needs`` did not pass is skipped too.
Each step gets a free port for its process group's rendezvous (``MASTER_PORT``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .parse import failure_reason, figures_of, log_tail, settle
from .plan import ROOT, Step

GRACE_S = 10.0
MIN_START_S = 20.0


class Interrupted(Exception):
    """SIGTERM or SIGINT reached the check: the running step was stopped, the record is saved."""


@dataclass
class Outcome:
    """What one step did. ``status``: ok | failed | timeout | skipped | interrupted."""

    status: str
    seconds: float = 0.0
    returncode: int | None = None
    limit_s: float | None = None
    log: str | None = None
    reason: str | None = None
    tail: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _kill_group(proc: subprocess.Popen, grace_s: float) -> None:
    """TERM the step's process group, KILL it after ``grace_s``; then KILL any member still left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_command(
    argv: tuple[str, ...] | list[str],
    log_path: Path,
    limit_s: float,
    cwd: Path = ROOT,
    env: dict[str, str] | None = None,
    grace_s: float = GRACE_S,
) -> Outcome:
    """Run ``argv`` with stdout and stderr into ``log_path``; ``timeout`` past ``limit_s`` seconds."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    start = time.monotonic()
    with open(log_path, "wb") as log:
        try:
            proc = subprocess.Popen(
                list(argv), cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        except OSError as e:
            return Outcome("failed", 0.0, None, limit_s, str(log_path), f"could not start {argv[0]}: {e.strerror}")
        timed_out = False
        try:
            proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc, grace_s)
        except BaseException:  # Interrupted, KeyboardInterrupt: stop the step, then pass it on
            _kill_group(proc, grace_s)
            raise
        else:
            _kill_group(proc, 0.0)  # what a finished step left running (workers) goes too
    seconds = time.monotonic() - start
    rc = proc.returncode
    tail = log_tail(log_path)
    if timed_out:
        return Outcome("timeout", seconds, rc, limit_s, str(log_path), f"stopped at its {limit_s:.0f} s limit", tail)
    if rc != 0:
        return Outcome("failed", seconds, rc, limit_s, str(log_path), failure_reason(tail, rc), tail)
    return Outcome("ok", seconds, rc, limit_s, str(log_path), None, [])


def free_port() -> int:
    """A TCP port free now: each step's one-process group rendezvous there (a port derived from the process
    id, the single-process default, can be taken by another job on the node)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _raise_interrupted(signum, _frame):
    raise Interrupted(signal.Signals(signum).name)


def execute(
    steps: list[Step],
    save: Callable[[Step, Outcome, dict[str, Any]], None],
    budget_s: float,
    logs: Path,
    started: float | None = None,
    min_start_s: float = MIN_START_S,
    grace_s: float = GRACE_S,
) -> dict[str, Outcome]:
    """Run ``steps`` in order within ``budget_s`` (counted from ``started``, a ``time.monotonic()``);
    ``save(step, outcome, figures)`` after each, skipped ones included. Raises :class:`Interrupted` on
    SIGTERM/SIGINT after saving the step it stopped."""
    started = time.monotonic() if started is None else started
    outcomes: dict[str, Outcome] = {}
    previous = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for step in steps:
            failed_need = [n for n in step.needs if n in outcomes and outcomes[n].status != "ok"]
            left = budget_s - (time.monotonic() - started) - grace_s  # a step stopped at its limit gets grace_s more
            if failed_need:
                need = outcomes[failed_need[0]].status
                outcome = Outcome("skipped", reason=f"needs {failed_need[0]}, which {_said(need)}")
            elif left < min_start_s:
                outcome = Outcome("skipped", reason=f"the total budget ({budget_s:.0f} s) was spent")
            else:
                limit = min(step.limit_s, left)
                try:
                    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
                    outcome = run_command(step.argv, logs / f"{step.name}.log", limit, env=env, grace_s=grace_s)
                except Interrupted as e:
                    outcome = Outcome("interrupted", reason=f"{e} received", log=str(logs / f"{step.name}.log"))
                    outcomes[step.name] = outcome
                    save(step, outcome, figures_of(step, outcome))
                    raise
                if outcome.status == "timeout" and limit < step.limit_s:
                    outcome.reason += f" (cut from {step.limit_s:.0f} s by the total budget)"
            figures = figures_of(step, outcome) if outcome.status != "skipped" else {}
            settle(step, outcome, figures)
            outcomes[step.name] = outcome
            save(step, outcome, figures)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return outcomes


def _said(status: str) -> str:
    return {"timeout": "ran out of time", "skipped": "was skipped", "failed": "failed"}.get(status, status)
