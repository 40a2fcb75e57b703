"""Data-path benchmark: images/s on ONE CPU core for the training input pipeline.

    python -m pipeline.data.benchmark --images 2000 [--jpegs DIR]

Writes ImageNet-like JPEGs (about 455 x 390 px, ~100 KB; or uses an ImageFolder tree given with
--jpegs) both as an ImageFolder tree and as shards, then measures, in the main process with one
thread: decode only (full and half scale); torchvision ImageFolder + the training transform; this
loader + the same transform with float output (normalise and erase on CPU) and with uint8 output
(normalise and erase on the device); and what crop-first PIL draft decoding could add, from the
fraction of crops that allow it. Prints img/s and the CPU cores needed per GPU at --target img/s.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation

from . import manifest as mf
from .loader import SampleFormat, ShardStream
from .shardset import list_shards
from .transforms import train_transform


def imagenet_like_jpeg(rng: np.random.Generator) -> bytes:
    """A photo-like JPEG: smooth colour field + mid-frequency texture + noise, ImageNet's mean size."""
    w = int(np.clip(rng.normal(455, 80), 200, 800))
    h = int(w * rng.uniform(0.7, 1.0))
    base = Image.fromarray(rng.integers(0, 256, (rng.integers(6, 20), rng.integers(6, 20), 3), dtype=np.uint8))
    texture = Image.fromarray(rng.integers(0, 256, (h // 2, w // 2, 3), dtype=np.uint8))
    a = 0.6 * np.asarray(base.resize((w, h), Image.BICUBIC), np.float32)
    a += 0.4 * np.asarray(texture.resize((w, h), Image.BILINEAR), np.float32) + rng.normal(0, 8, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=92)
    return buf.getvalue()


def prepare(root: Path, images: int, jpegs: Path | None, classes: int = 10) -> tuple[Path, Path, list[bytes]]:
    """ImageFolder tree + shards (with manifest) of the same JPEGs."""
    if jpegs is not None:
        files = sorted(p for p in jpegs.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))[:images]
        data = [p.read_bytes() for p in files]
    else:
        rng = np.random.default_rng(0)
        data = [imagenet_like_jpeg(rng) for _ in range(images)]
    folder, shards = root / "folder", root / "shards"
    shards.mkdir(parents=True)
    for i, b in enumerate(data):
        d = folder / f"c{i % classes:03d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:06d}.jpg").write_bytes(b)
    entries, per_shard = [], 500
    for s in range(0, len(data), per_shard):
        path = shards / mf.shard_name("train", s // per_shard)
        with wds.TarWriter(str(path)) as tw:
            for i in range(s, min(s + per_shard, len(data))):
                tw.write({"__key__": f"{i:06d}", "jpg": data[i], "cls": str(i % classes).encode()})
        entries.append(
            dict(
                name=path.name,
                samples=min(per_shard, len(data) - s),
                bytes=path.stat().st_size,
                sha256=mf.sha256_file(path),
            )
        )
    mf.write_json_atomic(
        shards / mf.MANIFEST_NAME,
        {"format": mf.FORMAT, "splits": {"train": mf.split_entry(entries)}, "skipped": [], "num_skipped": 0},
    )
    return folder, shards, data


def rate(fn, n: int) -> float:
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


def draft_eligible(data: list[bytes], size: int) -> float:
    """Fraction of images whose RandomResizedCrop box (sampled first, from the header's size) is at least
    2 x size on both sides, i.e. could be decoded at half scale by PIL draft without any upsampling."""
    rrc = RandomResizedCropAndInterpolation(size)
    hits = 0
    for b in data:
        _, _, h, w = rrc.get_params(Image.open(io.BytesIO(b)), rrc.scale, rrc.ratio)
        hits += h >= 2 * size and w >= 2 * size
    return hits / len(data)


def decode_half(b: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(b))
    img.draft("RGB", (img.size[0] // 2, img.size[1] // 2))
    img.load()
    return img


def run(args) -> dict:
    torch.set_num_threads(1)
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder, shards, data = prepare(Path(tmp), args.images, args.jpegs)
        n = len(data)
        sizes = [Image.open(io.BytesIO(b)).size for b in data]
        out["images"] = dict(
            count=n,
            mean_kb=round(float(np.mean([len(b) for b in data])) / 1e3, 1),
            mean_w=round(float(np.mean([s[0] for s in sizes]))),
            mean_h=round(float(np.mean([s[1] for s in sizes]))),
        )
        decode = SampleFormat().decode
        out["decode_only"] = rate(lambda: [decode({"jpg": b, "cls": b"0"}) for b in data], n)
        out["decode_half_scale_only"] = rate(lambda: [decode_half(b) for b in data], n)
        out["draft_eligible_fraction"] = round(draft_eligible(data, args.size), 3)

        from torchvision.datasets import ImageFolder

        def imagefolder(uint8: bool):
            ds = ImageFolder(str(folder), transform=train_transform(args.size, uint8=uint8))
            loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, num_workers=0)
            return lambda: sum(len(y) for _, y in loader)

        def ours(uint8: bool):
            ds = ShardStream(
                list_shards(shards),
                mode="epoch",
                batch_size=args.batch_size,
                workers=0,
                transform=train_transform(args.size, uint8=uint8),
                shuffle_buffer=1000,
                finite=True,
            )
            return lambda: sum(len(b["labels"]) for b in ds.iter_worker(0))

        for name, fn in [
            ("imagefolder_float", imagefolder(False)),
            ("imagefolder_uint8", imagefolder(True)),
            ("loader_float", ours(False)),
            ("loader_uint8", ours(True)),
        ]:
            torch.manual_seed(0)
            out[name] = rate(fn, n)
        # What crop-first draft decoding could add to the loader: eligible images save (full - half) decode time.
        saved = out["draft_eligible_fraction"] * (1 / out["decode_only"] - 1 / out["decode_half_scale_only"])
        out["loader_uint8_with_draft_predicted"] = 1 / (1 / out["loader_uint8"] - saved)
    for k, v in list(out.items()):
        if isinstance(v, float):
            out[k] = round(v, 1)
            if k.startswith("loader") or k.startswith("imagefolder"):
                out[f"cores_per_gpu_at_{args.target}:{k}"] = round(args.target / v, 1)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--jpegs", type=Path, default=None, help="use these JPEGs (an ImageFolder tree) instead")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--target", type=int, default=2000, help="images/s per GPU to size CPU cores for")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    out = run(args)
    for k, v in out.items():
        print(f"{k}: {v}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
