"""Convert original-repository checkpoints (SHI-Labs/Neighborhood-Attention-Transformer) to the HF layout.

The original blocks use a fused ``attn.qkv`` (rows: q, k, v) and ``attn.proj``, ``norm1/2``,
``mlp.fc1/fc2`` and ``gamma1/2``; the published weights carry RPB, so the result has ``use_rpb=True``.

    python -m dinat.convert dinat_large_in22k_224.pth OUT --variant dinat_large
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

_RENAMES = [
    (r"^patch_embed\.proj\.", "dinat.embeddings.patch_embeddings.projection."),
    (r"^patch_embed\.norm\.", "dinat.embeddings.norm."),
    (r"^levels\.(\d+)\.blocks\.(\d+)\.norm1\.", r"dinat.encoder.levels.\1.layers.\2.layernorm_before."),
    (r"^levels\.(\d+)\.blocks\.(\d+)\.norm2\.", r"dinat.encoder.levels.\1.layers.\2.layernorm_after."),
    (r"^levels\.(\d+)\.blocks\.(\d+)\.attn\.rpb$", r"dinat.encoder.levels.\1.layers.\2.attention.self.rpb"),
    (r"^levels\.(\d+)\.blocks\.(\d+)\.attn\.proj\.", r"dinat.encoder.levels.\1.layers.\2.attention.output.dense."),
    (r"^levels\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.", r"dinat.encoder.levels.\1.layers.\2.intermediate.dense."),
    (r"^levels\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.", r"dinat.encoder.levels.\1.layers.\2.output.dense."),
    (r"^levels\.(\d+)\.downsample\.", r"dinat.encoder.levels.\1.downsample."),
    (r"^norm\.", "dinat.layernorm."),
    (r"^head\.", "classifier."),
]
_QKV = re.compile(r"^levels\.(\d+)\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")
_GAMMA = re.compile(r"^levels\.(\d+)\.blocks\.(\d+)\.gamma([12])$")


def unwrap(checkpoint: dict) -> dict[str, torch.Tensor]:
    """Accept a bare state dict or one nested under 'model' / 'state_dict' (timm's train.py output)."""
    for key in ("model", "state_dict", "state_dict_ema"):
        if key in checkpoint and isinstance(checkpoint[key], dict):
            checkpoint = checkpoint[key]
            break
    return {k.removeprefix("module."): v for k, v in checkpoint.items()}


def convert_state_dict(original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original key names -> HF key names (qkv split, gammas stacked into layer_scale_parameters)."""
    out: dict[str, torch.Tensor] = {}
    gammas: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in original.items():
        if m := _QKV.match(key):
            level, layer, kind = m.groups()
            base = f"dinat.encoder.levels.{level}.layers.{layer}.attention.self."
            for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                out[f"{base}{name}.{kind}"] = part.clone()
            continue
        if m := _GAMMA.match(key):
            gammas.setdefault(m.groups()[:2], {})[m.group(3)] = value
            continue
        for pattern, repl in _RENAMES:
            new, n = re.subn(pattern, repl, key)
            if n:
                out[new] = value
                break
        else:
            raise ValueError(f"unrecognised key in original checkpoint: {key}")
    for (level, layer), g in gammas.items():
        if set(g) != {"1", "2"}:
            raise ValueError(f"levels.{level}.blocks.{layer}: gamma1 and gamma2 must both be present")
        out[f"dinat.encoder.levels.{level}.layers.{layer}.layer_scale_parameters"] = torch.stack([g["1"], g["2"]])
    return out


def convert_checkpoint(path: str | Path, variant: str, out_dir: str | Path, image_size: int | None = None):
    """Load an original ``.pth``, convert, check it fits ``variant`` strictly, and save it HF-style."""
    from .hub import load_hf_weights
    from .modeling import DinatForImageClassification
    from .variants import default_resolution, variant_config

    sd = convert_state_dict(unwrap(torch.load(path, map_location="cpu", weights_only=True)))
    num_labels = sd["classifier.weight"].shape[0] if "classifier.weight" in sd else 0
    layer_scale = next((float(v.flatten()[0]) for k, v in sd.items() if k.endswith("layer_scale_parameters")), 0.0)
    config = variant_config(variant, num_labels=num_labels, use_rpb=True, layer_scale_init_value=layer_scale)
    model = DinatForImageClassification(config)
    load_hf_weights(model, sd, str(path))
    model.save_pretrained(out_dir, image_size=image_size or default_resolution(variant))
    return model


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("out_dir")
    p.add_argument("--variant", required=True)
    p.add_argument("--image-size", type=int, default=None)
    args = p.parse_args(argv)
    convert_checkpoint(args.checkpoint, args.variant, args.out_dir, args.image_size)
    print(f"wrote {args.out_dir}")


if __name__ == "__main__":
    main()
