"""The inputs: enumerating them (per-synset tars or an ImageFolder tree) and planning which shard each goes to.

Scanning reads only tar headers and directory entries; image bytes are read later, one item at a time, by
random access (``read_item``), so shard jobs can run in any order and in parallel.

The plan depends only on the inputs' names and sizes and on the options, never on how many processes write it,
so parts written by separate Slurm tasks compose and re-runs resume:

* classes: sorted ids -> indices 0..N-1.
* keys: ``{class}_{path without extension}`` with every character outside ``[A-Za-z0-9_-]`` made ``_`` (no
  class prefix when the file name already starts with ``{class}_``, as ImageNet's do); keys that then collide
  all get ``-{sha1(source)[:10]}``.
* val: per class, the ``val_per_class`` items with the smallest ``sha1(f"{seed}:{key}")``, but never a whole
  class: a class of n <= N items gives n - 1 (a class of one item has no val sample). Items that later fail to
  decode are skipped where they fall, so such a class has fewer val samples.
* order: train by ``sha1(f"{seed}:train:{key}")`` (a global shuffle), val by class then key; shards are
  consecutive runs of that order, cut at ``shard_samples`` or at ``shard_bytes`` estimated from input sizes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .images import BadImage, is_image_name
from .manifest import shard_name

LAYOUTS = ("synset-tars", "folders")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True, slots=True)
class Item:
    """One candidate image. ``source`` is relative to SRC: ``n01440764.tar/n01440764_10026.JPEG`` (offset = byte
    offset of the member's data in the class tar) or ``cat/sub/x.jpg`` (offset -1)."""

    key: str
    source: str
    label: int
    size: int
    offset: int


@dataclass
class Scan:
    layout: str
    class_ids: list[str]
    items: list[Item]
    skipped: list[dict[str, str]] = field(default_factory=list)


def skip_record(source: str, reason: str, detail: str = "") -> dict[str, str]:
    return {"source": source, "reason": reason, **({"detail": detail} if detail else {})}


def _top_level(src: Path) -> tuple[list[str], list[str], list[str]]:
    """(tar files, directories, other entries) directly under ``src``, each sorted; hidden entries are others."""
    tars, dirs, other = [], [], []
    for e in sorted(os.scandir(src), key=lambda e: e.name):
        if e.name.startswith("."):
            other.append(e.name)
        elif e.is_file() and e.name.endswith(".tar"):
            tars.append(e.name)
        elif e.is_dir():
            dirs.append(e.name)
        else:
            other.append(e.name)
    return tars, dirs, other


def list_classes(src: Path, layout: str = "auto") -> tuple[str, list[str], list[dict[str, str]]]:
    """(layout, class ids sorted, skipped top-level entries); ValueError naming ``src`` when there is nothing."""
    if not src.is_dir():
        raise ValueError(f"{src}: no such directory")
    if layout not in ("auto", *LAYOUTS):
        raise ValueError(f"layout {layout!r}: expected auto, {' or '.join(LAYOUTS)}")
    tars, dirs, other = _top_level(src)
    if layout == "auto":
        if tars and dirs:
            raise ValueError(f"{src}: holds both *.tar files and folders; pass --layout synset-tars or folders")
        layout = "synset-tars" if tars else "folders"
    names, extra = (tars, dirs) if layout == "synset-tars" else (dirs, tars)
    if not names:
        kind = "class tars (*.tar)" if layout == "synset-tars" else "class folders"
        raise ValueError(f"{src}: no {kind} found")
    reason = "not a class tar" if layout == "synset-tars" else "not in a class folder"
    skipped = [skip_record(n, reason) for n in sorted(extra + other)]
    ids = [n[: -len(".tar")] for n in names] if layout == "synset-tars" else names
    return layout, ids, skipped


Entry = tuple[str, int, int]  # (path relative to the class tar or folder, size, data offset or -1)


def _check_end_of_archive(f: Any, offset: int) -> bool:
    f.seek(offset)
    block = f.read(tarfile.BLOCKSIZE)
    return len(block) == tarfile.BLOCKSIZE and not block.strip(b"\0")


def scan_tar(path: Path) -> tuple[list[Entry], list[dict[str, str]]]:
    """Regular members of one class tar from its headers; members cut off by truncation are skipped."""
    found: dict[str, Entry] = {}
    skipped: list[dict[str, str]] = []
    size = path.stat().st_size
    if size == 0:
        return [], [skip_record(path.name, "empty file")]
    try:
        tf = tarfile.open(path, "r:")
    except (tarfile.TarError, OSError) as e:
        return [], [skip_record(path.name, "unreadable tar", str(e))]
    with tf:
        while True:
            try:
                m = tf.next()
            except (tarfile.TarError, OSError, EOFError) as e:
                if tf.offset < size:  # past the end: the cut-off member was caught by the size check below
                    skipped.append(skip_record(path.name, "corrupt tar", f"stopped at byte {tf.offset}: {e}"))
                break
            if m is None:
                if not _check_end_of_archive(tf.fileobj, tf.offset):
                    skipped.append(skip_record(path.name, "truncated tar", f"no end-of-archive at byte {tf.offset}"))
                break
            name = m.name[2:] if m.name.startswith("./") else m.name
            source = f"{path.name}/{name}"
            if m.isdir():
                continue
            if not m.isreg():
                skipped.append(skip_record(source, "not a regular file"))
            elif m.offset_data + m.size > size:
                skipped.append(skip_record(source, "truncated tar", f"{m.size} bytes at {m.offset_data}, file {size}"))
            else:
                if name in found:
                    skipped.append(skip_record(source, "duplicate tar member", f"superseded at byte {m.offset_data}"))
                found[name] = (name, m.size, m.offset_data)
    return [found[n] for n in sorted(found)], skipped


def scan_folder(path: Path) -> tuple[list[Entry], list[dict[str, str]]]:
    """Every file under one class folder (recursively), with its size."""
    found: list[Entry] = []
    for dirpath, _, files in os.walk(path):
        for f in files:
            full = Path(dirpath, f)
            try:
                size = full.stat().st_size
            except OSError:
                size = -1  # a dangling link: skipped as a read error
            found.append((full.relative_to(path).as_posix(), size, -1))
    return sorted(found), []


def _scan_class(task: tuple[str, str, str]) -> tuple[list[Entry], list[dict[str, str]]]:
    src, layout, class_id = task
    if layout == "synset-tars":
        return scan_tar(Path(src, f"{class_id}.tar"))
    return scan_folder(Path(src, class_id))


def make_key(class_id: str, rel: str) -> str:
    """``n01440764`` + ``n01440764_10026.JPEG`` -> ``n01440764_10026``; ``cat`` + ``a/b.c.png`` -> ``cat_a_b_c``."""
    stem = rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel
    stem, prefix = _UNSAFE.sub("_", stem), _UNSAFE.sub("_", class_id)
    return stem if stem.startswith(prefix + "_") else f"{prefix}_{stem}"


def _unique_keys(items: list[Item]) -> list[Item]:
    """Keys that collide after sanitizing all get a suffix from the hash of their source."""
    counts = Counter(it.key for it in items)
    if max(counts.values(), default=0) < 2:
        return items
    out = []
    for it in items:
        if counts[it.key] > 1:
            suffix = hashlib.sha1(it.source.encode()).hexdigest()[:10]
            it = Item(f"{it.key}-{suffix}", it.source, it.label, it.size, it.offset)
        out.append(it)
    dup = [k for k, n in Counter(it.key for it in out).items() if n > 1]
    if dup:
        raise ValueError(f"sample keys not unique even after hashing sources: {dup[:5]}")
    return out


def _class_items(class_id: str, label: int, prefix: str, entries: list[Entry]) -> Iterator[Item | dict[str, str]]:
    for rel, size, offset in entries:
        source = f"{prefix}/{rel}"
        if not is_image_name(rel):
            yield skip_record(source, "not an image file", f"extension {Path(rel).suffix or '(none)'}")
        elif size < 0:
            yield skip_record(source, "read error", "cannot stat")
        elif size == 0:
            yield skip_record(source, "empty file")
        else:
            yield Item(make_key(class_id, rel), source, label, size, offset)


def scan(src: Path, layout: str = "auto", mapper: Callable[..., Iterable[Any]] = map) -> Scan:
    """Every class and candidate image under ``src``; ``mapper`` (e.g. ``pool.imap``) runs the per-class scans."""
    layout, class_ids, skipped = list_classes(src, layout)
    items: list[Item] = []
    results = mapper(_scan_class, [(str(src), layout, c) for c in class_ids])
    for label, (class_id, (entries, class_skipped)) in enumerate(zip(class_ids, results)):
        skipped += class_skipped
        prefix = f"{class_id}.tar" if layout == "synset-tars" else class_id
        for x in _class_items(class_id, label, prefix, entries):
            (items if isinstance(x, Item) else skipped).append(x)
    return Scan(layout, class_ids, _unique_keys(items), skipped)


def read_item(src: Path, item: Item) -> bytes:
    """The bytes of one input: a seek into its class tar, or the whole file. BadImage when cut short."""
    if item.offset < 0:
        return (src / item.source).read_bytes()
    with open(src / item.source.split("/", 1)[0], "rb") as f:
        f.seek(item.offset)
        data = f.read(item.size)
    if len(data) != item.size:
        raise BadImage("truncated tar", f"read {len(data)} of {item.size} bytes")
    return data


def read_names(path: Path) -> dict[str, str]:
    """Class id -> name from ImageNet's words.txt (``id<TAB>name`` lines) or a JSON object."""
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("{"):
        try:
            names = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not all(isinstance(v, str) for v in names.values()):
            raise ValueError(f"{path}: expected a JSON object of class id -> name strings")
        return names
    names = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t", 1) if "\t" in line else line.split(None, 1)
        if len(parts) != 2:
            raise ValueError(f"{path}:{n}: expected 'class_id<TAB>name', got {line!r}")
        names[parts[0].strip()] = parts[1].strip()
    return names


@dataclass(frozen=True)
class Job:
    """One shard to write: its items in order, and a digest of everything its bytes depend on."""

    split: str
    index: int
    items: tuple[Item, ...]
    digest: str

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index)


def _sha1(s: str) -> str:
    return hashlib.sha1(s.encode()).hexdigest()


def split_items(items: list[Item], num_classes: int, seed: int, val_per_class: int) -> tuple[list[Item], list[Item]]:
    """(train in shuffled order, val by class then key); see the module docstring for the rule."""
    by_class: list[list[Item]] = [[] for _ in range(num_classes)]
    for it in items:
        by_class[it.label].append(it)
    train, val = [], []
    for group in by_class:
        group.sort(key=lambda it: _sha1(f"{seed}:{it.key}"))
        n_val = min(val_per_class, max(len(group) - 1, 0))
        val += sorted(group[:n_val], key=lambda it: it.key)
        train += group[n_val:]
    train.sort(key=lambda it: _sha1(f"{seed}:train:{it.key}"))
    return train, val


def estimated_bytes(size: int) -> int:
    """Tar bytes of one unchanged sample: .jpg header + padded data, .cls header + one data block."""
    return 3 * 512 + -(-size // 512) * 512


def chunk(items: list[Item], shard_samples: int, shard_bytes: float) -> list[list[Item]]:
    """Consecutive runs of ``items``: ``shard_samples`` each when > 0, else up to ``shard_bytes`` (estimated)."""
    chunks: list[list[Item]] = []
    cur: list[Item] = []
    cur_bytes = 0
    for it in items:
        b = estimated_bytes(it.size)
        if cur and (len(cur) >= shard_samples if shard_samples else cur_bytes + b > shard_bytes):
            chunks.append(cur)
            cur, cur_bytes = [], 0
        cur.append(it)
        cur_bytes += b
    return chunks + [cur] if cur else chunks


def job_digest(name: str, items: Iterable[Item], salt: str) -> str:
    h = hashlib.sha256(f"{salt}\t{name}\n".encode())
    for it in items:
        h.update(f"{it.key}\t{it.source}\t{it.label}\t{it.size}\t{it.offset}\n".encode())
    return h.hexdigest()


def make_plan(
    sc: Scan, seed: int, val_per_class: int, shard_samples: int, shard_bytes: float, salt: str = ""
) -> list[Job]:
    """Train jobs then val jobs; ``salt`` (the encoding settings) goes into every job digest."""
    train, val = split_items(sc.items, len(sc.class_ids), seed, val_per_class)
    jobs = []
    for split, items in (("train", train), ("val", val)):
        for i, part in enumerate(chunk(items, shard_samples, shard_bytes)):
            jobs.append(Job(split, i, tuple(part), job_digest(shard_name(split, i), part, salt)))
    return jobs
