"""Run code in a fresh interpreter: what an import does cannot be seen from a process that already imported it."""

import subprocess
import sys


def run_fresh(code: str, timeout: float = 300) -> str:
    """The stdout of ``python -c code``; a non-zero exit fails the test with the child's stderr."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr
    return out.stdout
