"""The published DiNAT variants (SHI-Labs/Neighborhood-Attention-Transformer, classification/dinat.py)
plus a tiny debug variant, and ``create_model``."""

from __future__ import annotations

from typing import Any

_D224 = [[1, 8, 1], [1, 4, 1, 4], [1, 2] * 9, [1] * 5]
_D384 = [[1, 13, 1], [1, 6, 1, 6], [1, 3] * 9, [1] * 5]
_LARGE = dict(embed_dim=192, depths=[3, 4, 18, 5], num_heads=[6, 12, 24, 48], mlp_ratio=2.0)

# name -> (DinatConfig fields, input resolution)
# fmt: off
VARIANTS: dict[str, tuple[dict[str, Any], int]] = {
    "dinat_debug": (dict(embed_dim=16, depths=[2, 2, 2, 1], num_heads=[1, 2, 4, 8], mlp_ratio=2.0, kernel_size=3,
                         dilations=[[1, 4], [1, 2], [1, 2], [1]], drop_path_rate=0.1, num_labels=10), 64),
    "dinat_mini": (dict(embed_dim=64, depths=[3, 4, 6, 5], num_heads=[2, 4, 8, 16], mlp_ratio=3.0, drop_path_rate=0.2,
                        dilations=[[1, 8, 1], [1, 4, 1, 4], [1, 2] * 3, [1] * 5], num_labels=1000), 224),
    "dinat_tiny": (dict(embed_dim=64, depths=[3, 4, 18, 5], num_heads=[2, 4, 8, 16], mlp_ratio=3.0, drop_path_rate=0.2,
                        dilations=_D224, num_labels=1000), 224),
    "dinat_small": (dict(embed_dim=96, depths=[3, 4, 18, 5], num_heads=[3, 6, 12, 24], mlp_ratio=2.0,
                         drop_path_rate=0.3, dilations=_D224, num_labels=1000), 224),
    "dinat_base": (dict(embed_dim=128, depths=[3, 4, 18, 5], num_heads=[4, 8, 16, 32], mlp_ratio=2.0,
                        drop_path_rate=0.5, layer_scale_init_value=1e-5, dilations=_D224, num_labels=1000), 224),
    # ImageNet-22k pretraining (fall11: 21,841 classes); drop path 0.2 as the original dinat_large_21k.
    "dinat_large": (dict(**_LARGE, drop_path_rate=0.2, dilations=_D224, num_labels=21841), 224),
    # ImageNet-1k fine-tuned at 384 (drop path 0.35); the 11x11 variant keeps the 224 dilations.
    "dinat_large_384": (dict(**_LARGE, drop_path_rate=0.35, dilations=_D384, num_labels=1000), 384),
    "dinat_large_384_11x11": (dict(**_LARGE, drop_path_rate=0.35, kernel_size=11, dilations=_D224, num_labels=1000),
                              384),
}
# fmt: on


def list_models() -> list[str]:
    return list(VARIANTS)


def variant_config(name: str, **overrides: Any):
    from .config import DinatConfig

    if name not in VARIANTS:
        raise ValueError(f"unknown DiNAT variant {name!r}; choose from {', '.join(VARIANTS)}")
    fields, _ = VARIANTS[name]
    return DinatConfig(**fields).replace(**overrides) if overrides else DinatConfig(**fields)


def default_resolution(name: str) -> int:
    return VARIANTS[name][1]


def create_model(name: str, pretrained: str | None = None, device=None, **overrides: Any):
    """``create_model("dinat_large", attention_backend="natten", num_labels=1000)``.

    ``pretrained``: a directory written by ``save_pretrained`` (or transformers) to load weights from.
    ``num_labels=0`` gives a headless model (pooled features as logits).
    """
    from .modeling import DinatForImageClassification

    if pretrained is not None:
        return DinatForImageClassification.from_pretrained(pretrained, **overrides)
    return DinatForImageClassification(variant_config(name, **overrides), device=device)
