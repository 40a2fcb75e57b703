"""The inputs: per-synset tars or an ImageFolder tree. Listing them, refusing what is not that, and indexing them.

Listing reads one directory (and the first headers of two tars, to tell a synset tar from a WebDataset shard
or a tar of tars); the index pass reads every tar's headers once, with ``pread`` of exactly the header blocks
(no buffered file object, so the cost does not depend on the filesystem's block size: Lustre and GPFS report
1 MiB or more, and a buffered read of a 512-byte header would pull that much). A class's index (member names,
sizes, data offsets, skipped members) is cached in ``OUT/.make-shards/sources/<class>.idx``, tagged with the
tar's size and mtime, so a re-run or a kill only re-reads tars that changed or were not indexed yet.

Keys: ``{class}_{path without extension}`` with every character outside ``[A-Za-z0-9_-]`` made ``_`` (no
class prefix when the file name already starts with ``{class}_``, as ImageNet's do).
"""

from __future__ import annotations

import json
import os
import re
import struct
import tarfile
import tempfile
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .images import is_image_name

LAYOUTS = ("synset-tars", "folders")
INDEX_VERSION = 1  # of the cached class index files
PEEK_MEMBERS = 8  # headers read from a tar to tell what it holds
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_NUMBERED = re.compile(r"(.*[^\d])([-_.])(\d+)")  # a numbered shard name's stem: prefix, separator, number
_SIDECARS = frozenset({".cls", ".json", ".txt", ".npy", ".pth", ".pyd", ".idx", ".index", ".id", ".label"})
_ARCHIVES = (".tar", ".tar.gz", ".tgz", ".zip", ".tar.zst")

Counts = Counter  # I/O counters: tars, headers, header_bytes, opens, member_reads, member_bytes, ...


def skip_record(source: str, reason: str, detail: str = "") -> dict[str, str]:
    return {"source": source, "reason": reason, **({"detail": detail} if detail else {})}


# --------------------------------------------------------------------------------------------------- listing


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


def _few(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def _shard_pattern(tars: list[str]) -> str | None:
    """``imagenet22k-train-{0000..4095}.tar`` when every tar is one numbered series (WebDataset shard names)."""
    stems = [_NUMBERED.fullmatch(t[: -len(".tar")]) for t in tars]
    if len(tars) < 2 or not all(stems) or len({(m[1], m[2], len(m[3])) for m in stems}) != 1:
        return None
    m, last = stems[0], stems[-1]
    return f"{m[1]}{m[2]}{{{m[3]}..{last[3]}}}.tar"


def _webdataset_refusal(where: Path, tars: list[str], pattern: str | None, why: str) -> ValueError:
    urls = f"'{where / pattern}'" if pattern else f"'{where}/<shard>.tar' URLs"
    return ValueError(
        f"{where}: {len(tars)} tars ({_few(tars)}) are WebDataset shards ({why}), not one tar per synset: "
        f"train on them directly (data.train={urls}) or give dinat-make-shards the raw per-synset tars"
    )


def peek_members(path: Path, count: Counts | None = None) -> list[str]:
    """The names of the first few members of a tar ([] when unreadable)."""
    names: list[str] = []
    try:
        with PreadFile(path, count) as f, tarfile.open(fileobj=f, mode="r:") as tf:
            while len(names) < PEEK_MEMBERS and (m := tf.next()) is not None:
                names.append(m.name)
    except (tarfile.TarError, OSError, EOFError):
        pass
    return names


def _check_tar_contents(src: Path, tar: str, count: Counts | None) -> None:
    """Refuse a tar whose first members are WebDataset samples or tars rather than one synset's images."""
    names = [n for n in peek_members(src / tar, count) if not n.endswith("/")]
    if not names:
        return  # empty or unreadable: skipped and reported like any bad tar
    stems = Counter(n.split(".", 1)[0] for n in names)
    sidecars = [n for n in names if os.path.splitext(n)[1].lower() in _SIDECARS]
    if sidecars and max(stems.values()) > 1:
        pattern = _shard_pattern(_top_level(src)[0])
        raise _webdataset_refusal(src, _top_level(src)[0], pattern, f"{tar} holds {_few(names, 4)}")
    archives = [n for n in names if n.lower().endswith(_ARCHIVES)]
    if archives:
        raise ValueError(
            f"{src / tar} holds archives ({_few(archives)}), not images: extract it "
            f"(mkdir RAW && tar -xf {src / tar} -C RAW) and pass RAW as SRC"
        )
    if not any(is_image_name(n) for n in names):
        raise ValueError(
            f"{src / tar}: not a class tar: its first {len(names)} members ({_few(names)}) are not images; "
            f"SRC must hold one tar of images per synset (n01440764.tar) or one folder of images per class"
        )


def _check_folder_contents(src: Path, folder: str) -> None:
    """Refuse a 'class folder' that holds tars and no images (SRC one level too high)."""
    entries = []
    with os.scandir(src / folder) as it:
        for e in it:
            entries.append(e.name)
            if len(entries) >= 4 * PEEK_MEMBERS:
                break
    tars = sorted(n for n in entries if n.endswith(".tar"))
    if tars and not any(is_image_name(n) for n in entries):
        if pattern := _shard_pattern(tars):
            raise _webdataset_refusal(src / folder, tars, pattern, "numbered like shards")
        raise ValueError(
            f"{src / folder} holds tars ({_few(tars)}), not images: if they are per-synset tars, "
            f"pass {src / folder} as SRC"
        )


def list_classes(src: Path, layout: str = "auto", count: Counts | None = None) -> tuple[str, list[str], list[dict]]:
    """(layout, class ids sorted, skipped top-level entries); ValueError saying what was found when it is not a
    raw release (empty, an archive, WebDataset shards, a tar of tars, this tool's own output)."""
    if not src.is_dir():
        raise ValueError(f"{src}: no such directory")
    if layout not in ("auto", *LAYOUTS):
        raise ValueError(f"layout {layout!r}: expected auto, {' or '.join(LAYOUTS)}")
    tars, dirs, other = _top_level(src)
    expected = "one tar per synset (n01440764.tar, ...) or one folder of images per class"
    if "manifest.json" in other and any(re.fullmatch(r"(train|val)-\d{6}\.tar", t) for t in tars):
        raise ValueError(f"{src} holds shards written by dinat-make-shards (manifest.json): train on it "
                         f"(data.train={src}) instead of converting it again")  # fmt: skip
    if not (tars or dirs):
        visible = [n for n in other if not n.startswith(".")]
        if not visible:
            raise ValueError(f"{src}: empty directory; expected {expected}")
        raise ValueError(f"{src}: no class tars or class folders, only {len(visible)} other files ({_few(visible)}); "
                         f"if that is the release archive, extract it (tar -xf FILE -C RAW) and pass RAW")  # fmt: skip
    if layout == "auto":
        if tars and dirs:
            raise ValueError(f"{src}: holds both *.tar files and folders; pass --layout synset-tars or folders")
        layout = "synset-tars" if tars else "folders"
    names, extra = (tars, dirs) if layout == "synset-tars" else (dirs, tars)
    if not names:
        kind = "class tars (*.tar)" if layout == "synset-tars" else "class folders"
        raise ValueError(f"{src}: no {kind} found; expected {expected}")
    if layout == "synset-tars":
        pattern = _shard_pattern(tars)
        if pattern or "_info.json" in other:
            raise _webdataset_refusal(src, tars, pattern, "numbered like shards" if pattern else "_info.json")
        for tar in dict.fromkeys((names[0], names[-1])):  # first, then last: the error names the first bad one
            _check_tar_contents(src, tar, count)
    else:
        _check_folder_contents(src, names[0])
    reason = "not a class tar" if layout == "synset-tars" else "not in a class folder"
    skipped = [skip_record(n, reason) for n in sorted(extra + other)]
    ids = [n[: -len(".tar")] for n in names] if layout == "synset-tars" else names
    return layout, ids, skipped


def tar_stats(src: Path, class_ids: list[str]) -> np.ndarray:
    """(classes, 2) int64: each class tar's size and mtime_ns, what its cached index and the plan are tied to."""
    out = np.empty((len(class_ids), 2), dtype=np.int64)
    for i, c in enumerate(class_ids):
        st = os.stat(src / f"{c}.tar")
        out[i] = st.st_size, st.st_mtime_ns
    return out


# ------------------------------------------------------------------------------------------------ tar headers


class PreadFile:
    """A read-only file object over ``os.pread``: no buffer, so each read costs what it asks for whatever the
    filesystem's block size; counts reads in ``count`` (``header_reads``, ``header_bytes``)."""

    def __init__(self, path: str | Path, count: Counts | None = None):
        self.name, self.mode = str(path), "rb"
        self.fd = os.open(path, os.O_RDONLY)
        self.size, self.pos = os.fstat(self.fd).st_size, 0
        self.count = count if count is not None else Counter()
        self.count["opens"] += 1
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)  # no kernel read-ahead between headers

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n < 0 else n
        if n == 1:
            # tarfile reads the byte before each header only to learn whether the previous member's data is
            # all there; the file's size answers that without a read (the byte itself is never used).
            data = b"\0" if self.pos < self.size else b""
        else:
            data = os.pread(self.fd, n, self.pos)
            self.count["header_reads"] += 1
            self.count["header_bytes"] += len(data)
        self.pos += len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else self.pos + pos if whence == 1 else self.size + pos
        return self.pos

    def tell(self) -> int:
        return self.pos

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> PreadFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Listing:
    """One class's entries, sorted by name: path inside the class tar or folder, size, data offset (-1: a file).
    ``blob``/``ends`` hold the names utf-8 encoded (``names`` is empty when loaded without decoding them)."""

    names: list[str]
    sizes: np.ndarray  # (n,) int64
    offsets: np.ndarray  # (n,) int64
    skipped: list[dict[str, str]]
    blob: np.ndarray | None = None  # uint8
    ends: np.ndarray | None = None  # (n,) int64 end offset of each name in blob


def _listing(entries: list[tuple[str, int, int]], skipped: list[dict[str, str]]) -> Listing:
    entries.sort()
    return Listing(
        [e[0] for e in entries],
        np.array([e[1] for e in entries], dtype=np.int64),
        np.array([e[2] for e in entries], dtype=np.int64),
        skipped,
    )


def _end_of_archive(f: PreadFile, offset: int) -> bool:
    f.seek(offset)
    block = f.read(tarfile.BLOCKSIZE)
    return len(block) == tarfile.BLOCKSIZE and not block.strip(b"\0")


def scan_tar(path: Path, count: Counts | None = None) -> Listing:
    """Regular members of one class tar from its headers; members cut off by truncation are skipped."""
    count = count if count is not None else Counter()
    try:
        f = PreadFile(path, count)
    except OSError as e:
        return _listing([], [skip_record(path.name, "unreadable tar", str(e))])
    count["tars"] += 1
    with f:
        if f.size == 0:
            return _listing([], [skip_record(path.name, "empty file")])
        try:
            tf = tarfile.open(fileobj=f, mode="r:")
        except (tarfile.TarError, OSError) as e:
            return _listing([], [skip_record(path.name, "unreadable tar", str(e))])
        with tf:
            found, skipped = _members(tf, f, path.name, count)
    return _listing(list(found.values()), skipped)


def _members(tf: tarfile.TarFile, f: PreadFile, tar: str, count: Counts) -> tuple[dict, list[dict[str, str]]]:
    """name -> (name, size, data offset) of the regular members (the last of a repeated name), and skip records."""
    found: dict[str, tuple[str, int, int]] = {}
    skipped: list[dict[str, str]] = []
    while True:
        try:
            m = tf.next()
        except (tarfile.TarError, OSError, EOFError) as e:
            if tf.offset < f.size:  # past the end: the cut-off member was caught by the size check below
                skipped.append(skip_record(tar, "corrupt tar", f"stopped at byte {tf.offset}: {e}"))
            return found, skipped
        if m is None:
            if not _end_of_archive(f, tf.offset):
                skipped.append(skip_record(tar, "truncated tar", f"no end-of-archive at byte {tf.offset}"))
            return found, skipped
        count["headers"] += 1
        tf.members.clear()  # tarfile keeps every member; nothing here needs them
        name = m.name[2:] if m.name.startswith("./") else m.name
        source = f"{tar}/{name}"
        if m.isdir():
            continue
        if not m.isreg():
            skipped.append(skip_record(source, "not a regular file"))
        elif m.offset_data + m.size > f.size:
            skipped.append(skip_record(source, "truncated tar", f"{m.size} bytes at {m.offset_data}, file {f.size}"))
        else:
            if name in found:
                skipped.append(skip_record(source, "duplicate tar member", f"superseded at byte {m.offset_data}"))
            found[name] = (name, m.size, m.offset_data)


def scan_folder(path: Path) -> Listing:
    """Every file under one class folder (recursively), with its size."""
    found: list[tuple[str, int, int]] = []
    for dirpath, _, files in os.walk(path):
        for f in files:
            full = Path(dirpath, f)
            try:
                size = full.stat().st_size
            except OSError:
                size = -1  # a dangling link: skipped as a read error
            found.append((full.relative_to(path).as_posix(), size, -1))
    return _listing(found, [])


# ----------------------------------------------------------------------------------------- cached class index


def _encode_names(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 blob, int64 end offsets) of utf-8 names (undecodable bytes kept via surrogateescape)."""
    encoded = [n.encode("utf-8", "surrogateescape") for n in names]
    blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    return blob, np.cumsum([len(b) for b in encoded], dtype=np.int64)


def decode_names(data: bytes, ends: np.ndarray, start: int = 0) -> list[str]:
    """The names in ``data`` (the blob from offset ``start`` on) that end at offsets ``ends``."""
    out, prev = [], 0
    for end in (ends - start).tolist():
        out.append(data[prev:end].decode("utf-8", "surrogateescape"))
        prev = end
    return out


_MAGIC = b"DINATIDX"
_HEAD = struct.Struct("<8sII")  # magic, header length, crc32 of everything after the fixed head


def save_listing(path: Path, listing: Listing, stat: tuple[int, int]) -> None:
    """Write a class index so readers see the old file or the whole new one: a fixed head (magic, header length,
    crc32), a JSON header (version, the tar's size and mtime, counts, skip records), then the arrays."""
    blob, ends = _encode_names(listing.names)
    sizes, offsets = np.ascontiguousarray(listing.sizes, "<i8"), np.ascontiguousarray(listing.offsets, "<i8")
    header = json.dumps({"version": INDEX_VERSION, "stat": list(stat), "n": len(sizes), "blob": len(blob),
                         "skipped": listing.skipped}).encode()  # fmt: skip
    body = b"".join([header, sizes.tobytes(), offsets.tobytes(), ends.astype("<i8").tobytes(), blob.tobytes()])
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_HEAD.pack(_MAGIC, len(header), zlib.crc32(body)) + body)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_listing(path: Path, stat: tuple[int, int], decode: bool = True) -> Listing | None:
    """The cached index at ``path`` when it is whole (crc32) and was made from a tar of this size and mtime,
    else None (the tar is then indexed again)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        magic, hlen, crc = _HEAD.unpack_from(data)
        body = memoryview(data)[_HEAD.size :]
        if magic != _MAGIC or zlib.crc32(body) != crc:
            return None
        h = json.loads(bytes(body[:hlen]))
        if h["version"] != INDEX_VERSION or tuple(h["stat"]) != tuple(stat):
            return None
        n, at = h["n"], hlen
        sizes, offsets, ends = (np.frombuffer(body, "<i8", n, at + 8 * n * i) for i in range(3))
        blob = np.frombuffer(body, np.uint8, h["blob"], at + 24 * n)
    except (OSError, ValueError, KeyError, TypeError, struct.error):  # missing, cut short, damaged
        return None
    names = decode_names(blob.tobytes(), ends) if decode else []
    return Listing(names, sizes, offsets, h["skipped"], blob, ends)


def index_class(src: Path, layout: str, class_id: str, cache: Path | None, count: Counts) -> Listing:
    """One class's listing: from its cached index when the tar is unchanged, else by reading its headers."""
    if layout == "folders":
        return scan_folder(src / class_id)
    path = src / f"{class_id}.tar"
    try:
        st = os.stat(path)
    except OSError as e:
        return _listing([], [skip_record(path.name, "unreadable tar", str(e))])
    stat = (st.st_size, st.st_mtime_ns)
    cached = cache / f"{class_id}.idx" if cache is not None else None
    if cached is not None and (listing := load_listing(cached, stat)) is not None:
        count["reused"] += 1
        return listing
    listing = scan_tar(path, count)
    if cached is not None:
        save_listing(cached, listing, stat)
    return listing


# ----------------------------------------------------------------------------------------------------- keys


def make_key(class_id: str, rel: str) -> str:
    """``n01440764`` + ``n01440764_10026.JPEG`` -> ``n01440764_10026``; ``cat`` + ``a/b.c.png`` -> ``cat_a_b_c``."""
    return key_maker(class_id)(rel)


def key_maker(class_id: str) -> Callable[[str], str]:
    """``make_key`` for one class (its sanitised prefix computed once)."""
    prefix = _UNSAFE.sub("_", class_id) + "_"

    def key(rel: str) -> str:
        stem = rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel
        stem = _UNSAFE.sub("_", stem)
        return stem if stem.startswith(prefix) else prefix + stem

    return key


def source_name(layout: str, class_id: str, rel: str) -> str:
    """Where an input is, relative to SRC: ``n01440764.tar/n01440764_10026.JPEG`` or ``cat/a/b.jpg``."""
    return f"{class_id}.tar/{rel}" if layout == "synset-tars" else f"{class_id}/{rel}"


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


def item_filter(listing: Listing, class_id: str, layout: str) -> tuple[np.ndarray, list[dict[str, str]]]:
    """(indices of the entries that are candidate images, skip records for the others)."""
    keep, skipped = [], []
    sizes = listing.sizes.tolist()
    for i, rel in enumerate(listing.names):
        size = sizes[i]
        if not is_image_name(rel):
            ext = Path(rel).suffix or "(none)"
            skipped.append(skip_record(source_name(layout, class_id, rel), "not an image file", f"extension {ext}"))
        elif size < 0:
            skipped.append(skip_record(source_name(layout, class_id, rel), "read error", "cannot stat"))
        elif size == 0:
            skipped.append(skip_record(source_name(layout, class_id, rel), "empty file"))
        else:
            keep.append(i)
    return np.array(keep, dtype=np.int64), skipped


def read_member(fd: int, offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset`` in one ``pread`` (more only past the kernel's 2 GiB limit per call)."""
    parts, done = [], 0
    while done < size:
        chunk = os.pread(fd, size - done, offset + done)
        if not chunk:
            break
        parts.append(chunk)
        done += len(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)
