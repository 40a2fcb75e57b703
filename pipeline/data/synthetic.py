"""A small, learnable synthetic image-classification set written straight into WebDataset shards.

The embedded default dataset: it needs no download, so the pipeline can run end to end anywhere.
Class ``k`` is one (shape, colour) pair, ``shape = k % 5`` and ``colour = (shape + k // 5) % 5``, so the
default 10 classes use every shape and every colour twice: neither the colour (e.g. the mean colour) nor the
shape alone names the class, a model has to learn both. Each image is a saturated shape at a random
position, scale and rotation with a jittered colour, over a muted random texture (stripes, checks, blobs
or noise) with clutter lines, plus pixel noise.

Output follows the shard contract of :mod:`pipeline.data` (see :mod:`pipeline.data.manifest`);
manifest.json also records the generator parameters under ``"synthetic"``, and a second call with the
same parameters finds the set complete and returns at once. Same seed -> byte-identical shards (for one
numpy/Pillow install: neither promises identical random streams or JPEG bytes across versions).

Usage: ``dinat-make-synthetic OUT`` or ``python -m pipeline.data.synthetic OUT [--num-classes 10 ...]``.
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import os
import re
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw

from pipeline.data import manifest as mf
from pipeline.data.index import index_name, write_index
from pipeline.data.index_shards import scan_shard

log = logging.getLogger(__name__)

GENERATOR_VERSION = 2  # bump whenever the set changes (2: sample indexes), so old sets are regenerated
SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (235, 210, 40),
           "purple": (150, 50, 200)}  # fmt: skip
TEXTURES = ("stripes", "checks", "blobs", "noise")
MAX_CLASSES = len(SHAPES) * len(COLOURS)
SPLIT_CODES = {"train": 0, "val": 1}
_SHARD_RE = re.compile(r"^(train|val)-\d{6}\.tar$")
_KEY_RE = re.compile(r"^(train|val)-c\d{3}-\d{6,}\.(cls|jpg)$")  # see _write_shard


@dataclass(frozen=True)
class SyntheticParams:
    """What determines the set; recorded in manifest.json under ``"synthetic"``."""

    num_classes: int = 10
    train_per_class: int = 300
    val_per_class: int = 50
    image_size: int = 96
    seed: int = 0
    shard_samples: int = 256
    jpeg_quality: int = 90
    version: int = field(default=GENERATOR_VERSION, init=False)

    def __post_init__(self) -> None:
        if not 2 <= self.num_classes <= MAX_CLASSES:
            raise ValueError(f"num_classes must be in [2, {MAX_CLASSES}], got {self.num_classes}")
        for name in ("train_per_class", "val_per_class", "shard_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")


def class_of(label: int) -> tuple[str, str]:
    """(shape, colour) of a class index."""
    return SHAPES[label % 5], list(COLOURS)[(label % 5 + label // 5) % 5]


def _muted(rng: np.random.Generator, n: int) -> np.ndarray:
    """n random low-saturation colours, (n, 3) float."""
    grey = rng.uniform(60, 200, size=(n, 1))
    return grey + rng.uniform(-50, 50, size=(n, 3))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A muted random texture, (size, size, 3) float in [0, 255]."""
    texture = TEXTURES[rng.integers(len(TEXTURES))]
    c0 = _muted(rng, 1)[0]
    c = np.stack([c0, c0 + rng.uniform(-45, 45, size=3)])  # texture contrast below the shape's
    y, x = np.mgrid[0:size, 0:size] / size
    theta, period = rng.uniform(0, math.pi), rng.uniform(0.08, 0.3)
    u, v = x * math.cos(theta) + y * math.sin(theta), -x * math.sin(theta) + y * math.cos(theta)
    if texture == "stripes":
        t = (np.sin(2 * math.pi * u / period) > 0).astype(np.float64)
    elif texture == "checks":
        t = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float64)
    elif texture == "blobs":
        low = rng.uniform(0, 1, size=(rng.integers(3, 7),) * 2)
        t = np.asarray(Image.fromarray((low * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)) / 255
    else:
        t = rng.uniform(0, 1, size=(size, size))
    img = c[0] * (1 - t[..., None]) + c[1] * t[..., None]
    return _clutter(rng, img)


def _clutter(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Draw a few muted lines over the background."""
    size = img.shape[0]
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    n = int(rng.integers(2, 6))
    for pts, col in zip(rng.uniform(0, size, size=(n, 4)), _muted(rng, n)):
        draw.line(pts.tolist(), fill=tuple(int(v) for v in np.clip(col, 0, 255)), width=int(rng.integers(1, 4)))
    return np.asarray(pil, dtype=np.float64)


def _polygon(shape: str) -> list[tuple[float, float]]:
    """Unit-radius outline of a shape, centred at the origin."""
    if shape == "square":
        return [(math.cos(a), math.sin(a)) for a in np.arange(4) * math.pi / 2 + math.pi / 4]
    if shape == "triangle":
        return [(math.cos(a), math.sin(a)) for a in np.arange(3) * 2 * math.pi / 3 - math.pi / 2]
    if shape == "star":
        radii = [1.0, 0.45] * 5  # outer and inner points alternate
        return [(r * math.cos(a), r * math.sin(a)) for r, a in zip(radii, np.arange(10) * math.pi / 5 - math.pi / 2)]
    if shape == "cross":
        w = 0.33
        return [(w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w), (-w, -1), (w, -1), (w, -w), (1, -w), (1, w),
                (w, w)]  # fmt: skip
    raise ValueError(f"unknown shape {shape!r}")


def _shape_mask(rng: np.random.Generator, shape: str, size: int) -> np.ndarray:
    """Antialiased mask of one shape at a random position, scale and rotation, (size, size) in [0, 1]."""
    ss = 2 * size  # drawn at twice the size, then box-filtered down
    r = rng.uniform(0.2, 0.34) * ss
    cx, cy = rng.uniform(r * 0.9, ss - r * 0.9, size=2)
    mask = Image.new("L", (ss, ss), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    else:
        a = rng.uniform(0, 2 * math.pi)
        ca, sa = math.cos(a), math.sin(a)
        draw.polygon([(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in _polygon(shape)], fill=255)
    return np.asarray(mask.resize((size, size), Image.BOX), dtype=np.float64) / 255


def render(rng: np.random.Generator, label: int, size: int) -> Image.Image:
    """One RGB image of class ``label``."""
    shape, colour = class_of(label)
    img = _background(rng, size)
    alpha = _shape_mask(rng, shape, size)[..., None]
    fg = np.asarray(COLOURS[colour], dtype=np.float64) + rng.uniform(-25, 25, size=3)
    img = img * (1 - alpha) + fg * alpha
    img += rng.normal(0, rng.uniform(3, 12), size=img.shape)
    return Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8), "RGB")


def _split_plan(params: SyntheticParams, split: str) -> list[np.ndarray]:
    """Sample indices per shard, shuffled; sample i has class i // per_class.

    Val is shuffled too, so that any subset of its shards (one rank's share) holds every class.
    """
    per_class = params.train_per_class if split == "train" else params.val_per_class
    n = per_class * params.num_classes
    order = np.random.default_rng((params.seed, SPLIT_CODES[split], 1 << 32)).permutation(n)  # 2**32: no sample index
    return np.array_split(order, math.ceil(n / params.shard_samples))


def _write_shard(out: Path, split: str, index: int, samples: np.ndarray, params: SyntheticParams) -> dict[str, Any]:
    """Write one shard under a temporary name, rename it when complete; its manifest entry."""
    per_class = params.train_per_class if split == "train" else params.val_per_class
    name = mf.shard_name(split, index)
    tmp = out / f".{name}.tmp"
    try:
        with open(tmp, "wb") as f:
            sink = wds.TarWriter(f, user="synthetic", group="synthetic", mtime=0)  # fixed mtime: reproducible
            for i in samples.tolist():
                label = i // per_class
                rng = np.random.default_rng((params.seed, SPLIT_CODES[split], i))
                buf = io.BytesIO()
                render(rng, label, params.image_size).save(buf, format="JPEG", quality=params.jpeg_quality)
                sink.write({"__key__": f"{split}-c{label:03d}-{i:06d}", "jpg": buf.getvalue(), "cls": b"%d" % label})
            sink.close()
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    scan = scan_shard((str(out / name), "jpg", "cls"))  # one pass: size, hash and the sample index
    write_index(out / index_name(name), scan.offsets)
    entry = {"name": name, "samples": len(samples), "bytes": scan.bytes, "sha256": scan.sha256}
    return {**entry, "index": index_name(name)}


def _complete(out: Path, params: SyntheticParams) -> dict[str, Any] | None:
    """The manifest when ``out`` already holds the full set for ``params`` (shards checked by size)."""
    try:
        m = mf.read_manifest(out)
        mf.read_classes(out)
    except (FileNotFoundError, ValueError):
        return None
    if m.get("synthetic") != asdict(params):
        return None
    for split in mf.SPLITS:
        shards = m["splits"].get(split, {}).get("shards", [])
        if not shards or not all(mf.verify_shard(out / s["name"], s, check_hash=False) for s in shards):
            return None
    return m


def _written_here(path: Path) -> bool:
    """Whether a shard file was written by this generator (its first member has a synthetic key)."""
    try:
        with tarfile.open(path) as tar:
            first = tar.next()
    except (tarfile.TarError, OSError):
        return False
    return first is not None and _KEY_RE.match(first.name) is not None


def _clear(out: Path) -> None:
    """Remove a previous synthetic set; refuse to touch shards or a manifest that are not synthetic."""
    listed: set[str] = set()
    if (out / mf.MANIFEST_NAME).exists():
        try:
            old = mf.read_json(out / mf.MANIFEST_NAME)
        except ValueError:
            old = None
        if not isinstance(old, dict) or "synthetic" not in old:
            raise ValueError(f"{out} holds a manifest.json that is not a synthetic set; refusing to overwrite it")
        listed = {s["name"] for split in old.get("splits", {}).values() for s in split.get("shards", [])}
    shards = [p for p in out.iterdir() if _SHARD_RE.match(p.name)]
    if foreign := [p.name for p in shards if p.name not in listed and not _written_here(p)]:
        raise ValueError(f"{out} holds shards this generator did not write ({foreign[0]}); refusing to overwrite them")
    (out / mf.MANIFEST_NAME).unlink(missing_ok=True)  # first: a crash below leaves no manifest over missing shards
    for p in shards:
        p.unlink()


def make_synthetic(out_dir: str | Path, force: bool = False, **kwargs: Any) -> dict[str, Any]:
    """Write the synthetic set into ``out_dir`` unless it already holds it; the manifest.

    ``kwargs`` are :class:`SyntheticParams` fields (num_classes, train_per_class, val_per_class,
    image_size, seed, shard_samples, jpeg_quality).
    """
    params = SyntheticParams(**kwargs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not force and (m := _complete(out, params)) is not None:
        log.info("synthetic set in %s is complete for %s; nothing to do", out, params)
        return m
    t0 = time.perf_counter()
    _clear(out)
    ids = ["{1}_{0}".format(*class_of(k)) for k in range(params.num_classes)]
    mf.write_json_atomic(out / mf.CLASSES_NAME, mf.classes_dict(ids, {i: i.replace("_", " ") for i in ids}))
    splits = {}
    for split in mf.SPLITS:
        plan = _split_plan(params, split)
        splits[split] = mf.split_entry([_write_shard(out, split, k, s, params) for k, s in enumerate(plan)])
    m = {"format": mf.FORMAT, "splits": splits, "skipped": [], "num_skipped": 0, "synthetic": asdict(params)}
    mf.write_json_atomic(out / mf.MANIFEST_NAME, m)
    log.info(
        "synthetic: %d classes, %d train + %d val images (%d px) in %d + %d shards, %.1f MB, written to %s in %.1f s",
        params.num_classes, splits["train"]["samples"], splits["val"]["samples"], params.image_size,
        len(splits["train"]["shards"]), len(splits["val"]["shards"]),
        (splits["train"]["bytes"] + splits["val"]["bytes"]) / 1e6, out, time.perf_counter() - t0,
    )  # fmt: skip
    return m


def main(argv: list[str] | None = None) -> None:
    d = SyntheticParams()
    p = argparse.ArgumentParser(description="write the synthetic shape/colour classification set as shards")
    p.add_argument("out", help="output directory")
    p.add_argument("--num-classes", type=int, default=d.num_classes, help=f"2..{MAX_CLASSES}")
    p.add_argument("--train-per-class", type=int, default=d.train_per_class)
    p.add_argument("--val-per-class", type=int, default=d.val_per_class)
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--shard-samples", type=int, default=d.shard_samples)
    p.add_argument("--jpeg-quality", type=int, default=d.jpeg_quality)
    p.add_argument("--force", action="store_true", help="regenerate even when the set is complete")
    a = vars(p.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        make_synthetic(a.pop("out"), **a)
    except ValueError as e:
        p.error(str(e))


if __name__ == "__main__":
    main()
