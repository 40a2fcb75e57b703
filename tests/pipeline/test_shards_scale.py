"""dinat-make-shards at scale, on tiny trees: parts of any count give the same bytes, each part reads only its
share, reads do not depend on buffering, kills in either pass resume to the same output, wrong layouts are
refused, the planner holds a few bytes per image, and the output is what the plain rules + webdataset write."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from pipeline.data.index import read_index
from pipeline.data.manifest import read_manifest
from pipeline.data.shard_plan import WORK_DIR, Options
from pipeline.data.shards import main, make_shards
from pipeline.data.sources import PEEK_MEMBERS, Listing, make_key, save_listing
from tests.pipeline.test_shards import ROOT, _add, _image, kill_when, make_tars, make_zoo

ARGS = ["--shard-samples", "5", "--val-per-class", "2", "--seed", "7", "--workers", "1"]


def every_file(out: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every output file (the writer's working directory excluded)."""
    return {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and WORK_DIR not in p.parts and not p.name.startswith("manifest.part-")
    }


def headers_in(tar: Path) -> int:
    """Tar headers in ``tar``, counted with a plain tarfile (up to where it stops on damage)."""
    n = 0
    with tarfile.open(tar) as tf:
        try:
            while tf.next() is not None:
                n += 1
        except tarfile.TarError:
            pass
    return n


def tree(src: Path, classes: int = 14, seed: int = 0) -> int:
    """Synset tars of skewed sizes plus the bad-input zoo; the number of tar members."""
    rng = random.Random(seed)
    make_zoo(src)
    make_tars(src, {f"n{i:08d}": 1 + int(rng.paretovariate(1.2)) % 25 for i in range(classes)})
    return sum(headers_in(p) for p in src.glob("*.tar"))


def test_parts_of_any_count_write_the_same_bytes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    tree(src)
    main([str(src), str(tmp_path / "single"), *ARGS])
    single = every_file(tmp_path / "single")
    assert sum(n.startswith("index/") for n in single) == sum(n.endswith(".tar") for n in single) > 8
    for n in (1, 3, 8):
        out = tmp_path / f"parts{n}"
        main([str(src), str(out), *ARGS, "--plan"])
        for i in reversed(range(n)):
            main([str(src), str(out), *ARGS, "--part", f"{i}/{n}"])
        main(["--merge", str(out)])
        assert every_file(out) == single, n


def test_index_offsets_are_where_tar_puts_the_samples(tmp_path: Path) -> None:
    tree(tmp_path / "src")
    main([str(tmp_path / "src"), str(tmp_path / "out"), *ARGS])
    m = read_manifest(tmp_path / "out")
    for e in [e for s in ("train", "val") for e in m["splits"][s]["shards"]]:
        with tarfile.open(tmp_path / "out" / e["name"]) as tf:
            members = tf.getmembers()
        starts = [x.offset for j, x in enumerate(members) if j % 2 == 0]  # .cls then .jpg per sample
        end = members[-1].offset_data + -(-members[-1].size // 512) * 512 if members else 0
        assert read_index(tmp_path / "out" / e["index"], e["samples"]).tolist() == [*starts, end]


def test_each_part_reads_its_share_only(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    members = tree(src, classes=30)
    plan: Counter = Counter()
    make_shards(src, out, Options(seed=7, val_per_class=2, shard_samples=5), plan_only=True, stats=plan)
    assert plan["headers"] == members  # every header once, nothing else parsed
    n, per_part = 8, []
    for i in range(n):
        stats: Counter = Counter()
        m = make_shards(src, out, Options(seed=7, val_per_class=2, shard_samples=5), part=(i, n), stats=stats)
        planned = sum(m["plan"]["shards"].values())
        rows = sum(min(5, 10**9) for k in range(planned) if k % n == i)  # upper bound: 5 rows a shard
        assert stats["headers"] == 0 and stats["member_reads"] <= rows
        assert stats["header_reads"] <= 2 * PEEK_MEMBERS + 2  # checking SRC's layout: a constant
        per_part.append(stats)
    total = sum(s["member_reads"] + s["header_reads"] for s in per_part)
    assert sum(s["member_reads"] for s in per_part) == sum(m["plan"]["samples"].values())
    assert total <= members + n * (2 * PEEK_MEMBERS + 2)


def sparse_tree(src: Path, tars: int, per_tar: int, spacing: int = 110_000) -> int:
    """Tars whose members are a tiny JPEG padded with a hole to ``spacing`` bytes (ImageNet's mean size);
    the tree's size in bytes."""
    src.mkdir(parents=True)
    jpeg = _image((1, 2, 3))
    for t in range(tars):
        with open(src / f"n{t:08d}.tar", "wb") as f:
            for i in range(per_tar):
                info = tarfile.TarInfo(f"n{t:08d}_{i}.JPEG")
                info.size = spacing
                f.write(info.tobuf(tarfile.USTAR_FORMAT))
                f.write(jpeg)
                f.seek(f.tell() + spacing - len(jpeg) + -spacing % 512)
            f.write(b"\0" * 1024)
    return sum(p.stat().st_size for p in src.iterdir())


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
def test_planning_reads_headers_not_files(tmp_path: Path) -> None:
    """The index pass reads each 512-byte header and no more, whatever the file's buffering would have
    pulled: all read() bytes of the process stay under 1% of the tree (a buffered reader: 4-8 KB/header)."""
    size = sparse_tree(tmp_path / "src", tars=5, per_tar=60)

    def rchar() -> int:
        return int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["rchar"])

    stats: Counter = Counter()
    before = rchar()
    make_shards(tmp_path / "src", tmp_path / "out", Options(), plan_only=True, stats=stats)
    read = rchar() - before
    assert stats["headers"] == 300 and stats["header_bytes"] == 512 * (
        300 + 2 * 5 + 2 * PEEK_MEMBERS
    )  # + end block, twice
    assert read < 0.01 * size, (read, size)


def test_kill_in_the_index_pass_then_resume(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tars(src, {f"n{i:08d}": 3 + i for i in range(8)})
    main([str(src), str(tmp_path / "clean"), *ARGS])
    out = tmp_path / "out"
    cache = out / WORK_DIR / "sources"
    kill_when([sys.executable, "-m", "pipeline.data.shards", str(src), str(out), *ARGS],
              lambda: len(list(cache.glob("n*.idx"))) >= 3)  # fmt: skip
    assert not (out / WORK_DIR / "plan.json").exists()
    done = len(list(cache.glob("n*.idx")))
    stats: Counter = Counter()
    make_shards(src, out, Options(seed=7, val_per_class=2, shard_samples=5), stats=stats)
    assert stats["reused"] >= 3 and stats["reused"] + stats["tars"] == 8 and stats["reused"] >= done - 1
    assert every_file(out) == every_file(tmp_path / "clean")


def _write(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            _add(tf, name, data)


def _layouts(root: Path) -> dict[str, tuple[Path, str]]:
    """Inputs that are not a raw release -> (SRC, what the error must say)."""
    cases: dict[str, tuple[Path, str]] = {}
    (root / "empty").mkdir()
    cases["empty"] = (root / "empty", "empty directory; expected one tar per synset")
    timm = root / "timm"
    timm.mkdir()
    for i in range(2):
        sample = {f"{i:07d}.jpg": _image((i, 0, 0)), f"{i:07d}.cls": b"3", f"{i:07d}.json": b"{}"}
        _write(timm / f"imagenet22k-train-{i:04d}.tar", sample)
    cases["timm"] = (timm, r"2 tars \(imagenet22k-train-0000.tar, .*\) are WebDataset shards \(numbered like shards\)"
                           r".*data.train='.*/imagenet22k-train-\{0000..0001\}.tar'")  # fmt: skip
    wds_named = root / "wds"
    wds_named.mkdir()
    _write(wds_named / "alpha.tar", {"k.cls": b"1", "k.jpg": _image((1, 1, 1))})
    _write(wds_named / "beta.tar", {"m.cls": b"1", "m.jpg": _image((1, 1, 1))})
    cases["wds-contents"] = (wds_named, r"are WebDataset shards \(alpha.tar holds k.cls, k.jpg\)")
    whole = root / "whole"
    whole.mkdir()
    _write(whole / "fall11_whole.tar", {"n01.tar": b"x" * 600, "n02.tar": b"y" * 600})
    cases["tar-of-tars"] = (whole, r"fall11_whole.tar holds archives \(n01.tar, n02.tar\), not images: extract it")
    docs = root / "docs"
    docs.mkdir()
    _write(docs / "notes.tar", {"a.txt": b"a", "b.txt": b"b"})
    cases["not-images"] = (docs, r"notes.tar: not a class tar: its first 2 members \(a.txt, b.txt\) are not images")
    high = root / "high"
    make_tars(high / "train", {"n01440764": 1, "n01443537": 1})
    cases["one-level-up"] = (high, r"high/train holds tars \(n01440764.tar, n01443537.tar\), not images: .*pass")
    archive = root / "archive"
    archive.mkdir()
    (archive / "winter21_whole.tar.gz").write_bytes(b"\x1f\x8b")
    cases["archive"] = (archive, r"only 1 other files \(winter21_whole.tar.gz\); .* extract it")
    return cases


@pytest.mark.parametrize("case", ["empty", "timm", "wds-contents", "tar-of-tars", "not-images", "one-level-up",
                                  "archive", "own-output"])  # fmt: skip
def test_wrong_layouts_are_refused_in_one_line(tmp_path: Path, case: str) -> None:
    if case == "own-output":
        make_tars(tmp_path / "raw", {"n01": 2})
        main([str(tmp_path / "raw"), str(tmp_path / "shards"), "--workers", "1"])
        src, expected = tmp_path / "shards", r"holds shards written by dinat-make-shards \(manifest.json\): train on it"
    else:
        src, expected = _layouts(tmp_path)[case]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main([str(src), str(out), "--workers", "1"])
    message = str(e.value)
    assert "\n" not in message and message.startswith("dinat-make-shards: error: ")
    assert __import__("re").search(expected, message), message
    assert not out.exists()


def test_workers_do_not_import_torch() -> None:
    code = (
        "import sys, pipeline.data.shards, pipeline.data.shard_writer, pipeline.progress; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'webdataset', 'torchvision', 'timm'}))"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


def reference_shards(src: Path, seed: int, val_per_class: int, shard_samples: int) -> dict[str, bytes]:
    """The plan's rules written plainly (tarfile, sha1 sorts, webdataset's TarWriter): shard name -> bytes."""
    by_class = []
    for label, tar in enumerate(sorted(src.glob("*.tar"))):
        with tarfile.open(tar) as tf:
            items = [(make_key(tar.stem, m.name), label, tf.extractfile(m).read()) for m in tf.getmembers()]
        items.sort(key=lambda it: hashlib.sha1(f"{seed}:{it[0]}".encode()).hexdigest())
        by_class.append(items)
    val = [it for items in by_class for it in sorted(items[: min(val_per_class, len(items) - 1)])]
    train = [it for items in by_class for it in items[min(val_per_class, len(items) - 1) :]]
    train.sort(key=lambda it: hashlib.sha1(f"{seed}:train:{it[0]}".encode()).hexdigest())
    shards = {}
    for split, items in (("train", train), ("val", val)):
        for k in range(0, len(items), shard_samples):
            buf = io.BytesIO()
            writer = wds.TarWriter(buf, mtime=0, encoder=False)
            for key, label, data in items[k : k + shard_samples]:
                writer.write({"__key__": key, "jpg": data, "cls": str(label).encode()})
            writer.close()
            shards[f"{split}-{k // shard_samples:06d}.tar"] = buf.getvalue()
    return shards


def test_output_is_what_the_plain_rules_and_webdataset_write(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tars(src, {f"n{i:08d}": n for i, n in enumerate([1, 2, 7, 12, 3, 9])})
    main([str(src), str(tmp_path / "out"), *ARGS])
    got = {n: b for n, b in every_file(tmp_path / "out").items() if n.endswith(".tar")}
    assert got == reference_shards(src, seed=7, val_per_class=2, shard_samples=5)


def test_manifests_are_written_once_per_shard(tmp_path: Path) -> None:
    tree(tmp_path / "src")
    stats: Counter = Counter()
    out = tmp_path / "out"
    make_shards(tmp_path / "src", out, Options(seed=7, val_per_class=2, shard_samples=5), stats=stats)
    records = list((out / WORK_DIR / "records").glob("*.json"))
    plan = [out / WORK_DIR / "plan.json", *(out / WORK_DIR).glob("plan-*/summary.json")]
    written = sum(p.stat().st_size for p in [*records, *plan, out / "manifest.json", out / "classes.json"])
    assert len(records) == sum(read_manifest(out)["plan"]["shards"].values()) and stats["manifest_bytes"] == written


def fabricated_classes(src: Path, out: Path, classes: int, per_class: int) -> int:
    """Class tars (sparse, never read) with cached indexes of ``per_class`` members each, as the index pass
    leaves them: the planner takes them as they are. The number of images."""
    cache = out / WORK_DIR / "sources"
    cache.mkdir(parents=True)
    src.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for c in range(classes):
        cid = f"n{c:08d}"
        with open(src / f"{cid}.tar", "wb") as f:
            f.truncate(per_class * 110_592 + 1024)
        st = os.stat(src / f"{cid}.tar")
        names = [f"{cid}_{i}.JPEG" for i in range(per_class)]
        sizes = rng.integers(20_000, 200_000, per_class)
        offsets = 512 + np.arange(per_class, dtype=np.int64) * 110_592
        save_listing(cache / f"{cid}.idx", Listing(names, sizes, offsets, []), (st.st_size, st.st_mtime_ns))
    return classes * per_class


PEAK = """
import sys
from pathlib import Path
from pipeline.data.shard_plan import Options
from pipeline.data.shards import make_shards

def hwm():
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]) * 1024

base = hwm()
make_shards(Path(sys.argv[1]), Path(sys.argv[2]), Options(), plan_only=True)
print(hwm() - base)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc/self/status")
def test_planner_holds_a_few_bytes_per_image(tmp_path: Path) -> None:
    """Planning from fabricated class indexes in a fresh process: the peak resident memory grows by tens of bytes
    per image (arrays), not by the hundreds that a Python object per image costs."""
    peaks = []
    for classes in (30, 120):
        src, out = tmp_path / f"src{classes}", tmp_path / f"out{classes}"
        images = fabricated_classes(src, out, classes, 1000)
        r = subprocess.run([sys.executable, "-c", PEAK, str(src), str(out)], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        peaks.append((images, int(r.stdout)))
        assert sum(json.loads((out / WORK_DIR / "plan.json").read_text())["samples"].values()) == images
    per_image = (peaks[1][1] - peaks[0][1]) / (peaks[1][0] - peaks[0][0])
    assert 0 < per_image < 80, f"{per_image:.1f} bytes per image"
