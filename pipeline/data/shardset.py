"""From what ``data.train`` / ``data.val`` say to a list of :class:`Shard` (URL, sample count, sample index).

Accepted: a directory holding a manifest.json (written by ``dinat-make-shards`` or ``dinat-index-shards``); a
brace pattern, a ``::``-joined string or a list of paths or URLs (``pipe:`` commands included). Shards of a
pattern or list take their sample counts and indexes from a manifest: ``data.manifest``, or else the manifest.json
beside local shards, matched by file name, whatever the names are. Without one, only resampled mode can read them.

Manifest entries name a shard relative to the manifest's directory, or give its ``url`` (an indexed set that
lives elsewhere); ``index`` is the sample index file, relative to the manifest's directory.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from webdataset.shardlists import expand_urls

from .manifest import CLASSES_NAME, MANIFEST_NAME, SPLITS, read_manifest
from .plan import Shard
from .reader import is_local

_TAR_NAME = re.compile(r"[^/'\"]+\.tar\b")  # a file name in a path or a quoted pipe: command, spaces allowed


def _shard(entry: dict[str, Any], root: Path, url: str | None = None) -> Shard:
    index = str(root / entry["index"]) if entry.get("index") else None
    return Shard(url or entry.get("url") or str(root / entry["name"]), int(entry["samples"]), index)


def _entries(manifest: dict[str, Any], split: str | None) -> list[dict[str, Any]]:
    splits = SPLITS if split is None else (split,)
    return [e for s in splits for e in manifest["splits"].get(s, {}).get("shards", [])]


def no_manifest_hint(directory: Path) -> str:
    tars = sorted(p.name for p in directory.glob("*.tar"))
    if not tars:
        return f"{directory}: no {MANIFEST_NAME} and no shards (*.tar)"
    return (
        f"{directory}: no {MANIFEST_NAME} (found {len(tars)} tar files, e.g. {tars[0]}); to train on existing "
        f"WebDataset shards index them once: dinat-index-shards {directory} {directory}-index, then point "
        f"data.train at {directory}-index (raw per-class tars: dinat-make-shards writes shards and a manifest)"
    )


def list_shards(
    urls: str | Path | Sequence[str], manifest: str | Path | None = None, split: str = "train"
) -> list[Shard]:
    """The shards ``urls`` names, with counts and indexes from the manifest (see the module docstring).
    ValueError / FileNotFoundError naming the problem; shard files themselves are not checked here
    (:func:`missing_shards` does, on one rank)."""
    if isinstance(urls, (str, Path)) and Path(urls).is_dir():
        directory = Path(urls)
        path = Path(manifest) if manifest else directory / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file" if manifest else no_manifest_hint(directory))
        entries = _entries(read_manifest(path), split)
        if not entries:
            raise ValueError(f"{path}: the manifest lists no '{split}' shards")
        return [_shard(e, path.parent) for e in entries]
    expanded = expand_urls(str(urls)) if isinstance(urls, (str, Path)) else [str(u) for u in urls]
    if not expanded:
        raise ValueError(f"no shards in {urls!r}")
    if manifest is None:
        local = Path(expanded[0])
        beside = local.parent / MANIFEST_NAME if is_local(expanded[0]) else None
        if beside is None or not beside.is_file():
            return [Shard(u) for u in expanded]
        manifest = beside
    path = Path(manifest)
    by_name = {Path(e["name"]).name: e for e in _entries(read_manifest(path), None)}
    shards = []
    for url in expanded:
        words = [w.strip("'\"").rsplit("/", 1)[-1] for w in url.split()]  # unquoted commands
        names = [n for n in [*_TAR_NAME.findall(url), *words] if n in by_name]
        if not names:
            raise ValueError(f"shard {url} is not in {path}")
        shards.append(_shard(by_name[names[-1]], path.parent, url))
    return shards


def missing_shards(shards: list[Shard]) -> list[str]:
    """Local shard files (and index files) that do not exist; remote URLs are not checked."""
    missing = [s.url for s in shards if is_local(s.url) and not Path(s.url).is_file()]
    return missing + [s.index for s in shards if s.index is not None and not Path(s.index).is_file()]


def metadata_dir(train: str, manifest: str | None) -> Path:
    """Where classes.json is: beside ``data.manifest``, in the shard directory, or beside the first local shard."""
    if manifest:
        return Path(manifest).parent
    if Path(train).is_dir():
        return Path(train)
    first = expand_urls(train)[0] if train else ""
    return Path(first).parent if first and is_local(first) else Path(".")


def classes_file(train: str, manifest: str | None) -> Path:
    path = metadata_dir(train, manifest) / CLASSES_NAME
    if not path.is_file():
        where = "beside data.manifest" if manifest else "in data.train's directory"
        raise FileNotFoundError(
            f"data.train: no {CLASSES_NAME} {where} ({path}); dinat-make-shards and dinat-index-shards write one"
            + ("" if manifest else "; for remote shards set data.manifest to a local copy of their manifest")
        )
    return path
