"""The data position of a whole job, as a checkpoint keeps it, and where a resumed job continues from.

Each rank folds what its workers delivered into a :class:`~pipeline.data.loader.StreamPosition`; at a checkpoint
rank 0 gathers them into one record (:func:`job_state`, in state.json): the layout, the plan's origin, and every
slot's position. A job resumed on the same layout continues each stream exactly (bitwise, from its rank file). On
another layout (ranks, workers or micro-batch):

* epoch mode: what the interrupted epoch(s) had left (:func:`pipeline.data.plan.remainder`) is re-split over the
  new slots; every sample of the interrupted epoch is read exactly once, and the epochs after it whole;
* resampled mode: a new generation of streams starts (new draws, no prefix replayed).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigError
from .plan import EpochPlan, Layout, Origin, Shard, remainder


def shards_digest(shards: list[Shard]) -> str:
    """What a data position refers to: the shard names and sizes, in order."""
    h = hashlib.sha1()
    for s in shards:
        h.update(f"{Path(s.url.split()[-1]).name}\t{s.samples}\n".encode())
    return h.hexdigest()


def job_state(per_rank: list[dict[str, Any]], layout: Layout, *, mode: str, seed: int, window: int,
              shards: list[Shard], origin: Origin, generation: int) -> dict[str, Any]:  # fmt: skip
    """One record of every slot's position (slot = rank x workers + worker), from each rank's state_dict."""
    slots = []
    for rank_state in per_rank:
        streams = rank_state["streams"]
        slots += [list(streams.get(str(w), [0, 0])) for w in range(layout.workers)]
    return {
        "mode": mode,
        "layout": layout.as_dict(),
        "seed": seed,
        "window": window,
        "shards": {
            "count": len(shards),
            "samples": sum(s.samples or 0 for s in shards),
            "digest": shards_digest(shards),
        },  # fmt: skip
        "origin": origin.as_dict(),
        "generation": generation,
        "last_worker": per_rank[0].get("last_worker"),
        "slots": slots,
        "skipped": sum(r.get("skipped", 0) for r in per_rank),
        "seen": sum(r.get("seen", 0) for r in per_rank),
    }


@dataclass(frozen=True)
class Continuation:
    """How a resumed job's data stream starts: from the rank files (``same_layout``), or from ``origin`` /
    ``generation`` on a new layout; ``summary`` says which, for the log."""

    same_layout: bool
    origin: Origin
    generation: int
    summary: str


def continue_from(saved: dict[str, Any], shards: list[Shard], layout: Layout, mode: str, window: int,
                  seed: int) -> Continuation:  # fmt: skip
    """Where this job's data continues, given the checkpoint's :func:`job_state`; ConfigError when it cannot."""
    if saved["mode"] != mode:
        raise ConfigError(f"data.mode: the checkpoint was written in {saved['mode']} mode; resume in that mode")
    if saved["shards"]["digest"] != shards_digest(shards) or saved["seed"] != seed:
        raise ConfigError(
            f"data.train / train.seed: not the shards and seed the checkpoint's data position refers to "
            f"({saved['shards']['count']} shards, {saved['shards']['samples']} samples, seed {saved['seed']}); "
            "resume with those, or set run.resume=none"
        )
    old = Layout(**saved["layout"])
    origin = Origin.from_dict(saved["origin"])
    if old == layout and saved["window"] == window:
        return Continuation(True, origin, saved["generation"], "each stream continues where it stopped")
    moved = f"{old.world_size} ranks x {old.workers} workers -> {layout.world_size} x {layout.workers}"
    if mode == "resampled":
        generation = saved["generation"] + 1
        return Continuation(False, origin, generation, f"{moved}: new resampled streams (generation {generation})")
    plan = EpochPlan([s.samples for s in shards], old, seed, origin)
    positions = {i: (int(k), int(c)) for i, (k, c) in enumerate(saved["slots"])}
    left = remainder(plan, positions, saved["window"])
    samples = sum(p.count for _, pieces in left.segments for p in pieces)
    epochs = ", ".join(str(e) for e, _ in left.segments) or "none"
    summary = f"{moved}: {samples} unread samples of epoch(s) {epochs} re-split, then epoch {left.epoch} on"
    return Continuation(False, left, 0, summary)
