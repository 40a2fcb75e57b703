"""Reading samples out of WebDataset shards: a range of samples, window by window, in a seeded order.

With a sample index (:mod:`pipeline.data.index`) and a local (or shared-filesystem) path, a window is one seek and
one sequential read of exactly its bytes. Without one (``pipe:`` and ``http(s)://`` URLs, or a shard set that was
never indexed) the shard streams from its start and the samples before the range are read and dropped.
Tar members become samples as webdataset groups them (``tar_file_iterator`` + ``group_by_keys``).
"""

from __future__ import annotations

import io
import itertools
import logging
from collections.abc import Callable, Iterator
from typing import Any

from webdataset.tariterators import group_by_keys, tar_file_iterator, url_opener

from .index import read_index
from .plan import Piece, Shard, permutation

logger = logging.getLogger(__name__)


class ShardError(RuntimeError):
    """A shard that cannot be read as its manifest and index describe it."""


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _samples_of(stream: Any, url: str, handler: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
    files = ({**f, "__url__": url} for f in tar_file_iterator(stream, handler=handler))
    return group_by_keys(files, handler=handler)


class ShardReader:
    """Samples of one shard by position; keeps the open file or stream between consecutive reads."""

    def __init__(self, shard: Shard, on_error: Callable[[Exception], bool]):
        self.shard, self.on_error = shard, on_error
        self.offsets = None
        if shard.index is not None and is_local(shard.url):
            self.offsets = read_index(shard.index, shard.samples)
        self._file = None
        self._stream: Iterator[dict[str, Any]] | None = None
        self._next = 0  # position of the stream's next sample

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = self._stream = None

    def read(self, a: int, b: int | None) -> list[dict[str, Any]]:
        """Samples ``a..b-1`` (``b`` None: to the end of the shard)."""
        if self.offsets is not None:
            b = len(self.offsets) - 1 if b is None else b
            return self._read_indexed(a, b)
        return self._read_streamed(a, b)

    def _read_indexed(self, a: int, b: int) -> list[dict[str, Any]]:
        if self._file is None:
            self._file = open(self.shard.url, "rb", buffering=0)  # explicit reads: no block-size read-ahead
        start, stop = int(self.offsets[a]), int(self.offsets[b])
        self._file.seek(start)
        data = self._file.read(stop - start)
        if len(data) != stop - start:
            raise ShardError(f"{self.shard.url}: truncated: the index needs bytes {start}..{stop}, read {len(data)}")
        samples = list(_samples_of(io.BytesIO(data), self.shard.url, self.on_error))
        if len(samples) != b - a:
            raise ShardError(
                f"{self.shard.url}: bytes {start}..{stop} hold {len(samples)} samples, its index says {b - a}; "
                "the shard changed since it was indexed (re-run dinat-index-shards)"
            )
        return samples

    def _read_streamed(self, a: int, b: int | None) -> list[dict[str, Any]]:
        if self._stream is None or self._next > a:
            self.close()
            opened = url_opener(iter([{"url": self.shard.url}]), handler=self.on_error)
            self._stream = itertools.chain.from_iterable(
                _samples_of(s["stream"], self.shard.url, self.on_error) for s in opened
            )
            self._next = 0
        for _ in itertools.islice(self._stream, a - self._next):  # read and dropped: no index to seek with
            pass
        self._next = a
        samples = list(itertools.islice(self._stream, None if b is None else b - a))
        self._next += len(samples)
        return samples


def read_piece(
    reader: ShardReader, piece: Piece, window: int, key: Callable[[int], str], skip: int = 0
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(sample position in the shard, sample) of ``piece`` in reading order, from its ``skip``-th on.

    A run is read in windows of ``window`` samples from its start, each emitted in the order of the permutation
    ``key(window start)``; ``window`` <= 1 reads in shard order. A leftover window (``piece.key``) is read whole and
    emitted from its own permutation, positions ``piece.skip`` onwards."""
    if piece.take is not None:
        samples = reader.read(piece.start, piece.stop)
        order = permutation(piece.key, len(samples))[piece.skip : piece.skip + piece.take]
        for i in order[skip:]:
            yield piece.start + i, samples[i]
        return
    stop = piece.stop
    if window <= 1:
        for offset, sample in enumerate(reader.read(piece.start + skip, stop)):
            yield piece.start + skip + offset, sample
        return
    first = piece.start + skip // window * window
    for start in itertools.count(first, window):
        if stop is not None and start >= stop:
            return
        end = start + window if stop is None else min(start + window, stop)
        samples = reader.read(start, end)
        if not samples:
            return  # the end of a shard read without a sample count
        order = permutation(key(start), len(samples))
        into = skip % window if start == first else 0
        for i in order[into:]:
            yield start + i, samples[i]
        if stop is None and len(samples) < window:
            return
