"""How a rank stops: on a stop signal, on its own error or on another rank's, with no process left behind.

Exit codes, the job's contract with launchers and sbatch scripts:

    0      done
    1      failed: an error on this rank or on another one
    2      bad configuration, refused before training started
    75     stopped by SIGTERM / SIGUSR1 after writing a checkpoint: requeue the job to continue (EX_TEMPFAIL)
    128+N  stopped by signal N without a checkpoint: a second stop signal, or one during start-up

* A stop signal during training only sets :attr:`Lifecycle.stop_signal`: the trainer checkpoints at the end of
  the step and exits 75. A second one, or one before training starts, ends the process at once.
* An error on any rank ends every rank within about a second. The failing rank publishes it under a key of the
  job's rendezvous store (the first rank to fail reports it; later ones stay quiet), and each rank has a thread
  blocked on that key that ends its process with the same exit code, even while its main thread waits in a
  collective for the rank that failed.
* Ending a process kills its descendants first: DataLoader workers ignore TERM (Slurm sends it to every process of
  a step, and only the trainer must act on it), so Python's exit, which TERMs and joins them, would wait forever.
"""

from __future__ import annotations

import atexit
import ctypes
import datetime
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import torch.distributed as dist

from .config import ConfigError
from .distributed import DistInfo, connect_store

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG, EXIT_REQUEUE = 0, 1, 2, 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
LOST_STORE_GRACE_S = 10.0  # a rank whose store vanished waits this long for its own normal end before giving up
_WAIT_FOREVER = datetime.timedelta(days=365)


def exit_code(error: BaseException) -> int:
    if isinstance(error, ConfigError):
        return EXIT_CONFIG
    if isinstance(error, KeyboardInterrupt):
        return 128 + signal.SIGINT
    if isinstance(error, SystemExit) and isinstance(error.code, int):
        return error.code
    return EXIT_FAILURE


def one_line(error: BaseException | str) -> str:
    """The line that names an error; for a DataLoader worker's re-raised error, its original last line."""
    if isinstance(error, str):
        return error
    lines = [line for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if "Original Traceback" in str(error):  # torch re-raises worker errors with the worker's traceback as text
        return lines[-1].strip()[:500]
    prefix = "" if isinstance(error, ConfigError) else f"{type(error).__name__}: "
    return f"{prefix}{lines[0].strip()}"[:500]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, grandchildren ...), from /proc; [] where there is no /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid ...
        except (OSError, IndexError):
            continue  # the process ended while we looked
        children.setdefault(int(fields[1]), []).append(int(entry.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def kill_descendants() -> None:
    """SIGKILL every descendant of this process (DataLoader workers, ``pipe:`` commands)."""
    for pid in descendants(os.getpid()):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies, however it dies (Linux; elsewhere a no-op)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the call
        os._exit(EXIT_FAILURE)


class Lifecycle:
    """One per rank process: call :meth:`start` once the process group exists, :meth:`training` when the loop
    starts, :meth:`finishing` before the last collective of a normal end, :meth:`fail` on any error."""

    def __init__(self, info: DistInfo):
        self.info = info
        self.stop_signal = 0  # the first stop signal received during training
        self._training = False
        self._finishing = threading.Event()
        self._exiting = threading.RLock()
        self._cleanups: list[Callable[[], None]] = []
        self._key: str | None = None

    def start(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        atexit.register(kill_descendants)  # runs before multiprocessing's exit handler, which would wait on them
        if self.info.world_size > 1:
            token = [uuid.uuid4().hex]  # a fresh key per job attempt: a restarted job must not see the last failure
            dist.broadcast_object_list(token, src=0)
            self._key = f"dinat/failure/{token[0]}"
            threading.Thread(target=self._watch, name="dinat-failure-watch", daemon=True).start()

    def on_exit(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` (bounded to a few seconds) before the process ends on an error or a signal."""
        self._cleanups.append(fn)

    def training(self) -> None:
        """From now on a first stop signal asks for a checkpoint instead of ending the process."""
        self._training = True

    def finishing(self) -> None:
        """This rank is past its last collective: another rank ending now is no longer a failure."""
        self._finishing.set()

    def exit(self, code: int) -> NoReturn:
        """End a normal run. Skips the interpreter's teardown, whose final garbage collection over the objects of
        torch and DeepSpeed takes ~10 s of CPU per rank, and which could wait on a worker that ignores TERM."""
        self._exit(code)

    def fail(self, code: int, error: BaseException | str) -> NoReturn:
        """Report ``error`` (if no rank did before), tell every rank to stop with ``code``, and end this process."""
        message = one_line(error)
        if self._publish(code, message):
            if isinstance(error, BaseException) and not isinstance(error, (ConfigError, KeyboardInterrupt)):
                logger.error("%s", message, exc_info=error)
            else:
                logger.error("%s", message)
            if self._key is not None and self.info.is_main:
                time.sleep(1.0)  # the store may live in this process: let the other ranks hear before it goes
        self._exit(code)

    # -- internals ------------------------------------------------------------------------------------------
    def _on_signal(self, signum: int, _frame) -> None:
        if self._training and not self.stop_signal:
            self.stop_signal = signum  # only a flag: the trainer checkpoints between steps
            return
        why = "a second stop signal" if self.stop_signal else "during start-up"
        self.fail(128 + signum, f"{signal.Signals(signum).name} ({why}): stopping without a checkpoint")

    def _publish(self, code: int, message: str) -> bool:
        """Set the failure key; True when this rank is the first to fail (it reports the error)."""
        if self._key is None:
            return True
        try:
            store = connect_store(timeout_s=5)
            first = store.add(f"{self._key}/count", 1) == 1
            if first:
                store.set(self._key, f"{code}\t{self.info.rank}\t{message}")
            return first
        except Exception as e:  # the store is gone: nobody else can be told, report here
            logger.warning("could not tell the other ranks about this failure: %s", e)
            return True

    def _watch(self) -> None:
        """Thread: wait for another rank's failure and end this process with its exit code."""
        try:
            store = connect_store(timeout_s=60)
            store.wait([self._key], _WAIT_FOREVER)
            code, rank, message = store.get(self._key).decode().split("\t", 2)
        except Exception:  # the store went away: rank 0 (or the launcher) ended
            if not self._finishing.wait(LOST_STORE_GRACE_S):
                self._exit(EXIT_FAILURE, "lost the job's rendezvous store (rank 0 or the launcher ended); stopping")
            return
        if int(rank) != self.info.rank:
            self._exit(int(code), f"rank {rank} failed ({message}); stopping")

    def _exit(self, code: int, message: str | None = None) -> NoReturn:
        with self._exiting:  # one thread ends the process; a second caller waits here until it is gone
            if message:
                logger.info("%s", message)
            for fn in self._cleanups:
                thread = threading.Thread(target=fn, daemon=True)
                thread.start()
                thread.join(timeout=5)
            kill_descendants()
            for handler in logging.getLogger().handlers:
                handler.flush()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
