"""The streaming loader on real tar shards: exactly-once epochs on any layout, determinism, exact resume,
seeking with the sample index, and bad data that never loops."""

import io
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import webdataset as wds
from PIL import Image

from pipeline.data import manifest as mf
from pipeline.data.index_shards import index_shards
from pipeline.data.loader import DataError, SampleFormat, ShardStream, StreamPosition, build_loader
from pipeline.data.plan import EpochPlan, Layout
from pipeline.data.shardset import list_shards
from tests.pipeline.ds_helpers import run_ranks
from tests.progress import wait_while_busy

REPO = Path(__file__).resolve().parents[2]

SIZES = [2, 9, 5, 7, 3, 8, 4, 6, 9, 2, 5, 7, 3, 6, 8, 4, 5, 9, 2, 6, 7, 3, 8, 5, 4, 6, 9, 2, 7, 5, 3, 8, 6, 4, 5, 7, 9]


def image_bytes(value: int, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value % 256, value // 256 % 256, 7)).save(buf, format=fmt)
    return buf.getvalue()


def write_shards(directory, sizes, bad=None, image_key="jpg", names=None, index=True, label_key="cls"):
    """Shards whose samples have unique labels 0..N-1 (the label identifies the sample), indexed by
    dinat-index-shards into ``directory`` itself (manifest.json, classes.json, index/) unless ``index`` is off."""
    bad = bad or {}
    fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}.get(image_key, "JPEG")
    entries, label = [], 0
    for i, n in enumerate(sizes):
        path = directory / (names[i] if names else mf.shard_name("train", i))
        with wds.TarWriter(str(path)) as tw:
            for _ in range(n):
                sample = {"__key__": f"s{label:05d}", image_key: image_bytes(label, fmt)}
                sample.update({"cls": str(label).encode()} if label_key == "cls" else {})
                sample.update({"json": json.dumps({"label": label}).encode()} if label_key == "json:label" else {})
                sample.update(bad.get(label, {}))
                tw.write({k: v for k, v in sample.items() if v is not None})
                label += 1
        entries.append({"name": path.name, "samples": n, "bytes": path.stat().st_size, "sha256": mf.sha256_file(path)})
    if index:
        index_shards([str(directory / e["name"]) for e in entries], directory, label_key=label_key, image_key="auto")
    else:
        m = {"format": mf.FORMAT, "splits": {"train": mf.split_entry(entries)}, "skipped": [], "num_skipped": 0}
        mf.write_json_atomic(directory / mf.MANIFEST_NAME, m)
    return label


def to_array(image):
    return np.asarray(image).transpose(2, 0, 1).copy()


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    write_shards(d, SIZES)
    return d


def stream(shard_dir, **kw):
    kw.setdefault("transform", to_array)
    kw.setdefault("batch_size", 4)
    kw.setdefault("shuffle_buffer", 3)
    return ShardStream(list_shards(shard_dir), **kw)


def round_robin(ds, workers, limit=None):
    """Batches in the order a DataLoader delivers them: workers in turn, exhausted ones skipped."""
    its = [ds.iter_worker(w) for w in range(workers)]
    out, active = [], list(range(workers))
    while active and (limit is None or len(out) < limit):
        for w in list(active):
            if limit is not None and len(out) >= limit:
                break
            batch = next(its[w], None)
            if batch is None:
                active.remove(w)
            else:
                out.append(batch)
    return out


def labels(batches) -> list[int]:
    return [int(x) for b in batches for x in b["labels"]]


# -- plans at full scale (no data) --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "world,workers,shards,micro",
    [(1, 1, 1, 8), (3, 2, 1, 4), (8, 4, 5, 3), (7, 3, 13, 5), (64, 10, 91, 8), (512, 10, 4862, 8),
     (1024, 16, 20000, 4)],
)  # fmt: skip
def test_epoch_plans_at_scale(world, workers, shards, micro):
    """Fabricated ImageNet-22k-like sizes (up to 1,024 ranks x 16 workers over 20,000 shards, 14M samples): two
    epochs are each read exactly once, every rank gets the same number of samples within one, and
    ceil(N / global batch) steps read all of epoch 0 on every worker."""
    rng = np.random.default_rng(world * 7919 + shards)
    counts = rng.integers(1, 1400, size=shards) if shards > 1 else np.array([1000])
    plan = EpochPlan(counts, Layout(world, workers, micro), seed=5)
    n = plan.epoch_size
    steps = plan.steps_for(1, world * micro)  # accumulation 1: one micro-batch per rank per step
    assert steps == -(-n // (world * micro))
    for k in (0, 1):
        seen = [np.zeros(c, dtype=np.int8) for c in counts]
        rank_totals = np.diff(plan.rank_cuts(k))
        for rank in range(world):
            cuts = plan.worker_cuts(k, rank)
            assert cuts[0] == plan.rank_cuts(k)[rank] and cuts[-1] == plan.rank_cuts(k)[rank + 1]
            for worker in range(workers):
                for p in plan.segment(k).pieces(int(cuts[worker]), int(cuts[worker + 1])):
                    seen[p.shard][p.start : p.stop] += 1
                if k == 0:  # the worker's batches in `steps` steps hold at least its share of epoch 0
                    batches = len(range(worker, steps, workers))
                    assert cuts[worker + 1] - cuts[worker] <= batches * micro
        assert all((s == 1).all() for s in seen)
        assert rank_totals.sum() == n and rank_totals.max() - rank_totals.min() <= 1
    after_two = plan.rank_cuts(0)[1:] - plan.rank_cuts(0)[:-1] + np.diff(plan.rank_cuts(1))
    assert after_two.max() - after_two.min() <= 1  # balanced cumulatively, not epoch by epoch


# -- real shards ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
@pytest.mark.parametrize("workers", [1, 3])
def test_an_epoch_reads_every_sample_once(shard_dir, world_size, workers):
    seen, per_rank = [], []
    for rank in range(world_size):
        ds = stream(shard_dir, mode="epoch", rank=rank, world_size=world_size, workers=workers, finite=True, seed=3)
        batches = round_robin(ds, workers)
        assert sum(len(b["labels"]) < 4 for b in batches) <= 1  # one partial batch, the rank's last
        per_rank.append(sum(len(b["labels"]) for b in batches))
        seen += labels(batches)
    assert sorted(seen) == list(range(sum(SIZES)))
    assert max(per_rank) - min(per_rank) <= 1


def test_training_streams_run_on_across_epochs_with_full_batches(shard_dir):
    """Two ranks x two workers, endless: every batch full; the first ceil(N / 8) steps hold all of epoch 0."""
    total, kw = sum(SIZES), dict(mode="epoch", world_size=2, workers=2, seed=1)
    steps = -(-total // 8)
    first_epoch = []
    for rank in range(2):
        batches = round_robin(stream(shard_dir, rank=rank, **kw), 2, limit=steps + 3)
        assert all(len(b["labels"]) == 4 for b in batches)
        first_epoch += labels(batches[:steps])
    assert set(range(total)) <= set(first_epoch)
    assert len(first_epoch) - total < 8  # the last step starts epoch 1 (at most one global batch)


def test_epochs_shuffle_differently_and_reproducibly(shard_dir):
    def order(e, s=0):
        ds = stream(shard_dir, mode="epoch", seed=s)
        plan = ds.plan
        return labels(itertools.islice(ds.iter_worker(0), plan.epoch_size // 4))

    assert order(0) == order(0)
    assert order(0) != order(0, s=1)
    one = stream(shard_dir, mode="epoch", batch_size=1)
    epochs = labels(itertools.islice(one.iter_worker(0), 2 * sum(SIZES)))
    assert sorted(epochs[: sum(SIZES)]) == sorted(epochs[sum(SIZES) :]) == list(range(sum(SIZES)))
    assert epochs[: sum(SIZES)] != epochs[sum(SIZES) :]


def test_resampled_mode_is_deterministic_per_seed_rank_and_worker(shard_dir):
    def first(seed, rank, worker):
        ds = stream(shard_dir, mode="resampled", seed=seed, rank=rank, world_size=2, workers=2)
        return labels(itertools.islice(ds.iter_worker(worker), 12))

    a = first(0, 0, 0)
    assert a == first(0, 0, 0)
    assert all(len(set(a) - set(first(*other))) > 0 for other in [(1, 0, 0), (0, 1, 0), (0, 0, 1)])
    assert len(a) == 48  # resampled batches are always full


@pytest.mark.parametrize("mode,consumed", [("epoch", 5), ("epoch", 23), ("resampled", 7)])
def test_resume_continues_exactly(shard_dir, mode, consumed):
    kw = dict(mode=mode, workers=3, world_size=2, rank=1, seed=5)
    full = round_robin(stream(shard_dir, **kw), 3, 40)
    position = StreamPosition(mode, Layout(2, 3, 4))
    for batch in full[:consumed]:
        position.update(batch["meta"])
    rest = round_robin(stream(shard_dir, state=position.state_dict(), **kw), 3, 40 - consumed)
    as_lists = lambda bs: [b["labels"].tolist() for b in bs]  # noqa: E731
    assert as_lists(full[:consumed] + rest) == as_lists(full)


def test_resume_through_a_real_dataloader(shard_dir):
    kw = dict(mode="resampled", workers=2, seed=1, batch_size=3)
    full = [b["labels"].tolist() for b in itertools.islice(build_loader(stream(shard_dir, **kw)), 9)]
    position = StreamPosition("resampled", Layout(1, 2, 3))
    first = []
    for batch in itertools.islice(build_loader(stream(shard_dir, **kw)), 5):
        first.append(batch["labels"].tolist())
        position.update(batch["meta"])
    resumed = build_loader(stream(shard_dir, state=position.state_dict(), **kw))
    rest = [b["labels"].tolist() for b in itertools.islice(resumed, 4)]
    assert first + rest == full


def _read_epoch(info, shard_dir, out):
    ds = ShardStream(
        list_shards(shard_dir), mode="epoch", batch_size=4, transform=to_array, rank=info.rank,
        world_size=info.world_size, workers=2, finite=True, shuffle_buffer=3,
    )  # fmt: skip
    got = [b["labels"].tolist() for b in build_loader(ds)]
    gathered = [None] * info.world_size
    dist.all_gather_object(gathered, got)
    if info.rank == 0:
        torch.save(gathered, out)


def test_fewer_shards_than_slots_through_real_dataloaders(tmp_path):
    """2 shards for 2 ranks x 2 workers: slots share shards by sample ranges; every sample exactly once."""
    total = write_shards(tmp_path, [13, 6])
    run_ranks(_read_epoch, str(tmp_path), str(tmp_path / "out.pt"))
    per_rank = torch.load(tmp_path / "out.pt")
    seen = [x for batches in per_rank for b in batches for x in b]
    assert sorted(seen) == list(range(total))
    sizes = [sum(map(len, r)) for r in per_rank]
    assert sum(sizes) == total and max(sizes) - min(sizes) <= 1


def _bytes_read() -> int:
    return int(dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())["rchar"])


def test_a_range_of_a_shard_is_read_by_seeking(tmp_path):
    """Reading 8 samples from the end of a 3,000-sample shard reads their bytes, not the shard before them."""
    write_shards(tmp_path, [3000])
    size = (tmp_path / "train-000000.tar").stat().st_size
    ds = ShardStream(list_shards(tmp_path), mode="epoch", batch_size=8, transform=to_array, world_size=375,
                     rank=374, finite=True, shuffle_buffer=0)  # fmt: skip
    before = _bytes_read()
    [batch] = list(ds.iter_worker(0))
    read = _bytes_read() - before
    assert sorted(batch["labels"].tolist()) == list(range(2992, 3000))
    assert read < 0.02 * size, (read, size)
    streamed = ShardStream([list_shards(tmp_path)[0].__class__(str(tmp_path / "train-000000.tar"), 3000)],
                           mode="epoch", batch_size=8, transform=to_array, world_size=375, rank=374, finite=True,
                           shuffle_buffer=0)  # fmt: skip
    before = _bytes_read()
    assert sorted(next(streamed.iter_worker(0))["labels"].tolist()) == list(range(2992, 3000))
    assert _bytes_read() - before > 0.9 * size  # without an index: read from the start


# -- bad data ------------------------------------------------------------------------------------------------------


def test_bad_samples_are_skipped_counted_and_batches_stay_full(tmp_path):
    total = write_shards(tmp_path, [6, 6], bad={1: {"jpg": b"not a jpeg"}, 6: {"cls": b"99"}})
    ds = ShardStream(list_shards(tmp_path), mode="epoch", batch_size=5, transform=to_array, shuffle_buffer=0,
                     sample_format=SampleFormat(num_classes=12), max_skip_fraction=0.5)  # fmt: skip
    batches = list(itertools.islice(ds.iter_worker(0), 2))
    assert all(len(b["labels"]) == 5 for b in batches)
    assert set(labels(batches)) == set(range(total)) - {1, 6}  # label 99 is outside the 12 classes
    assert batches[-1]["meta"]["skipped"] == 2 and batches[-1]["meta"]["seen"] == 12
    position = StreamPosition("epoch", Layout(1, 1, 5))
    position.update(batches[-1]["meta"])
    assert position.skipped == 2


@pytest.mark.parametrize("mode", ["epoch", "resampled"])
@pytest.mark.parametrize("workers", [0, 2])
def test_a_shard_with_the_wrong_keys_is_an_error(tmp_path, mode, workers):
    write_shards(tmp_path, [20, 20], image_key="jpg", index=False)
    ds = ShardStream(list_shards(tmp_path), mode=mode, batch_size=4, transform=to_array, workers=workers,
                     sample_format=SampleFormat(image_key="png"))  # fmt: skip
    keys = r"samples have keys \['cls', 'jpg'\], not an image \(png\)"
    with pytest.raises(DataError, match=rf"train-00000[01].tar: {keys}"):
        next(iter(build_loader(ds)))  # before, resampled mode logged skipped samples forever


def test_too_many_bad_samples_stop_the_run(tmp_path):
    write_shards(tmp_path, [40], bad={i: {"jpg": b"junk"} for i in range(1, 40, 2)})
    ds = ShardStream(list_shards(tmp_path), mode="resampled", batch_size=4, transform=to_array)
    with pytest.raises(DataError, match=r"rank 0: 20 of \d+ samples skipped, more than data.max_skip_fraction = 0.05"):
        list(itertools.islice(ds.iter_worker(0), 100))  # half the samples are bad: it stops at the 20th skip


@pytest.mark.parametrize("image_key", ["jpeg", "png", "webp"])
def test_other_image_keys_and_json_labels(tmp_path, image_key):
    total = write_shards(tmp_path, [5, 4], image_key=image_key, label_key="json:label")
    ds = ShardStream(list_shards(tmp_path), mode="epoch", batch_size=3, transform=to_array, finite=True,
                     sample_format=SampleFormat(label_key="json:label"))  # fmt: skip
    batches = list(ds.iter_worker(0))
    assert sorted(labels(batches)) == list(range(total))
    assert batches[0]["images"].shape == (3, 3, 8, 8)


# -- shard lists ---------------------------------------------------------------------------------------------------


def test_patterns_lists_and_pipes_with_any_names(tmp_path):
    names = ["imagenet22k-train-0000.tar", "imagenet22k-train-0001.tar", "odd name.tar"]
    write_shards(tmp_path, [3, 4, 2], names=names)
    shards = list_shards(str(tmp_path / "imagenet22k-train-{0000..0001}.tar"))  # manifest found beside them
    assert [s.samples for s in shards] == [3, 4] and all(s.index for s in shards)
    piped = [f"pipe:cat '{tmp_path / n}'" for n in names]
    ds = ShardStream(list_shards(piped, manifest=tmp_path / "manifest.json"), mode="epoch", batch_size=5,
                     transform=to_array, finite=True)  # fmt: skip
    assert sorted(labels(ds.iter_worker(0))) == list(range(9))


def test_clear_errors(shard_dir, tmp_path):
    with pytest.raises(ValueError, match="is not in"):
        list_shards([str(tmp_path / "other-000000.tar")], manifest=shard_dir / "manifest.json")
    with pytest.raises(ValueError, match="needs per-shard sample counts .*dinat-index-shards"):
        ShardStream(list_shards(["/x/a.tar", "/x/b.tar"]), mode="epoch", batch_size=2, transform=to_array)
    with pytest.raises(ValueError, match="data mode must be one of"):
        stream(shard_dir, mode="shuffled")
    state = StreamPosition("epoch", Layout(1, 2, 4)).state_dict()
    with pytest.raises(ValueError, match="saved with mode=epoch world_size=1 workers=2 micro_batch=4; this loader "
                       "has mode=epoch world_size=1 workers=3 micro_batch=4"):  # fmt: skip
        stream(shard_dir, mode="epoch", workers=3, state=state)
    (tmp_path / "a.tar").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no manifest.json \(found 1 tar files, e.g. a.tar\); .* "
                       r"dinat-index-shards"):  # fmt: skip
        list_shards(tmp_path)


# -- per-sample seeding and signals (kept from the loader's first version) -----------------------------------------


def test_augmentation_is_seeded_by_the_sample_not_by_the_global_rng(shard_dir):
    """Random transforms give the same pixels for a sample whatever the global RNG's state (a DataLoader worker's
    seed changes on resume) and whichever rank reads it; the run seed does change them."""
    import random

    def draws(_image):  # what random transforms see: the three global RNGs
        return torch.tensor([random.random(), np.random.rand(), torch.rand(1).item()])

    kw = dict(mode="epoch", batch_size=1, transform=draws, seed=3, finite=True)
    a = {int(b["labels"]): b["images"] for b in stream(shard_dir, **kw).iter_worker(0)}
    torch.manual_seed(123)
    b = {int(x["labels"]): x["images"] for r in range(2) for x in stream(shard_dir, rank=r, world_size=2,
                                                                          **kw).iter_worker(0)}  # fmt: skip
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = {int(x["labels"]): x["images"] for x in stream(shard_dir, **(kw | {"seed": 4})).iter_worker(0)}
    assert all(not torch.equal(a[k], c[k]) for k in a)
    assert len({tuple(v.flatten().tolist()) for v in a.values()}) == len(a)  # every sample draws differently


def test_main_process_loading_leaves_global_rng_alone(shard_dir):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    next(stream(shard_dir, mode="resampled", workers=0).iter_worker(0))
    assert torch.equal(torch.rand(3), expected)


def test_per_sample_seeding_leaves_cuda_seeding_alone(shard_dir):
    """torch.manual_seed would (re)queue a lazy CUDA seeding call, with a formatted stack trace, per sample
    where CUDA is not initialised (DataLoader workers): ~140 us each. Only the CPU generator is seeded."""
    if torch.cuda.is_initialized():
        pytest.skip("CUDA already initialised: nothing is queued either way")
    from torch.cuda import _lazy_seed_tracker

    _lazy_seed_tracker.manual_seed_all_cb = None
    batches = itertools.islice(stream(shard_dir, mode="resampled").iter_worker(0), 5)
    assert sum(len(b["labels"]) for b in batches) == 20
    assert _lazy_seed_tracker.manual_seed_all_cb is None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_workers_survive_the_stop_signals_slurm_sends_every_process(shard_dir, sig):
    """Preemption/requeue signal a job's whole process tree: the workers must keep delivering batches
    while the main process checkpoints (before, a TERM killed them and the DataLoader raised)."""
    kw = dict(mode="resampled", workers=2, seed=1, batch_size=3)
    full = [b["labels"].tolist() for b in itertools.islice(build_loader(stream(shard_dir, **kw)), 8)]
    iterator = iter(build_loader(stream(shard_dir, **kw)))
    got = [next(iterator)["labels"].tolist() for _ in range(2)]
    workers = iterator._workers  # the worker processes of this iterator
    for w in workers:
        os.kill(w.pid, sig)
    time.sleep(0.5)
    got += [next(iterator)["labels"].tolist() for _ in range(6)]
    assert got == full
    assert all(w.is_alive() for w in workers)


def test_a_program_that_fails_with_live_workers_still_exits(shard_dir):
    """An exception while a DataLoader's workers run keeps them referenced until exit, where Python TERMs and
    joins them; they ignore TERM, so the program used to wait forever. They are killed first now."""
    code = (
        "import sys; sys.path.insert(0, '.'); from tests.pipeline.test_loader import stream, build_loader; "
        f"it = iter(build_loader(stream({str(shard_dir)!r}, mode='resampled', workers=2))); next(it); "
        "raise RuntimeError('boom')"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stderr=subprocess.PIPE, text=True)
    wait_while_busy(lambda: [proc.pid], lambda: proc.poll() is not None, "the failing program", idle_s=30)
    assert proc.returncode == 1 and "RuntimeError: boom" in proc.stderr.read()
