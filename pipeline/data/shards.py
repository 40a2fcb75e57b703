"""``dinat-make-shards SRC OUT``: ImageNet-22k (per-synset tars or class folders) -> WebDataset shards.

Three steps, each resumable, each O(images) in total whatever the number of tasks:

1. **plan** (``--plan``, or the first step of a run without ``--part``): read every class tar's headers once, in
   parallel (:mod:`pipeline.data.sources`, cached per tar), and decide which input goes to which shard
   (:mod:`pipeline.data.planner`; the format: :mod:`pipeline.data.shard_plan`), identically whatever ``--workers``
   and ``--part``.
2. **write**: shard jobs are the unit of work; job k (train shards first, then val) belongs to part k % n. A task
   reads only its shards' rows of the plan and their members (:mod:`pipeline.data.shard_writer`). Each shard's
   record names the digest of its job (encoding settings and every item); a re-run keeps a shard only when that
   digest matches and the file verifies (size + sha256), and rewrites the others.
3. **manifest**: assembled once from the shards' records, at the end of a run (``manifest.json``, or a part's
   ``manifest.part-i-of-n.json``) or by ``--merge``; always written whole (write, fsync, rename).

Under Slurm: one ``--plan`` job, an array of ``--part i/n`` tasks, one ``--merge`` (see slurm/shards.sbatch).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import re
import time
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ..progress import Progress
from .index import index_name
from .manifest import (
    CLASSES_NAME,
    FORMAT,
    MANIFEST_NAME,
    SPLITS,
    classes_dict,
    read_classes,
    read_json,
    read_manifest,
    shard_name,
    split_entry,
    verify_shard,
    write_json_atomic,
)
from .planner import make_plan
from .shard_plan import PLAN_NAME, TEST_PAUSE_ENV, WORK_DIR, Options, Plan
from .shard_writer import RECORDS_DIR, ShardJob, run_job
from .sources import Counts, list_classes, read_names

log = logging.getLogger(__name__)

__all__ = ["Options", "TEST_PAUSE_ENV", "make_shards", "merge", "main"]

PART_RE = re.compile(r"manifest\.part-(\d+)-of-(\d+)\.json")


def part_manifest_name(index: int, count: int) -> str:
    return f"manifest.part-{index:05d}-of-{count:05d}.json"


def _entries(m: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for s in SPLITS for e in m["splits"].get(s, {}).get("shards", [])] + m.get("pending", [])


def prior_entries(out: Path, names: set[str]) -> dict[tuple[str, str], dict[str, Any]]:
    """(shard name, job digest) -> entry for the shards in ``names``: from their records, and from any manifest
    or part manifest in ``out`` (runs of earlier versions kept entries only there)."""
    found = {}
    for path in [out / MANIFEST_NAME, *sorted(out.glob("manifest.part-*-of-*.json"))]:
        if not path.is_file():
            continue
        try:
            m = read_manifest(path)
        except ValueError as e:
            log.warning("ignoring %s", e)
            continue
        found.update({(e["name"], e["job"]): e for e in _entries(m) if "job" in e and e["name"] in names})
    records = out / WORK_DIR / RECORDS_DIR
    for name in sorted(names):
        try:
            e = read_json(records / f"{name}.json")
        except (OSError, ValueError):
            continue
        found[(e["name"], e["job"])] = e
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


def plan_info(plan: Plan) -> dict[str, Any]:
    """The manifest's ``plan``: what the shards were made from and with."""
    i = plan.info
    return {"digest": i["digest"], "source": i["source"], "layout": i["layout"], **i["options"],
            "shards": i["shards"], "samples": i["samples"]}  # fmt: skip


def _pool(workers: int) -> Any:
    """A spawn pool for ``workers`` > 1 (safe whatever the parent holds), else nothing: work runs in-process."""
    return multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else nullcontext(None)


def _mapper(pool: Any, ordered: bool = True) -> Callable:
    if pool is None:
        return map
    return lambda f, xs: (pool.imap if ordered else pool.imap_unordered)(f, xs, chunksize=4 if ordered else 1)


def _write_json(path: Path, obj: Any, stats: Counts) -> None:
    write_json_atomic(path, obj)
    stats["manifest_bytes"] += path.stat().st_size


def _remove_leftovers(out: Path, names: set[str] | None) -> None:
    """Delete temporary files left by a killed run: all of them, or (for one part) those of ``names`` only."""
    for d, pattern in [(out, ".*.tar.tmp"), (out / "index", ".*.tar.npy.*.tmp"),
                       (out / WORK_DIR / RECORDS_DIR, ".*.tar.json.*.tmp")]:  # fmt: skip
        for p in d.glob(pattern) if d.is_dir() else []:
            name = p.name[1 : p.name.index(".tar") + len(".tar")]  # ".train-000001.tar..." -> "train-000001.tar"
            if names is None or name in names:
                log.info("removing leftover %s", p)
                p.unlink(missing_ok=True)


def _names_in(out: Path, ids: list[str]) -> dict[str, str] | None:
    """The names an earlier run wrote to classes.json for the same class ids, so a resume without --names keeps them."""
    try:
        classes = read_classes(out)
    except (OSError, ValueError):
        return None
    return {c["id"]: c["name"] for c in classes} if [c["id"] for c in classes] == ids else None


def _check_plan_matches(plan: Plan, src: Path, layout: str, class_ids: list[str], opts: Options) -> None:
    """A part writes only from a plan made from the same SRC with the same options."""
    i, again = plan.info, "make the plan again with these arguments and --plan"
    if i["source"] != str(src.resolve()) or i["layout"] != layout:
        raise ValueError(f"the plan in {plan.dir.parent} is of {i['source']} ({i['layout']}), not {src}; {again}")
    if i["classes"] != class_ids:
        raise ValueError(f"{src}: its class tars or folders changed since the plan was made; {again}")
    diff = [f"--{k.replace('_', '-')} {v} (plan: {i['options'].get(k)})" for k, v in asdict(opts).items()
            if i["options"].get(k) != v]  # fmt: skip
    if diff:
        raise ValueError(f"options differ from the plan's: {', '.join(diff)}; {again}")


def _plan_for(
    src: Path,
    out: Path,
    opts: Options,
    layout: str,
    class_ids: list[str],
    top_skipped: list[dict],
    names: dict[str, str] | None,
    pool: Any,
    part: tuple[int, int] | None,
    stats: Counts,
) -> Plan:
    """Make the plan (no ``part``) and classes.json, or load the committed plan a part writes from."""
    work = out / WORK_DIR
    if part is None:
        unit = "tars" if layout == "synset-tars" else "folders"
        progress = Progress("index", len(class_ids), unit)
        plan = make_plan(src, work, layout, class_ids, top_skipped, opts, _mapper(pool), progress, stats)
        _write_json(out / CLASSES_NAME, classes_dict(class_ids, names or _names_in(out, class_ids)), stats)
        return plan
    try:
        plan = Plan.load(work)
    except FileNotFoundError:
        raise ValueError(f"{out}: no plan yet ({work / PLAN_NAME}): make it first, with the same arguments and "
                         "--plan (one job: sbatch slurm/shards.sbatch --plan SRC OUT ...)") from None  # fmt: skip
    _check_plan_matches(plan, src, layout, class_ids, opts)
    if names is not None and read_json(out / CLASSES_NAME) != classes_dict(class_ids, names):
        raise ValueError(f"{out / CLASSES_NAME} does not hold the names given with --names; pass them to --plan")
    return plan


def _write_shards(
    plan: Plan, src: Path, out: Path, opts: Options, pool: Any, mine: list[int], stats: Counts
) -> tuple[list[dict[str, Any]], int]:
    """Keep or write every job in ``mine``; (entries, shards written)."""
    jobs = list(zip(plan.names, plan.info["jobs"]))
    names = {jobs[k][0] for k in mine}
    priors = prior_entries(out, names)
    start = plan.col("shard_start")
    images = int(sum(int(start[k + 1] - start[k]) for k in mine))
    tasks = [ShardJob(str(plan.dir), k, jobs[k][0], jobs[k][1], str(src), str(out), str(out / WORK_DIR),
                      opts.jpeg_quality, opts.max_side, priors.get(jobs[k])) for k in mine]  # fmt: skip
    (out / WORK_DIR / RECORDS_DIR).mkdir(parents=True, exist_ok=True)
    (out / "index").mkdir(exist_ok=True)
    rows = {jobs[k][0]: int(start[k + 1] - start[k]) for k in mine}
    entries, written = [], 0
    with Progress("write", images, "images") as progress:
        for k, (entry, wrote, count) in enumerate(_mapper(pool, ordered=False)(run_job, tasks), 1):
            entries.append(entry)
            written += wrote
            stats.update(count)
            progress.update(rows[entry["name"]])
            what = "wrote" if wrote else "kept (verified)"
            mb = entry["bytes"] / 1e6
            log.info("%s %s: %d samples, %.1f MB [%d/%d]", what, entry["name"], entry["samples"], mb, k, len(tasks))
    return entries, written


def make_shards(
    src: Path,
    out: Path,
    opts: Options,
    layout: str = "auto",
    names: dict[str, str] | None = None,
    workers: int = 1,
    part: tuple[int, int] | None = None,
    plan_only: bool = False,
    stats: Counts | None = None,
) -> dict[str, Any]:
    """Plan (unless ``part``), then write the shards of ``part`` (index, count) or all of them, and the manifest
    (or part manifest); only the plan with ``plan_only``. Returns the manifest (the plan summary with
    ``plan_only``). ``stats`` receives I/O counts (headers, member reads, bytes, manifest bytes written)."""
    t0 = time.monotonic()
    stats = stats if stats is not None else Counter()
    layout, class_ids, top_skipped = list_classes(src, layout, stats)
    out.mkdir(parents=True, exist_ok=True)
    with _pool(workers) as pool:
        plan = _plan_for(src, out, opts, layout, class_ids, top_skipped, names, pool, part, stats)
        if plan_only:
            _log_io(stats, time.monotonic() - t0)
            return plan.info
        index, count = part or (0, 1)
        names = plan.names
        mine = [k for k in range(len(names)) if k % count == index]
        sh = plan.info["shards"]
        log.info("%s: %d classes, %d images (%s layout) -> %d train + %d val shards; this run: %d shards",
                 src, len(class_ids), sum(plan.info["samples"].values()), layout, sh["train"], sh["val"],
                 len(mine))  # fmt: skip
        _remove_leftovers(out, None if part is None else {names[k] for k in mine})
        entries, written = _write_shards(plan, src, out, opts, pool, mine, stats)
    extra = {"part": {"index": index, "count": count}} if part else {}
    manifest = build_manifest(entries, plan_info(plan), plan.info["skipped"], complete=True, **extra)
    _write_json(out / (part_manifest_name(index, count) if part else MANIFEST_NAME), manifest, stats)
    if part is None:
        _warn_stale(out, names)
    log_summary(manifest)
    log.info("shards: %d written, %d kept (verified)", written, len(mine) - written)
    _log_io(stats, time.monotonic() - t0)
    return manifest


def _log_io(stats: Counts, elapsed: float) -> None:
    s = stats
    log.info(
        "I/O: %d tar headers read (%.1f MB in %d reads), %d members read (%.1f MB), %d opens, "
        "%.1f MB verified, %.1f KB of manifests and records written; elapsed %.1f s",
        s["headers"], s["header_bytes"] / 1e6, s["header_reads"], s["member_reads"], s["member_bytes"] / 1e6,
        s["opens"], s["verified_bytes"] / 1e6, s["manifest_bytes"] / 1e3, elapsed,
    )  # fmt: skip


def _warn_stale(out: Path, names: list[str]) -> None:
    stale = sorted({p.name for s in SPLITS for p in out.glob(f"{s}-*.tar")} - set(names))
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


def index_ok(path: Path, samples: int) -> bool:
    """Whether ``path`` is, by its header and size alone, the index of a shard of ``samples`` samples."""
    try:
        with open(path, "rb") as f:
            fmt = np.lib.format
            read = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = read(f)
            header = f.tell()
        return shape == (samples + 1,) and dtype == np.int64 and os.path.getsize(path) == header + 8 * (samples + 1)
    except (OSError, ValueError):
        return False


def merge(out: Path, stats: Counts | None = None) -> dict[str, Any]:
    """Combine every part manifest in ``out`` into manifest.json; ValueError naming missing parts or shards."""
    stats = stats if stats is not None else Counter()
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
    bad = []
    with Progress("merge: check shards", len(expected), "shards") as progress:
        for n in expected:
            e = have.get(n)
            if (
                e is None
                or not verify_shard(out / n, e, check_hash=False)
                or not index_ok(out / index_name(n), e["samples"])
            ):
                bad.append(n)
            progress.update(1)
    if bad:
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise ValueError(f"{out}: {len(bad)} shards missing or incomplete: {', '.join(bad[:10])}{more}; "
                         "re-run their parts")  # fmt: skip
    skipped = [s for m in parts for s in m["skipped"]]
    manifest = build_manifest(entries, plan, skipped, complete=True)
    _write_json(out / MANIFEST_NAME, manifest, stats)
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
        "with classes.json and manifest.json. Re-running resumes. Across jobs: --plan once, then --part i/n for "
        "every i (same arguments), then --merge.",
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
    p.add_argument("--plan", action="store_true", help="only index the inputs and make the plan (before --part)")
    p.add_argument("--part", help="i/n: write only shard jobs k with k %% n == i, and a part manifest")
    p.add_argument("--merge", action="store_true", help="combine the part manifests in OUT into manifest.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        if args.merge:
            if len(args.paths) > 2 or args.part or args.plan:
                raise ValueError("--merge takes OUT (or SRC OUT) and neither --part nor --plan")
            merge(Path(args.paths[-1]))
            return
        if len(args.paths) != 2:
            raise ValueError(f"expected SRC OUT, got {' '.join(args.paths)}")
        if args.plan and args.part:
            raise ValueError("--plan makes the plan for every part: run it once, without --part")
        src, out = (Path(p) for p in args.paths)
        keys = ("seed", "val_per_class", "shard_size_mb", "shard_samples", "jpeg_quality", "max_side")
        opts = Options(**{k: getattr(args, k) for k in keys})
        part = parse_part(args.part) if args.part else None
        names = read_names(Path(args.names)) if args.names else None
        if args.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {args.workers}")
        if src.is_dir() and out.resolve().is_relative_to(src.resolve()):
            raise ValueError(f"{out}: OUT must not be inside SRC ({src})")
        make_shards(src, out, opts, args.layout, names, args.workers, part, args.plan)
    except (ValueError, OSError) as e:
        raise SystemExit(f"dinat-make-shards: error: {e}") from None


if __name__ == "__main__":
    from pipeline.data.shards import main as _main  # the package module, so worker processes unpickle its names

    _main()
