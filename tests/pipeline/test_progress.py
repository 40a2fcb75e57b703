"""pipeline.progress: log lines with done/total, rate and ETA when not on a terminal; a bar on one."""

from __future__ import annotations

import io
import logging
import re

import pytest

from pipeline import progress as progress_module
from pipeline.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_lines_under_slurm(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    stream = io.StringIO()
    with Progress("index", 10, "tars", every=0, stream=stream) as p:
        for _ in range(4):
            p.update()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 5 and stream.getvalue() == ""
    assert re.fullmatch(r"index: 3/10 tars \(30%\), [\d,.]+ tars/s, ETA \d+:\d\d:\d\d", lines[2]), lines[2]
    assert re.fullmatch(r"index: 4 tars in \d+:\d\d:\d\d \([\d,.]+ tars/s\)", lines[4]), lines[4]


def test_quiet_between_intervals(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    with Progress("write", 1000, "images", every=3600, stream=io.StringIO()) as p:
        for _ in range(1000):
            p.update()
    assert [r.getMessage().split(" in ")[0] for r in caplog.records] == ["write: 1,000 images"]


def test_bar_on_a_terminal(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress_module, "DRAW_EVERY_S", 0.0)
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    term = Terminal()
    with Progress("write", 8, "images", stream=term) as p:
        p.update(2)
        p.update(2)
    drawn = term.getvalue().split("\r")
    assert drawn[1].startswith("[#######-----------------------] write: 2/8 images (25%)")
    assert drawn[2].startswith("[###############---------------] write: 4/8 images (50%)")
    assert drawn[-1] == "\033[K" and len(caplog.records) == 1  # cleared; only the final line is logged


def test_log_records_clear_the_bar_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress_module, "DRAW_EVERY_S", 0.0)
    term = Terminal()
    handler = logging.StreamHandler(term)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with Progress("write", 4, "images", stream=term) as p:
            p.update(1)
            logging.getLogger("pipeline.data.shards").warning("wrote train-000000.tar")
            p.update(1)
    finally:
        root.removeHandler(handler)
    text = term.getvalue()
    assert "images (25%)" in text and "\r\033[Kwrote train-000000.tar\n\r[" in text
    assert not handler.filters  # removed on close
