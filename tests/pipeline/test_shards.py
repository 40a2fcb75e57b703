"""dinat-make-shards: every input once, deterministic plans, bad inputs, kill + resume, parts + merge."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from pipeline.data.manifest import read_classes, read_manifest, verify_shard
from pipeline.data.planner import split_class
from pipeline.data.shards import TEST_PAUSE_ENV, main
from pipeline.data.sources import make_key

ROOT = Path(__file__).resolve().parents[2]


def _image(color: tuple[int, ...], mode: str = "RGB", fmt: str = "JPEG", size: tuple[int, int] = (32, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt)
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def make_tars(src: Path, counts: dict[str, int]) -> dict[str, bytes]:
    """Per-synset tars of distinct tiny JPEGs; source -> bytes."""
    src.mkdir(parents=True, exist_ok=True)
    sources = {}
    for c, (cls, n) in enumerate(sorted(counts.items())):
        with tarfile.open(src / f"{cls}.tar", "w") as tf:
            for i in range(n):
                data = _image((40 * c, 7 * i, 100))
                _add(tf, f"{cls}_{i}.JPEG", data)
                sources[f"{cls}.tar/{cls}_{i}.JPEG"] = data
    return sources


def read_shards(out: Path) -> dict[str, dict[str, tuple[bytes, int]]]:
    """split -> key -> (jpg bytes, class index), read with plain tarfile; a key seen twice fails."""
    found: dict[str, dict[str, tuple[bytes, int]]] = {"train": {}, "val": {}}
    for split, samples in found.items():
        for path in sorted(out.glob(f"{split}-*.tar")):
            members: dict[str, dict[str, bytes]] = {}
            with tarfile.open(path) as tf:
                for m in tf.getmembers():
                    key, ext = m.name.split(".", 1)
                    members.setdefault(key, {})[ext] = tf.extractfile(m).read()
            for key, d in members.items():
                assert key not in samples and "/" not in key and set(d) == {"jpg", "cls"}
                samples[key] = (d["jpg"], int(d["cls"]))
    return found


def shard_list(out: Path, manifest: str = "manifest.json") -> list[tuple[str, int, int, str]]:
    m = read_manifest(out / manifest)
    return [
        (e["name"], e["samples"], e["bytes"], e["sha256"]) for s in ("train", "val") for e in m["splits"][s]["shards"]
    ]


def test_tars_every_input_once(tmp_path: Path) -> None:
    sources = make_tars(tmp_path / "src", {"n02": 9, "n01": 7, "n03": 4})
    (tmp_path / "words.txt").write_text("n01\ttench, Tinca tinca\nn02\tgoldfish, Carassius auratus\nn99\tunused\n")
    out = tmp_path / "out"
    names = ["--names", str(tmp_path / "words.txt")]
    main([str(tmp_path / "src"), str(out), *names, "--shard-samples", "4", "--val-per-class", "3", "--workers", "1"])

    classes = read_classes(out)
    assert [c["name"] for c in classes] == ["tench, Tinca tinca", "goldfish, Carassius auratus", "n03"]
    main([str(tmp_path / "src"), str(out), "--shard-samples", "4", "--val-per-class", "3", "--workers", "1"])
    assert read_classes(out) == classes  # a resume without --names keeps them
    index = {c["id"]: c["index"] for c in classes}
    expected = {make_key(s.split(".", 1)[0], s.split("/", 1)[1]): (data, index[s[:3]]) for s, data in sources.items()}
    got = read_shards(out)
    assert got["train"].keys().isdisjoint(got["val"]) and {**got["train"], **got["val"]} == expected
    per_class = {c: sum(1 for _, k in got["val"].values() if k == index[c]) for c in index}
    assert per_class == {"n01": 3, "n02": 3, "n03": 3}
    m = read_manifest(out)
    assert m["splits"]["train"]["samples"] == 20 - 9 and m["num_skipped"] == 0 and m["reencoded"] == 0
    assert all(verify_shard(out / e["name"], e) for s in ("train", "val") for e in m["splits"][s]["shards"])

    urls = [str(p) for p in sorted(out.glob("*-*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert sorted(s["__key__"] for s in samples) == sorted(expected)
    assert all(s["jpg"] == expected[s["__key__"]][0] and int(s["cls"]) == expected[s["__key__"]][1] for s in samples)


def test_deterministic_across_runs_and_workers(tmp_path: Path) -> None:
    make_tars(tmp_path / "src", {"n01": 12, "n02": 9, "n03": 10})
    args = [str(tmp_path / "src"), "--shard-samples", "5", "--val-per-class", "2"]
    for out, workers in (("a", "1"), ("b", "1"), ("c", "2")):
        main([args[0], str(tmp_path / out), *args[1:], "--workers", workers])
    a = shard_list(tmp_path / "a")
    assert len(a) == 5 + 2 and a == shard_list(tmp_path / "b") == shard_list(tmp_path / "c")
    main([args[0], str(tmp_path / "d"), *args[1:], "--workers", "1", "--seed", "1"])
    assert read_shards(tmp_path / "d")["val"].keys() != read_shards(tmp_path / "a")["val"].keys()


def test_folders_layout_keys_and_json_names(tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = {"cat/a.jpg": (1,), "cat/a.png": (2,), "cat/a b.jpg": (3,), "cat/a_b.jpg": (4,), "cat/sub/x.y.jpeg": (5,)}
    files |= {f"dog/d{i}.JPEG": (10 + i,) for i in range(4)}
    for rel, (c,) in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(_image((c, c, c), fmt="PNG" if rel.endswith(".png") else "JPEG"))
    (tmp_path / "names.json").write_text(json.dumps({"cat": "Felis catus", "dog": "Canis familiaris"}))
    out = tmp_path / "out"
    main([str(src), str(out), "--names", str(tmp_path / "names.json"), "--val-per-class", "1", "--workers", "1"])

    assert [c["name"] for c in read_classes(out)] == ["Felis catus", "Canis familiaris"]
    got = read_shards(out)
    keys = {**got["train"], **got["val"]}
    assert len(keys) == len(files) and all("." not in k for k in keys)
    assert {"cat_sub_x_y", "dog_d0"} <= keys.keys() and sum(k.startswith("cat_a_b-") for k in keys) == 2
    assert sorted(k for _, k in keys.values()) == [0] * 5 + [1] * 4
    assert len(got["val"]) == 2 and read_manifest(out)["reencoded"] == 1  # the PNG


def make_zoo(src: Path) -> dict[str, str]:
    """Good and bad members in synset tars, one tar cut short; source -> expected skip reason."""
    make_tars(src, {"n01": 6, "n02": 6})
    with tarfile.open(src / "n01.tar", "a") as tf:
        _add(tf, "n01_corrupt.JPEG", b"\xff\xd8\xff\xe0" + bytes(range(256)) * 2)
        _add(tf, "n01_truncated.JPEG", _image((9, 9, 9), size=(64, 64))[:400])
        _add(tf, "n01_png.JPEG", _image((1, 2, 3), fmt="PNG"))
        _add(tf, "n01_cmyk.JPEG", _image((1, 2, 3, 4), mode="CMYK"))
        _add(tf, "n01_empty.JPEG", b"")
        _add(tf, "n01_html.JPEG", b"<html>404 Not Found</html>")
        _add(tf, "README.txt", b"not an image")
    with tarfile.open(src / "n03.tar", "w") as tf:
        for i in range(4):
            _add(tf, f"n03_{i}.JPEG", _image((5, 5, 50 * i), size=(48, 48)))
    with tarfile.open(src / "n03.tar") as tf:
        last = tf.getmembers()[-1]
    os.truncate(src / "n03.tar", last.offset_data + last.size // 2)
    with tarfile.open(src / "n04.tar", "w") as tf:
        _add(tf, "n04_0.JPEG", _image((7, 7, 7)))
        _add(tf, "n04_1.JPEG", _image((8, 8, 8)))
    with tarfile.open(src / "n04.tar") as tf:
        second = tf.getmembers()[-1].offset
    os.truncate(src / "n04.tar", second + 100)  # inside the second header: only the first member is seen
    return {
        "n01.tar/n01_corrupt.JPEG": "corrupt image",
        "n01.tar/n01_truncated.JPEG": "truncated image",
        "n01.tar/n01_empty.JPEG": "empty file",
        "n01.tar/n01_html.JPEG": "not an image",
        "n01.tar/README.txt": "not an image file",
        "n03.tar/n03_3.JPEG": "truncated tar",
        "n04.tar": "truncated tar",
    }


def test_bad_inputs_are_counted_not_fatal(tmp_path: Path) -> None:
    expected = make_zoo(tmp_path / "src")
    out = tmp_path / "out"
    main([str(tmp_path / "src"), str(out), "--shard-samples", "4", "--val-per-class", "1", "--workers", "1"])

    m = read_manifest(out)
    assert {s["source"]: s["reason"] for s in m["skipped"]} == expected and m["num_skipped"] == len(expected)
    assert m["reencoded"] == 2
    got = read_shards(out)
    samples = {**got["train"], **got["val"]}
    assert len(samples) == 6 + 2 + 6 + 3 + 1  # good n01 + PNG + CMYK, n02, the complete members of n03 and n04
    for key in ("n01_png", "n01_cmyk"):
        im = Image.open(io.BytesIO(samples[key][0]))
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (32, 24))


def test_max_side_reencodes_large_images(tmp_path: Path) -> None:
    make_tars(tmp_path / "src", {"n01": 3})
    main([str(tmp_path / "src"), str(tmp_path / "out"), "--max-side", "16", "--workers", "1"])
    jpgs = [d for d, _ in read_shards(tmp_path / "out")["train"].values()]
    assert read_manifest(tmp_path / "out")["reencoded"] == 3
    assert {Image.open(io.BytesIO(d)).size for d in jpgs} == {(16, 12)}


def kill_when(cmd: list[str], ready, pause: str = "0.2") -> None:
    """Run ``cmd`` slowed down by the test pause, SIGKILL its process group once ``ready()`` holds."""
    env = {**os.environ, TEST_PAUSE_ENV: pause}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stderr=subprocess.DEVNULL)
    try:
        deadline, seen = time.monotonic() + 60, False
        while not seen and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
            seen = ready()
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert seen and proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"


def test_kill_mid_write_then_resume(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_zoo(tmp_path / "src")
    args = [str(tmp_path / "src"), "--shard-samples", "3", "--val-per-class", "1", "--workers", "1"]
    main([args[0], str(tmp_path / "clean"), *args[1:]])
    out = tmp_path / "out"
    records = out / ".make-shards" / "records"
    kill_when([sys.executable, "-m", "pipeline.data.shards", args[0], str(out), *args[1:]],
              lambda: len(list(records.glob("*.json"))) >= 2)  # fmt: skip
    before = sorted(p.name[: -len(".json")] for p in records.glob("*.json"))
    assert len(list(out.glob("*-*.tar"))) < len(shard_list(tmp_path / "clean")) and not (out / "manifest.json").exists()
    stamps = {n: (out / n).stat().st_mtime_ns for n in before}
    (out / ".val-000000.tar.tmp").write_bytes(b"left by a killed run")

    caplog.set_level(logging.INFO, logger="pipeline.data.shards")
    main([args[0], str(out), *args[1:]])
    assert shard_list(out) == shard_list(tmp_path / "clean")
    assert read_manifest(out) == read_manifest(tmp_path / "clean")
    assert not list(out.glob(".*.tmp")) and stamps == {n: (out / n).stat().st_mtime_ns for n in stamps}
    assert all(f"kept (verified) {n}" in caplog.text for n in before)


def test_resume_rewrites_only_bad_shards(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_tars(tmp_path / "src", {"n01": 8, "n02": 8})
    argv = [
        str(tmp_path / "src"),
        str(tmp_path / "out"),
        "--shard-samples",
        "4",
        "--val-per-class",
        "1",
        "--workers",
        "1",
    ]
    main(argv)
    clean = shard_list(tmp_path / "out")
    (tmp_path / "out" / "train-000000.tar").unlink()
    with open(tmp_path / "out" / "train-000001.tar", "r+b") as f:
        f.seek(600)
        f.write(b"X")
    caplog.set_level(logging.INFO, logger="pipeline.data.shards")
    main(argv)
    assert shard_list(tmp_path / "out") == clean
    assert caplog.text.count("wrote ") == 2 and caplog.text.count("kept (verified) ") == len(clean) - 2


def test_parts_and_merge(tmp_path: Path) -> None:
    make_zoo(tmp_path / "src")
    args = [str(tmp_path / "src"), "--shard-samples", "3", "--val-per-class", "1", "--workers", "1"]
    main([args[0], str(tmp_path / "single"), *args[1:]])
    out = tmp_path / "parts"
    with pytest.raises(SystemExit, match=r"no plan yet .*: make it first, with the same arguments and --plan"):
        main([args[0], str(out), *args[1:], "--part", "1/2"])
    main([args[0], str(out), *args[1:], "--plan"])
    with pytest.raises(SystemExit, match=r"options differ from the plan's: --seed 1 \(plan: 0\)"):
        main([args[0], str(out), *args[1:], "--part", "1/2", "--seed", "1"])
    main([args[0], str(out), *args[1:], "--part", "1/2"])
    with pytest.raises(SystemExit, match="missing part manifests: manifest.part-00000-of-00002.json"):
        main(["--merge", str(out)])
    main([args[0], str(out), *args[1:], "--part", "0/2"])
    main(["--merge", str(out)])
    single, merged = read_manifest(tmp_path / "single"), read_manifest(out)
    assert shard_list(out) == shard_list(tmp_path / "single")
    assert merged["skipped"] == single["skipped"] and merged["reencoded"] == single["reencoded"] == 2
    assert merged == single

    (out / "index" / "val-000000.tar.npy").unlink()
    with pytest.raises(SystemExit, match="1 shards missing or incomplete: val-000000.tar"):
        main(["--merge", str(out)])
    main([args[0], str(out), *args[1:], "--part", "0/2"])  # re-run: the shard is kept, its index rewritten
    main(["--merge", str(out)])

    (out / "val-000000.tar").unlink()
    with pytest.raises(SystemExit, match="1 shards missing or incomplete: val-000000.tar"):
        main(["--merge", str(out)])


def test_clear_errors_before_work(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=f"{tmp_path / 'nope'}: no such directory"):
        main([str(tmp_path / "nope"), str(tmp_path / "out")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="empty: empty directory; expected one tar per synset"):
        main([str(tmp_path / "empty"), str(tmp_path / "out")])
    make_tars(tmp_path / "mixed", {"n01": 1})
    (tmp_path / "mixed" / "n02").mkdir()
    with pytest.raises(SystemExit, match="both"):
        main([str(tmp_path / "mixed"), str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="--part '2/2'"):
        main([str(tmp_path / "mixed"), str(tmp_path / "out"), "--part", "2/2"])
    assert not (tmp_path / "out").exists()


def test_val_rule_keeps_a_train_sample() -> None:
    sizes = [1, 2, 5, 12, 0]
    splits = [split_class([f"c{c}_{i}" for i in range(n)], seed=0, val_per_class=5) for c, n in enumerate(sizes)]
    assert [len(val) for val, _ in splits] == [0, 1, 4, 5, 0]
    assert [len(prefix) for _, prefix in splits] == sizes
    assert all(list(val) == sorted(set(val.tolist())) for val, _ in splits)  # key order, no repeats
    assert make_key("n01440764", "n01440764_10026.JPEG") == "n01440764_10026"
    assert make_key("cat", "a/b.c.png") == "cat_a_b_c"
