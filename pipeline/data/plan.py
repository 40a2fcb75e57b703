"""Which shards each (rank, worker) slot reads, and in what order: pure functions of the shard list, the
world and the seed, so every rank computes the same plan without communicating.

* epoch mode: shards are dealt to slots balanced by sample count; every sample is read exactly once per
  epoch, and batch sizes are planned so every rank yields the same number of batches.
* resampled mode: slot ``s`` reads an endless sequence of chunks; chunk ``i`` is a shard drawn with
  replacement by an RNG seeded with ``(seed, s, i)``.

A slot's stream is a sequence of chunks (one shard each, shuffled inside by a seeded buffer), so a
position is ``(chunk, offset)``: resuming re-reads at most one shard.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int | None = None  # from the manifest; needed by epoch mode


@dataclass(frozen=True)
class SlotPlan:
    shards: list[Shard]  # in reading order
    batch_sizes: list[int]  # epoch mode: the batches this slot yields; empty in resampled mode


def chunk_rng(seed: int, epoch: int, slot: int, chunk: int) -> random.Random:
    """The RNG of one chunk; seeding with a string hashes it with SHA-512, the same in every process."""
    return random.Random(f"{seed}/{epoch}/{slot}/{chunk}")


def epoch_plan(
    shards: list[Shard], world_size: int, workers: int, batch_size: int, seed: int, epoch: int
) -> list[SlotPlan]:
    """Plans for all ``world_size * workers`` slots (slot = rank * workers + worker)."""
    slots = world_size * workers
    if len(shards) < slots:
        raise ValueError(
            f"epoch mode needs at least ranks x workers = {world_size} x {workers} = {slots} shards, "
            f"got {len(shards)}; use fewer data workers or write smaller shards"
        )
    unknown = [s.url for s in shards if s.samples is None]
    if unknown:
        raise ValueError(f"epoch mode needs per-shard sample counts (a manifest.json); none for {unknown[0]}")
    order = list(shards)
    chunk_rng(seed, epoch, -1, -1).shuffle(order)
    # Largest first onto the least-loaded slot: loads differ by at most one shard's samples.
    heap = [(0, s) for s in range(slots)]
    assigned: list[list[Shard]] = [[] for _ in range(slots)]
    for shard in sorted(order, key=lambda s: -s.samples):
        load, s = heapq.heappop(heap)
        assigned[s].append(shard)
        heapq.heappush(heap, (load + shard.samples, s))
    position = {id(x): i for i, x in enumerate(order)}
    for a in assigned:  # reading order: the epoch's shuffled order, not size order
        a.sort(key=lambda x: position[id(x)])
    sizes = [sum(x.samples for x in a) for a in assigned]
    per_rank = [sizes[r * workers : (r + 1) * workers] for r in range(world_size)]
    batches = max(sum(-(-n // batch_size) for n in ranks) for ranks in per_rank)  # every rank yields this many
    fewest = min(sum(n) for n in per_rank)
    if batches > fewest:
        raise ValueError(
            f"epoch mode cannot give every rank {batches} non-empty batches: one rank has only "
            f"{fewest} samples; use a smaller world size, fewer workers or more data"
        )
    plans = []
    for r in range(world_size):
        counts = _batches_per_worker(per_rank[r], batch_size, batches)
        for w in range(workers):
            n, k = per_rank[r][w], counts[w]
            plans.append(SlotPlan(assigned[r * workers + w], [n // k + (i < n % k) for i in range(k)] if k else []))
    return plans


def _batches_per_worker(samples: list[int], batch_size: int, total: int) -> list[int]:
    """Split ``total`` batches among workers: each gets at least ceil(n / batch_size), at most n."""
    counts = [-(-n // batch_size) for n in samples]
    for _ in range(total - sum(counts)):
        # give the extra batch to the worker whose batches are fullest
        w = max((i for i in range(len(samples)) if counts[i] < samples[i]), key=lambda i: samples[i] / counts[i])
        counts[w] += 1
    return counts


def resampled_shard(shards: list[Shard], seed: int, slot: int, chunk: int) -> Shard:
    return shards[chunk_rng(seed, -1, slot, chunk).randrange(len(shards))]


def round_robin_next(last_worker: int | None, workers: int) -> int:
    """The virtual worker whose batch a DataLoader delivers after ``last_worker``'s."""
    return 0 if last_worker is None else (last_worker + 1) % workers
