"""DiNAT for current NATTEN, in transformers' checkpoint layout.

import dinat
model = dinat.create_model("dinat_large", attention_backend="natten", activation_checkpointing="all")
"""

from . import (
    compat,  # dinat.compat.patch_transformers(); imports transformers only when called
    timm_models,  # noqa: F401  (registers the variants with timm)
)
from .attention import BACKENDS, na2d_natten, na2d_reference, resolve_backend
from .config import DinatConfig
from .modeling import (
    DinatBackbone,
    DinatForImageClassification,
    DinatModel,
    DinatOutput,
)
from .variants import VARIANTS, create_model, list_models, variant_config

__all__ = [
    "BACKENDS",
    "DinatBackbone",
    "DinatConfig",
    "DinatForImageClassification",
    "DinatModel",
    "DinatOutput",
    "VARIANTS",
    "compat",
    "create_model",
    "list_models",
    "na2d_natten",
    "na2d_reference",
    "resolve_backend",
    "variant_config",
]
__version__ = "0.1.0"
