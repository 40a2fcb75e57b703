"""``dinat-index-shards SHARDS... OUT``: make existing WebDataset shards trainable in every mode.

Reads each shard once, sequentially, and writes into OUT the project's ``manifest.json`` (per shard: name,
location, samples, bytes, sha256, sample index), the sample indexes (``index/*.npy``, :mod:`pipeline.data.index`)
and ``classes.json``. Then ``data.train=OUT`` trains on the shards where they are: epoch mode, exact resume,
evaluation on any number of ranks.

Understood as they come: timm's ``imagenet-22k-wds`` (``imagenet22k-{train,validation}-NNNN.tar``, keys
jpg/cls/json, an ``_info.json`` whose shard lengths are checked; its splits are indexed together when SHARDS is
its directory), ``webdataset.ShardWriter`` output with any file names, and images under ``jpg``, ``jpeg``,
``png`` or ``webp`` (``--image-key`` / ``--label-key`` where a set differs: ``--label-key json:label_12k``).

A sample is the consecutive tar members that share a key (the file name up to its first dot), as webdataset
groups them. Each shard is read once in large sequential reads (size, sha256), then its headers are read from
the page cache with 512-byte reads that seek over the data. Shards are indexed in parallel (``--workers``); the
workers do not import torch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing
import os
import re
import sys
import tarfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .index import index_name, write_index
from .manifest import (
    CLASSES_NAME,
    FORMAT,
    MANIFEST_NAME,
    SPLITS,
    classes_dict,
    read_manifest,
    split_entry,
    write_json_atomic,
)

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
INFO_NAMES = ("_info.json", "info.json")
SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val"}  # _info.json's names -> ours
READ_SIZE = 4 << 20
_META = re.compile(r"__[^/]*__($|/)")


class IndexingError(ValueError):
    """A shard or shard set that cannot be indexed as asked (names the shard)."""


def sample_key(name: str) -> str | None:
    """The webdataset key of a member name: its path up to the first dot of the file name (None: no dot)."""
    head, _, base = name.rpartition("/")
    stem, dot, _ = base.partition(".")
    return f"{head}/{stem}" if head and stem and dot else stem if stem and dot else None


def _skipped_member(info: tarfile.TarInfo) -> bool:
    """Members webdataset does not turn into sample fields: non-files and __meta__ entries."""
    name = info.name
    return (
        not info.isreg()
        or _META.match(name) is not None
        or ("/" not in name and name.startswith("__") and name.endswith("__"))
    )


@dataclass
class ShardScan:
    url: str
    offsets: list[int] = field(default_factory=list)
    bytes: int = 0
    sha256: str = ""
    max_label: int = -1
    missing: int = 0  # samples without an image or label key


def _label(value: bytes, label_key: str) -> int:
    _, _, json_field = label_key.partition(":")
    return int(json.loads(value)[json_field]) if json_field else int(value)


def scan_shard(task: tuple[str, str, str]) -> ShardScan:
    """One sequential pass over a shard: sample offsets, size, sha256, labels (see the module docstring)."""
    url, image_key, label_key = task
    scan = ShardScan(url)
    label_field = label_key.split(":", 1)[0]
    current, keys, label = None, set(), None
    recent: list[set[str]] = []

    def close_sample() -> None:
        nonlocal label
        has_image = bool(keys & set(IMAGE_KEYS)) if image_key == "auto" else image_key in keys
        if not (has_image and label is not None):
            scan.missing += 1
            recent.append(set(keys))
            if len(recent) == 3 and scan.missing == 3:  # the shard's first samples: the wrong keys
                raise IndexingError(
                    f"{url}: samples have keys {sorted(keys)}, not an image "
                    f"({'|'.join(IMAGE_KEYS) if image_key == 'auto' else image_key}) and a label ({label_key}); "
                    "pass --image-key / --label-key"
                )
        else:
            scan.max_label = max(scan.max_label, label)
        label = None

    sha, size = hashlib.sha256(), 0
    with open(url, "rb", buffering=0) as raw:
        while block := raw.read(READ_SIZE):  # the whole file, sequentially: hash and size
            sha.update(block)
            size += len(block)
        raw.seek(0)
        try:  # then the headers alone, seeking over the data (now in the page cache): 512-byte reads
            with tarfile.open(fileobj=raw, mode="r:") as tf:
                for info in tf:
                    if _skipped_member(info):
                        continue
                    key = sample_key(info.name)
                    if key is None:
                        continue
                    if key != current:
                        if current is not None:
                            close_sample()
                        current, keys = key, set()
                        scan.offsets.append(info.offset)
                    suffix = info.name.rpartition("/")[2].partition(".")[2].lower()
                    keys.add(suffix)
                    if suffix == label_field:
                        try:
                            label = _label(tf.extractfile(info).read(), label_key)
                        except (ValueError, KeyError, TypeError):
                            label = None
                if current is not None:
                    close_sample()
                end = tf.offset
        except tarfile.TarError as e:
            raise IndexingError(f"{url}: not a readable tar file ({e})") from None
    scan.offsets.append(end)
    scan.bytes, scan.sha256 = size, sha.hexdigest()
    return scan


# -- inputs -----------------------------------------------------------------------------------------------------------


def _info_file(directory: Path) -> Path | None:
    return next((directory / n for n in INFO_NAMES if (directory / n).is_file()), None)


def expand_inputs(inputs: list[str], split: str | None) -> dict[str, list[Path]]:
    """Split -> shard files from directories (every *.tar; an _info.json assigns them to splits), brace patterns
    and files. IndexingError naming what was given when there is nothing to index."""
    from webdataset.shardlists import expand_urls  # only here: it imports torch, which pool workers must not

    found: dict[str, list[Path]] = {}
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            tars = sorted(path.glob("*.tar"))
            if not tars:
                raise IndexingError(f"{path}: no *.tar files to index")
            info = _info_file(path)
            if info is not None and split is None:
                for name, paths in _splits_from_info(info, tars).items():
                    found.setdefault(name, []).extend(paths)
                continue
            found.setdefault(split or "train", []).extend(tars)
        else:
            files = [Path(u) for u in expand_urls(item)]
            missing = [str(p) for p in files if not p.is_file()]
            if missing:
                more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
                raise IndexingError(f"no such shard: {missing[0]}{more}")
            found.setdefault(split or "train", []).extend(files)
    return found


def _splits_from_info(info: Path, tars: list[Path]) -> dict[str, list[Path]]:
    splits = json.loads(info.read_text()).get("splits", {})
    by_name = {p.name: p for p in tars}
    out: dict[str, list[Path]] = {}
    for name, entry in splits.items():
        ours = SPLIT_NAMES.get(name)
        if ours is None:
            continue
        files = [by_name[f] for f in entry.get("filenames", []) if f in by_name]
        if files:
            out[ours] = files
    if not out:
        raise IndexingError(f"{info}: names none of the tar files beside it in a train or validation split")
    return out


def expected_lengths(paths: Iterable[Path]) -> dict[str, int]:
    """Shard name -> sample count that an _info.json beside the shards promises (timm's sets)."""
    lengths: dict[str, int] = {}
    for directory in {p.parent for p in paths}:
        info = _info_file(directory)
        if info is None:
            continue
        for entry in json.loads(info.read_text()).get("splits", {}).values():
            lengths.update(zip(entry.get("filenames", []), entry.get("shard_lengths", [])))
    return lengths


def read_class_ids(path: Path) -> tuple[list[str], dict[str, str]]:
    """(class ids in label order, id -> name) from a classes.json, a words.txt (``id<TAB>name``) or a list of ids
    one per line (timm's ``imagenet22k_synsets.txt``)."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("{"):
        classes = json.loads(text)["classes"]
        return [c["id"] for c in classes], {c["id"]: c["name"] for c in classes}
    ids, names = [], {}
    for line in text.splitlines():
        if not line.strip():
            continue
        class_id, _, name = line.strip().partition("\t")
        ids.append(class_id.strip())
        if name:
            names[class_id.strip()] = name.strip()
    return ids, names


# -- the whole run ----------------------------------------------------------------------------------------------------


def index_shards(
    inputs: list[str],
    out: Path,
    split: str | None = None,
    classes: Path | None = None,
    names: Path | None = None,
    image_key: str = "auto",
    label_key: str = "cls",
    workers: int = 1,
) -> dict[str, Any]:
    """Index ``inputs`` into ``out``; returns the manifest (see the module docstring)."""
    by_split = expand_inputs(inputs, split)
    everything = [p for paths in by_split.values() for p in paths]
    names_seen: dict[str, Path] = {}
    for p in everything:
        if p.name in names_seen and names_seen[p.name] != p:
            raise IndexingError(f"two shards named {p.name}: {names_seen[p.name]} and {p}; index them separately")
        names_seen[p.name] = p
    lengths = expected_lengths(everything)
    out.mkdir(parents=True, exist_ok=True)
    manifest = _existing(out)
    total_bytes = sum(p.stat().st_size for p in everything)
    log.info("indexing %d shards (%.1f GB) into %s", len(everything), total_bytes / 1e9, out)
    t0, done_bytes, max_label = time.monotonic(), 0, -1
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        tasks = [(str(p.resolve()), image_key, label_key) for p in everything]
        scans = pool.imap(scan_shard, tasks) if pool else map(scan_shard, tasks)
        results: dict[str, ShardScan] = {}
        for n, scan in enumerate(scans, 1):
            results[scan.url] = scan
            done_bytes += scan.bytes
            max_label = max(max_label, scan.max_label)
            _progress(n, len(everything), done_bytes, total_bytes, t0)
    finally:
        if pool:
            pool.terminate()
    for name, paths in by_split.items():
        entries = []
        for p in paths:
            scan = results[str(p.resolve())]
            samples = len(scan.offsets) - 1
            if p.name in lengths and lengths[p.name] != samples:
                raise IndexingError(f"{p}: holds {samples} samples, its _info.json says {lengths[p.name]}")
            if scan.missing:
                log.warning("%s: %d samples without an image or a label (they will be skipped)", p, scan.missing)
            write_index(out / index_name(p.name), scan.offsets)
            entries.append({"name": p.name, "url": str(p.resolve()), "samples": samples, "bytes": scan.bytes,
                            "sha256": scan.sha256, "index": index_name(p.name)})  # fmt: skip
        manifest["splits"][name] = split_entry(entries)
    manifest["indexed"] = {"image_key": image_key, "label_key": label_key}
    write_json_atomic(out / MANIFEST_NAME, manifest)
    _write_classes(out, classes, names, max_label)
    for s in SPLITS:
        if s in manifest["splits"]:
            e = manifest["splits"][s]
            log.info("%s: %d samples in %d shards, %.2f GB", s, e["samples"], len(e["shards"]), e["bytes"] / 1e9)
    return manifest


def _existing(out: Path) -> dict[str, Any]:
    """The manifest already in ``out`` (indexing a second split adds to it), or a new one."""
    if (out / MANIFEST_NAME).is_file():
        return read_manifest(out / MANIFEST_NAME)
    return {"format": FORMAT, "splits": {}, "skipped": [], "num_skipped": 0, "reencoded": 0}


def _write_classes(out: Path, classes: Path | None, names: Path | None, max_label: int) -> None:
    id_names: dict[str, str] = {}
    if classes is not None:
        ids, id_names = read_class_ids(classes)
        if max_label >= len(ids):
            raise IndexingError(f"{classes}: lists {len(ids)} classes, the shards have label {max_label}")
    elif (out / CLASSES_NAME).is_file():
        return  # written by an earlier call (another split)
    else:
        ids = [str(i) for i in range(max_label + 1)]
        log.warning("no --classes: %d classes named by their index (labels 0..%d seen)", len(ids), max_label)
    if names is not None:
        id_names.update(read_class_ids(names)[1])
    write_json_atomic(out / CLASSES_NAME, classes_dict(ids, id_names))


def _progress(n: int, total: int, done: int, total_bytes: int, t0: float) -> None:
    elapsed = time.monotonic() - t0
    rate = done / max(elapsed, 1e-9)
    if n == total or n % max(1, total // 20) == 0:
        eta = (total_bytes - done) / max(rate, 1e-9)
        log.info("indexed %d/%d shards, %.1f GB, %.0f MB/s, ETA %.0f s", n, total, done / 1e9, rate / 1e6, eta)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dinat-index-shards", description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", metavar="PATH", help="SHARDS... (directories, files, brace patterns) OUT")
    p.add_argument("--split", choices=["train", "val"], help="the split these shards are (default: from an "
                   "_info.json beside them, else train)")  # fmt: skip
    p.add_argument("--classes", type=Path, help="class ids in label order: a text file (one per line, e.g. timm's "
                   "imagenet22k_synsets.txt), a words.txt or a classes.json")  # fmt: skip
    p.add_argument("--names", type=Path, help="class id -> name: words.txt ('id<TAB>name' lines)")
    p.add_argument("--image-key", default="auto", help="the image's key (default: the first of jpg/jpeg/png/webp)")
    p.add_argument("--label-key", default="cls", help="the label's key, or json:FIELD (default cls)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if len(args.paths) < 2:
        p.error("expected SHARDS... OUT")
    *inputs, out = args.paths
    try:
        index_shards(inputs, Path(out), args.split, args.classes, args.names, args.image_key, args.label_key,
                     max(1, args.workers))  # fmt: skip
    except (IndexingError, OSError, ValueError) as e:
        print(f"dinat-index-shards: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from pipeline.data.index_shards import main as _main  # the package module, so pool workers unpickle its names

    sys.exit(_main())
