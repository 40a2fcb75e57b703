"""timm registration: after ``import dinat``, ``timm.create_model("dinat_large", num_classes=1000)`` works.

timm's usual arguments map onto DinatConfig (num_classes -> num_labels, in_chans -> num_channels,
drop_rate -> hidden_dropout_prob); any other keyword must be a DinatConfig field. The timm-facing model
returns logits from ``forward`` and keeps the HF parameter names.
"""

from __future__ import annotations

import torch
from timm.models import register_model

from .modeling import DinatForImageClassification
from .variants import VARIANTS, default_resolution, variant_config

_TIMM_TO_CONFIG = {"num_classes": "num_labels", "in_chans": "num_channels", "drop_rate": "hidden_dropout_prob"}
_TIMM_IGNORED = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


class TimmDinat(DinatForImageClassification):
    """DinatForImageClassification with timm's model interface."""

    @property
    def num_classes(self) -> int:
        return self.config.n_labels

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H/32, W/32, num_features), after the final LayerNorm."""
        return self.dinat(x).last_hidden_state

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.flatten(1, 2).mean(dim=1)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # timm convention: logits
        return self.forward_head(self.forward_features(x))

    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if any(s in n for s in self.no_weight_decay_keywords())}


def _entrypoint(name: str):
    def create(pretrained: bool = False, **kwargs) -> TimmDinat:
        if pretrained:
            raise ValueError(
                f"{name}: no hub weights are registered with timm; use dinat.create_model(name, "
                "pretrained=DIR) or TimmDinat.from_pretrained(DIR)"
            )
        for k in _TIMM_IGNORED:
            kwargs.pop(k, None)
        overrides = {_TIMM_TO_CONFIG.get(k, k): v for k, v in kwargs.items()}
        model = TimmDinat(variant_config(name, **overrides))
        size = default_resolution(name)
        model.pretrained_cfg = {
            "input_size": (3, size, size),
            "interpolation": "bicubic",
            "crop_pct": 0.875,
            "mean": (0.485, 0.456, 0.406),
            "std": (0.229, 0.224, 0.225),
            "num_classes": model.num_classes,
            "first_conv": "dinat.embeddings.patch_embeddings.projection.0",
            "classifier": "classifier",
        }
        model.default_cfg = model.pretrained_cfg
        return model

    create.__name__ = create.__qualname__ = name
    create.__module__ = __name__
    create.__doc__ = f"DiNAT variant {name!r} (see dinat.variants)."
    return create


for _name in VARIANTS:
    globals()[_name] = register_model(_entrypoint(_name))
