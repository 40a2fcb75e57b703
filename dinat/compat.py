"""Make transformers' own DiNAT run with modern NATTEN.

Every transformers release imports ``natten.functional.natten2dqkrpb`` / ``natten2dav``, which NATTEN
removed in 0.17.5. ``patch_transformers()`` supplies both from :mod:`dinat.attention` (pure PyTorch,
with RPB), so ``transformers.DinatForImageClassification`` loads and runs our checkpoints again.

Which releases can run, read from each release's ``models/dinat/modeling_dinat.py``:

- 4.25-4.27 call ``natten2dqkrpb(query, key, rpb, dilation)``, without the kernel size: refused.
- 4.28.0-4.53.3 lay q/k/v out as (B, heads, H, W, d) and call ``natten2dqkrpb(query, key, rpb,
  kernel_size, dilation)``; their inference code is the same in every release: supported.
- 4.54.0 rewrote the q/k/v reshape for (B, L, C) sequences: ``batch_size, seq_length, _ =
  hidden_states.shape`` fails on DiNAT's (B, H, W, C) maps (4.54.0-4.57.6, 5.0.0-5.5.0). From 5.5.1 it
  views them as (B, W, H, heads, d) and attends over the wrong axes. Refused.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

from packaging.version import Version

from . import attention

SUPPORTED = ((4, 28), (4, 54))  # [first, end) as (major, minor)
TESTED = ("4.28.0", "4.53.3")  # the oldest and newest releases the parity tests ran against
REQUIREMENT = "transformers>=4.28,<4.54"


def check_version(version: str) -> None:
    """Raise RuntimeError, one line, unless transformers ``version``'s DiNAT runs with the supplied functions."""
    release = Version(version).release[:2]  # 4.54.0.dev0 is 4.54's code, not 4.53's
    first, end = SUPPORTED
    if first <= release < end:
        return
    if release < first:
        why = "its DiNAT calls natten2dqkrpb(query, key, rpb, dilation), an older NATTEN signature without kernel_size"
    else:
        why = (
            "its DiNAT attention, rewritten in 4.54.0, reshapes (B, H, W, C) maps as (B, L, C) sequences "
            "(from 5.5.1: over the wrong axes) and cannot run"
        )
    raise RuntimeError(
        f"transformers {version}: {why}; patch_transformers() supports {REQUIREMENT} (tested {TESTED[0]} to "
        f"{TESTED[1]}): pip install '{REQUIREMENT}', or load the checkpoint with "
        "dinat.DinatForImageClassification.from_pretrained"
    )


def patch_transformers() -> ModuleType:
    """Patch transformers' DiNAT module in place; returns the patched ``modeling_dinat`` module.

    Refuses (RuntimeError naming the version) every release whose DiNAT cannot run: see the module docstring.
    """
    import transformers

    check_version(transformers.__version__)
    return _install()


def _install() -> ModuleType:
    """Supply the two functions to ``transformers.models.dinat.modeling_dinat``, whatever its version."""
    from transformers.utils import import_utils

    name = "transformers.models.dinat.modeling_dinat"
    module = sys.modules.get(name)
    if module is None:
        # Import with NATTEN reported missing so the module defines placeholders instead of failing
        # on the removed imports; the placeholders are replaced below.
        saved = import_utils._natten_available
        import_utils._natten_available = False
        try:
            module = importlib.import_module(name)
        finally:
            import_utils._natten_available = saved
    module.natten2dqkrpb = attention.natten2dqkrpb
    module.natten2dav = attention.natten2dav
    import_utils._natten_available = True  # requires_backends(self, ["natten"]) in the model constructors
    return module
