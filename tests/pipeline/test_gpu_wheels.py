"""The wheel bundle for GPU machines without a registry: the requirement check on wheels made here, and the
real bundle built from the registry, installed into a fresh folder with --no-index and imported from it."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.version import Version

from pipeline.bench.gpu_check.h200_packages import H200_PACKAGES
from pipeline.bench.gpu_check.wheels import (
    BUILT,
    DOWNLOADED,
    MAX_MIB,
    BundleError,
    build_bundle,
    check,
    parse_present,
    platforms,
    target_environment,
    top_level_names,
    verify,
)


def wheel(folder: Path, name: str, version: str, requires: list[str], tag: str = "py3-none-any") -> Path:
    """A real (minimal) wheel file: METADATA with these Requires-Dist and one module."""
    path = folder / f"{name}-{version}-{tag}.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/__init__.py", "")
        z.writestr(f"{name}-{version}.dist-info/METADATA", meta)
    return path


def test_requirements_against_the_bundle_and_the_target(tmp_path):
    present = parse_present("# the target\ntorch==2.11.0\nnumpy\n")
    assert present == {"torch": Version("2.11.0"), "numpy": None}
    env = target_environment("3.12", "x86_64")
    good = [
        wheel(tmp_path, "speed", "1.0", ["torch>=2.0", "numpy", "hjson", "tomli; python_version < '3.11'"]),
        wheel(tmp_path, "hjson", "3.1.0", ["sphinx; extra == 'docs'"]),
    ]
    assert check(good, present, env) == []  # tomli only below 3.11, sphinx only with an extra
    bad = [
        wheel(tmp_path, "needs_more", "1.0", ["torch>=2.12", "missing-pkg", "core==2.50.5", "numpy>=2"]),
        wheel(tmp_path, "core", "2.41.0", [], tag="cp312-cp312-manylinux_2_17_x86_64"),
        wheel(tmp_path, "core", "2.50.5", [], tag="cp312-cp312-manylinux_2_17_x86_64"),
    ]
    problems = check(bad, present, env)
    assert problems == [
        "core: twice in the bundle (2.41.0, 2.50.5); pip refuses the lot",
        "needs_more-1.0-py3-none-any.whl: needs torch>=2.12, the target has 2.11.0",
        "needs_more-1.0-py3-none-any.whl: needs missing-pkg, in neither the bundle nor the target's packages",
    ]  # core==2.50.5 is met by the last copy; numpy's version there is unknown: only its presence counts
    assert top_level_names(good[0]) == {"speed"}


def test_the_h200_list_and_platform_tags():
    h200 = parse_present(H200_PACKAGES)
    assert h200["torch"] == Version("2.11.0") and h200["typing-extensions"] is None
    assert not {"deepspeed", "natten", "webdataset", "pydantic", "hjson", "braceexpand"} & set(h200)
    tags = platforms("x86_64", "2.28")
    assert tags[0] == "manylinux_2_28_x86_64" and tags[-2:] == ["manylinux_2_17_x86_64", "manylinux2014_x86_64"]
    assert len(tags) == 28 - 17 + 2
    with pytest.raises(BundleError, match="--glibc: 2.17 or newer"):
        platforms("x86_64", "2.5")


def _registry_reachable(tmp_path: Path) -> bool:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(tmp_path), "braceexpand==0.1.7"]
    try:
        return subprocess.run(cmd, capture_output=True, timeout=120).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@pytest.mark.slow
def test_bundle_builds_installs_without_an_index_and_imports(tmp_path):
    """The real bundle for this Python (the H200's cp312 one differs only in pydantic-core's binary wheel):
    about a minute, most of it building deepspeed. Skipped without the registry."""
    if not _registry_reachable(tmp_path / "probe"):
        pytest.skip("the package registry is not reachable")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    out = tmp_path / "bundle"
    (out).mkdir()
    (out / "stale-0.1-py3-none-any.whl").write_bytes(b"")  # a leftover of an earlier build goes
    wheels = build_bundle(out, python_version=version)
    names = {w.name.split("-")[0].replace("_", "-").lower() for w in wheels}
    assert names == {n.replace("_", "-") for n in BUILT + DOWNLOADED}
    assert {w.name for w in wheels} == {p.name for p in out.glob("*.whl")}
    for name in BUILT:  # built here without CUDA: pure Python, so any CPython 3 with torch takes them
        assert next(w for w in wheels if w.name.startswith(name + "-")).name.endswith("-py3-none-any.whl")
    assert sum(w.stat().st_size for w in wheels) < MAX_MIB * 2**20

    printed = verify(out, sys.executable).splitlines()
    assert [line.split()[0] for line in printed] == ["deepspeed", "natten", "webdataset"]
    for line in printed:
        module, version_, path = line.split()
        assert "/site/" in path and not path.startswith(sys.prefix)  # from the fresh folder, not this .venv
        assert any(w.name.startswith(f"{module}-{version_}-") for w in wheels)
