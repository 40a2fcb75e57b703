"""``dinat-make-shards SRC OUT``: ImageNet-22k (per-synset tars or class folders) -> WebDataset shards.

Which input goes to which shard is planned first (:mod:`pipeline.data.sources`), identically whatever
``--workers`` and ``--part``; shard jobs are then the unit of work: job k (train shards first, then val) belongs
to part k % n. Each shard entry records the digest of its job (encoding settings and every item); a re-run keeps
a shard only when that digest matches and the file verifies (size + sha256), and rewrites the others.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import multiprocessing
import os
import re
import time
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import webdataset as wds

from .images import BadImage, prepare
from .manifest import (
    CLASSES_NAME,
    FORMAT,
    MANIFEST_NAME,
    SPLITS,
    classes_dict,
    read_classes,
    read_manifest,
    shard_name,
    split_entry,
    verify_shard,
    write_json_atomic,
)
from .sources import Item, Job, list_classes, make_plan, read_item, read_names, scan, skip_record

log = logging.getLogger(__name__)

PART_RE = re.compile(r"manifest\.part-(\d+)-of-(\d+)\.json")
TEST_PAUSE_ENV = "DINAT_MAKE_SHARDS_TEST_PAUSE"  # test-only: seconds to sleep after each sample written


@dataclass(frozen=True)
class Options:
    """What the plan and the shard bytes depend on."""

    seed: int = 0
    val_per_class: int = 10
    shard_size_mb: float = 256
    shard_samples: int = 0  # > 0 overrides shard_size_mb
    jpeg_quality: int = 95
    max_side: int = 0  # 0: never resize

    def __post_init__(self) -> None:
        if self.val_per_class < 0 or self.shard_samples < 0 or self.max_side < 0:
            raise ValueError("--val-per-class, --shard-samples and --max-side must be >= 0")
        if self.shard_size_mb <= 0:
            raise ValueError(f"--shard-size-mb must be > 0, got {self.shard_size_mb}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"--jpeg-quality must be in 1..100, got {self.jpeg_quality}")


def tmp_name(name: str) -> str:
    return f".{name}.tmp"


class _HashingWriter:
    """A write-only file object that hashes and counts what goes through to ``f``."""

    def __init__(self, f: Any):
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def write(self, b: bytes) -> int:
        self.sha.update(b)
        self.bytes += len(b)
        return self.f.write(b)


def _sample(src: Path, item: Item, opts: Options) -> tuple[dict[str, Any] | None, bool, dict[str, str] | None]:
    """(sample or None, re-encoded, skip record or None) for one item."""
    try:
        data, reencoded = prepare(read_item(src, item), opts.max_side, opts.jpeg_quality)
    except BadImage as e:
        return None, False, skip_record(item.source, e.reason, e.detail)
    except OSError as e:
        return None, False, skip_record(item.source, "read error", str(e))
    return {"__key__": item.key, "jpg": data, "cls": str(item.label).encode()}, reencoded, None


def write_shard(job: Job, src: Path, out: Path, opts: Options) -> dict[str, Any]:
    """Write one shard under a temporary name, fsync it and rename it into place; its manifest entry."""
    tmp, pause = out / tmp_name(job.name), float(os.environ.get(TEST_PAUSE_ENV) or 0)
    samples = reencoded = 0
    skipped: list[dict[str, str]] = []
    try:
        with open(tmp, "wb") as f:
            hashed = _HashingWriter(f)
            writer = wds.TarWriter(hashed, mtime=0, encoder=False)  # fixed mtime: reproducible bytes
            for item in job.items:
                sample, changed, skip = _sample(src, item, opts)
                if skip:
                    skipped.append(skip)
                    continue
                writer.write(sample)
                samples, reencoded = samples + 1, reencoded + changed
                if pause:
                    time.sleep(pause)
            writer.close()
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out / job.name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(out, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return {
        "name": job.name,
        "samples": samples,
        "bytes": hashed.bytes,
        "sha256": hashed.sha.hexdigest(),
        "job": job.digest,
        "reencoded": reencoded,
        "skipped": skipped,
    }


def run_job(task: tuple[Job, Path, Path, Options, dict[str, Any] | None]) -> tuple[dict[str, Any], bool]:
    """(entry, written): keep the shard if it verifies against ``prior``, else write it."""
    job, src, out, opts, prior = task
    if prior is not None and verify_shard(out / job.name, prior):
        return prior, False
    return write_shard(job, src, out, opts), True


def part_manifest_name(index: int, count: int) -> str:
    return f"manifest.part-{index:05d}-of-{count:05d}.json"


def _entries(m: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for s in SPLITS for e in m["splits"].get(s, {}).get("shards", [])] + m.get("pending", [])


def prior_entries(out: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """(shard name, job digest) -> entry, from every manifest and part manifest in ``out``, finished or not."""
    found = {}
    for path in [out / MANIFEST_NAME, *sorted(out.glob("manifest.part-*-of-*.json"))]:
        if not path.is_file():
            continue
        try:
            m = read_manifest(path)
        except ValueError as e:
            log.warning("ignoring %s", e)
            continue
        found.update({(e["name"], e["job"]): e for e in _entries(m) if "job" in e})
    return found


def build_manifest(
    entries: list[dict[str, Any]], plan: dict[str, Any], skipped: list[dict[str, str]], **extra: Any
) -> dict[str, Any]:
    """The manifest.json of ``entries``; ``skipped`` (inputs dropped by the scan) plus each entry's, deduplicated."""
    records = {tuple(sorted(s.items())): s for s in [*skipped, *(s for e in entries for s in e["skipped"])]}
    skipped = sorted(records.values(), key=lambda s: (s["source"], s["reason"]))
    return {
        "format": FORMAT,
        "splits": {s: split_entry([e for e in entries if e["name"].startswith(f"{s}-")]) for s in SPLITS},
        "skipped": skipped,
        "num_skipped": len(skipped),
        "reencoded": sum(e["reencoded"] for e in entries),
        "plan": plan,
        **extra,
    }


def plan_info(src: Path, layout: str, jobs: list[Job], opts: Options) -> dict[str, Any]:
    digest = hashlib.sha256("".join(j.digest for j in jobs).encode()).hexdigest()
    count = lambda split: [j for j in jobs if j.split == split]
    return {
        "digest": digest,
        "source": str(src.resolve()),
        "layout": layout,
        **vars(opts),
        "shards": {s: len(count(s)) for s in SPLITS},
        "samples": {s: sum(len(j.items) for j in count(s)) for s in SPLITS},
    }


def _pool(workers: int) -> Any:
    """A spawn pool for ``workers`` > 1 (safe whatever the parent holds), else nothing: work runs in-process."""
    return multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else nullcontext(None)


def _run(
    jobs: list[Job], src: Path, out: Path, opts: Options, pool: Any, save: Callable[[list, list], None]
) -> tuple[list[dict[str, Any]], int, int]:
    """Keep or write every job, calling ``save(done, pending)`` after each; (entries, shards written, samples)."""
    priors = prior_entries(out)
    pending = {j.name: priors[(j.name, j.digest)] for j in jobs if (j.name, j.digest) in priors}
    tasks = [(j, src, out, opts, pending.get(j.name)) for j in jobs]
    results = pool.imap_unordered(run_job, tasks) if pool else map(run_job, tasks)
    done: dict[str, dict[str, Any]] = {}
    written = samples = 0
    for k, (entry, wrote) in enumerate(results, 1):
        done[entry["name"]] = entry
        pending.pop(entry["name"], None)
        written += wrote
        samples += entry["samples"] if wrote else 0
        save(list(done.values()), list(pending.values()))
        what = "wrote" if wrote else "kept (verified)"
        mb = entry["bytes"] / 1e6
        log.info("%s %s: %d samples, %.1f MB [%d/%d]", what, entry["name"], entry["samples"], mb, k, len(jobs))
    return list(done.values()), written, samples


def _remove_leftovers(out: Path, jobs: list[Job], everything: bool) -> None:
    """Delete temporary shards left by a killed run: all of them, or (for one part) those of ``jobs`` only."""
    names = {tmp_name(j.name) for j in jobs}
    for p in out.glob(".*.tar.tmp"):
        if everything or p.name in names:
            log.info("removing leftover %s", p.name)
            p.unlink(missing_ok=True)


def make_shards(
    src: Path,
    out: Path,
    opts: Options,
    layout: str = "auto",
    names: dict[str, str] | None = None,
    workers: int = 1,
    part: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Scan, plan and write the shards of ``part`` (index, count), or all of them; the manifest written."""
    t0 = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    with _pool(workers) as pool:
        sc = scan(src, layout, pool.imap if pool else map)
        write_json_atomic(out / CLASSES_NAME, classes_dict(sc.class_ids, names or _names_in(out, sc.class_ids)))
        salt = f"{FORMAT}:{opts.jpeg_quality}:{opts.max_side}"
        jobs = make_plan(sc, opts.seed, opts.val_per_class, opts.shard_samples, opts.shard_size_mb * 2**20, salt)
        plan = plan_info(src, sc.layout, jobs, opts)
        index, count = part or (0, 1)
        mine = [j for k, j in enumerate(jobs) if k % count == index]
        log.info(
            "%s: %d classes, %d images (%s layout) -> %d train + %d val shards; this run: %d shards",
            src, len(sc.class_ids), len(sc.items), sc.layout, plan["shards"]["train"], plan["shards"]["val"], len(mine),
        )  # fmt: skip
        _remove_leftovers(out, mine, everything=part is None)
        target = out / (part_manifest_name(index, count) if part else MANIFEST_NAME)
        extra = {"part": {"index": index, "count": count}} if part else {}
        save = lambda done, pending: write_json_atomic(
            target, build_manifest(done, plan, sc.skipped, complete=False, pending=pending, **extra)
        )
        entries, written, samples = _run(mine, src, out, opts, pool, save)
    manifest = build_manifest(entries, plan, sc.skipped, complete=True, **extra)
    write_json_atomic(target, manifest)
    if part is None:
        _warn_stale(out, jobs)
    log_summary(manifest)
    elapsed = time.monotonic() - t0
    log.info("shards: %d written, %d kept (verified)", written, len(mine) - written)
    log.info("elapsed %.1f s, %.1f images/s written", elapsed, samples / max(elapsed, 1e-9))
    return manifest


def _names_in(out: Path, ids: list[str]) -> dict[str, str] | None:
    """The names an earlier run wrote to classes.json for the same class ids, so a resume without --names keeps them."""
    try:
        classes = read_classes(out)
    except (OSError, ValueError):
        return None
    return {c["id"]: c["name"] for c in classes} if [c["id"] for c in classes] == ids else None


def _warn_stale(out: Path, jobs: list[Job]) -> None:
    stale = sorted({p.name for s in SPLITS for p in out.glob(f"{s}-*.tar")} - {j.name for j in jobs})
    if stale:
        log.warning("%d shards in %s are not in this plan (left in place): %s", len(stale), out, ", ".join(stale[:5]))


def log_summary(manifest: dict[str, Any]) -> None:
    """Samples and shards per split, re-encoded images, skipped inputs by reason (and the first few)."""
    for s in SPLITS:
        e = manifest["splits"][s]
        log.info("%s: %d samples in %d shards, %.2f GB", s, e["samples"], len(e["shards"]), e["bytes"] / 1e9)
    log.info("re-encoded images: %d", manifest["reencoded"])
    reasons = ", ".join(f"{r}: {n}" for r, n in Counter(s["reason"] for s in manifest["skipped"]).most_common())
    log.info("skipped inputs: %d%s", manifest["num_skipped"], f" ({reasons})" if reasons else "")
    for s in manifest["skipped"][:10]:
        log.info("  skipped %s: %s%s", s["source"], s["reason"], f" ({s['detail']})" if "detail" in s else "")


def merge(out: Path) -> dict[str, Any]:
    """Combine every part manifest in ``out`` into manifest.json; ValueError naming missing parts or shards."""
    found: dict[int, dict[int, Path]] = {}
    for p in out.glob("manifest.part-*-of-*.json"):
        if mt := PART_RE.fullmatch(p.name):
            found.setdefault(int(mt[2]), {})[int(mt[1])] = p
    if not found:
        raise ValueError(f"{out}: no part manifests (manifest.part-*-of-*.json) to merge")
    if len(found) > 1:
        raise ValueError(f"{out}: part manifests for different part counts {sorted(found)}; remove the stale ones")
    [(count, paths)] = found.items()
    missing = [part_manifest_name(i, count) for i in range(count) if i not in paths]
    if missing:
        raise ValueError(f"{out}: missing part manifests: {', '.join(missing)} (run those --part tasks first)")
    parts = [read_manifest(paths[i]) for i in range(count)]
    if len({m["plan"]["digest"] for m in parts}) > 1:
        raise ValueError(f"{out}: part manifests come from different plans (inputs or options differ)")
    plan = parts[0]["plan"]
    entries = [e for m in parts for s in SPLITS for e in m["splits"][s]["shards"]]
    have = {e["name"]: e for e in entries}
    expected = [shard_name(s, i) for s in SPLITS for i in range(plan["shards"][s])]
    bad = [n for n in expected if n not in have or not verify_shard(out / n, have[n], check_hash=False)]
    if bad:
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        names = ", ".join(bad[:10])
        raise ValueError(f"{out}: {len(bad)} shards missing or incomplete: {names}{more}; re-run their parts")
    skipped = [s for m in parts for s in m["skipped"]]
    manifest = build_manifest(entries, plan, skipped, complete=True)
    write_json_atomic(out / MANIFEST_NAME, manifest)
    log.info("merged %d parts into %s", count, out / MANIFEST_NAME)
    log_summary(manifest)
    return manifest


def parse_part(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)/(\d+)", text)
    if not m or not 0 <= int(m[1]) < int(m[2]):
        raise ValueError(f"--part {text!r}: expected i/n with 0 <= i < n")
    return int(m[1]), int(m[2])


def _available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="dinat-make-shards",
        usage="%(prog)s [options] SRC OUT\n       %(prog)s --merge OUT",
        description="Write ImageNet-22k (a directory of per-synset tars, or class folders) as WebDataset shards "
        "with classes.json and manifest.json. Re-running resumes; --part i/n + --merge split it across jobs.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="SRC OUT (or OUT alone with --merge)")
    p.add_argument("--layout", default="auto", choices=["auto", "synset-tars", "folders"])
    p.add_argument("--names", help="class id -> name: words.txt ('id<TAB>name' lines) or a JSON object")
    p.add_argument("--seed", type=int, default=0, help="val choice and train shuffle")
    p.add_argument("--val-per-class", type=int, default=10)
    p.add_argument("--shard-size-mb", type=float, default=256, help="target shard size, from input sizes")
    p.add_argument("--shard-samples", type=int, default=0, help="samples per shard (overrides --shard-size-mb)")
    p.add_argument("--max-side", type=int, default=0, help="re-encode images whose longer side exceeds this (0: off)")
    p.add_argument("--jpeg-quality", type=int, default=95, help="for re-encoded images")
    p.add_argument("--workers", type=int, default=_available_cpus(), help="processes (default: available CPUs)")
    p.add_argument("--part", help="i/n: write only shard jobs k with k %% n == i, and a part manifest")
    p.add_argument("--merge", action="store_true", help="combine the part manifests in OUT into manifest.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        if args.merge:
            if len(args.paths) > 2 or args.part:
                raise ValueError("--merge takes OUT (or SRC OUT) and no --part")
            merge(Path(args.paths[-1]))
            return
        if len(args.paths) != 2:
            raise ValueError(f"expected SRC OUT, got {' '.join(args.paths)}")
        src, out = (Path(p) for p in args.paths)
        keys = ("seed", "val_per_class", "shard_size_mb", "shard_samples", "jpeg_quality", "max_side")
        opts = Options(**{k: getattr(args, k) for k in keys})
        part = parse_part(args.part) if args.part else None
        names = read_names(Path(args.names)) if args.names else None
        if args.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {args.workers}")
        list_classes(src, args.layout)  # a missing or empty SRC fails here, before any work
        if out.resolve().is_relative_to(src.resolve()):
            raise ValueError(f"{out}: OUT must not be inside SRC ({src})")
    except (ValueError, OSError) as e:
        raise SystemExit(f"dinat-make-shards: error: {e}") from None
    make_shards(src, out, opts, args.layout, names, args.workers, part)


if __name__ == "__main__":
    from pipeline.data.shards import main as _main  # the package module, so worker processes unpickle its names

    _main()
