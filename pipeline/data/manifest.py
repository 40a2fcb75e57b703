"""classes.json and manifest.json: reading, writing (atomically) and checking shards against them.

classes.json::

    {"num_classes": 2, "classes": [{"index": 0, "id": "n01440764", "name": "tench"}, ...]}

manifest.json::

    {"format": 1,
     "splits": {"train": {"samples": N, "bytes": B, "shards": [{"name": "train-000000.tar", "samples": n,
                                                                 "bytes": b, "sha256": "..."}, ...]},
                "val": {...}},
     "skipped": [{"source": "n01440764.tar/n01440764_18.JPEG", "reason": "truncated JPEG"}, ...],
     "num_skipped": K}
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

FORMAT = 1
SPLITS = ("train", "val")
CLASSES_NAME = "classes.json"
MANIFEST_NAME = "manifest.json"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON so that readers see either the old file or the complete new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; others on a cluster must read it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_path(path: str | Path) -> None:
    """fsync a file or a directory (a directory: so that a rename into it survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def classes_dict(ids: list[str], names: dict[str, str] | None = None) -> dict[str, Any]:
    names = names or {}
    return {
        "num_classes": len(ids),
        "classes": [{"index": i, "id": c, "name": names.get(c, c)} for i, c in enumerate(ids)],
    }


def read_classes(path: str | Path) -> list[dict[str, Any]]:
    """The class list of a classes.json (a directory holding one, or the file), checked."""
    path = Path(path)
    if path.is_dir():
        path = path / CLASSES_NAME
    d = read_json(path)
    classes = d.get("classes") if isinstance(d, dict) else None
    if not isinstance(classes, list) or [c.get("index") for c in classes] != list(range(len(classes))):
        raise ValueError(f"{path}: expected 'classes' as a list with indices 0..N-1")
    if d.get("num_classes") != len(classes):
        raise ValueError(f"{path}: num_classes {d.get('num_classes')} != {len(classes)} classes listed")
    return classes


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    m = read_json(path)
    if not isinstance(m, dict) or m.get("format") != FORMAT or not isinstance(m.get("splits"), dict):
        raise ValueError(f"{path}: not a shard manifest (format {FORMAT})")
    return m


def split_entry(shards: list[dict[str, Any]]) -> dict[str, Any]:
    shards = sorted(shards, key=lambda s: s["name"])
    return {
        "samples": sum(s["samples"] for s in shards),
        "bytes": sum(s["bytes"] for s in shards),
        "shards": shards,
    }


def verify_shard(path: str | Path, entry: dict[str, Any], check_hash: bool = True) -> bool:
    """True when the file at ``path`` is the complete shard the manifest entry describes."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size != entry["bytes"]:
        return False
    return not check_hash or sha256_file(path) == entry["sha256"]
