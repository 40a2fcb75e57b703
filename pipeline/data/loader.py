"""Streaming WebDataset loader.

Stages, per DataLoader worker: this slot's plan (:mod:`plan`: node and worker split, epoch segments or resampled
chunks) -> pieces of shards read window by window (:mod:`reader`: seek with the shard's index, or stream) ->
decode (bad samples skipped and counted) -> transform -> batch.

Every batch carries ``meta``: the (virtual) worker that made it and that worker's stream position after it.
:class:`StreamPosition` folds those into a state a checkpoint stores; a loader built with that state continues
exactly where the consumed batches ended (no replay, same order as an uninterrupted run).

Bad data never loops: a shard whose samples lack the image or label key is an error naming the shard and the
keys it has, after a few samples; a worker that skips more than ``max_skip_fraction`` of what it reads (after
at least :data:`MIN_SKIPS_TO_JUDGE` skips) stops the run with the counts.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import itertools
import json
import logging
import multiprocessing
import random
import signal
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..lifecycle import die_with_parent
from .plan import EpochPlan, Layout, Origin, Piece, Shard, resampled_shard, round_robin_next, window_key
from .reader import ShardError, ShardReader, read_piece

logger = logging.getLogger(__name__)

MODES = ("epoch", "resampled")
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
MISSING_KEYS_LIMIT = 3  # consecutive samples of a shard without the image or label key: the shard is wrong
MIN_SKIPS_TO_JUDGE = 20  # skipped samples before the skip fraction is judged (a few bad images in a row are data)
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class DataError(RuntimeError):
    """Data that cannot train: a shard with the wrong keys, or too many bad samples."""


class BadSample(ValueError):
    """One sample that cannot be used (skipped and counted)."""


@dataclass(frozen=True)
class SampleFormat:
    """Where a sample keeps its image and label. ``image_key``: a key, or ``auto`` for the first of
    :data:`IMAGE_KEYS`; ``label_key``: a key holding the class index as text (``cls``), or ``json:FIELD`` for a
    field of the sample's JSON (timm's sets: ``json:label``)."""

    image_key: str = "auto"
    label_key: str = "cls"
    num_classes: int | None = None

    def image_bytes(self, sample: dict[str, Any]) -> bytes | None:
        if self.image_key != "auto":
            return sample.get(self.image_key)
        return next((sample[k] for k in IMAGE_KEYS if k in sample), None)

    def has_keys(self, sample: dict[str, Any]) -> bool:
        label = self.label_key.split(":", 1)[0]
        return self.image_bytes(sample) is not None and label in sample

    def expected(self) -> str:
        image = "|".join(IMAGE_KEYS) if self.image_key == "auto" else self.image_key
        return f"an image ({image}) and a label ({self.label_key})"

    def decode(self, sample: dict[str, Any]) -> tuple[Image.Image, int]:
        """A sample -> (RGB image, class index); BadSample for anything unusable."""
        try:
            image = Image.open(io.BytesIO(self.image_bytes(sample)))
            image.load()  # decodes fully, so truncated data raises here
            if image.mode != "RGB":  # convert() copies even when the mode is already RGB (~20% of decode time)
                image = image.convert("RGB")
            label = self.label(sample)
        except _DECODE_ERRORS as e:
            raise BadSample(f"{type(e).__name__}: {e}") from None
        if self.num_classes is not None and not 0 <= label < self.num_classes:
            raise BadSample(f"label {label} outside the {self.num_classes} classes")
        return image, label

    def label(self, sample: dict[str, Any]) -> int:
        key, _, field = self.label_key.partition(":")
        if not field:
            return int(sample[key])
        value = json.loads(sample[key])[field]
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{self.label_key} is {value!r}, not a class index")
        return value


def seed_augmentation(*identity: int | str) -> None:
    """Seed the global RNGs that timm/torchvision transforms draw from with the sample's identity, so
    augmentation is a function of the data alone: identical after a resume, on any number of ranks and workers."""
    seed = zlib.crc32("/".join(map(str, identity)).encode())
    random.seed(seed)
    np.random.seed(seed)
    # Not torch.manual_seed: where CUDA is not initialised (DataLoader workers) every call re-queues a lazy
    # CUDA seeding call with a formatted stack trace, ~140 us per sample.
    torch.default_generator.manual_seed(seed)


@contextlib.contextmanager
def _own_rng(restore: bool):
    """In the main process (workers=0), give back the global RNG states the transform's seeding replaced."""
    if not restore:
        yield
        return
    states = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.default_generator.set_state(states[2])


class ShardStream(IterableDataset):
    """Batches from WebDataset shards for one rank; see the module docstring.

    ``workers`` must equal the DataLoader's ``num_workers`` (0 = the main process). Epoch mode reads segment after
    segment forever (``finite``: the first segment only, for evaluation). ``state`` comes from
    :meth:`StreamPosition.state_dict` of a run with the same layout; ``origin`` / ``generation`` start a run
    where another layout left off (:func:`pipeline.data.plan.remainder`).
    """

    def __init__(
        self,
        shards: list[Shard],
        *,
        mode: str,
        batch_size: int,
        transform: Callable[[Image.Image], Any],
        rank: int = 0,
        world_size: int = 1,
        workers: int = 0,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        state: dict[str, Any] | None = None,
        origin: Origin | None = None,
        generation: int = 0,
        finite: bool = False,
        sample_format: SampleFormat | None = None,
        max_skip_fraction: float = 0.05,
    ):
        if mode not in MODES:
            raise ValueError(f"data mode must be one of {MODES}, got {mode!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if finite and mode != "epoch":
            raise ValueError("a finite stream reads one epoch: mode must be 'epoch'")
        self.shards, self.mode, self.transform = shards, mode, transform
        self.num_workers = workers  # the DataLoader's (0: main process)
        self.layout = Layout(world_size, max(workers, 1), batch_size)
        self.rank, self.seed, self.window = rank, seed, shuffle_buffer
        self.generation, self.finite = generation, finite
        self.format, self.max_skip_fraction = sample_format or SampleFormat(), max_skip_fraction
        self.plan = None
        if mode == "epoch":  # validates now, in the main process, rather than in a worker
            unknown = [s.url for s in shards if s.samples is None]
            if unknown:
                raise ValueError(
                    f"epoch mode needs per-shard sample counts (a manifest.json); none for {unknown[0]} "
                    "(dinat-index-shards writes one for existing shards)"
                )
            self.plan = EpochPlan([s.samples for s in shards], self.layout, seed, origin or Origin())
        self.start: dict[int, tuple[int, int]] = {}
        self.first_worker = 0
        if state is not None:
            self.load_state(state)

    @property
    def workers(self) -> int:
        return self.layout.workers

    def load_state(self, state: dict[str, Any]) -> None:
        saved = {k: state.get(k) for k in ("mode", *self.layout.as_dict())}
        mine = {"mode": self.mode, **self.layout.as_dict()}
        if saved != mine:
            as_text = lambda d: " ".join(f"{k}={v}" for k, v in d.items())  # noqa: E731
            raise ValueError(f"data state was saved with {as_text(saved)}; this loader has {as_text(mine)}")
        self.start = {int(w): (int(p[0]), int(p[1])) for w, p in state["streams"].items()}
        self.first_worker = round_robin_next(state.get("last_worker"), self.workers)

    def batches_per_rank(self) -> int:
        """Finite streams: the micro-batches of the fullest rank (every rank must run as many forward passes)."""
        largest = -(-self.plan.epoch_size // self.layout.world_size)
        return -(-largest // self.layout.micro_batch)

    # -- one worker's stream --------------------------------------------------------------------------
    def _pieces(self, slot: int, worker: int, start: tuple[int, int]) -> Iterator[tuple[int, Piece, str, int]]:
        """(stream unit, piece, window key tag, samples of the piece already read) from ``start`` on. Units are
        segments (epoch mode) or chunks (resampled); a position is (unit, samples read in it)."""
        unit, done = start
        units = range(unit, unit + 1) if self.finite else itertools.count(unit)
        for u in units:
            if self.mode == "epoch":
                tag = f"e{self.plan.segment(u).epoch}"
                pieces = self.plan.share(u, self.rank, worker)
            else:
                j = resampled_shard(len(self.shards), self.seed, self.generation, slot, u)
                tag = f"r{self.generation}/{slot}/{u}"
                pieces = [Piece(j, 0, self.shards[j].samples)]
            for piece in pieces:
                if self.mode == "epoch" and done >= piece.count:
                    done -= piece.count
                    continue
                yield u, piece, tag, done
                done = 0
            done = 0

    def _samples(self, slot: int, worker: int, start: tuple[int, int]) -> Iterator[tuple]:
        """(transformed image, label, unit, samples read in it, key, epoch) from ``start`` on; bad samples skipped.
        ``epoch`` is the epoch the sample is read for (-1 in resampled mode)."""
        reader: ShardReader | None = None  # one open shard at a time
        position = start
        for unit, piece, tag, done in self._pieces(slot, worker, start):
            shard = self.shards[piece.shard]
            epoch = self.plan.segment(unit).epoch if self.mode == "epoch" else -1
            if reader is None or reader.shard is not shard:
                if reader is not None:
                    reader.close()
                reader = ShardReader(shard, self._tar_error)
            count = position[1] if position[0] == unit else 0
            missing = 0
            key = lambda s, p=piece, t=tag: window_key(self.seed, t, p.shard, s)  # noqa: E731
            for index, sample in read_piece(reader, piece, self.window, key, done):
                count += 1
                self.seen += 1
                position = (unit, count)
                if not self.format.has_keys(sample):
                    missing += 1
                    self._skip(sample, shard, "missing keys")
                    if missing >= MISSING_KEYS_LIMIT:
                        keys = sorted(k for k in sample if not k.startswith("__"))
                        raise DataError(
                            f"{shard.url}: samples have keys {keys}, not {self.format.expected()}; "
                            "set data.image_key / data.label_key"
                        )
                    continue
                missing = 0
                try:
                    image, label = self.format.decode(sample)
                except BadSample as e:
                    self._skip(sample, shard, str(e))
                    continue
                with _own_rng(get_worker_info() is None):
                    seed_augmentation(self.seed, tag, piece.shard, index)
                    image = self.transform(image)
                yield image, label, unit, count, sample.get("__key__", ""), epoch

    def _skip(self, sample: dict[str, Any], shard: Shard, reason: str) -> None:
        self.skipped += 1
        logger.warning("skipping sample %s in %s: %s", sample.get("__key__"), shard.url, reason)
        if self.skipped >= MIN_SKIPS_TO_JUDGE and self.skipped > self.max_skip_fraction * self.seen:
            raise DataError(
                f"rank {self.rank}: {self.skipped} of {self.seen} samples skipped, more than data.max_skip_fraction "
                f"= {self.max_skip_fraction:g} (last: {sample.get('__key__')} in {shard.url}: {reason})"
            )

    def _tar_error(self, exn: Exception) -> bool:
        if isinstance(exn, ShardError):
            return False
        logger.warning("skipping unreadable shard data: %s", exn)
        return True

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers = info.num_workers if info is not None else 1
        if workers != self.workers:
            raise ValueError(f"ShardStream built for {self.workers} workers but the DataLoader has {workers}")
        return self.iter_worker(info.id if info is not None else 0)

    def iter_worker(self, physical: int) -> Iterator[dict[str, Any]]:
        """The batches of DataLoader worker ``physical`` (a virtual worker after a resume rotation)."""
        worker = (physical + self.first_worker) % self.workers
        slot = self.layout.slot(self.rank, worker)
        start = self.start.get(worker, (0, 0))
        self.skipped = self.seen = 0
        samples = self._samples(slot, worker, start)
        position, size = start, self.layout.micro_batch
        for batches in itertools.count(1):
            items = list(itertools.islice(samples, size))
            if not items:
                if self.finite:
                    return
                raise DataError(f"rank {self.rank} worker {worker}: the shards gave no samples")
            position = items[-1][2:4]
            yield {
                "images": torch.stack([torch.as_tensor(x[0]) for x in items]),
                "labels": torch.tensor([x[1] for x in items], dtype=torch.long),
                "keys": [x[4] for x in items],  # which samples these are, and for which epoch (-1: resampled)
                "epochs": torch.tensor([x[5] for x in items], dtype=torch.long),
                "meta": dict(
                    worker=worker,
                    unit=position[0],
                    count=position[1],
                    batches=batches,
                    skipped=self.skipped,
                    seen=self.seen,
                ),  # fmt: skip
            }
            if len(items) < size:
                return  # a finite stream's last, partial batch


class StreamPosition:
    """Folds the ``meta`` of consumed batches into the state that resumes a :class:`ShardStream`.

    Also sums the workers' skipped/seen counters for metrics (``data/skipped_samples``).
    """

    def __init__(self, mode: str, layout: Layout):
        self.mode, self.layout, self.workers = mode, layout, layout.workers
        self.streams: dict[int, tuple[int, int]] = {}
        self.last_worker: int | None = None
        self.counters: dict[int, tuple[int, int]] = {}
        self.before = (0, 0)  # (skipped, seen) counted before this run (by the run a resume continues)

    def update(self, meta: dict[str, Any]) -> None:
        w = int(meta["worker"])
        self.streams[w] = (int(meta["unit"]), int(meta["count"]))
        self.last_worker = w
        self.counters[w] = (int(meta["skipped"]), int(meta["seen"]))

    @property
    def skipped(self) -> int:
        return self.before[0] + sum(s for s, _ in self.counters.values())

    @property
    def seen(self) -> int:
        return self.before[1] + sum(n for _, n in self.counters.values())

    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            **self.layout.as_dict(),
            "last_worker": self.last_worker,
            "streams": {str(w): list(p) for w, p in self.streams.items()},
            "skipped": self.skipped,
            "seen": self.seen,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_worker = state["last_worker"]
        self.streams = {int(w): (int(p[0]), int(p[1])) for w, p in state["streams"].items()}
        self.counters, self.before = {}, (state.get("skipped", 0), state.get("seen", 0))


def _kill_daemonic_children() -> None:
    """At exit, Python stops daemonic children with TERM and waits for them; DataLoader workers ignore TERM (see
    below), so a program leaving with a live iterator (an exception holds it) would wait forever. Registered after
    multiprocessing's own exit handler, this runs first and kills them instead."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


atexit.register(_kill_daemonic_children)


def _worker_init(_worker_id: int) -> None:
    """Slurm sends TERM (preemption, requeue) to every process of a job step, workers included: they ignore
    it (and USR1), so the main process can checkpoint. The main process kills them when it ends, and the
    kernel kills them if it dies (SIGKILL, OOM) before it can."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    die_with_parent()


def build_loader(dataset: ShardStream, pin_memory: bool = False, prefetch_factor: int = 4) -> DataLoader:
    """A DataLoader over ``dataset`` with the worker count it was planned for (batches are made in workers)."""
    workers = dataset.num_workers
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if workers else None,
        persistent_workers=False,
        worker_init_fn=_worker_init,
        generator=torch.Generator().manual_seed(dataset.seed),  # leaves the global RNG (DropPath, Mixup) alone
    )
