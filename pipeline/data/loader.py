"""Streaming WebDataset loader.

Stages, per DataLoader worker: shard list -> this slot's plan (node + worker split, :mod:`plan`) ->
tar reading (webdataset's ``tarfile_samples``: local paths, ``pipe:`` URLs) -> seeded shuffle inside each
shard -> decode (bad samples skipped and counted) -> transform -> batch.

Every batch carries ``meta``: the (virtual) worker that made it and that worker's stream position after
it. :class:`StreamPosition` folds those into a state a checkpoint stores; a loader built with that state
continues exactly where the consumed batches ended (no replay, same order as an uninterrupted run).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import random
import re
import signal
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls
from webdataset.tariterators import tarfile_samples

from ..lifecycle import die_with_parent
from .manifest import MANIFEST_NAME, read_manifest
from .plan import Shard, chunk_rng, epoch_plan, resampled_shard, round_robin_next

logger = logging.getLogger(__name__)

MODES = ("epoch", "resampled")
_SHARD_NAME = re.compile(r"((?:train|val)-\d{6}\.tar)")
_DECODE_ERRORS = (OSError, ValueError, KeyError, SyntaxError, Image.DecompressionBombError)


def list_shards(urls: str | Sequence[str], manifest: str | Path | None = None, split: str = "train") -> list[Shard]:
    """Shards from a shard directory (its manifest.json), a brace pattern / '::'-joined string / list of
    URLs (``pipe:`` commands included), with sample counts from ``manifest`` when given."""
    if isinstance(urls, (str, Path)) and Path(urls).is_dir():
        directory = Path(urls)
        entries = read_manifest(manifest or directory / MANIFEST_NAME)["splits"].get(split)
        if not entries or not entries["shards"]:
            raise ValueError(f"{directory}: the manifest lists no '{split}' shards")
        shards = [Shard(str(directory / e["name"]), e["samples"]) for e in entries["shards"]]
    else:
        expanded = expand_urls(urls) if isinstance(urls, str) else [str(u) for u in urls]
        counts = {}
        if manifest is not None:
            for split_entry in read_manifest(manifest)["splits"].values():
                counts.update({e["name"]: e["samples"] for e in split_entry["shards"]})
        shards = []
        for url in expanded:
            m = _SHARD_NAME.search(url)
            if manifest is not None and (m is None or m.group(1) not in counts):
                raise ValueError(f"shard {url} is not in {manifest}")
            shards.append(Shard(url, counts[m.group(1)] if manifest is not None else None))
    if not shards:
        raise ValueError(f"no shards in {urls!r}")
    missing = [
        s.url for s in shards if "://" not in s.url and not s.url.startswith("pipe:") and not Path(s.url).is_file()
    ]
    if missing:
        raise FileNotFoundError(
            f"shard not found: {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    return shards


def decode_sample(sample: dict[str, Any]) -> tuple[Image.Image, int]:
    """A shard sample -> (RGB image, class index). Raises on anything unusable."""
    image = Image.open(io.BytesIO(sample["jpg"]))
    image.load()  # decodes fully, so truncated data raises here
    if image.mode != "RGB":  # convert() copies even when the mode is already RGB (~20% of decode time)
        image = image.convert("RGB")
    return image, int(sample["cls"])


def seed_augmentation(*position: int) -> None:
    """Seed the global RNGs that timm/torchvision transforms draw from with the sample's position, so
    augmentation is a function of the data order alone: identical after a resume, whatever the workers' seeds."""
    seed = zlib.crc32("/".join(map(str, position)).encode())
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

    ``workers`` must equal the DataLoader's ``num_workers`` (0 = the main process); ``state`` comes from
    :meth:`StreamPosition.state_dict` of a run with the same world size and workers.
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
        epoch: int = 0,
        state: dict[str, Any] | None = None,
        decode: Callable[[dict[str, Any]], tuple[Image.Image, int]] = decode_sample,
    ):
        if mode not in MODES:
            raise ValueError(f"data mode must be one of {MODES}, got {mode!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.shards, self.mode, self.batch_size, self.transform = shards, mode, batch_size, transform
        self.num_workers = workers  # the DataLoader's (0: main process)
        self.rank, self.world_size, self.workers, self.seed = rank, world_size, max(workers, 1), seed
        self.shuffle_buffer, self.decode = shuffle_buffer, decode
        self.epoch = epoch
        self.plans = None
        if mode == "epoch":  # validates now, in the main process, rather than in a worker
            self.plans = epoch_plan(shards, world_size, self.workers, batch_size, seed, epoch)
        self.start: dict[int, dict[str, int]] = {}
        self.first_worker = 0
        if state is not None:
            self.load_state(state)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.start, self.first_worker = epoch, {}, 0
            if self.mode == "epoch":
                self.plans = epoch_plan(self.shards, self.world_size, self.workers, self.batch_size, self.seed, epoch)

    def load_state(self, state: dict[str, Any]) -> None:
        if state.get("workers") != self.workers or state.get("mode") != self.mode:
            raise ValueError(
                f"data state was saved with mode={state.get('mode')} workers={state.get('workers')}; "
                f"this loader has mode={self.mode} workers={self.workers}"
            )
        self.set_epoch(state["epoch"])
        self.start = {int(w): dict(p) for w, p in state["streams"].items()}
        self.first_worker = round_robin_next(state.get("last_worker"), self.workers)

    # -- one worker's stream --------------------------------------------------------------------------
    def _chunks(self, slot: int, first: int) -> Iterator[tuple[int, Shard]]:
        if self.mode == "epoch":
            yield from itertools.islice(enumerate(self.plans[slot].shards), first, None)
        else:
            for chunk in itertools.count(first):
                yield chunk, resampled_shard(self.shards, self.seed, slot, chunk)

    def _shuffled(self, samples: Iterator[dict], rng) -> Iterator[dict]:
        """Seeded buffer shuffle of one shard's samples (still undecoded)."""
        buf: list[dict] = []
        for sample in samples:
            if len(buf) < self.shuffle_buffer:
                buf.append(sample)
                continue
            j = rng.randrange(len(buf))
            buf[j], sample = sample, buf[j]
            yield sample
        rng.shuffle(buf)
        yield from buf

    def _tar_error(self, exn: Exception) -> bool:
        self.skipped += 1
        logger.warning("skipping unreadable shard data: %s", exn)
        return True

    def _samples(self, slot: int, start: dict[str, int]) -> Iterator[tuple[Any, int, int, int]]:
        """(transformed image, label, chunk, offset after it), from ``start`` on."""
        for chunk, shard in self._chunks(slot, start.get("chunk", 0)):
            raw = tarfile_samples(iter([{"url": shard.url}]), handler=self._tar_error)
            if self.shuffle_buffer > 1:
                raw = self._shuffled(raw, chunk_rng(self.seed, self.epoch, slot, chunk))
            skip = start.get("offset", 0) if chunk == start.get("chunk", 0) else 0
            for offset, sample in enumerate(raw, 1):
                if offset <= skip:
                    continue
                try:
                    image, label = self.decode(sample)
                except _DECODE_ERRORS as e:
                    self.skipped += 1
                    logger.warning("skipping sample %s in %s: %s", sample.get("__key__"), shard.url, e)
                    continue
                with _own_rng(get_worker_info() is None):
                    seed_augmentation(self.seed, self.epoch, slot, chunk, offset)
                    image = self.transform(image)
                yield image, label, chunk, offset

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers = info.num_workers if info is not None else 1
        if workers != self.workers:
            raise ValueError(f"ShardStream built for {self.workers} workers but the DataLoader has {workers}")
        return self.iter_worker(info.id if info is not None else 0)

    def iter_worker(self, physical: int) -> Iterator[dict[str, Any]]:
        """The batches of DataLoader worker ``physical`` (a virtual worker after a resume rotation)."""
        worker = (physical + self.first_worker) % self.workers
        slot = self.rank * self.workers + worker
        start = self.start.get(worker, {})
        self.skipped, padded = 0, 0
        samples = self._samples(slot, start)
        sizes = itertools.repeat(self.batch_size)
        if self.mode == "epoch":
            sizes = iter(self.plans[slot].batch_sizes[start.get("batches", 0) :])
        position = dict(start)
        last = None
        for batches, size in enumerate(sizes, start.get("batches", 0) + 1):
            items = list(itertools.islice(samples, size))
            if not items and self.mode == "resampled":
                raise RuntimeError(f"rank {self.rank} worker {worker}: no decodable samples in the shards")
            if items:
                last = items[-1]
                position = {"chunk": last[2], "offset": last[3]}
            if len(items) < size:  # epoch mode, samples lost to decoding errors: keep the batch count
                if last is None:
                    raise RuntimeError(f"rank {self.rank} worker {worker}: no decodable samples to fill a batch")
                padded += size - len(items)
                items += [last] * (size - len(items))
            yield {
                "images": torch.stack([torch.as_tensor(x[0]) for x in items]),
                "labels": torch.tensor([x[1] for x in items], dtype=torch.long),
                "meta": dict(
                    worker=worker, epoch=self.epoch, batches=batches, skipped=self.skipped, padded=padded, **position
                ),
            }


class StreamPosition:
    """Folds the ``meta`` of consumed batches into the state that resumes a :class:`ShardStream`.

    Also sums the workers' skipped/padded counters for metrics (``data/skipped_samples``).
    """

    def __init__(self, mode: str, workers: int, epoch: int = 0):
        self.mode, self.workers = mode, max(workers, 1)
        self.reset(epoch)
        self.skipped_before = 0  # counted by earlier iterators (epochs, or the run before a resume)

    def reset(self, epoch: int) -> None:
        self.epoch, self.streams, self.last_worker, self.counters = epoch, {}, None, {}

    def update(self, meta: dict[str, Any]) -> None:
        w = int(meta["worker"])
        self.streams[w] = {"chunk": int(meta["chunk"]), "offset": int(meta["offset"]), "batches": int(meta["batches"])}
        self.last_worker = w
        self.counters[w] = (int(meta["skipped"]), int(meta["padded"]))

    def next_epoch(self) -> None:
        self.skipped_before += sum(s for s, _ in self.counters.values())
        self.reset(self.epoch + 1)

    @property
    def skipped(self) -> int:
        return self.skipped_before + sum(s for s, _ in self.counters.values())

    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "workers": self.workers,
            "epoch": self.epoch,
            "last_worker": self.last_worker,
            "streams": {str(w): p for w, p in self.streams.items()},
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.last_worker = state["epoch"], state["last_worker"]
        self.streams = {int(w): dict(p) for w, p in state["streams"].items()}
        self.counters, self.skipped_before = {}, state.get("skipped", 0)


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
