"""``python -m pipeline.data.plan_benchmark``: what the epoch plan costs one rank, and what indexing shards costs.

1. Planning, per rank: the work a rank does for one epoch at ImageNet-22k's size (14.2M samples) on fabricated
   shard sizes: the epoch's shard order and cumulative sizes, its rank cut, and the pieces of each of its workers.
   Time and peak Python memory (tracemalloc) for ranks x workers over shard counts, with a linear fit in the
   number of shards, extrapolated to ``--extrapolate`` shards.
2. ``dinat-index-shards`` on a written shard set (random, incompressible members of ImageNet's mean size), as MB/s
   beside a plain sequential read and a read that only hashes the same files (page cache warm for all three).
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from .plan import EpochPlan, Layout

IMAGES = 14_197_122  # ImageNet-22k (fall11)
MEAN_BYTES = 110_000  # mean member spacing of the raw release


def rank_plan_cost(shards: int, world: int, workers: int, micro: int = 8, rank: int | None = None) -> tuple[float, int]:
    """(seconds, peak bytes) for one rank's first epoch: the middle rank unless ``rank`` is given."""
    rng = np.random.default_rng(shards)
    counts = rng.multinomial(IMAGES, rng.dirichlet(np.full(shards, 50.0)))  # sizes within ~15% of the mean
    rank = world // 2 if rank is None else rank
    tracemalloc.start()
    start = time.perf_counter()
    plan = EpochPlan(counts, Layout(world, workers, micro), seed=0)
    pieces = [plan.share(0, rank, w) for w in range(workers)]
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert sum(p.count for ps in pieces for p in ps) == int(np.diff(plan.rank_cuts(0))[rank])
    return seconds, peak


def planning(shard_counts: list[int], worlds: list[int], workers: int, extrapolate: int) -> None:
    print(f"planning one rank's epoch of {IMAGES:,} samples, {workers} workers per rank (median of 3)")
    print(f"{'ranks':>6} {'shards':>7} {'ms':>8} {'peak MiB':>9}")
    for world in worlds:
        xs, ys = [], []
        for shards in shard_counts:
            runs = [rank_plan_cost(shards, world, workers) for _ in range(3)]
            seconds, peak = float(np.median([r[0] for r in runs])), max(r[1] for r in runs)
            xs.append(shards)
            ys.append(seconds)
            print(f"{world:>6} {shards:>7} {seconds * 1e3:>8.1f} {peak / 2**20:>9.2f}")
        slope, intercept = np.polyfit(xs, ys, 1)
        print(f"{world:>6} fit: {intercept * 1e3:.2f} ms + {slope * 1e6:.2f} us/shard -> "
              f"{(intercept + slope * extrapolate) * 1e3:.1f} ms at {extrapolate:,} shards")  # fmt: skip


def _write_set(directory: Path, shards: int, per_shard: int) -> list[Path]:
    import webdataset as wds

    rng = np.random.default_rng(0)
    paths = []
    for s in range(shards):
        path = directory / f"bench-{s:04d}.tar"
        with wds.TarWriter(str(path)) as tw:
            for i in range(per_shard):
                size = int(rng.integers(MEAN_BYTES // 2, MEAN_BYTES * 3 // 2))
                tw.write({"__key__": f"s{s:04d}_{i:05d}", "jpg": rng.bytes(size), "cls": b"%d" % (i % 1000)})
        paths.append(path)
    return paths


def _read_all(paths: list[Path], digest: bool) -> int:
    total = 0
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb", buffering=0) as f:
            while block := f.read(1 << 20):
                total += len(block)
                if digest:
                    h.update(block)
    return total


def indexing(shards: int, per_shard: int) -> None:
    from .index_shards import index_shards

    with tempfile.TemporaryDirectory() as tmp:
        paths = _write_set(Path(tmp), shards, per_shard)
        size = sum(p.stat().st_size for p in paths)
        _read_all(paths, digest=False)  # warm the page cache for every contender
        rows = []
        for name, fn in [
            ("plain read", lambda: _read_all(paths, digest=False)),
            ("read + sha256", lambda: _read_all(paths, digest=True)),
            ("dinat-index-shards (1 worker)", lambda: index_shards([str(p) for p in paths], Path(tmp) / "out")),
        ]:
            start = time.perf_counter()
            fn()
            rows.append((name, size / (time.perf_counter() - start) / 1e6))
    print(f"indexing {shards} shards x {per_shard} samples ({size / 1e9:.2f} GB, members ~{MEAN_BYTES // 1000} KB)")
    for name, rate in rows:
        print(f"  {name:<32} {rate:>8.0f} MB/s  ({rate / rows[0][1]:.2f}x plain read)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", default="1250,2500,5000,10000,20000", help="shard counts to plan over")
    p.add_argument("--ranks", default="64,512,1024")
    p.add_argument("--workers", type=int, default=10)
    p.add_argument("--extrapolate", type=int, default=20_000)
    p.add_argument("--index-shards", type=int, default=4, help="shards written for the indexing benchmark (0: skip)")
    p.add_argument("--index-samples", type=int, default=1000, help="samples per shard there")
    args = p.parse_args(argv)
    planning([int(x) for x in args.shards.split(",")], [int(x) for x in args.ranks.split(",")], args.workers,
             args.extrapolate)  # fmt: skip
    if args.index_shards:
        indexing(args.index_shards, args.index_samples)


if __name__ == "__main__":
    main()
