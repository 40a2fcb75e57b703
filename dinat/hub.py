"""HF checkpoint directories: ``config.json`` + ``model.safetensors`` + ``preprocessor_config.json``.

The layout is transformers' DinatForImageClassification. A model without RPB writes zero ``rpb``
tensors, so transformers' code (which always adds RPB) computes the same function.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import DinatConfig

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PREPROCESSOR_NAME = "preprocessor_config.json"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _rpb_keys(config: DinatConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    k = 2 * config.kernel_size - 1
    return {
        f"{prefix}encoder.levels.{i}.layers.{j}.attention.self.rpb": (config.num_heads[i], k, k)
        for i, depth in enumerate(config.depths)
        for j in range(depth)
    }


def _prefix(model: torch.nn.Module) -> str:
    return "" if type(model).__name__ in ("DinatModel", "DinatBackbone") else "dinat."


def hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under HF names, with zero RPB added when the model has none."""
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if not model.config.use_rpb:
        for key, shape in _rpb_keys(model.config, _prefix(model)).items():
            sd[key] = torch.zeros(shape, dtype=next(iter(sd.values())).dtype)
    return sd


def save_pretrained(
    model: torch.nn.Module, save_directory: str | Path, image_size: int = 224, dtype: torch.dtype | None = None
) -> Path:
    """Write config.json, model.safetensors and preprocessor_config.json into ``save_directory``."""
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    sd = hf_state_dict(model)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    save_file(sd, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    model.config.save(out / CONFIG_NAME)
    preprocessor = {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": image_size, "width": image_size},
        "resample": 3,  # bicubic
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
    }
    (out / PREPROCESSOR_NAME).write_text(json.dumps(preprocessor, indent=2) + "\n")
    return out


# PIL resample codes (what preprocessor_config.json stores) -> timm / torchvision interpolation names
RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def read_preprocessor(directory: str | Path) -> dict[str, Any] | None:
    """The input a checkpoint directory's model expects, from its preprocessor_config.json (None if absent).

    Returns ``{"size": (height, width), "mean": (...), "std": (...), "interpolation": "bicubic"}``; a value
    that is missing or malformed is a ValueError naming the file and the key.
    """
    path = Path(directory) / PREPROCESSOR_NAME
    if not path.is_file():
        return None
    raw = DinatConfig.read_json(path)
    size = raw.get("size") if isinstance(raw.get("size"), dict) else {}
    hw = [size.get("height"), size.get("width")] if "height" in size else [size.get("shortest_edge")] * 2
    values = {"size": hw, "image_mean": raw.get("image_mean"), "image_std": raw.get("image_std")}
    for key, value in values.items():
        if not isinstance(value, list) or not value or not all(isinstance(v, (int, float)) and v > 0 for v in value):
            raise ValueError(f"{path}: {key!r} must be a list of positive numbers, got {raw.get(key)!r}")
    resample = raw.get("resample", 2)  # ViTImageProcessor's default: bilinear
    if resample not in RESAMPLE_NAMES:
        raise ValueError(f"{path}: 'resample' must be a PIL resample code 0-5, got {resample!r}")
    return {
        "size": tuple(int(v) for v in hw),
        "mean": tuple(values["image_mean"]),
        "std": tuple(values["image_std"]),
        "interpolation": RESAMPLE_NAMES[resample],
    }


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        if (path.parent / "pytorch_model.bin").is_file():  # transformers < 4.35 saves this by default
            raise FileNotFoundError(
                f"{path}: no such file, only pytorch_model.bin; save it with transformers' "
                "save_pretrained(..., safe_serialization=True)"
            )
        raise FileNotFoundError(f"{path}: no such file (expected {WEIGHTS_NAME} beside config.json)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def _list(keys, n: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def drop_zero_rpb(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """``sd`` without the all-zero ``rpb`` tensors of an export, when ``model`` has no RPB.

    Non-zero RPB for a model without RPB is a ValueError naming ``source``: dropping it would change the function.
    """
    if model.config.use_rpb:
        return sd
    rpb = _rpb_keys(model.config, _prefix(model))
    nonzero = [k for k in rpb if k in sd and bool(sd[k].any())]
    if nonzero:
        raise ValueError(
            f"{source}: non-zero relative positional bias ({_list(nonzero, 2)}) but use_rpb=False; "
            "load with use_rpb=True (reference attention backend)"
        )
    return {k: v for k, v in sd.items() if k not in rpb}


def load_hf_weights(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Load HF-named weights strictly; every mismatch is one clear ValueError naming ``source``."""
    if _prefix(model) == "" and any(k.startswith("dinat.") for k in sd):  # base model from a classifier checkpoint
        sd = {k[len("dinat.") :]: v for k, v in sd.items() if k.startswith("dinat.")}
    sd = drop_zero_rpb(model, sd, source)
    expected = model.state_dict()
    missing = expected.keys() - sd.keys()
    unexpected = sd.keys() - expected.keys()
    if missing:
        raise ValueError(f"{source}: missing keys {_list(missing)}")
    if unexpected:
        raise ValueError(f"{source}: unexpected keys {_list(unexpected)}")
    bad = [f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if sd[k].shape != v.shape]
    if bad:
        raise ValueError(f"{source}: mis-shaped keys {'; '.join(bad[:5])}")
    model.load_state_dict(sd, strict=True)


def from_pretrained(directory: str | Path, cls=None, **overrides) -> torch.nn.Module:
    """Build ``cls`` (default DinatForImageClassification) from a checkpoint directory.

    ``overrides`` replace config fields (``attention_backend="reference"``, ``use_rpb=False`` ...). A
    transformers-written checkpoint whose RPB is all zeros loads without RPB, so it runs on fused kernels.
    """
    from .modeling import DinatForImageClassification

    cls = cls or DinatForImageClassification
    directory = Path(directory)
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: no such file")
    raw = DinatConfig.read_json(cfg_path)
    config = DinatConfig.from_dict(raw, source=str(cfg_path))
    weights_path = directory / WEIGHTS_NAME
    sd = _read_weights(weights_path)
    if "use_rpb" not in raw and "use_rpb" not in overrides:
        rpb = [v for k, v in sd.items() if k.endswith("attention.self.rpb")]
        if rpb and not any(bool(t.any()) for t in rpb):
            logger.info("%s: all RPB tensors are zero; loading without RPB", weights_path)
            overrides["use_rpb"] = False
    if overrides:
        config = config.replace(**overrides)
    model = cls(config)
    load_hf_weights(model, sd, str(weights_path))
    return model
