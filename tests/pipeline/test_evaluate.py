"""Evaluation is exact on any number of ranks: one validation shard, read by 1, 2 and 3 ranks of a real ZeRO-3
job (ranks short of data run padding forward passes, which ZeRO-3's collective forward needs), gives the
same loss, top-1, top-5 and sample count."""

import io

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline.data.index_shards import index_shards
from pipeline.data.loader import SampleFormat, ShardStream, build_loader
from pipeline.data.shardset import list_shards
from pipeline.data.transforms import DeviceAugment
from pipeline.evaluate import evaluate

from .ds_helpers import NUM_LABELS, RES, make_engine, run_ranks

SAMPLES = 13


def resize(image):
    return np.asarray(image.resize((RES, RES))).transpose(2, 0, 1).copy()


def _evaluate(info, shards: str, workers: int, out: str, cap: int | None = None) -> None:
    engine = make_engine(3, seed=0)
    ds = ShardStream(list_shards(shards, split="train"), mode="epoch", batch_size=2, transform=resize, finite=True,
                     rank=info.rank, world_size=info.world_size, workers=workers, shuffle_buffer=0,
                     sample_format=SampleFormat(num_classes=NUM_LABELS))  # fmt: skip
    augment = DeviceAugment(NUM_LABELS, "cpu", training=False)
    batches = min(ds.batches_per_rank(), cap or ds.batches_per_rank())  # cap: train.eval_batches
    results = evaluate(engine, build_loader(ds), augment, torch.device("cpu"), batches, RES, whole=cap is None)
    if info.rank == 0:
        torch.save(results, out)


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory):
    d = tmp_path_factory.mktemp("val")
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(d / "val-000000.tar")) as tw:
        for i in range(SAMPLES):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (RES, RES, 3), dtype=np.uint8)).save(buf, format="PNG")
            tw.write({"__key__": f"v{i:03d}", "png": buf.getvalue(), "cls": str(i % NUM_LABELS).encode()})
    index_shards([str(d / "val-000000.tar")], d)
    return d


def test_the_same_results_from_1_2_and_3_ranks_on_one_shard(one_shard, tmp_path):
    results = {}
    for world, workers in ((1, 0), (2, 1), (3, 2)):
        out = tmp_path / f"w{world}.pt"
        run_ranks(_evaluate, str(one_shard), workers, str(out), world_size=world)
        results[world] = torch.load(out)
    assert results[1]["eval/samples"] == SAMPLES
    for world in (2, 3):
        assert results[world]["eval/samples"] == SAMPLES
        assert results[world]["eval/top1"] == results[1]["eval/top1"]
        assert results[world]["eval/top5"] == results[1]["eval/top5"]
        assert results[world]["eval/loss"] == pytest.approx(results[1]["eval/loss"], rel=1e-6)


def test_more_ranks_than_samples_still_evaluate(tmp_path):
    """Ranks with nothing to read run only padding; the totals are exact."""
    shards = tmp_path / "tiny"
    shards.mkdir()
    with wds.TarWriter(str(shards / "val-000000.tar")) as tw:
        for i in range(2):
            buf = io.BytesIO()
            Image.new("RGB", (RES, RES), (i * 90, 3, 7)).save(buf, format="JPEG")
            tw.write({"__key__": f"v{i}", "jpg": buf.getvalue(), "cls": str(i).encode()})
    index_shards([str(shards / "val-000000.tar")], shards)
    run_ranks(_evaluate, str(shards), 0, str(tmp_path / "r.pt"), world_size=3)
    assert torch.load(tmp_path / "r.pt")["eval/samples"] == 2


def test_capped_evaluation_reads_its_batches_and_stops(one_shard, tmp_path):
    """train.eval_batches cuts every rank's share short: 2 ranks x 1 batch of 2 images, and no complaint about
    the batches left unread."""
    run_ranks(_evaluate, str(one_shard), 1, str(tmp_path / "r.pt"), 1, world_size=2)
    assert torch.load(tmp_path / "r.pt")["eval/samples"] == 4
