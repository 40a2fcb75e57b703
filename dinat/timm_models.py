"""timm registration: after ``import dinat``, ``timm.create_model("dinat_large", num_classes=1000)`` works.

timm's usual arguments map onto DinatConfig (num_classes -> num_labels, in_chans -> num_channels,
drop_rate -> hidden_dropout_prob); any other keyword must be a DinatConfig field. The timm-facing model
returns logits from ``forward`` and keeps the HF parameter names, so an export (config.json +
model.safetensors + preprocessor_config.json) loads with timm's own calls::

    timm.create_model("dinat_large", pretrained=True, pretrained_cfg_overlay=dict(file="EXPORT/model.safetensors"))
    timm.create_model("dinat_large", checkpoint_path="EXPORT/model.safetensors")

With ``file=`` (or ``source="local-dir", file="EXPORT"``) the pretrained cfg comes from the export: its class
count and names (config.json) and its input size, mean, std and interpolation (preprocessor_config.json), which
is what ``timm.data.resolve_model_data_config`` reports; its architecture must be the variant's.
``checkpoint_path=`` is read after the model is built, so the class count and data config stay the
variant's: pass ``num_classes=`` and ``pretrained_cfg_overlay=dict(input_size=(3, H, W))`` with it.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from timm.models import build_model_with_cfg, register_model

from .config import ARCH_FIELDS, DinatConfig
from .hub import CONFIG_NAME, IMAGENET_MEAN, IMAGENET_STD, drop_zero_rpb, read_preprocessor
from .modeling import DinatForImageClassification
from .variants import VARIANTS, default_resolution, variant_config

_TIMM_TO_CONFIG = {"num_classes": "num_labels", "in_chans": "num_channels", "drop_rate": "hidden_dropout_prob"}
_WEIGHT_SOURCES = ("file", "url", "hf_hub_id", "state_dict")  # pretrained cfg keys timm loads weights from


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

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Also takes an export's state dict: its zero ``rpb`` tensors (model without RPB) are dropped.

        timm's ``checkpoint_path=`` and ``pretrained=True`` both end here (``load_checkpoint`` has no filter hook).
        """
        sd = drop_zero_rpb(self, dict(state_dict), "state dict")
        return super().load_state_dict(sd, strict=strict, assign=assign)


def _cfg(name: str) -> dict[str, Any]:
    size = default_resolution(name)
    return {
        "url": "",
        "input_size": (3, size, size),
        "interpolation": "bicubic",
        "crop_pct": 0.875,
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "num_classes": variant_config(name).n_labels,
        "first_conv": "dinat.embeddings.patch_embeddings.projection.0",
        "classifier": "classifier",
    }


default_cfgs = {name: _cfg(name) for name in VARIANTS}  # read by timm's register_model


def export_pretrained_cfg(file: str | Path) -> tuple[dict[str, Any], DinatConfig | None]:
    """Pretrained cfg entries of the export holding ``file`` (model.safetensors, or the directory), and its config."""
    directory = Path(file) if Path(file).is_dir() else Path(file).parent
    cfg: dict[str, Any] = {}
    config = None
    if (directory / CONFIG_NAME).is_file():
        config = DinatConfig.load(directory / CONFIG_NAME)
        cfg["num_classes"] = config.n_labels
        cfg["label_names"] = tuple(config.labels[i] for i in range(config.n_labels))
    spec = read_preprocessor(directory)
    if spec is not None:
        channels = config.num_channels if config is not None else 3
        cfg.update(input_size=(channels, *spec["size"]), mean=spec["mean"], std=spec["std"])
        cfg["interpolation"] = spec["interpolation"]
    return cfg, config


def _build(name: str, export: DinatConfig | None, export_path: str, **kwargs: Any) -> TimmDinat:
    overrides = {_TIMM_TO_CONFIG.get(k, k): v for k, v in kwargs.items()}
    config = variant_config(name, **overrides)
    if export is not None:  # same parameter shapes can still be another network (dilations)
        for field in ARCH_FIELDS:
            if getattr(export, field) != getattr(config, field):
                raise ValueError(
                    f"{export_path}: {field}={getattr(export, field)} but {name} has {getattr(config, field)}; "
                    f"choose the variant the export was trained as, or pass {field}=... to timm.create_model"
                )
    return TimmDinat(config)


def _entrypoint(name: str):
    def create(pretrained: bool = False, **kwargs: Any) -> TimmDinat:
        if kwargs.pop("features_only", False):
            raise ValueError(f"{name}: features_only is not supported; use dinat.DinatBackbone for feature maps")
        overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
        if pretrained and kwargs.get("pretrained_cfg") is None and not any(overlay.get(k) for k in _WEIGHT_SOURCES):
            raise ValueError(
                f"{name}: no hub weights are registered with timm; load an export with "
                "pretrained_cfg_overlay=dict(file='EXPORT/model.safetensors') or checkpoint_path="
            )
        export = None
        if overlay.get("file"):
            from_export, export = export_pretrained_cfg(overlay["file"])
            overlay = {**from_export, **overlay}  # what the caller set wins
        return build_model_with_cfg(
            partial(_build, name, export if pretrained else None, str(overlay.get("file"))),
            name,
            pretrained,
            pretrained_cfg_overlay=overlay,
            **kwargs,
        )

    create.__name__ = create.__qualname__ = name
    create.__module__ = __name__
    create.__doc__ = f"DiNAT variant {name!r} (see dinat.variants)."
    return create


for _name in VARIANTS:
    globals()[_name] = register_model(_entrypoint(_name))
