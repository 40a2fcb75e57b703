"""The wheel bundle: the packages a GPU machine lacks, as wheels for its Python and platform, built here.

    bash launch/gpu_wheels.sh                      # -> .whl/gpu-cp312: CPython 3.12, manylinux x86_64
    python -m pipeline.bench.gpu_check.wheels --python-version 3.11 --out /tmp/b --verify-with python3.11

A GPU machine without registry access (the H200 machines: torch 2.11, no deepspeed, natten or webdataset)
gets them as a folder of wheels that travels with the working tree and installs with
``pip install --no-index --no-deps --target DIR`` (``launch/gpu_check.sh --wheels``). Nothing of the
project's own installation changes.

- natten and deepspeed exist on the registry as source only. Both are built here, in the Python that runs
  this module (the project's .venv: their setup imports torch, hence ``--no-build-isolation``), as pure
  Python: no CUDA visible and ``DS_BUILD_OPS=0``. NATTEN then runs on FlexAttention (its fused kernels are
  a long compile: ``launch/natten_wheel.sh``); DeepSpeed compiles any op it needs on first use.
- The rest is downloaded as binary wheels for the target's Python and platform.
- Versions are those of this environment, so the GPU runs what the CPU tests ran.
- Every wheel's ``Requires-Dist`` (markers evaluated for the target) must be met by the bundle or by the
  target's own packages (:data:`.h200_packages.H200_PACKAGES`, or ``--present FILE``): checked here, so a
  missing dependency shows before a GPU minute is spent.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import subprocess
import sys
import tempfile
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

from .h200_packages import H200_PACKAGES

BUILT = ("natten", "deepspeed")  # source distributions only: built here, pure Python
# webdataset and what the H200 machines lack of deepspeed's and webdataset's requirements. typing-extensions
# is there, in a version nobody recorded; pydantic needs a recent one, and a newer typing-extensions is
# backward compatible, so it travels too (ahead of the machine's own on PYTHONPATH).
DOWNLOADED = ("webdataset", "braceexpand", "hjson", "pydantic", "pydantic-core", "annotated-types")
DOWNLOADED += ("typing-inspection", "typing-extensions")
IMPORTS = ("deepspeed", "natten", "webdataset")
MAX_MIB = 64.0  # what travels with the working tree to the GPU machine, all in all


class BundleError(RuntimeError):
    """The bundle cannot be built or would not install there; the message names the package."""


def local_versions(names: tuple[str, ...]) -> dict[str, str]:
    """The versions installed in this Python, or a BundleError naming what is missing."""
    out, missing = {}, []
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    if missing:
        raise BundleError(f"not installed in {sys.executable}: {', '.join(missing)} (use the project's .venv)")
    return out


def platforms(arch: str, glibc: str) -> list[str]:
    """pip's --platform tags accepted on a Linux ``arch`` with glibc ``glibc`` (pip matches each exactly)."""
    major, minor = (int(x) for x in glibc.split("."))
    if major != 2 or minor < 17:
        raise BundleError(f"--glibc: 2.17 or newer, got {glibc}")
    return [f"manylinux_2_{n}_{arch}" for n in range(minor, 16, -1)] + [f"manylinux2014_{arch}"]


def _pip(python: str, *args: str, env: dict[str, str] | None = None) -> None:
    cmd = [python, "-m", "pip", "--disable-pip-version-check", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        lines = [line for line in (r.stderr or r.stdout).splitlines() if line.strip() and "WARNING" not in line]
        raise BundleError(f"{' '.join(cmd[3:6])} ... failed: {' / '.join(lines[-3:])}")


def build_pure(specs: list[str], out: Path) -> None:
    """Pure-Python wheels of source-only packages, against this Python's torch."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NATTEN_")}
    env |= {"CUDA_VISIBLE_DEVICES": "", "DS_BUILD_OPS": "0"}  # no libnatten, no precompiled DeepSpeed ops
    args = ["wheel", "-q", "--no-build-isolation", "--no-deps", "--no-binary", ":all:", "-w", str(out), *specs]
    _pip(sys.executable, *args, env=env)
    for wheel in out.glob("*.whl"):
        tags = {str(t) for t in parse_wheel_filename(wheel.name)[3]}
        if tags != {"py3-none-any"}:
            raise BundleError(
                f"{wheel.name}: built with compiled code ({', '.join(sorted(tags))}); expected pure Python"
            )


def download(specs: list[str], out: Path, python_version: str, tags: list[str]) -> None:
    args = ["download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", python_version]
    args += ["--implementation", "cp", *(x for t in tags for x in ("--platform", t)), "-d", str(out), *specs]
    _pip(sys.executable, *args)


def target_environment(python_version: str, arch: str) -> dict[str, str]:
    """Marker variables of the target (for ``Requires-Dist: x; python_version < '3.11'`` and the like)."""
    return {
        "python_version": python_version,
        "python_full_version": f"{python_version}.0",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "os_name": "posix",
        "platform_machine": arch,
        "extra": "",
    }


def requirements(wheel: Path, environment: dict[str, str]) -> list[Requirement]:
    """The ``Requires-Dist`` of a wheel that apply on the target (extras left out)."""
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(z.read(name).decode())
    reqs = [Requirement(r) for r in meta.get_all("Requires-Dist") or []]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(environment)]


def parse_present(text: str) -> dict[str, Version | None]:
    """``pip list --format=freeze`` lines (NAME or NAME==VERSION; # comments) -> {canonical name: version}."""
    out: dict[str, Version | None] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[canonicalize_name(name)] = Version(version) if version else None
    return out


def check(wheels: list[Path], present: dict[str, Version | None], environment: dict[str, str]) -> list[str]:
    """Problems (empty: none): a requirement met neither by the bundle nor by the target's packages, a
    version that does not satisfy one (where the target's version is known), a package twice in the bundle."""
    bundle: dict[str, Version] = {}
    problems = []
    for w in wheels:
        name, version = parse_wheel_filename(w.name)[:2]
        if name in bundle:
            problems.append(f"{name}: twice in the bundle ({bundle[name]}, {version}); pip refuses the lot")
        bundle[name] = version
    for w in wheels:
        for req in requirements(w, environment):
            name = canonicalize_name(req.name)
            have = bundle.get(name, present.get(name))
            if name not in bundle and name not in present:
                problems.append(f"{w.name}: needs {req}, in neither the bundle nor the target's packages")
            elif have is not None and req.specifier and not req.specifier.contains(have, prereleases=True):
                where = "bundle" if name in bundle else "target"
                problems.append(f"{w.name}: needs {req}, the {where} has {have}")
    return problems


def shadowed(wheels: list[Path], present: dict[str, Version | None]) -> list[str]:
    """Bundled packages the target has too: the bundle's copy comes first on PYTHONPATH."""
    return [parse_wheel_filename(w.name)[0] for w in wheels if parse_wheel_filename(w.name)[0] in present]


def build_bundle(
    out: Path, python_version: str = "3.12", arch: str = "x86_64", glibc: str = "2.28", present: str | None = None
) -> list[Path]:
    """Empty ``out`` of wheels, build and download the bundle into it, check it; returns the wheels."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.whl"):  # one version of each: two make pip refuse the whole install
        old.unlink()
    versions = local_versions(BUILT + DOWNLOADED)
    spec = lambda names: [f"{n}=={versions[n]}" for n in names]  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        build_pure(spec(BUILT), Path(tmp))
        for wheel in Path(tmp).glob("*.whl"):
            wheel.rename(out / wheel.name)
    download(spec(DOWNLOADED), out, python_version, platforms(arch, glibc))
    wheels = sorted(out.glob("*.whl"))
    found = {parse_wheel_filename(w.name)[0] for w in wheels}
    absent = [n for n in BUILT + DOWNLOADED if canonicalize_name(n) not in found]
    if absent:
        raise BundleError(f"no wheel for {', '.join(absent)} in {out}")
    text = Path(present).read_text() if present else H200_PACKAGES
    problems = check(wheels, parse_present(text), target_environment(python_version, arch))
    if problems:
        raise BundleError("; ".join(problems))
    size = sum(w.stat().st_size for w in wheels) / 2**20
    if size > MAX_MIB:
        raise BundleError(f"{out}: {size:.1f} MiB of wheels, over the {MAX_MIB:g} MiB that can travel")
    return wheels


def install_line(wheels: Path, python: str = "python3") -> str:
    """The line that installs the bundle into a fresh folder and puts it on PYTHONPATH (as gpu_check.sh does)."""
    return (
        f'site="$(mktemp -d)" && {python} -m pip install -q --no-index --no-deps --no-compile --target "$site" '
        f'{wheels}/*.whl && export PYTHONPATH="$site${{PYTHONPATH:+:$PYTHONPATH}}"'
    )


# Imported with the bundle's packages hidden everywhere but the target folder: the import proves that the
# bundle itself supplies them, also in an environment that has its own copies (the project's .venv).
_VERIFY = """
import importlib.machinery, importlib.metadata, sys
target, names = sys.argv[1], set(sys.argv[2].split(","))
class OnlyFromBundle:
    @staticmethod
    def find_spec(name, path=None, target_=None):
        if path is None and name.partition(".")[0] in names:
            spec = importlib.machinery.PathFinder.find_spec(name, [target])
            if spec is None:
                raise ModuleNotFoundError(f"{name}: not in the bundle", name=name)
            return spec
        return None
sys.meta_path.insert(0, OnlyFromBundle)
for module in sys.argv[3].split(","):
    m = __import__(module)
    assert m.__file__.startswith(target), (module, m.__file__)
    print("imported:", module, importlib.metadata.version(module), m.__file__)
"""


def top_level_names(wheel: Path) -> set[str]:
    """The importable top-level names a wheel installs (from its RECORD)."""
    with zipfile.ZipFile(wheel) as z:
        names = {n.split("/", 1)[0] for n in z.namelist()}
    return {n.removesuffix(".py") for n in names if not n.endswith((".dist-info", ".data")) and n != "__pycache__"}


def verify(wheels_dir: Path, python: str) -> str:
    """Install the bundle with ``python`` into a fresh folder (--no-index) and import :data:`IMPORTS` from
    there alone; returns a line per module: name, version, file."""
    wheels = sorted(wheels_dir.glob("*.whl"))
    if not wheels:
        raise BundleError(f"{wheels_dir}: no wheels")
    names = set().union(*(top_level_names(w) for w in wheels))
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        args = ["install", "-q", "--no-index", "--no-deps", "--no-compile", "--target", str(site)]
        _pip(python, *args, *map(str, wheels))
        env = {**os.environ, "PYTHONPATH": str(site)}
        cmd = [python, "-c", _VERIFY, str(site), ",".join(sorted(names)), ",".join(IMPORTS)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise BundleError(f"import with {python} failed: {last}")
    # DeepSpeed prints its accelerator warning to stdout: keep only the lines of the import itself
    lines = r.stdout.splitlines(True)
    return "".join(line.removeprefix("imported: ") for line in lines if line.startswith("imported: "))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_wheels", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="wheel folder (default .whl/gpu-cpXY, git-ignored)")
    p.add_argument("--python-version", default="3.12", help="the target's Python, e.g. 3.12")
    p.add_argument("--arch", default="x86_64")
    p.add_argument("--glibc", default="2.28", help="the newest manylinux glibc to accept (the target's or older)")
    p.add_argument("--present", default=None, help="the target's 'pip list --format=freeze' (default: the H200's)")
    p.add_argument("--verify-with", default=None, metavar="PYTHON", help="install and import with this Python")
    args = p.parse_args(argv)
    root = Path(__file__).resolve().parents[3]
    out = args.out or root / ".whl" / f"gpu-cp{args.python_version.replace('.', '')}"
    try:
        wheels = build_bundle(out, args.python_version, args.arch, args.glibc, args.present)
        for w in wheels:
            print(f"{w.stat().st_size / 2**20:7.2f} MiB  {w.name}")
        print(f"{sum(w.stat().st_size for w in wheels) / 2**20:7.2f} MiB  in {out}; requirements met")
        present = parse_present(Path(args.present).read_text() if args.present else H200_PACKAGES)
        for name in shadowed(wheels, present):
            print(f"{name}: the target has it too; the bundle's copy comes first on PYTHONPATH")
        if args.verify_with:
            print(verify(out, args.verify_with), end="")
    except BundleError as e:
        print(f"gpu_wheels: {e}", file=sys.stderr)
        return 1
    rel = os.path.relpath(out, root)
    print(f"on the GPU machine: bash launch/gpu_check.sh --system-python --wheels {rel}")
    print(f"which installs them with: {install_line(Path(rel))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
