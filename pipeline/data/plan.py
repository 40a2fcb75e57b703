"""Which samples each (rank, worker) slot reads, and in what order: pure functions of the shard sizes, the layout
(ranks, workers per rank, micro-batch) and the seed, so every rank computes its own part without communicating.

Epoch mode
    Epoch ``e`` orders the shards by a permutation seeded with ``(seed, e)``; their samples, shard after shard,
    form the epoch's sequence (positions ``0..N-1``). A run reads a sequence of *segments*: one per epoch, and,
    after a resume on another layout, first what the interrupted epochs had left (:func:`remainder`).

    * Ranks: each segment is cut into contiguous runs, balanced cumulatively over segments: after ``k`` segments
      of ``T`` samples in all, rank ``r`` has been given ``floor((T + r) / W)``. Every rank has the same number of
      samples within one, every micro-batch is full, and ``ceil(epochs * N / global batch)`` steps read every
      epoch exactly once (the last step may start the next one).
    * Workers: micro-batch ``j`` of a rank's stream comes from worker ``j mod K`` (the DataLoader's round robin),
      so a worker gets the contiguous part of the rank's run that holds as many samples as its batches.
    * Order: a worker's run is cut into windows of ``window`` samples from its start; each window is read with
      one sequential read (a shard's sample index gives the byte range) and emitted in a seeded random order.

    A slot's position is ``(segment, samples read in it)``: resuming re-reads at most one window.

Resampled mode
    Slot ``s`` reads an endless sequence of chunks; chunk ``i`` is a whole shard drawn with replacement by an RNG
    seeded with ``(seed, generation, s, i)``, read in windows as above. A resume on another layout starts a new
    generation: new streams, none replaying a prefix.

Cost per rank: a permutation and a cumulative sum over the shards per epoch, and vectors over the ranks and
workers: milliseconds at 1,024 ranks x 16 workers over 20,000 shards (``python -m pipeline.data.plan_benchmark``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property

import numpy as np


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int | None = None  # from the manifest; needed by epoch mode
    index: str | None = None  # its sample index (pipeline.data.index): reads seek instead of reading from the start


@dataclass(frozen=True)
class Layout:
    """How a job reads: ``world_size`` ranks x ``workers`` DataLoader workers each (the main process counts as
    one), ``micro_batch`` samples per batch."""

    world_size: int
    workers: int
    micro_batch: int

    def __post_init__(self):
        if min(self.world_size, self.workers, self.micro_batch) < 1:
            raise ValueError(f"layout needs positive ranks, workers and micro-batch, got {self}")

    def slot(self, rank: int, worker: int) -> int:
        return rank * self.workers + worker

    def as_dict(self) -> dict[str, int]:
        return {"world_size": self.world_size, "workers": self.workers, "micro_batch": self.micro_batch}


@dataclass(frozen=True)
class Piece:
    """Part of a slot's reading. A run (``take`` None): samples ``start..stop-1`` of shard ``shard``, read in
    windows of the plan's window size from ``start``. A window left over by a resume (``key`` set): samples
    ``start..stop-1`` in the order the permutation ``key`` gives them, positions ``skip..skip+take-1`` of it."""

    shard: int
    start: int
    stop: int | None  # None: to the end of a shard whose size is unknown (resampled mode without a manifest)
    key: str | None = None
    skip: int = 0
    take: int | None = None

    @property
    def count(self) -> int:
        return self.stop - self.start if self.take is None else self.take

    def cut(self, a: int, b: int) -> Piece:
        """Positions ``a..b-1`` of this piece's reading order."""
        if self.take is None:
            return Piece(self.shard, self.start + a, self.start + b)
        return Piece(self.shard, self.start, self.stop, self.key, self.skip + a, b - a)

    def as_list(self) -> list:
        return [self.shard, self.start, self.stop, self.key, self.skip, self.take]


def window_key(seed: int, tag: str, shard: int, start: int) -> str:
    """The permutation key of the window that starts at sample ``start`` of ``shard``."""
    return f"{seed}/{tag}/{shard}/{start}"


def permutation(key: str, n: int) -> list[int]:
    """A seeded order of ``range(n)``; seeding with a string hashes it (SHA-512): the same in every process."""
    order = list(range(n))
    random.Random(key).shuffle(order)
    return order


# -- epochs and segments -------------------------------------------------------------------------------------------


class Segment:
    """What a run reads in one pass: pieces in order, addressed by position ``0..total-1``."""

    epoch: int
    total: int

    def pieces(self, a: int, b: int) -> list[Piece]:  # pragma: no cover - interface
        raise NotImplementedError


class EpochSegment(Segment):
    """A whole epoch: every shard, in the epoch's permuted order."""

    def __init__(self, counts: np.ndarray, seed: int, epoch: int):
        self.counts, self.seed, self.epoch = counts, seed, epoch
        self.total = int(counts.sum())

    @cached_property
    def order(self) -> np.ndarray:
        order = list(range(len(self.counts)))
        random.Random(f"{self.seed}/epoch/{self.epoch}").shuffle(order)  # the same in every process and version
        return np.asarray(order, dtype=np.int64)

    @cached_property
    def ends(self) -> np.ndarray:
        return np.cumsum(self.counts[self.order])  # (shards,) position after each shard of the order

    def pieces(self, a: int, b: int) -> list[Piece]:
        out = []
        i = int(np.searchsorted(self.ends, a, side="right"))
        while a < b:
            shard, end = int(self.order[i]), int(self.ends[i])
            begin = end - int(self.counts[shard])
            stop = min(b, end)
            if stop > a:
                out.append(Piece(shard, a - begin, stop - begin))
            a, i = stop, i + 1
        return out


class ListSegment(Segment):
    """Explicit pieces: what an interrupted epoch had left when a run resumed on another layout."""

    def __init__(self, pieces: list[Piece], epoch: int):
        self.piece_list, self.epoch = pieces, epoch
        self.ends = np.cumsum([p.count for p in pieces], dtype=np.int64)
        self.total = int(self.ends[-1]) if len(pieces) else 0

    def pieces(self, a: int, b: int) -> list[Piece]:
        out = []
        i = int(np.searchsorted(self.ends, a, side="right"))
        while a < b:
            p, end = self.piece_list[i], int(self.ends[i])
            begin = end - p.count
            stop = min(b, end)
            if stop > a:
                out.append(p.cut(a - begin, stop - begin))
            a, i = stop, i + 1
        return out


@dataclass(frozen=True)
class Origin:
    """Where a run's segments start: ``segments`` left over by an interrupted layout, then whole epochs from
    ``epoch`` on. A fresh run: no leftovers, epoch 0."""

    epoch: int = 0
    segments: tuple[tuple[int, tuple[Piece, ...]], ...] = ()  # (epoch, pieces)

    def as_dict(self) -> dict:
        return {"epoch": self.epoch, "segments": [[e, [p.as_list() for p in ps]] for e, ps in self.segments]}

    @staticmethod
    def from_dict(d: dict) -> Origin:
        segments = tuple((int(e), tuple(Piece(*p) for p in ps)) for e, ps in d["segments"])
        return Origin(int(d["epoch"]), segments)


def batch_quota(x: int, micro: int, workers: int) -> np.ndarray:
    """(workers,) how many of a rank stream's first ``x`` positions fall in each worker's micro-batches
    (micro-batch ``j`` = positions ``j*micro..``, made by worker ``j mod workers``)."""
    period = micro * workers
    v = np.arange(workers, dtype=np.int64)
    return (x // period) * micro + np.clip(x % period - v * micro, 0, micro)


class EpochPlan:
    """The epoch-mode plan of one job: segment by segment, each rank's and each worker's share."""

    def __init__(self, counts: list[int] | np.ndarray, layout: Layout, seed: int, origin: Origin | None = None):
        self.counts = np.asarray(counts, dtype=np.int64)
        if (self.counts < 0).any() or not len(self.counts):
            raise ValueError("epoch mode needs the sample count of every shard")
        self.layout, self.seed, self.origin = layout, seed, origin or Origin()
        self.epoch_size = int(self.counts.sum())
        if self.epoch_size < 1:
            raise ValueError("epoch mode: the shards hold no samples")
        self._leftovers = [ListSegment(list(ps), e) for e, ps in self.origin.segments]
        self._before = np.concatenate([[0], np.cumsum([s.total for s in self._leftovers], dtype=np.int64)])
        self._rank_cuts: dict[int, np.ndarray] = {}
        self._epochs: dict[int, EpochSegment] = {}

    def segment(self, k: int) -> Segment:
        if k < len(self._leftovers):
            return self._leftovers[k]
        if k not in self._epochs:  # keep the last two: a slot reads at most two segments at a time
            self._epochs = {j: s for j, s in self._epochs.items() if j >= k - 1}
            self._epochs[k] = EpochSegment(self.counts, self.seed, self.origin.epoch + k - len(self._leftovers))
        return self._epochs[k]

    def start_of(self, k: int) -> int:
        """Samples in all segments before ``k`` (the run's cumulative position where segment ``k`` begins)."""
        n = len(self._leftovers)
        return int(self._before[k]) if k <= n else int(self._before[n]) + (k - n) * self.epoch_size

    def segment_of(self, epoch: int) -> int:
        """The segment index that reads epoch ``epoch`` whole (epochs after the leftovers)."""
        return len(self._leftovers) + epoch - self.origin.epoch

    def rank_cuts(self, k: int) -> np.ndarray:
        """(world + 1,) where each rank's run of segment ``k`` starts (positions in the segment)."""
        if k not in self._rank_cuts:
            w = self.layout.world_size
            r = np.arange(w, dtype=np.int64)
            given = (self.start_of(k + 1) + r) // w - (self.start_of(k) + r) // w  # (world,)
            self._rank_cuts = {k: np.concatenate([[0], np.cumsum(given)])}  # the segment at hand only
        return self._rank_cuts[k]

    def worker_cuts(self, k: int, rank: int) -> np.ndarray:
        """(workers + 1,) where each worker's run of segment ``k`` starts, for ``rank`` (positions in the segment)."""
        w, m, nw = self.layout.world_size, self.layout.micro_batch, self.layout.workers
        before, after = (self.start_of(k) + rank) // w, (self.start_of(k + 1) + rank) // w  # in the rank's stream
        quota = batch_quota(after, m, nw) - batch_quota(before, m, nw)  # (workers,)
        return int(self.rank_cuts(k)[rank]) + np.concatenate([[0], np.cumsum(quota)])

    def share(self, k: int, rank: int, worker: int) -> list[Piece]:
        """What slot (``rank``, ``worker``) reads of segment ``k``, in order."""
        cuts = self.worker_cuts(k, rank)
        return self.segment(k).pieces(int(cuts[worker]), int(cuts[worker + 1]))

    def share_size(self, k: int, rank: int, worker: int) -> int:
        cuts = self.worker_cuts(k, rank)
        return int(cuts[worker + 1] - cuts[worker])

    def steps_for(self, epochs: float, global_batch: int) -> int:
        """Optimizer steps that read ``epochs`` epochs: every sample of each once (the last step may start the
        next epoch)."""
        return max(1, -(-int(round(epochs * self.epoch_size)) // global_batch))


def remainder(plan: EpochPlan, positions: dict[int, tuple[int, int]], window: int) -> Origin:
    """What the run described by ``plan`` has left to read, given each slot's position ``(segment, samples read)``
    (slot = rank x workers + worker): the open segments' unread pieces, then the epochs no slot has started.
    The samples read are the first ones of each slot's share in reading order (windows in permuted order)."""
    layout = plan.layout
    first = min(k for k, _ in positions.values())
    last = max(k for k, _ in positions.values())
    left: dict[int, list[Piece]] = {k: [] for k in range(first, last + 1)}
    for rank in range(layout.world_size):
        for worker in range(layout.workers):
            k, done = positions[layout.slot(rank, worker)]
            for seg in range(first, last + 1):
                share = plan.share(seg, rank, worker)
                if seg < k:
                    continue
                left[seg] += share if seg > k else _unread(share, done, window, plan.seed, plan.segment(seg).epoch)
    segments = tuple((plan.segment(k).epoch, tuple(left[k])) for k in range(first, last + 1) if left[k])
    return Origin(plan.segment(last).epoch + 1, segments)


def _unread(share: list[Piece], done: int, window: int, seed: int, epoch: int) -> list[Piece]:
    """The pieces of ``share`` after its first ``done`` samples in reading order."""
    out: list[Piece] = []
    for p in share:
        if done >= p.count:
            done -= p.count
            continue
        if done == 0:
            out.append(p)
        elif window <= 1 and p.take is None:  # read in order: the rest of the run
            out.append(Piece(p.shard, p.start + done, p.stop))
        elif p.take is not None:  # a leftover window: further along its permutation
            out.append(p.cut(done, p.count))
        else:  # a run: whole windows read, then the current window's tail, then the rest of the run
            w = window
            start = p.start + done // w * w
            stop = min(start + w, p.stop)
            into = done % w
            if into:
                key = window_key(seed, f"e{epoch}", p.shard, start)
                out.append(Piece(p.shard, start, stop, key, into, stop - start - into))
                start = stop
            if start < p.stop:
                out.append(Piece(p.shard, start, p.stop))
        done = 0
    return out


# -- resampled mode ---------------------------------------------------------------------------------------------------


def resampled_shard(num_shards: int, seed: int, generation: int, slot: int, chunk: int) -> int:
    """The shard that chunk ``chunk`` of slot ``slot`` reads."""
    return random.Random(f"{seed}/r{generation}/{slot}/{chunk}").randrange(num_shards)


def round_robin_next(last_worker: int | None, workers: int) -> int:
    """The virtual worker whose batch a DataLoader delivers after ``last_worker``'s."""
    return 0 if last_worker is None else (last_worker + 1) % workers


# -- evaluation -------------------------------------------------------------------------------------------------------


def eval_plan(counts: list[int] | np.ndarray, layout: Layout) -> EpochPlan:
    """Evaluation reads the split once, in shard order, split over ranks and workers like a training epoch."""
    return EpochPlan(counts, layout, seed=0, origin=Origin(epoch=0))


def eval_batches(plan: EpochPlan) -> int:
    """Micro-batches the fullest rank makes of the split: every rank runs this many forward passes (the ones
    short of data run padding), which ZeRO-3's collective forward needs."""
    largest = -(-plan.epoch_size // plan.layout.world_size)
    return -(-largest // plan.layout.micro_batch)
