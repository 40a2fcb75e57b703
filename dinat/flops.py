"""Analytic FLOP count of a DiNAT model (1 multiply-add = 2 FLOPs).

Counted: every matmul and convolution -- stem convs, q/k/v and output projections, attention QK^T and
AV (each query against kernel_size^2 keys), MLP, downsampler convs, classifier. Not counted (a few tenths
of a percent of the total at 224): LayerNorms, GELU, softmax, bias and residual adds, layer scale, the
attention scale, RPB adds, average pooling. This is the convention of ``torch.utils.flop_counter``
(which agrees with this count exactly when attention runs as einsums, ``attention_backend="reference"``).
The published GMACs (fvcore plus NATTEN's handles) also count LayerNorms at 5 FLOPs per element and the
RPB add; that is the 0.1-0.5% by which this count falls short of them.

Padding: when a feature map is smaller than ``kernel_size * dilation`` the layer zero-pads it to that size
before the q/k/v projection and crops after the output projection (``DinatLayer.forward``), so q/k/v,
attention and the output projection are counted at the padded size, the MLP at the true size.
"""

from __future__ import annotations

from .config import DinatConfig

NOT_COUNTED = "LayerNorm, GELU, softmax, bias/residual adds, layer scale, attention scale, RPB add, pooling"


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else size
    if h < 1 or w < 1:
        raise ValueError(f"image_size must be positive, got {size!r}")
    return int(h), int(w)


def _half(n: int) -> int:
    """Output length of a 3x3, stride-2, padding-1 convolution."""
    return (n - 1) // 2 + 1


def conv_flops(c_in: int, c_out: int, kernel: int, out_h: int, out_w: int) -> float:
    """FLOPs of a dense conv producing a (c_out, out_h, out_w) map, bias not counted."""
    return 2.0 * c_in * c_out * kernel * kernel * out_h * out_w


def layer_flops(
    dim: int, mlp_ratio: float, kernel_size: int, dilation: int, height: int, width: int
) -> dict[str, float]:
    """FLOPs of one DinatLayer on a (height, width, dim) map, for one image.

    Keys: ``qkv_proj`` (q, k, v and output linears), ``attn_qk``, ``attn_av``, ``mlp``, ``total``;
    ``padded`` is the (H, W) the attention ran at.
    """
    window = kernel_size * dilation
    hp, wp = max(height, window), max(width, window)
    hidden = int(mlp_ratio * dim)
    n, n_pad = height * width, hp * wp
    out = {
        "qkv_proj": 2.0 * 4 * dim * dim * n_pad,
        "attn_qk": 2.0 * kernel_size**2 * dim * n_pad,  # summed over heads: heads * head_dim = dim
        "attn_av": 2.0 * kernel_size**2 * dim * n_pad,
        "mlp": 2.0 * 2 * dim * hidden * n,
    }
    out["total"] = sum(out.values())
    out["padded"] = (hp, wp)
    return out


def forward_flops(config: DinatConfig, image_size: int | tuple[int, int], batch_size: int = 1) -> dict:
    """Forward FLOPs of ``DinatForImageClassification(config)`` on (batch_size, 3, H, W) images.

    Returns ``{"total", "stem", "levels", "head", "attention", "image_size", "batch_size", "not_counted"}``;
    ``levels[i]`` holds ``map`` (H, W), ``padded`` (per layer), ``qkv_proj``, ``attn_qk``, ``attn_av``, ``mlp``,
    ``downsample``, ``total`` and ``layers`` (one dict of :func:`layer_flops` per layer, scaled by the batch).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    h, w = _pair(image_size)
    c = config.embed_dim
    h2, w2 = _half(h), _half(w)
    h, w = _half(h2), _half(w2)  # (H/4, W/4) after the stem
    stem = conv_flops(config.num_channels, c // 2, 3, h2, w2) + conv_flops(c // 2, c, 3, h, w)
    levels = []
    for i, dilations in enumerate(config.dilations):
        dim = config.embed_dim * 2**i
        layers = [layer_flops(dim, config.mlp_ratio, config.kernel_size, d, h, w) for d in dilations]
        layers = [{k: (v * batch_size if k != "padded" else v) for k, v in lf.items()} for lf in layers]
        level = {"map": (h, w), "padded": [lf["padded"] for lf in layers], "layers": layers}
        for key in ("qkv_proj", "attn_qk", "attn_av", "mlp"):
            level[key] = sum(lf[key] for lf in layers)
        level["downsample"] = 0.0
        if i < len(config.depths) - 1:
            h, w = _half(h), _half(w)
            level["downsample"] = conv_flops(dim, 2 * dim, 3, h, w) * batch_size
        level["total"] = sum(lf["total"] for lf in layers) + level["downsample"]
        levels.append(level)
    head = 2.0 * config.num_features * config.n_labels * batch_size
    stem *= batch_size
    total = stem + sum(lv["total"] for lv in levels) + head
    return {
        "total": total,
        "stem": stem,
        "levels": levels,
        "head": head,
        "attention": sum(lv["attn_qk"] + lv["attn_av"] for lv in levels),
        "image_size": _pair(image_size),
        "batch_size": batch_size,
        "not_counted": NOT_COUNTED,
    }


def checkpoint_recompute_fraction(config: DinatConfig, image_size: int | tuple[int, int]) -> float:
    """Share of forward FLOPs recomputed in backward under ``config.activation_checkpointing``.

    Mirrors ``DinatStage``: with ``checkpoint_every = k`` the layers whose global index is a multiple of k
    are checkpointed (k = 1: all layers; 0: none). Stem, downsamplers and head are never recomputed.
    """
    every = config.checkpoint_every
    if every == 0:
        return 0.0
    fwd = forward_flops(config, image_size)
    layers = [lf["total"] for lv in fwd["levels"] for lf in lv["layers"]]
    return sum(f for j, f in enumerate(layers) if j % every == 0) / fwd["total"]


def train_step_flops(
    config: DinatConfig, image_size: int | tuple[int, int], batch_size: int, recompute_fraction: float = 0.0
) -> dict[str, float]:
    """FLOPs of one training step: forward + backward (2 x forward) + recomputed forward.

    ``useful`` (forward + backward) is what MFU counts; ``hardware`` adds the recomputation of
    activation-checkpointed layers (``recompute_fraction`` of the forward, see :func:`checkpoint_recompute_fraction`).
    The 2 x rule slightly overstates backward: the first stem conv needs no input gradient.
    """
    if not 0.0 <= recompute_fraction <= 1.0:
        raise ValueError(f"recompute_fraction must be in [0, 1], got {recompute_fraction}")
    fwd = forward_flops(config, image_size, batch_size)["total"]
    out = {"forward": fwd, "backward": 2.0 * fwd, "recompute": recompute_fraction * fwd}
    out["useful"] = out["forward"] + out["backward"]
    out["hardware"] = out["useful"] + out["recompute"]
    return out
