"""The plan's format and its reader: which input goes to which shard, as compact columns on disk.

The plan is made once (:mod:`pipeline.data.planner`) and read by every write task. In ``OUT/.make-shards/``::

    plan.json              what was planned from what: options, classes, shard counts, one digest per shard job
    plan-<digest>/         one row per sample, in shard order (train shards, then val shards):
        label.npy (int32)  offset.npy (int64, -1: a file)  size.npy (int64)  name_end.npy (int64)  names.bin
        shard_start.npy    (shards + 1,) int64: shard k is rows [shard_start[k], shard_start[k + 1])
        tar_stat.npy       (classes, 2) int64: each class tar's size and mtime when planned
        summary.json       plan.json's content, for processes that open the directory directly

A write task reads its shards' rows of each column (``pread``) and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .manifest import FORMAT, SPLITS, shard_name
from .sources import decode_names, key_maker, source_name

WORK_DIR = ".make-shards"
PLAN_NAME = "plan.json"
PLAN_VERSION = 1
TEST_PAUSE_ENV = "DINAT_MAKE_SHARDS_TEST_PAUSE"  # test-only: seconds to sleep after each class indexed / sample written
BLOCK = 512
SAMPLE_OVERHEAD_BLOCKS = 3  # .jpg header + .cls header + .cls data


@dataclass(frozen=True)
class Options:
    """What the plan and the shard bytes depend on."""

    seed: int = 0
    val_per_class: int = 10
    shard_size_mb: float = 256
    shard_samples: int = 0  # > 0 overrides shard_size_mb
    jpeg_quality: int = 95
    max_side: int = 0  # 0: never resize

    def __post_init__(self) -> None:
        if self.val_per_class < 0 or self.shard_samples < 0 or self.max_side < 0:
            raise ValueError("--val-per-class, --shard-samples and --max-side must be >= 0")
        if self.shard_size_mb <= 0:
            raise ValueError(f"--shard-size-mb must be > 0, got {self.shard_size_mb}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"--jpeg-quality must be in 1..100, got {self.jpeg_quality}")

    @property
    def salt(self) -> str:
        """The encoding settings, in every job digest."""
        return f"{FORMAT}:{self.jpeg_quality}:{self.max_side}"


def pause_for_tests() -> float:
    """Seconds to sleep after each class indexed and each sample written: 0 unless a test sets TEST_PAUSE_ENV."""
    return float(os.environ.get(TEST_PAUSE_ENV) or 0)


@dataclass
class Rows:
    """One shard's items, in order."""

    labels: list[int]
    offsets: list[int]
    sizes: list[int]
    names: list[str]
    keys: list[str]
    sources: list[str]


class Plan:
    """A plan: its summary (``info``) and its columns in ``d`` (memory-mapped: a reader touches its rows only)."""

    def __init__(self, d: Path, info: dict[str, Any]):
        self.dir, self.info = d, info
        self.class_ids: list[str] = info["classes"]
        self.layout: str = info["layout"]
        self.keys = {int(r): k for r, k in info.get("keys", {}).items()}
        self._cols: dict[str, tuple[int, int, np.dtype]] = {}  # column -> (data offset, rows, dtype)
        self._small: dict[str, np.ndarray] = {}

    @classmethod
    def load(cls, work: Path) -> Plan:
        """The committed plan in ``work``; FileNotFoundError when there is none, ValueError when unusable."""
        path = work / PLAN_NAME
        try:
            info = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no plan") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if info.get("version") != PLAN_VERSION:
            raise ValueError(f"{path}: made by another version of dinat-make-shards; make the plan again")
        if not (work / info["dir"]).is_dir():
            raise ValueError(f"{path}: its columns ({info['dir']}) are missing; make the plan again")
        return cls(work / info["dir"], info)

    def col(self, name: str, a: int = 0, b: int | None = None) -> np.ndarray:
        """Rows [a, b) of a column, read with ``pread`` (not memory-mapped: a reader's resident memory stays what
        it asked for, however many rows it reads over time); small columns are read whole once and kept."""
        if name in ("shard_start", "tar_stat"):
            if name not in self._small:
                self._small[name] = np.load(self.dir / f"{name}.npy", allow_pickle=False)
            return self._small[name][a:b]
        if name not in self._cols:
            with open(self.dir / f"{name}.npy", "rb") as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
                self._cols[name] = (f.tell(), shape[0], dtype)
        data_at, n, dtype = self._cols[name]
        b = n if b is None else min(b, n)
        if b <= a:
            return np.empty(0, dtype)
        fd = os.open(self.dir / f"{name}.npy", os.O_RDONLY)
        try:
            return np.frombuffer(os.pread(fd, (b - a) * dtype.itemsize, data_at + a * dtype.itemsize), dtype)
        finally:
            os.close(fd)

    @property
    def names(self) -> list[str]:
        """Every shard's name, train then val (the job order: job k is shard ``names[k]``)."""
        return [shard_name(s, i) for s in SPLITS for i in range(self.info["shards"][s])]

    def tar_stat(self, label: int) -> tuple[int, int]:
        s = self.col("tar_stat")[label]
        return int(s[0]), int(s[1])

    def rows(self, k: int) -> Rows:
        """Shard ``k``'s items: reads its rows of each column and its names, nothing else."""
        start = self.col("shard_start")
        a, b = int(start[k]), int(start[k + 1])
        ends = self.col("name_end", max(a - 1, 0), b)
        first = int(ends[0]) if a else 0
        ends = ends[1:] if a else ends
        with open(self.dir / "names.bin", "rb") as f:
            data = os.pread(f.fileno(), int(ends[-1]) - first, first) if b > a else b""
        names = decode_names(data, ends, first)
        labels = self.col("label", a, b).tolist()
        makers: dict[int, Callable[[str], str]] = {}
        keys = [
            self.keys.get(a + j) or (makers.get(c) or makers.setdefault(c, key_maker(self.class_ids[c])))(n)
            for j, (c, n) in enumerate(zip(labels, names))
        ]
        sources = [source_name(self.layout, self.class_ids[c], n) for c, n in zip(labels, names)]
        offsets, sizes = self.col("offset", a, b).tolist(), self.col("size", a, b).tolist()
        return Rows(labels, offsets, sizes, names, keys, sources)


_OPEN: dict[str, Plan] = {}  # a worker process's plans, by directory


def open_plan(d: str) -> Plan:
    """The plan whose columns are in ``d``, read once per process (its summary from ``d/summary.json``)."""
    if d not in _OPEN:
        _OPEN.clear()
        _OPEN[d] = Plan(Path(d), json.loads((Path(d) / "summary.json").read_text()))
    return _OPEN[d]


def job_digest(name: str, rows: Rows, salt: str) -> str:
    """What a shard's bytes depend on: the encoding settings and every item (key, source, label, size, offset)."""
    h = hashlib.sha256(f"{salt}\t{name}\n".encode())
    for key, source, label, size, offset in zip(rows.keys, rows.sources, rows.labels, rows.sizes, rows.offsets):
        h.update(f"{key}\t{source}\t{label}\t{size}\t{offset}\n".encode())
    return h.hexdigest()
