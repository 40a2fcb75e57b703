"""Making the plan (:mod:`pipeline.data.shard_plan`): which input goes to which shard, from the class indexes.

The plan depends only on the inputs' names and sizes and on the options, never on how many processes write it,
so parts written by separate Slurm tasks compose and re-runs resume:

* classes: sorted ids -> indices 0..N-1.
* keys: see :mod:`pipeline.data.sources`; keys that then collide all get ``-{sha1(source)[:10]}``.
* val: per class, the ``val_per_class`` items with the smallest ``sha1(f"{seed}:{key}")``, but never a whole
  class: a class of n <= N items gives n - 1 (a class of one item has no val sample). Items that later fail to
  decode are skipped where they fall, so such a class has fewer val samples.
* order: train by ``sha1(f"{seed}:train:{key}")`` (a global shuffle), val by class then key; shards are
  consecutive runs of that order, cut at ``shard_samples`` or at ``shard_bytes`` estimated from input sizes.

Cost: the class indexes are read in parallel (one task per class); the main process holds, per image, an 8-byte
hash prefix, a 4-byte size estimate, a 4-byte name length and the permutation (4 bytes) -- never one Python object
per image -- and fills the columns one at a time from the class indexes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..progress import Progress
from .manifest import fsync_path, write_json_atomic
from .shard_plan import (
    BLOCK,
    PLAN_NAME,
    PLAN_VERSION,
    SAMPLE_OVERHEAD_BLOCKS,
    Options,
    Plan,
    job_digest,
    open_plan,
    pause_for_tests,
)
from .sources import (
    Counts,
    Listing,
    index_class,
    item_filter,
    key_maker,
    load_listing,
    save_listing,
    source_name,
    tar_stats,
)

log = logging.getLogger(__name__)


def _sha1(s: str) -> Any:
    return hashlib.sha1(s.encode())


# ---------------------------------------------------------------------------------------- one class (workers)


def split_class(keys: list[str], seed: int, val_per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """(val item indices in key order, train-order hash prefix of every item as uint64) for one class."""
    order = sorted(range(len(keys)), key=lambda i: _sha1(f"{seed}:{keys[i]}").digest())
    n_val = min(val_per_class, max(len(keys) - 1, 0))
    val = np.array(sorted(order[:n_val], key=keys.__getitem__), dtype=np.int64)
    prefix = np.fromiter(
        (int.from_bytes(_sha1(f"{seed}:train:{k}").digest()[:8], "big") for k in keys), dtype=np.uint64, count=len(keys)
    )
    return val, prefix


@dataclass
class ClassPlan:
    """What the planner keeps of one class: per candidate image a hash prefix, a size estimate and a name length."""

    excluded: np.ndarray  # listing indices that are not candidate images
    prefix: np.ndarray  # (n,) uint64
    blocks: np.ndarray  # (n,) uint32: estimated 512-byte tar blocks of the sample
    lens: np.ndarray  # (n,) int32: bytes of the name
    val: np.ndarray  # indices (into the n candidates) of the val items, in key order
    skipped: list[dict[str, str]]
    count: Counts = field(default_factory=Counter)


@dataclass(frozen=True)
class ClassTask:
    src: str
    layout: str
    class_id: str
    cache: str
    seed: int
    val_per_class: int
    keys: dict[int, str] = field(default_factory=dict)  # candidate index -> key, where collisions were resolved


def candidates(listing: Listing, task: ClassTask) -> tuple[np.ndarray, list[str], list[dict[str, str]]]:
    """(listing indices of candidate images, their keys, skip records for the rest)."""
    keep, skipped = item_filter(listing, task.class_id, task.layout)
    key = key_maker(task.class_id)
    keys = [key(listing.names[i]) for i in keep.tolist()]
    for j, k in task.keys.items():
        keys[j] = k
    return keep, keys, skipped


def plan_class(task: ClassTask) -> ClassPlan:
    """Index one class (or load its cached index) and compute what the planner needs of it."""
    count: Counts = Counter()
    listing = index_class(Path(task.src), task.layout, task.class_id, Path(task.cache), count)
    if task.layout == "folders":  # not reusable (no cheap change test), but the planner reads it back below
        save_listing(Path(task.cache) / f"{task.class_id}.idx", listing, (-1, -1))
    keep, keys, skipped = candidates(listing, task)
    val, prefix = split_class(keys, task.seed, task.val_per_class)
    sizes = listing.sizes[keep]
    if pause := pause_for_tests():
        time.sleep(pause)
    excluded = np.ones(len(listing.names), dtype=bool)
    excluded[keep] = False
    return ClassPlan(
        excluded=np.flatnonzero(excluded),
        prefix=prefix,
        blocks=(SAMPLE_OVERHEAD_BLOCKS + -(-sizes // BLOCK)).astype(np.uint32),
        lens=np.array([len(listing.names[i].encode("utf-8", "surrogateescape")) for i in keep.tolist()], np.int32),
        val=val,
        skipped=listing.skipped + skipped,
        count=count,
    )


# ------------------------------------------------------------------------------------------- the whole plan


def chunk_bounds(blocks: np.ndarray, shard_samples: int, shard_bytes: float) -> np.ndarray:
    """Start of each shard within ``blocks`` (estimated tar blocks per item, in order), then len(blocks):
    ``shard_samples`` items each when > 0, else as many as fit in ``shard_bytes`` (at least one)."""
    n = len(blocks)
    if n == 0:
        return np.zeros(1, dtype=np.int64)
    if shard_samples:
        return np.append(np.arange(0, n, shard_samples, dtype=np.int64), n)
    ends = np.cumsum(blocks, dtype=np.int64)  # ends[j]: bytes of items 0..j
    ends *= BLOCK
    starts, s = [0], 0
    while s < n:
        before = ends[s - 1] if s else 0
        e = max(s + 1, int(np.searchsorted(ends, before + shard_bytes, side="right")))
        starts.append(min(e, n))
        s = e
    return np.array(starts, dtype=np.int64)


@dataclass
class _Classes:
    """Per-class results held while planning, and the global item numbering (class by class)."""

    ids: list[str]
    start: np.ndarray  # (classes + 1,) first global item id of each class
    excluded: list[np.ndarray]
    val: list[np.ndarray]


def _concat(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
    out = np.empty(sum(len(p) for p in parts), dtype=dtype)
    i = 0
    for p in parts:
        out[i : i + len(p)] = p
        i += len(p)
    parts.clear()
    return out


def _class_of(cls: _Classes, gids: np.ndarray) -> np.ndarray:
    return np.searchsorted(cls.start, gids, side="right") - 1


def _listing(cache: Path, class_id: str, stat: tuple[int, int], decode: bool = True) -> Listing:
    listing = load_listing(cache / f"{class_id}.idx", stat, decode)
    if listing is None:
        raise ValueError(f"{class_id}: its input changed while the plan was being made; run again")
    return listing


class Planner:
    """Builds the plan of one SRC in ``work`` (``OUT/.make-shards``); see the module docstring."""

    def __init__(self, src: Path, work: Path, layout: str, class_ids: list[str], opts: Options, mapper: Callable):
        self.src, self.work, self.layout, self.opts, self.mapper = src, work, layout, opts, mapper
        self.cache = work / "sources"
        self.stats = (
            tar_stats(src, class_ids) if layout == "synset-tars" else np.full((len(class_ids), 2), -1, np.int64)
        )
        self.cls = _Classes(class_ids, np.zeros(1, np.int64), [], [])
        self.keys: dict[int, str] = {}  # global item id -> key, for resolved collisions
        self.count: Counts = Counter()
        self.skipped: list[dict[str, str]] = []

    def stat(self, c: int) -> tuple[int, int]:
        return int(self.stats[c, 0]), int(self.stats[c, 1])

    def task(self, c: int, keys: dict[int, str] | None = None) -> ClassTask:
        o = self.opts
        return ClassTask(str(self.src), self.layout, self.cls.ids[c], str(self.cache), o.seed, o.val_per_class,
                         keys or {})  # fmt: skip

    # -- pass 1: index every class, keep the compact per-item values
    def index(self, progress: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self.cache.mkdir(parents=True, exist_ok=True)
        prefix, blocks, lens, sizes = [], [], [], [0]
        for cp in self.mapper(plan_class, [self.task(c) for c in range(len(self.cls.ids))]):
            prefix.append(cp.prefix)
            blocks.append(cp.blocks)
            lens.append(cp.lens)
            sizes.append(len(cp.prefix))
            self.cls.excluded.append(cp.excluded)
            self.cls.val.append(cp.val)
            self.skipped += cp.skipped
            self.count.update(cp.count)
            progress.update(1)
        self.cls.start = np.cumsum(sizes, dtype=np.int64)
        return _concat(prefix, np.uint64), _concat(blocks, np.uint32), _concat(lens, np.int32)

    def keys_of(self, gids: Iterable[int]) -> dict[int, tuple[str, str]]:
        """Global item id -> (key, source) (reads the class indexes; for the rare items that need it)."""
        out: dict[int, tuple[str, str]] = {}
        gids = sorted(set(int(g) for g in gids))
        for c in sorted(set(_class_of(self.cls, np.array(gids, np.int64)).tolist())):
            listing = _listing(self.cache, self.cls.ids[c], self.stat(c))
            local = {g - int(self.cls.start[c]): g for g in gids if self.cls.start[c] <= g < self.cls.start[c + 1]}
            keep, keys, _ = candidates(listing, self.task(c, self._class_keys(c)))
            for j, g in local.items():
                out[g] = keys[j], source_name(self.layout, self.cls.ids[c], listing.names[keep[j]])
        return out

    def _class_keys(self, c: int) -> dict[int, str]:
        lo, hi = int(self.cls.start[c]), int(self.cls.start[c + 1])
        return {g - lo: k for g, k in self.keys.items() if lo <= g < hi}

    def resolve_collisions(self, prefix: np.ndarray) -> None:
        """Keys equal after sanitising all get ``-{sha1(source)[:10]}``; equal keys have equal hash prefixes, so
        only items sharing a prefix are looked at. Their classes are split again with the new keys."""
        for _ in range(2):
            s = np.sort(prefix)
            shared = np.unique(s[1:][s[1:] == s[:-1]])
            del s
            if not len(shared):
                return
            found = self.keys_of(np.flatnonzero(np.isin(prefix, shared)))
            by_key: dict[str, list[int]] = {}
            for g, (key, _) in found.items():
                by_key.setdefault(key, []).append(g)
            dup = {g for gs in by_key.values() if len(gs) > 1 for g in gs}
            if not dup:
                return
            if dup & self.keys.keys():
                raise ValueError(f"sample keys not unique even after hashing sources: {sorted(by_key)[:5]}")
            for g in dup:
                key, source = found[g]
                self.keys[g] = f"{key}-{hashlib.sha1(source.encode()).hexdigest()[:10]}"
            for c in sorted(set(_class_of(self.cls, np.array(sorted(dup), np.int64)).tolist())):
                lo, hi = int(self.cls.start[c]), int(self.cls.start[c + 1])
                _, keys, _ = candidates(
                    _listing(self.cache, self.cls.ids[c], self.stat(c)), self.task(c, self._class_keys(c))
                )
                self.cls.val[c], prefix[lo:hi] = split_class(keys, self.opts.seed, self.opts.val_per_class)
        raise ValueError("sample keys not unique even after hashing sources")

    def train_order(self, prefix: np.ndarray, is_val: np.ndarray) -> np.ndarray:
        """Train item ids (int32) sorted by their full train hash (the prefix, ties settled by the whole digest)."""
        order = np.argsort(prefix, kind="stable").astype(np.int32)
        order = order[~is_val[order]]
        p = prefix[order]
        ties = np.flatnonzero(p[1:] == p[:-1])
        del p
        if len(ties):
            runs = sorted(set(ties.tolist()) | set((ties + 1).tolist()))
            keys = self.keys_of(order[runs])
            seed = self.opts.seed
            # Consecutive tied positions form runs; each run is re-sorted by the whole digest.
            groups: list[list[int]] = []
            for pos in runs:
                if groups and pos == groups[-1][-1] + 1 and prefix[order[pos]] == prefix[order[groups[-1][-1]]]:
                    groups[-1].append(pos)
                else:
                    groups.append([pos])
            for g in groups:
                ids = sorted(order[g].tolist(), key=lambda i: _sha1(f"{seed}:train:{keys[i][0]}").digest())
                order[g] = ids
        return order

    def build(self, progress: Any) -> tuple[Path, dict[str, Any]]:
        """Index, order, chunk and write the columns into a new directory; (its path, the plan summary).

        Arrays live in ``a`` and are dropped as soon as they are used: the peak is what one step needs."""
        a: dict[str, np.ndarray] = dict(zip(("prefix", "blocks", "lens"), self.index(progress)))
        progress.close()
        n = len(a["prefix"])
        log.info("plan: %d candidate images in %d classes; ordering them", n, len(self.cls.ids))
        self.resolve_collisions(a["prefix"])
        val_ids = _concat([v + self.cls.start[c] for c, v in enumerate(self.cls.val)], np.int64)
        is_val = np.zeros(n, dtype=bool)
        is_val[val_ids] = True
        n_train = n - len(val_ids)
        a["rows"] = np.empty(n, dtype=np.int32)  # row -> global item id: train rows, then val rows
        a["rows"][:n_train] = self.train_order(a.pop("prefix"), is_val)
        a["rows"][n_train:] = val_ids
        del is_val, val_ids
        o, blocks = self.opts, a.pop("blocks")
        shard_bytes = 0 if o.shard_samples else o.shard_size_mb * 2**20
        train = chunk_bounds(blocks[a["rows"][:n_train]], o.shard_samples, shard_bytes)
        val = n_train + chunk_bounds(blocks[a["rows"][n_train:]], o.shard_samples, shard_bytes)
        del blocks
        a["shard_start"] = np.concatenate([train, val[1:]])
        log.info("plan: ordered; %d train + %d val shards; writing the columns", len(train) - 1, len(val) - 1)
        tmp = Path(tempfile.mkdtemp(dir=self.work, prefix=".plan-"))
        keys = self._write_columns(tmp, a)
        return tmp, {
            "shards": {"train": len(train) - 1, "val": len(val) - 1},
            "samples": {"train": int(n_train), "val": int(n - n_train)},
            "keys": keys,
        }

    def _write_columns(self, d: Path, a: dict[str, np.ndarray]) -> dict[str, str]:
        """The row columns, filled class by class from the class indexes (``a``: rows, lens, shard_start; taken
        and freed); the resolved keys by row."""
        rows = a.pop("rows")
        n = len(rows)
        np.save(d / "shard_start.npy", a.pop("shard_start"))
        np.save(d / "tar_stat.npy", self.stats)
        np.save(d / "label.npy", _class_of(self.cls, rows).astype(np.int32))
        name_end = np.cumsum(a.pop("lens")[rows], dtype=np.int64)
        np.save(d / "name_end.npy", name_end)
        pos = np.empty(n, dtype=np.int32)  # global item id -> row
        pos[rows] = np.arange(n, dtype=np.int32)
        del rows
        keys = {str(int(pos[g])): k for g, k in sorted(self.keys.items())}
        # Two passes over the class indexes, so that only one set of output columns is held at a time.
        offset, size = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
        for listing, keep, r in self._classes(pos, "offsets and sizes"):
            offset[r], size[r] = listing.offsets[keep], listing.sizes[keep]
        np.save(d / "offset.npy", offset)
        np.save(d / "size.npy", size)
        del offset, size
        names = np.empty(int(name_end[-1]) if n else 0, dtype=np.uint8)
        for listing, keep, r in self._classes(pos, "names"):
            # Each kept name's bytes go where its row's name ends: (bytes,) index arrays for the class.
            src_end = listing.ends[keep]
            length = src_end - np.concatenate([[0], listing.ends])[keep]
            within = np.arange(int(length.sum())) - np.repeat(np.cumsum(length) - length, length)
            dst = np.repeat(name_end[r] - length, length) + within
            names[dst] = listing.blob[np.repeat(src_end - length, length) + within]
        with open(d / "names.bin", "wb") as f:
            f.write(names.data)
        for p in d.iterdir():
            fsync_path(p)
        return keys

    def _classes(self, pos: np.ndarray, what: str) -> Iterable[tuple[Listing, np.ndarray, np.ndarray]]:
        """(a class's index with names undecoded, listing indices of its candidates, their rows), class by class."""
        with Progress(f"plan: {what}", len(self.cls.ids), "classes") as progress:
            yield from self._each_class(pos, progress)

    def _each_class(self, pos: np.ndarray, progress: Progress) -> Iterable[tuple[Listing, np.ndarray, np.ndarray]]:
        for c, class_id in enumerate(self.cls.ids):
            progress.update(1)
            listing = _listing(self.cache, class_id, self.stat(c), decode=False)
            keep = np.ones(len(listing.sizes), dtype=bool)
            keep[self.cls.excluded[c]] = False
            keep = np.flatnonzero(keep)
            yield listing, keep, pos[self.cls.start[c] : self.cls.start[c + 1]]


def digest_shards(task: tuple[str, str, int, int]) -> list[str]:
    """Job digests of shards [a, b) of the plan in directory ``d`` (a worker's share of the planning's last step)."""
    d, salt, a, b = task
    plan = open_plan(d)
    names = plan.names
    return [job_digest(names[k], plan.rows(k), salt) for k in range(a, b)]


def fingerprint(
    src: Path, layout: str, class_ids: list[str], stats: np.ndarray, opts: Options, top: list[dict[str, str]]
) -> str | None:
    """What a plan was made from (names, sizes and mtimes of the tars, other entries of SRC, the options); None
    for folders, which cannot be checked without listing every file."""
    if layout != "synset-tars":
        return None
    h = hashlib.sha256(json.dumps([PLAN_VERSION, str(src.resolve()), layout, asdict(opts), top]).encode())
    for c, s in zip(class_ids, stats.tolist()):
        h.update(f"{c}\t{s[0]}\t{s[1]}\n".encode())
    return h.hexdigest()


def make_plan(
    src: Path,
    work: Path,
    layout: str,
    class_ids: list[str],
    top_skipped: list[dict[str, str]],
    opts: Options,
    mapper: Callable,
    progress: Any,
    stats: Counts,
) -> Plan:
    """Make the plan of ``src`` in ``work`` (or keep the committed one when its inputs are unchanged); the Plan.

    ``mapper(f, tasks)`` runs tasks in order (``pool.imap``); ``progress`` counts classes indexed; ``stats``
    receives the index pass's I/O counts."""
    work.mkdir(parents=True, exist_ok=True)
    planner = Planner(src, work, layout, class_ids, opts, mapper)
    fp = fingerprint(src, layout, class_ids, planner.stats, opts, top_skipped)
    if fp is not None and (old := _committed(work)) is not None and old.info.get("fingerprint") == fp:
        progress.close()
        log.info("plan: kept %s (the tars and the options are unchanged)", work / PLAN_NAME)
        return old
    for leftover in work.glob(".plan-*"):  # a killed run's
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in (work / "sources").glob(".*.tmp"):
        leftover.unlink(missing_ok=True)
    tmp, summary = planner.build(progress)
    stats.update(planner.count)
    info = {
        "version": PLAN_VERSION,
        "fingerprint": fp,
        "source": str(src.resolve()),
        "layout": layout,
        "options": asdict(opts),
        "classes": class_ids,
        **summary,
        "skipped": top_skipped + planner.skipped,
        "counts": {k: int(v) for k, v in sorted(planner.count.items())},
    }
    plan = _commit(work, tmp, info, opts.salt, mapper, stats)
    sh, sa = summary["shards"], summary["samples"]
    log.info("plan: %d train + %d val shards, %d + %d samples, in %s", sh["train"], sh["val"], sa["train"], sa["val"],
             plan.dir)  # fmt: skip
    return plan


def _committed(work: Path) -> Plan | None:
    try:
        return Plan.load(work)
    except (OSError, ValueError):
        return None


def _commit(work: Path, tmp: Path, info: dict[str, Any], salt: str, mapper: Callable, stats: Counts) -> Plan:
    """Digest every shard job (in the workers), move the columns to ``plan-<digest>`` and write plan.json last:
    readers see the previous plan or the whole new one."""
    (tmp / "summary.json").write_text(json.dumps(info))
    total = info["shards"]["train"] + info["shards"]["val"]
    step = max(1, -(-total // 256))
    jobs: list[str] = []
    with Progress("plan: job digests", total, "shards") as digests:
        for part in mapper(digest_shards, [(str(tmp), salt, a, min(a + step, total)) for a in range(0, total, step)]):
            jobs += part
            digests.update(len(part))
    digest = hashlib.sha256("".join(jobs).encode()).hexdigest()
    final = work / f"plan-{digest[:16]}"
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    info = {**info, "dir": final.name, "digest": digest, "jobs": jobs}
    (final / "summary.json").write_text(json.dumps(info))
    fsync_path(final / "summary.json")
    write_json_atomic(work / PLAN_NAME, info)
    stats["manifest_bytes"] += (work / PLAN_NAME).stat().st_size + (final / "summary.json").stat().st_size
    for stale in work.glob("plan-*"):
        if stale != final:
            shutil.rmtree(stale, ignore_errors=True)
    return Plan(final, info)
