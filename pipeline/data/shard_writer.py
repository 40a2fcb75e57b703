"""Writing (or keeping) one shard from its rows of the plan, with its sample index and its record.

Runs in pool workers, so it imports neither torch nor webdataset (a spawned worker would otherwise load ~300 MB
of torch). The tar bytes are what ``webdataset.TarWriter(f, encoder=False, mtime=0)`` writes: per sample
``{key}.cls`` then ``{key}.jpg``, ustar headers (mode 0444, owner bigdata:bigdata, mtime 0), two zero blocks at
the end and zeros up to a multiple of 10240 bytes. Each source tar is opened once per shard job (a bounded
cache of descriptors) and each member is read with one ``pread`` of exactly its bytes.

A shard is complete when these exist: the shard under its final name (written under ``.NAME.tmp``, fsynced,
renamed), its sample index ``index/NAME.npy`` (:mod:`pipeline.data.index`) and its record
``OUT/.make-shards/records/NAME.json`` (its manifest entry). A kept shard is checked against its record (size,
sha256) and its index against its own headers; a missing or wrong index is rewritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .images import BadImage, prepare
from .index import index_name, read_index, write_index
from .manifest import fsync_path, verify_shard, write_json_atomic
from .shard_plan import Plan, open_plan, pause_for_tests
from .sources import Counts, PreadFile, read_member, skip_record

log = logging.getLogger(__name__)

RECORDSIZE = 20 * tarfile.BLOCKSIZE  # tarfile pads archives to this
WRITE_BUFFER = 8 << 20
RECORDS_DIR = "records"


def tmp_name(name: str) -> str:
    return f".{name}.tmp"


def member(name: str, data: bytes) -> bytes:
    """One tar member as webdataset's TarWriter writes it: header, data, zeros to the next block."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "bigdata", "bigdata"
    pad = -len(data) % tarfile.BLOCKSIZE
    return info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape") + data + b"\0" * pad


def end_of_archive(pos: int) -> bytes:
    """The two zero blocks, then zeros up to a multiple of RECORDSIZE (what tarfile writes on close)."""
    pos += 2 * tarfile.BLOCKSIZE
    return b"\0" * (2 * tarfile.BLOCKSIZE + -pos % RECORDSIZE)


class TarReader:
    """Reads planned inputs: tar members by offset (each tar opened once, up to ``limit`` open at a time; its
    size and mtime checked against the plan's) or whole files (the folders layout)."""

    def __init__(self, src: Path, plan: Plan, count: Counts, limit: int = 256):
        self.src, self.plan, self.count, self.limit = src, plan, count, limit
        self.fds: OrderedDict[int, int] = OrderedDict()

    def _fd(self, label: int) -> int:
        if label in self.fds:
            self.fds.move_to_end(label)
            return self.fds[label]
        path = self.src / f"{self.plan.class_ids[label]}.tar"
        fd = os.open(path, os.O_RDONLY)
        self.count["opens"] += 1
        st = os.fstat(fd)
        if (st.st_size, st.st_mtime_ns) != self.plan.tar_stat(label):
            os.close(fd)
            raise ValueError(f"{path} changed after the plan was made (size or mtime differ): make the plan again")
        self.fds[label] = fd
        if len(self.fds) > self.limit:
            os.close(self.fds.popitem(last=False)[1])
        return fd

    def read(self, label: int, offset: int, size: int, source: str) -> bytes:
        self.count["member_reads"] += 1
        if offset < 0:
            self.count["opens"] += 1
            data = (self.src / source).read_bytes()
        else:
            data = read_member(self._fd(label), offset, size)
            if len(data) != size:
                raise BadImage("truncated tar", f"read {len(data)} of {size} bytes")
        self.count["member_bytes"] += len(data)
        return data

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


@dataclass(frozen=True)
class ShardJob:
    """Job ``k`` of the plan in ``plan_dir``: shard ``name`` with digest ``digest``; ``prior`` is a recorded entry
    for the same digest (to keep when it verifies)."""

    plan_dir: str
    k: int
    name: str
    digest: str
    src: str
    out: str
    work: str
    jpeg_quality: int
    max_side: int
    prior: dict[str, Any] | None = None


def shard_offsets(path: Path, count: Counts | None = None) -> list[int]:
    """Where each sample of a shard starts (its first member's header), then where the end-of-archive starts,
    read from the shard's own headers (``pread`` of each header)."""
    offsets, last = [], None
    with PreadFile(path, count) as f, tarfile.open(fileobj=f, mode="r:") as tf:
        while (m := tf.next()) is not None:
            tf.members.clear()
            key = m.name.split(".", 1)[0]
            if key != last:
                offsets.append(m.offset)
                last = key
        offsets.append(tf.offset)
    return offsets


def _write(job: ShardJob, plan: Plan, count: Counts) -> dict[str, Any]:
    """Write the shard under a temporary name, fsync it, rename it into place, write its index; its entry."""
    out, rows, pause = Path(job.out), plan.rows(job.k), pause_for_tests()
    tmp = out / tmp_name(job.name)
    offsets: list[int] = []
    skipped: list[dict[str, str]] = []
    samples = reencoded = pos = 0
    sha = hashlib.sha256()
    reader = TarReader(Path(job.src), plan, count)
    try:
        with open(tmp, "wb", buffering=WRITE_BUFFER) as f:
            for label, offset, size, key, source in zip(rows.labels, rows.offsets, rows.sizes, rows.keys, rows.sources):
                try:
                    data, changed = prepare(reader.read(label, offset, size, source), job.max_side, job.jpeg_quality)
                except BadImage as e:
                    skipped.append(skip_record(source, e.reason, e.detail))
                    continue
                except OSError as e:
                    skipped.append(skip_record(source, "read error", str(e)))
                    continue
                sample = member(f"{key}.cls", str(label).encode()) + member(f"{key}.jpg", data)
                f.write(sample)
                sha.update(sample)
                offsets.append(pos)
                pos += len(sample)
                samples, reencoded = samples + 1, reencoded + changed
                if pause:
                    time.sleep(pause)
            offsets.append(pos)
            tail = end_of_archive(pos)
            f.write(tail)
            sha.update(tail)
            pos += len(tail)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out / job.name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        reader.close()
    write_index(out / index_name(job.name), offsets)
    fsync_path(out)
    return {
        "name": job.name,
        "samples": samples,
        "bytes": pos,
        "sha256": sha.hexdigest(),
        "job": job.digest,
        "reencoded": reencoded,
        "skipped": skipped,
        "index": index_name(job.name),
    }


def _keep(job: ShardJob, count: Counts) -> dict[str, Any] | None:
    """The prior entry (with its index) when the shard verifies; its index rewritten when missing or wrong."""
    out, prior = Path(job.out), job.prior
    path = out / job.name
    if prior is None or not verify_shard(path, prior):
        return None
    count["verified_bytes"] += prior["bytes"]
    offsets = shard_offsets(path, count)
    if len(offsets) != prior["samples"] + 1:
        return None
    index = out / index_name(job.name)
    try:
        ok = read_index(index, prior["samples"]).tolist() == offsets
    except (OSError, ValueError):
        ok = False
    if not ok:
        log.info("%s: index missing or wrong; rewritten", job.name)
        write_index(index, offsets)
        count["indexes_rewritten"] += 1
    return {**prior, "index": index_name(job.name)}


def run_job(job: ShardJob) -> tuple[dict[str, Any], bool, Counts]:
    """(entry, written, I/O counts): keep the shard if it verifies against ``job.prior``, else write it; then
    record its entry (once per shard: O(shards) manifest writes in all)."""
    count: Counts = Counter()
    plan = open_plan(job.plan_dir)
    entry = _keep(job, count)
    wrote = entry is None
    if wrote:
        entry = _write(job, plan, count)
    record = Path(job.work) / RECORDS_DIR / f"{job.name}.json"
    if wrote or not _same_record(record, entry):
        write_json_atomic(record, entry)
        count["manifest_bytes"] += record.stat().st_size
    return entry, wrote, count


def _same_record(path: Path, entry: dict[str, Any]) -> bool:
    try:
        return json.loads(path.read_text()) == entry
    except (OSError, ValueError):
        return False
