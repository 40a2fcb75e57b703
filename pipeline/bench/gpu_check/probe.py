"""The environment of a GPU check: devices, driver, versions, what NATTEN can run, as one JSON object.

    python -m pipeline.bench.gpu_check.probe OUT.json

Run as the check's first step (a process of its own: a driver that hangs costs only this step's limit).
Packages are looked up without importing them first (``importlib.metadata``), then imported to record
where they come from and why an import fails (a wheel bundle on ``PYTHONPATH`` shows up in ``path``).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "natten", "deepspeed", "webdataset", "timm", "torchvision", "transformers", "accelerate")
PACKAGES += ("safetensors", "numpy", "triton", "pydantic", "tensorboard", "pytest")
IMPORTS = ("deepspeed", "natten", "webdataset", "timm")  # what the project needs beyond torch


def package(name: str, do_import: bool) -> dict[str, Any]:
    try:
        info: dict[str, Any] = {"version": importlib.metadata.version(name)}
    except importlib.metadata.PackageNotFoundError:
        info = {"version": None}
    if do_import:
        try:
            module = importlib.import_module(name)
            info["path"] = str(Path(module.__file__).parent) if getattr(module, "__file__", None) else None
        except Exception as e:  # any import failure is a finding, not a crash of the probe
            info["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    return info


def _driver() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        r = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None


def natten_status() -> dict[str, Any]:
    """Whether the ``natten`` backend can run, and on what: fused kernels (libnatten) or FlexAttention."""
    try:
        import natten
    except Exception as e:
        return {"available": False, "error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
    if not hasattr(natten, "na2d"):
        return {"available": False, "error": f"natten {natten.__version__} has no na2d (needs >= 0.20)"}
    fused = bool(getattr(natten, "HAS_LIBNATTEN", False))
    return {"available": True, "fused_kernels": fused, "path": "libnatten (fused)" if fused else "FlexAttention"}


def probe() -> dict[str, Any]:
    import torch

    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append(
                {
                    "name": p.name,
                    "capability": f"{p.major}.{p.minor}",
                    "total_memory": p.total_memory,
                    "multiprocessors": p.multi_processor_count,
                }
            )
    return {
        "host": platform.node(),
        "python": platform.python_version(),
        "executable": sys.executable,
        "cpus": _cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "driver": _driver(),
        "devices": devices,
        "natten": natten_status(),
        "packages": {name: package(name, name in IMPORTS) for name in PACKAGES},
    }


def _cpu_count() -> int | None:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m pipeline.bench.gpu_check.probe OUT.json", file=sys.stderr)
        return 2
    record = probe()
    Path(args[0]).parent.mkdir(parents=True, exist_ok=True)
    Path(args[0]).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: record[k] for k in ("python", "torch", "cuda", "devices", "natten")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
