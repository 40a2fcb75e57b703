"""Existing WebDataset shard sets, indexed once with ``dinat-index-shards``, train like the project's own (real
2-rank jobs on CPU): timm's ``imagenet-22k-wds`` layout (``_info.json``, labels in ``cls`` and in ``json``) in
epoch mode with a resume and an export, and ``webdataset.ShardWriter`` output with odd names and png / webp
images in resampled mode."""

import io
import json
import shutil
import subprocess
import sys

import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline.data.manifest import read_classes, read_manifest
from tests.e2e import REPO, launch, logs, run_then_resume, scalars, wait

CLASSES = 4


def picture(label: int, fmt: str, size: int = 40) -> bytes:
    """A class-coloured square on a grey ground: learnable, and each format decodes to much the same image."""
    image = Image.new("RGB", (size, size), (128, 128, 128))
    colour = [(220, 40, 40), (40, 180, 60), (50, 80, 230), (235, 210, 40)][label]
    image.paste(colour, (8, 8, 32, 32))
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def index(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipeline.data.index_shards", *args, "--workers", "2"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)


def write_timm_set(src):
    """4 train shards x 12 + 1 validation shard x 8 in ``src``, named and described as timm's imagenet-22k-wds
    (``_info.json``, ``imagenet22k_synsets.txt``)."""
    info = {"splits": {}}
    for split, shards, per in (("train", 4, 12), ("validation", 1, 8)):
        names = [f"imagenet22k-{split}-{i:04d}.tar" for i in range(shards)]
        for n, name in enumerate(names):
            with wds.TarWriter(str(src / name)) as tw:
                for i in range(per):
                    label = (n * per + i) % CLASSES
                    meta = {"label": label, "label_12k": label, "filename": f"n{label:08d}_{i}.JPEG"}
                    tw.write({"__key__": f"{split}_{n:04d}_{i:05d}", "jpg": picture(label, "JPEG"),
                              "cls": str(label).encode(), "json": json.dumps(meta).encode()})  # fmt: skip
        info["splits"][split] = {"name": split, "num_samples": shards * per, "filenames": names,
                                 "shard_lengths": [per] * shards}  # fmt: skip
    (src / "_info.json").write_text(json.dumps(info))
    (src / "imagenet22k_synsets.txt").write_text("".join(f"n{c:08d}\n" for c in range(CLASSES)))


@pytest.fixture(scope="module")
def timm_set(tmp_path_factory):
    src = tmp_path_factory.mktemp("imagenet-22k-wds")
    write_timm_set(src)
    out = tmp_path_factory.mktemp("timm-index")
    done = index(str(src), str(out), "--classes", str(src / "imagenet22k_synsets.txt"), "--label-key", "json:label")
    assert done.returncode == 0, done.stderr
    return src, out


def test_the_index_describes_the_timm_set(timm_set):
    src, out = timm_set
    m = read_manifest(out)
    assert {s: m["splits"][s]["samples"] for s in ("train", "val")} == {"train": 48, "val": 8}
    assert [e["url"] for e in m["splits"]["val"]["shards"]] == [str(src / "imagenet22k-validation-0000.tar")]
    assert [c["id"] for c in read_classes(out)] == [f"n{c:08d}" for c in range(CLASSES)]
    # _info.json is checked: a shard that does not hold what it promises is refused, naming both
    info = json.loads((src / "_info.json").read_text())
    info["splits"]["train"]["shard_lengths"][1] = 11
    bad = src.parent / "bad-info"
    shutil.copytree(src, bad)
    (bad / "_info.json").write_text(json.dumps(info))
    done = index(str(bad), str(bad.parent / "bad-index"))
    assert done.returncode == 2
    assert f"{bad / 'imagenet22k-train-0001.tar'}: holds 12 samples, its _info.json says 11" in done.stderr


def test_timm_set_trains_in_epoch_mode_resumes_bitwise_and_exports(timm_set, tmp_path):
    _, out = timm_set
    run = tmp_path / "run"
    args = [f"data.train={out}", f"data.val={out}", "data.mode=epoch", "data.label_key=json:label",
            "train.steps=10", "train.checkpoint_every=4", "train.eval_every=10", "run.export=true"]  # fmt: skip
    first, again = run_then_resume(run, out, args, resume_step=4)
    assert "top-1" in logs(run)[0] and "(8 images)" in logs(run)[0]  # the 1-shard split, read by both ranks
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert max(v for _, v in scalars(run)["data/skipped_samples"]) == 0


def test_shardwriter_set_with_odd_names_and_png_webp_trains_resampled(tmp_path):
    src = tmp_path / "my set"
    src.mkdir()
    with wds.ShardWriter(str(src / "part %d of set.tar"), maxcount=10) as sink:
        for i in range(36):
            label, fmt = i % CLASSES, ("PNG", "WEBP")[i % 2]
            sink.write({"__key__": f"img{i:03d}", fmt.lower(): picture(label, fmt), "cls": str(label).encode()})
    out = tmp_path / "index"
    done = index(str(src), str(out))  # no _info.json: all of it is the train split
    assert done.returncode == 0, done.stderr
    assert read_manifest(out)["splits"]["train"]["samples"] == 36 and len(read_classes(out)) == CLASSES
    run = tmp_path / "run"
    assert wait(launch(run, out, f"data.train={out}", "data.val=null", "train.steps=6", "run.export=true")) == [0, 0]
    assert (run / "export" / "model.safetensors").is_file()
    assert max(v for _, v in scalars(run)["data/skipped_samples"]) == 0
