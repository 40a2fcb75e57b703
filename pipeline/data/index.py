"""Per-shard sample index: where each sample of a WebDataset shard starts, so a reader can seek to sample i.

One file per shard, ``index/<shard name>.npy`` beside manifest.json (the manifest entry names it under
``"index"``): an int64 array of ``samples + 1`` byte offsets. ``offsets[i]`` is where the first tar header of
sample ``i`` starts (samples in tar order, a sample being the consecutive members that share a key);
``offsets[-1]`` is where the end-of-archive blocks start. Sample ``i`` is the byte range
``[offsets[i], offsets[i + 1])``: whole tar members, headers included, which any tar reader reads on its own,
so samples ``i..j`` are one contiguous read. 8 bytes per sample: 114 MB for ImageNet-22k's 14.2M images,
spread over its shards; a reader loads only the files of the shards it reads.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

INDEX_DIR = "index"


def index_name(shard_name: str) -> str:
    """``train-000000.tar`` -> ``index/train-000000.tar.npy`` (relative to the manifest's directory)."""
    return f"{INDEX_DIR}/{shard_name}.npy"


def write_index(path: str | Path, offsets: np.ndarray | list[int]) -> None:
    """Write ``offsets`` (samples + 1 increasing byte offsets) so readers see the old file or the whole new one."""
    path = Path(path)
    offsets = np.asarray(offsets, dtype=np.int64)
    check_offsets(offsets, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, offsets, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_index(path: str | Path, samples: int | None = None) -> np.ndarray:
    """The offsets in ``path``; ValueError naming the file when it is not an index (of ``samples`` samples)."""
    path = Path(path)
    try:
        offsets = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such index file") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a shard index ({e})") from None
    if offsets.dtype != np.int64 or offsets.ndim != 1:
        raise ValueError(f"{path}: not a shard index (expected int64 offsets, got {offsets.dtype} {offsets.shape})")
    check_offsets(offsets, path)
    if samples is not None and len(offsets) != samples + 1:
        raise ValueError(f"{path}: indexes {len(offsets) - 1} samples, the manifest says {samples}")
    return offsets


def check_offsets(offsets: np.ndarray, where: str | Path) -> None:
    if len(offsets) < 1 or offsets[0] < 0 or (len(offsets) > 1 and not (np.diff(offsets) > 0).all()):
        raise ValueError(f"{where}: index offsets must be >= 0 and strictly increasing")
    if (offsets % 512).any():
        raise ValueError(f"{where}: index offsets must fall on 512-byte tar blocks")
