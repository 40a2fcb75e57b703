"""Progress of a long loop: a bar on an interactive terminal, periodic log lines otherwise (Slurm logs).

    progress = Progress("index", total=21841, unit="tars")
    for ...:
        progress.update(1)
    progress.close()

Each log line says what was done of how much, the rate and the time left:
``index: 5,120/21,841 tars (23%), 171.2 tars/s, ETA 0:01:37``; ``close`` logs the final count and the time taken.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

log = logging.getLogger(__name__)

LOG_EVERY_S = 30.0  # between log lines when stderr is not a terminal
DRAW_EVERY_S = 0.2  # between redraws of the bar
BAR_WIDTH = 30


def _duration(seconds: float) -> str:
    s = int(seconds + 0.5)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    """Counts ``done`` out of ``total`` (0 when unknown) and reports it; ``update`` is cheap between reports."""

    def __init__(
        self,
        what: str,
        total: int,
        unit: str = "items",
        every: float = LOG_EVERY_S,
        stream: TextIO | None = None,
        logger: logging.Logger | None = None,
    ):
        self.what, self.total, self.unit, self.every = what, total, unit, every
        self.stream = stream if stream is not None else sys.stderr
        self.log = logger or log
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done = 0
        self.start = self.last = time.monotonic()
        self.closed = False
        # On a terminal, log records that go to the same stream first clear the bar (redrawn on the next update).
        self._handlers = [h for h in logging.getLogger().handlers if getattr(h, "stream", None) is self.stream]
        if self.tty:
            for h in self._handlers:
                h.addFilter(self._clear)

    def line(self, now: float | None = None) -> str:
        """``what: done/total unit (pct%), rate unit/s, ETA h:mm:ss``."""
        elapsed = max((now or time.monotonic()) - self.start, 1e-9)
        rate = self.done / elapsed
        text = f"{self.what}: {self.done:,}/{self.total:,} {self.unit}" if self.total else f"{self.what}: {self.done:,}"
        if self.total:
            text += f" ({100 * self.done / self.total:.0f}%)"
        text += f", {rate:,.1f} {self.unit}/s"
        if self.total and rate > 0 and self.done < self.total:
            text += f", ETA {_duration((self.total - self.done) / rate)}"
        return text

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last < (DRAW_EVERY_S if self.tty else self.every):
            return
        self.last = now
        if self.tty:
            self._draw(now)
        else:
            self.log.info("%s", self.line(now))

    def _clear(self, record: logging.LogRecord) -> bool:
        self.stream.write("\r\033[K")
        return True

    def _draw(self, now: float) -> None:
        filled = int(BAR_WIDTH * self.done / self.total) if self.total else 0
        bar = "#" * min(filled, BAR_WIDTH) + "-" * (BAR_WIDTH - min(filled, BAR_WIDTH))
        self.stream.write(f"\r[{bar}] {self.line(now)}\033[K")
        self.stream.flush()

    def close(self) -> None:
        """Clear the bar (on a terminal) and log the final count and the time taken."""
        if self.closed:
            return
        self.closed = True
        now = time.monotonic()
        if self.tty:
            for h in self._handlers:
                h.removeFilter(self._clear)
            self.stream.write("\r\033[K")
            self.stream.flush()
        elapsed = now - self.start
        rate = self.done / max(elapsed, 1e-9)
        self.log.info("%s: %s %s in %s (%s %s/s)", self.what, f"{self.done:,}", self.unit, _duration(elapsed),
                      f"{rate:,.1f}", self.unit)  # fmt: skip

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
