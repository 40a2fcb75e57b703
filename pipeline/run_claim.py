"""One job writes a run directory at a time: rank 0 holds a claim file there while the job runs.

``RUN/.owner`` holds who owns the directory (host, pid, Slurm job and restart count) and a random token; its
owner touches it every ``heartbeat`` seconds. Another job that finds it is refused, with the owner named, unless
the claim is stale:

* its heartbeat is older than ``stale_after`` seconds (a dead job or a failed node: works across nodes, only the
  shared filesystem's timestamps are compared with this node's clock);
* its owner ran on this host and that process is gone (``kill -9``: no need to wait);
* it belongs to an earlier restart of this same Slurm job (Slurm never runs two incarnations of one job).

A stale claim is removed under a short-lived ``.owner.takeover`` lock (created with O_EXCL), so two jobs that both
find it stale cannot both take over. The owner checks its token at every heartbeat: a job whose claim was taken
over (it stalled past ``stale_after``) stops rather than write beside the new owner.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .distributed import JobIdentity

logger = logging.getLogger(__name__)

CLAIM_NAME = ".owner"
HEARTBEAT_S = 15.0
STALE_AFTER_S = 120.0


class RunDirBusy(RuntimeError):
    """Another live job owns the run directory."""


class RunClaim:
    def __init__(
        self,
        run_dir: Path,
        me: JobIdentity,
        heartbeat: float = HEARTBEAT_S,
        stale_after: float = STALE_AFTER_S,
        on_lost: Callable[[str], None] | None = None,
    ):
        self.path = Path(run_dir) / CLAIM_NAME
        self.me, self.heartbeat, self.stale_after = me, heartbeat, stale_after
        self.on_lost = on_lost
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- taking and giving back ------------------------------------------------------------------------
    def acquire(self) -> None:
        """Claim the directory (taking over a stale claim), then keep the claim fresh; RunDirBusy if it is in use."""
        for _ in range(10):
            if self._create():
                self._thread = threading.Thread(target=self._beat, name="dinat-run-claim", daemon=True)
                self._thread.start()
                return
            claim, age = self._read()
            if claim is None:
                continue  # it vanished between our attempts: try again
            why = self._stale_reason(claim, age)
            if why is None:
                owner = JobIdentity(**claim["owner"]).describe()
                raise RunDirBusy(
                    f"run.output_dir: {self.path.parent} is in use by {owner} (claimed {claim['since']}, "
                    f"last heartbeat {age:.0f} s ago); wait for that job to end, stop it, or use another run.output_dir"
                )
            self._take_over(claim, why)
        raise RunDirBusy(f"run.output_dir: {self.path.parent}: could not claim {self.path} (other jobs keep taking it)")

    def release(self) -> None:
        """Stop the heartbeat and remove the claim if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat + 5)
        claim, _ = self._read()
        if claim is not None and claim.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    # -- internals -------------------------------------------------------------------------------------
    def _create(self) -> bool:
        record = {"owner": asdict(self.me), "token": self.token, "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _read(self) -> tuple[dict[str, Any] | None, float]:
        """(the claim, seconds since its last heartbeat), or (None, 0) when there is none. A claim that cannot be
        parsed (its writer died mid-write) counts as one whose owner is unknown, aged by its timestamp."""
        try:
            age = time.time() - self.path.stat().st_mtime
            text = self.path.read_text()
        except FileNotFoundError:
            return None, 0.0
        try:
            claim = json.loads(text)
            JobIdentity(**claim["owner"])
        except (ValueError, KeyError, TypeError):
            claim = {"owner": asdict(JobIdentity(host="?", pid=0)), "token": None, "since": "?"}
        return claim, max(age, 0.0)

    def _stale_reason(self, claim: dict[str, Any], age: float) -> str | None:
        owner = JobIdentity(**claim["owner"])
        if age > self.stale_after:
            return f"no heartbeat for {age:.0f} s"
        if owner.host == self.me.host and owner.pid > 0 and not _alive(owner.pid):
            return f"process {owner.pid} on this host is gone"
        if owner.job and owner.job == self.me.job and owner.restart < self.me.restart:
            return f"written by restart {owner.restart} of this Slurm job"
        return None

    def _take_over(self, claim: dict[str, Any], why: str) -> None:
        lock = self.path.with_name(CLAIM_NAME + ".takeover")
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:  # a taker that died mid-takeover leaves its lock: it is old by then
                if time.time() - lock.stat().st_mtime > self.stale_after:
                    lock.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            time.sleep(0.2)
            return
        os.close(fd)
        try:
            current, _ = self._read()
            if current is not None and current.get("token") == claim.get("token"):  # nobody took it meanwhile
                self.path.unlink(missing_ok=True)
                logger.warning("taking over %s from %s: %s", self.path, JobIdentity(**claim["owner"]).describe(), why)
        finally:
            lock.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            claim, _ = self._read()
            if claim is None or claim.get("token") != self.token:
                owner = "nobody" if claim is None else JobIdentity(**claim["owner"]).describe()
                message = f"lost the claim on {self.path.parent} (now held by {owner}); stopping"
                if self.on_lost is not None:
                    self.on_lost(message)
                return
            try:
                os.utime(self.path)
            except OSError as e:
                logger.warning("could not refresh %s: %s", self.path, e)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
