"""Shard-writer benchmark: what ``dinat-make-shards`` costs per task, fitted and extrapolated to ImageNet-22k.

    python -m pipeline.data.shards_benchmark [--trees 1000:0.01,2000:0.02,2000:0.06,8000:0.01,21841:0.005]
        [--write-trees 1000:0.01,4000:0.005] [--indexes 21841:0.05,21841:0.15] [--parts 64] [--dir DIR]

Trees (``TARS:FRACTION``) are synthetic raw layouts of ImageNet-22k's shape at reduced size: ``TARS`` synset tars
whose class sizes follow a log-normal with fall11's mean (650 images; sigma 1, clipped to 1..3,000: assumed)
times ``FRACTION``, members named like ImageNet's (``n01440764_10026.JPEG``) and sized like its JPEGs (log-normal,
mean ~110 KB), each a tiny real JPEG followed by a hole, so 21,841 tars fit in a few hundred MB of disk. Each step
runs in a fresh process with one worker (a task's own cost): the plan on every tree; on ``--write-trees`` also
the writes with 1 task and with ``--parts`` tasks, and the merge. ``--indexes`` fabricates the cached class
indexes of a tree without its tars (``21841:1`` is ImageNet-22k's full shape, 14.2M images) and plans from them:
the planner's memory and CPU at scale, without reading headers.

Per step and task count it prints: tar headers parsed, bytes read (``rchar``: every ``read()`` of the process),
CPU seconds (whole process, startup included), peak resident memory above the interpreter (VmHWM after imports
to exit; the largest task), manifest/record bytes written, member reads, opens. Then fits by least squares:
planning CPU and bytes read = c + (per tar) x tars + (per image) x images over the trees; planning memory = c +
(per image) x images over the fabricated indexes; writing CPU per image, and a task's fixed CPU = (``--parts``
tasks - 1 task) / (parts - 1), linear in tars. Extrapolates to 14,197,122 images in 21,841 tars (~5,900
shards of 256 MB) and compares one task doing everything with the plan + ``--parts`` write tasks. Decoding real
JPEGs (~2 ms each, FACTS.md) is not in these figures (the tiny JPEGs decode in microseconds): it adds the same
~28,000 CPU-s to both sides.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .shard_plan import WORK_DIR
from .sources import Listing, save_listing

FULL_IMAGES, FULL_TARS, FULL_SHARDS = 14_197_122, 21_841, 5_900
MEAN_CLASS, MAX_CLASS = 650, 3_000
DECODE_S = 0.002  # per real ImageNet JPEG, one core (FACTS.md: PIL ~524 img/s)

RUNNER = r"""
import json, sys
from collections import Counter
from pathlib import Path
from pipeline.data.shard_plan import Options
from pipeline.data.shards import make_shards, merge

def status(key):
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1]) * 1024

def rchar():
    return int(next(line for line in open("/proc/self/io") if line.startswith("rchar")).split()[1])

a = json.loads(sys.argv[1])
base, read0, stats = status("VmHWM"), rchar(), Counter()
if a["step"] == "merge":
    merge(Path(a["out"]), stats)
else:
    part = tuple(a["part"]) if a["part"] else None
    make_shards(Path(a["src"]), Path(a["out"]), Options(**a["opts"]), workers=1, part=part,
                plan_only=a["step"] == "plan", stats=stats)
print(json.dumps({**stats, "peak": status("VmHWM") - base, "rchar": rchar() - read0}))
"""


def tiny_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), (90, 140, 200)).save(buf, "JPEG", quality=50)
    return buf.getvalue()


def class_sizes(tars: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Images per class: log-normal with mean MEAN_CLASS (sigma 1), clipped to 1..MAX_CLASS, times ``fraction``."""
    sigma = 1.0
    full = np.clip(rng.lognormal(np.log(MEAN_CLASS) - sigma**2 / 2, sigma, tars), 1, MAX_CLASS)
    return np.maximum(1, np.round(full * fraction)).astype(int)


def members(t: int, n: int, rng: np.random.Generator, smallest: int = 1) -> tuple[str, list[str], np.ndarray]:
    """Synset id of class ``t``, ImageNet-like member names and JPEG-like sizes (mean ~110 KB) of its ``n`` images."""
    synset = f"n{10_000_000 + t * 397:08d}"
    numbers = rng.choice(60_000, size=n, replace=False) + 1 if n < 60_000 else np.arange(1, n + 1)
    sizes = np.clip(rng.lognormal(np.log(85_000), 0.7, n), smallest, 4 << 20).astype(np.int64)
    return synset, [f"{synset}_{k}.JPEG" for k in numbers.tolist()], sizes


def build_tree(root: Path, tars: int, fraction: float, seed: int = 0) -> dict[str, int]:
    """A raw layout of ``tars`` synset tars holding ``fraction`` of ImageNet-22k-like class sizes; its shape."""
    rng = np.random.default_rng(seed)
    jpeg, images, logical = tiny_jpeg(), 0, 0
    root.mkdir(parents=True)
    for t, n in enumerate(class_sizes(tars, fraction, rng).tolist()):
        synset, names, sizes = members(t, n, rng, len(jpeg))
        with open(root / f"{synset}.tar", "wb") as f:
            for name, size in zip(names, sizes.tolist()):
                info = tarfile.TarInfo(name)
                info.size = size
                f.write(info.tobuf(tarfile.USTAR_FORMAT))
                f.write(jpeg)
                f.seek(f.tell() + size - len(jpeg) + -size % 512)  # the rest of the member: a hole
            f.write(b"\0" * 1024)
            logical += f.tell()
        images += n
    return {"tars": tars, "images": images, "bytes": logical}


def fabricate_indexes(src: Path, out: Path, tars: int, fraction: float, seed: int = 0) -> dict[str, int]:
    """The cached class indexes the index pass would leave for a tree, and its tars as empty sparse files of the
    right size (never read: the planner trusts an index made from a tar of the same size and mtime); its shape."""
    rng = np.random.default_rng(seed)
    cache = out / WORK_DIR / "sources"
    cache.mkdir(parents=True)
    src.mkdir(parents=True)
    images = 0
    for t, n in enumerate(class_sizes(tars, fraction, rng).tolist()):
        synset, names, sizes = members(t, n, rng)
        blocks = 1 + -(-sizes // 512)
        offsets = 512 * (np.cumsum(blocks) - blocks + 1)
        with open(src / f"{synset}.tar", "wb") as f:
            f.truncate(int(512 * (blocks.sum() + 2)))
        st = os.stat(src / f"{synset}.tar")
        save_listing(cache / f"{synset}.idx", Listing(names, sizes, offsets, []), (st.st_size, st.st_mtime_ns))
        images += n
    return {"tars": tars, "images": images, "bytes": int(images * 110_000)}


def run(step: str, src: Path, out: Path, opts: dict[str, Any], part: tuple[int, int] | None = None) -> dict[str, Any]:
    """One step in a fresh process; its counters plus whole-process CPU seconds (from wait4)."""
    arg = json.dumps({"step": step, "src": str(src), "out": str(out), "opts": opts, "part": part})
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, arg], stdout=subprocess.PIPE, env=env, text=True)
    text = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{step} {part} failed ({proc.returncode})")
    return {**json.loads(text.strip().splitlines()[-1]), "cpu": usage.ru_utime + usage.ru_stime}


def _sum(runs: list[dict[str, Any]], key: str) -> float:
    return sum(r.get(key, 0) for r in runs)


def _row(tree: dict[str, int], step: str, tasks: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "tars": tree["tars"],
        "images": tree["images"],
        "step": step,
        "tasks": tasks,
        "headers": int(_sum(runs, "headers")),
        "read_mb": _sum(runs, "rchar") / 1e6,
        "cpu_s": _sum(runs, "cpu"),
        "peak_mb": max(r["peak"] for r in runs) / 1e6,
        "manifest_kb": _sum(runs, "manifest_bytes") / 1e3,
        "member_reads": int(_sum(runs, "member_reads")),
        "opens": int(_sum(runs, "opens")),
    }


def _fit(x: list[list[float]], y: list[float]) -> np.ndarray:
    return np.linalg.lstsq(np.array(x, float), np.array(y, float), rcond=None)[0]


def measure(work: Path, trees: list[tuple[int, float]], write_trees: list[tuple[int, float]],
            indexes: list[tuple[int, float]], parts: int, shard_samples: int) -> dict[str, Any]:  # fmt: skip
    rows, plans, writes, fabricated = [], [], [], []
    opts = {"shard_samples": shard_samples}
    for tars, fraction in sorted(set(trees) | set(write_trees)):
        src, out = work / f"raw-{tars}-{fraction}", work / f"out-{tars}-{fraction}"
        t0 = time.monotonic()
        tree = build_tree(src, tars, fraction)
        print(f"tree {tars:,} tars, {tree['images']:,} images, {tree['bytes'] / 1e9:.1f} GB logical "
              f"({time.monotonic() - t0:.0f} s to build)", flush=True)  # fmt: skip
        plan = run("plan", src, out, opts)
        rows.append(_row(tree, "plan", 1, [plan]))
        plans.append((tree, plan))
        if (tars, fraction) in write_trees:
            one = run("write", src, out, opts, (0, 1))
            rows.append(_row(tree, "write", 1, [one]))
            for p in [*out.glob("*.tar"), *out.glob("manifest.part-*")]:
                p.unlink()  # the n-task run writes them again
            shutil.rmtree(out / WORK_DIR / "records")
            shutil.rmtree(out / "index")
            many = [run("write", src, out, opts, (i, parts)) for i in range(parts)]
            merged = run("merge", src, out, opts)
            rows.append(_row(tree, "write", parts, many))
            rows.append(_row(tree, "merge", 1, [merged]))
            writes.append((tree, one, many, merged, len(list(out.glob("*.tar")))))
        shutil.rmtree(out)
        shutil.rmtree(src)
    for tars, fraction in indexes:
        src, out = work / f"fab-{tars}-{fraction}", work / f"fab-out-{tars}-{fraction}"
        tree = fabricate_indexes(src, out, tars, fraction)
        print(f"fabricated indexes: {tars:,} tars, {tree['images']:,} images", flush=True)
        plan = run("plan", src, out, {"shard_size_mb": 256})
        plan["state"] = sum(p.stat().st_size for p in (out / WORK_DIR).rglob("*") if p.is_file())
        rows.append(_row(tree, "plan (indexes)", 1, [plan]))
        fabricated.append((tree, plan))
        shutil.rmtree(out)
        shutil.rmtree(src)
    return {"rows": rows, "fit": extrapolate(plans, writes, fabricated, parts)}


def extrapolate(plans: list, writes: list, fabricated: list, parts: int) -> dict[str, float]:
    """Per-tar / per-image / per-task costs fitted over the trees, and the full-size figures they give."""
    x = [[1, t["tars"], t["images"]] for t, _ in plans]
    plan_cpu = _fit(x, [p["cpu"] for _, p in plans])
    plan_read = _fit(x, [p["rchar"] for _, p in plans])
    headers = [p["headers"] / t["images"] for t, p in plans]
    plan_mem = _fit([[1, t["images"]] for t, _ in fabricated], [p["peak"] for _, p in fabricated])
    state = _fit([[1, t["images"]] for t, _ in fabricated], [p["state"] for _, p in fabricated])
    per_task = [(_sum(many, "cpu") - one["cpu"]) / (parts - 1) for _, one, many, _, _ in writes]
    task_fit = _fit([[1, t["tars"]] for t, *_ in writes], per_task) if len(writes) > 1 else np.array([per_task[0], 0])
    write_cpu = _fit([[t["images"]] for t, *_ in writes], [one["cpu"] - task_fit @ [1, t["tars"]]
                                                           for t, one, *_ in writes])[0]  # fmt: skip
    write_mem = max(max(r["peak"] for r in many) for _, _, many, _, _ in writes)
    manifest = _fit([[s] for *_, s in writes], [one["manifest_bytes"] for _, one, *_ in writes])[0]
    written = [_sum(many, "manifest_bytes") + m["manifest_bytes"] for _, _, many, m, _ in writes]
    manifest_n = _fit([[s] for *_, s in writes], written)[0]
    full = np.array([1, FULL_TARS, FULL_IMAGES])
    one_task = plan_cpu @ full + task_fit @ [1, FULL_TARS] + write_cpu * FULL_IMAGES
    n_tasks = plan_cpu @ full + parts * (task_fit @ [1, FULL_TARS]) + write_cpu * FULL_IMAGES
    decode = DECODE_S * FULL_IMAGES
    return {
        "plan_cpu_per_tar_ms": plan_cpu[1] * 1e3,
        "plan_cpu_per_image_us": plan_cpu[2] * 1e6,
        "plan_peak_per_image_bytes": plan_mem[1],
        "plan_read_per_image_bytes": plan_read[2],
        "plan_read_per_tar_bytes": plan_read[1],
        "headers_per_image": float(np.mean(headers)),
        "write_cpu_per_image_us": write_cpu * 1e6,
        "task_fixed_cpu_s": float(task_fit @ [1, FULL_TARS]),
        "write_task_peak_mb_measured": write_mem / 1e6,
        "manifest_bytes_per_shard_n1": manifest,
        "manifest_bytes_per_shard_n": manifest_n,
        "full_plan_cpu_s": float(plan_cpu @ full),
        "full_plan_peak_mb": float(plan_mem @ [1, FULL_IMAGES]) / 1e6,
        "full_plan_read_gb": float(plan_read @ full) / 1e9,
        "full_state_gb": float(state @ [1, FULL_IMAGES]) / 1e9,
        "full_plan_read_fraction": float(plan_read @ full) / (FULL_IMAGES * 110_000),
        "full_one_task_cpu_s": float(one_task),
        "full_n_tasks_cpu_s": float(n_tasks),
        "full_ratio": float(n_tasks / one_task),
        "full_ratio_with_decode": float((n_tasks + decode) / (one_task + decode)),
        "full_manifest_mb_n1": manifest * FULL_SHARDS / 1e6,
        "full_manifest_mb_n": manifest_n * FULL_SHARDS / 1e6,
    }


def report(result: dict[str, Any], parts: int) -> str:
    lines = [
        "| tars | images | step | tasks | headers parsed | bytes read (MB) | CPU s | peak MB / task | manifest KB "
        "| member reads | opens |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['tars']:,} | {r['images']:,} | {r['step']} | {r['tasks']} | {r['headers']:,} | "
                     f"{r['read_mb']:.1f} | {r['cpu_s']:.1f} | {r['peak_mb']:.1f} | {r['manifest_kb']:.1f} | "
                     f"{r['member_reads']:,} | {r['opens']:,} |")  # fmt: skip
    f = result["fit"]
    lines += [
        "",
        f"plan: {f['plan_cpu_per_tar_ms']:.2f} ms CPU per tar + {f['plan_cpu_per_image_us']:.1f} us per image; "
        f"peak {f['plan_peak_per_image_bytes']:.1f} B per image (fabricated indexes); "
        f"reads {f['plan_read_per_image_bytes']:.0f} B per image + {f['plan_read_per_tar_bytes']:.0f} B per tar; "
        f"{f['headers_per_image']:.3f} headers parsed per image",
        f"write: {f['write_cpu_per_image_us']:.1f} us CPU per image; a task's fixed cost at 21,841 tars "
        f"{f['task_fixed_cpu_s']:.2f} CPU-s; peak per write task (measured) {f['write_task_peak_mb_measured']:.1f} MB",
        f"manifests: {f['manifest_bytes_per_shard_n1']:.0f} B per shard (1 task), "
        f"{f['manifest_bytes_per_shard_n']:.0f} B per shard ({parts} tasks + merge)",
        "",
        f"At 14.2M images / 21,841 tars / ~{FULL_SHARDS:,} shards:",
        f"- plan job: {f['full_plan_cpu_s'] / 60:.1f} CPU-min, peak {f['full_plan_peak_mb']:.0f} MB above the "
        f"interpreter, reads {f['full_plan_read_gb']:.2f} GB = {100 * f['full_plan_read_fraction']:.2f}% of the "
        f"dataset (~1.56 TB at 110 KB/image); OUT/.make-shards holds {f['full_state_gb']:.2f} GB",
        f"- one task doing everything: {f['full_one_task_cpu_s'] / 3600:.2f} CPU-h; plan + {parts} tasks: "
        f"{f['full_n_tasks_cpu_s'] / 3600:.2f} CPU-h = {f['full_ratio']:.3f}x "
        f"({f['full_ratio_with_decode']:.3f}x with ~2 ms/image of real JPEG decoding)",
        f"- manifests and records written: {f['full_manifest_mb_n1']:.1f} MB (1 task), "
        f"{f['full_manifest_mb_n']:.1f} MB ({parts} tasks + merge)",
    ]
    return "\n".join(lines)


def _trees(text: str) -> list[tuple[int, float]]:
    return [(int(t), float(f)) for t, f in (x.split(":") for x in text.split(",") if x)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipeline.data.shards_benchmark", description=__doc__.split("\n")[0])
    p.add_argument("--trees", default="1000:0.01,2000:0.02,2000:0.06,8000:0.01,21841:0.005",
                   help="TARS:FRACTION,... trees to build and plan")  # fmt: skip
    p.add_argument("--write-trees", default="1000:0.01,4000:0.005", help="TARS:FRACTION,... also written")
    p.add_argument("--indexes", default="21841:0.05,21841:0.15", help="TARS:FRACTION,... fabricated class indexes")
    p.add_argument("--parts", type=int, default=64)
    p.add_argument("--shard-samples", type=int, default=100, help="samples per shard in the written trees")
    p.add_argument("--dir", help="where to build the trees (default: a temporary directory, removed after)")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    trees, writes, indexes = _trees(args.trees), _trees(args.write_trees), _trees(args.indexes)
    if len(set(trees) | set(writes)) < 3 or len(indexes) < 2 or not writes or args.parts < 2:
        p.error(
            "the fits need 3+ trees (--trees and --write-trees together), 2+ --indexes, 1+ --write-trees, --parts >= 2"
        )
    work = Path(tempfile.mkdtemp(prefix="shards-bench-", dir=args.dir))
    try:
        result = measure(work, trees, writes, indexes, args.parts, args.shard_samples)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(report(result, args.parts))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
