"""The data position across a resume on another layout (planning only, fabricated shard sizes): what the
interrupted epoch had left is read exactly once by the new ranks and workers, and later epochs whole."""

from collections import Counter

import numpy as np
import pytest

from pipeline.data.plan import EpochPlan, Layout, Piece, Shard, permutation, remainder, window_key
from pipeline.data.resume import continue_from, job_state

WINDOW = 7


def reading_order(plan: EpochPlan, k: int, rank: int, worker: int) -> list[tuple[int, int]]:
    """(shard, sample) in the order slot (rank, worker) reads segment ``k``: windows from each run's start,
    each in its permutation; a leftover window in its own permutation (what the reader does, spelled out)."""
    out = []
    for p in plan.share(k, rank, worker):
        if p.key is not None:
            order = permutation(p.key, p.stop - p.start)[p.skip : p.skip + p.take]
            out += [(p.shard, p.start + i) for i in order]
            continue
        for start in range(p.start, p.stop, WINDOW):
            end = min(start + WINDOW, p.stop)
            key = window_key(plan.seed, f"e{plan.segment(k).epoch}", p.shard, start)
            out += [(p.shard, start + i) for i in permutation(key, end - start)]
    return out


def consume(plan: EpochPlan, micro_batches: int) -> tuple[dict[int, tuple[int, int]], Counter]:
    """Every rank trains ``micro_batches`` micro-batches (round robin over its workers): each slot's position
    (segment, samples read) and the (epoch, shard, sample) it read."""
    layout, positions, read = plan.layout, {}, Counter()
    for rank in range(layout.world_size):
        for worker in range(layout.workers):
            todo = len(range(worker, micro_batches, layout.workers)) * layout.micro_batch
            k = 0
            while todo > plan.share_size(k, rank, worker):  # whole segments first
                order = reading_order(plan, k, rank, worker)
                read.update((plan.segment(k).epoch, *s) for s in order)
                todo -= len(order)
                k += 1
            order = reading_order(plan, k, rank, worker)[:todo]
            read.update((plan.segment(k).epoch, *s) for s in order)
            positions[layout.slot(rank, worker)] = (k, todo)
    return positions, read


@pytest.mark.parametrize(
    "old,new,batches",
    [((4, 3, 5), (1, 1, 20), 7), ((8, 2, 4), (3, 5, 3), 40), ((3, 1, 6), (8, 4, 2), 5), ((16, 3, 8), (7, 2, 4), 31)],
)
def test_an_interrupted_epoch_is_finished_exactly_once_on_another_layout(old, new, batches):
    counts = np.random.default_rng(sum(old)).integers(1, 60, size=41)
    first = EpochPlan(counts, Layout(*old), seed=9)
    positions, read = consume(first, batches)
    left = remainder(first, positions, WINDOW)
    second = EpochPlan(counts, Layout(*new), seed=9, origin=left)
    for k in range(len(left.segments) + 1):  # the leftovers, then one whole epoch
        for rank in range(second.layout.world_size):
            for worker in range(second.layout.workers):
                read.update((second.segment(k).epoch, *s) for s in reading_order(second, k, rank, worker))
    epochs = sorted({e for e, _, _ in read})
    everything = Counter((s, i) for s, c in enumerate(counts) for i in range(c))
    for epoch in range(left.epoch + 1):
        assert Counter((s, i) for e, s, i in read.elements() if e == epoch) == everything, epoch
    assert epochs == list(range(left.epoch + 1))


def test_remainder_at_imagenet22k_scale():
    """512 ranks x 10 workers -> 1,024 x 16, 20,000 shards, 14.2M samples: the leftovers hold exactly what was not
    read (each rank computes them once at a resume; 0.4 s here)."""
    counts = np.random.default_rng(1).multinomial(14_197_122, np.full(20_000, 1 / 20_000))
    plan = EpochPlan(counts, Layout(512, 10, 8), seed=0)
    batches = 1_234  # per rank, mid-epoch
    positions = {}
    for rank in range(512):
        for worker in range(10):
            positions[plan.layout.slot(rank, worker)] = (0, len(range(worker, batches, 10)) * 8)
    left = remainder(plan, positions, 1000)
    [(epoch, pieces)] = left.segments
    assert epoch == 0 and left.epoch == 1
    assert sum(p.count for p in pieces) == plan.epoch_size - 512 * batches * 8
    again = EpochPlan(counts, Layout(1024, 16, 4), seed=0, origin=left)
    sizes = [again.share_size(0, r, w) for r in (0, 511, 1023) for w in range(16)]
    assert max(sizes) - min(sizes) <= 4 + 1 and sum(np.diff(again.rank_cuts(0))) == sum(p.count for p in pieces)


def test_job_state_round_trips_and_resampled_streams_start_a_new_generation():
    shards = [Shard(f"/d/train-{i:06d}.tar", 10) for i in range(6)]
    layout = Layout(2, 2, 4)
    per_rank = [{"streams": {"0": [3, 5], "1": [2, 7]}, "last_worker": 1, "skipped": 1, "seen": 30}] * 2
    from pipeline.data.plan import Origin

    state = job_state(per_rank, layout, mode="resampled", seed=3, window=5, shards=shards, origin=Origin(),
                      generation=0)  # fmt: skip
    assert state["slots"] == [[3, 5], [2, 7], [3, 5], [2, 7]] and state["seen"] == 60
    same = continue_from(state, shards, layout, "resampled", 5, 3)
    assert same.same_layout and same.generation == 0
    moved = continue_from(state, shards, Layout(3, 1, 4), "resampled", 5, 3)
    assert not moved.same_layout and moved.generation == 1
    with pytest.raises(ValueError, match="data.mode: the checkpoint was written in resampled mode"):
        continue_from(state, shards, layout, "epoch", 5, 3)
    with pytest.raises(ValueError, match=r"not the shards and seed .* \(6 shards, 60 samples, seed 3\)"):
        continue_from(state, shards[:5], layout, "resampled", 5, 3)


def test_leftover_windows_keep_their_order():
    """A window a slot had half read is finished by whichever new slot gets it, in the same permuted order."""
    plan = EpochPlan([30], Layout(1, 1, 4), seed=2)
    positions, read = consume(plan, 3)  # 12 samples: windows of 7 -> one whole, one with 5 read
    left = remainder(plan, positions, WINDOW)
    [(_, pieces)] = left.segments
    assert pieces[0] == Piece(0, 7, 14, window_key(2, "e0", 0, 7), 5, 2) and pieces[1] == Piece(0, 14, 30)
    order = reading_order(plan, 0, 0, 0)
    assert [(0, 7 + i) for i in permutation(pieces[0].key, 7)][5:] == order[12:14]
