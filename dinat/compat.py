"""Make transformers' own DiNAT run with modern NATTEN.

Every transformers release imports ``natten.functional.natten2dqkrpb`` / ``natten2dav``, which NATTEN
removed in 0.17.5. ``patch_transformers()`` supplies both from :mod:`dinat.attention` (pure PyTorch,
with RPB), so ``transformers.DinatForImageClassification`` loads and runs our checkpoints again.
"""

from __future__ import annotations

import importlib
import logging
import sys

from packaging.version import Version

from . import attention

logger = logging.getLogger(__name__)

TESTED = "4.46.3"


def patch_transformers():
    """Patch transformers' DiNAT module in place; returns the patched ``modeling_dinat`` module.

    transformers >= 5 is refused: its DiNAT views (B, H, W, C) maps as (B, W, H, heads, d), which is
    wrong for non-square maps whatever attention functions it is given.
    """
    import transformers
    from transformers.utils import import_utils

    version = Version(transformers.__version__)
    if version.major >= 5:
        raise RuntimeError(
            f"transformers {version}: its DiNAT reshapes attention on the wrong axes; "
            f"patch_transformers() supports 4.x (tested: {TESTED})"
        )
    if str(version) != TESTED:
        logger.warning("patch_transformers(): tested with transformers %s, found %s", TESTED, version)

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
