"""Dilated Neighborhood Attention Transformer (DiNAT).

Paper: Hassani & Shi, "Dilated Neighborhood Attention Transformer", arXiv 2209.15001.
Architecture of SHI-Labs/Neighborhood-Attention-Transformer (classification/nat.py, dinat.py).
Module tree and parameter names of transformers' DinatForImageClassification, so ``state_dict()``
keys are HF's; feature maps are channels-last (B, H, W, C) inside the encoder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath
from torch.utils.checkpoint import checkpoint

from .attention import get_attention_fn, resolve_backend
from .config import DinatConfig

logger = logging.getLogger(__name__)

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "swish": nn.SiLU, "gelu_new": nn.GELU}


@dataclass
class DinatOutput:
    """Outputs of DinatModel / DinatForImageClassification (attribute names as in transformers)."""

    last_hidden_state: torch.Tensor | None = None  # (B, H, W, C) after the final LayerNorm
    pooler_output: torch.Tensor | None = None  # (B, C)
    logits: torch.Tensor | None = None  # (B, num_labels)
    loss: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None  # each (B, H, W, C): stem + every level
    reshaped_hidden_states: tuple[torch.Tensor, ...] | None = None  # each (B, C, H, W)
    feature_maps: tuple[torch.Tensor, ...] | None = None  # DinatBackbone: (B, C, H, W) per out_feature


# ---------------------------------------------------------------------------- blocks


class DinatPatchEmbeddings(nn.Module):
    """Two 3x3 stride-2 convolutions: (B, C_in, H, W) -> (B, H/4, W/4, embed_dim)."""

    def __init__(self, config: DinatConfig):
        super().__init__()
        self.num_channels = config.num_channels
        dim = config.embed_dim
        self.projection = nn.Sequential(
            nn.Conv2d(config.num_channels, dim // 2, kernel_size=3, stride=2, padding=1),
            nn.Conv2d(dim // 2, dim, kernel_size=3, stride=2, padding=1),
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.num_channels:
            raise ValueError(
                f"pixel_values must be (batch, {self.num_channels}, height, width); got {tuple(pixel_values.shape)}"
            )
        return self.projection(pixel_values).permute(0, 2, 3, 1)


class DinatEmbeddings(nn.Module):
    def __init__(self, config: DinatConfig):
        super().__init__()
        self.patch_embeddings = DinatPatchEmbeddings(config)
        self.norm = nn.LayerNorm(config.embed_dim)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.norm(self.patch_embeddings(pixel_values)))  # (B, H, W, C)


class NeighborhoodAttention(nn.Module):
    """q/k/v projections + dilated neighborhood attention (+ RPB when ``use_rpb``)."""

    def __init__(self, config: DinatConfig, dim: int, num_heads: int, dilation: int, backend: str):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.kernel_size = config.kernel_size
        self.dilation = dilation
        self.attn_drop = config.attention_probs_dropout_prob
        self.query = nn.Linear(dim, dim, bias=config.qkv_bias)
        self.key = nn.Linear(dim, dim, bias=config.qkv_bias)
        self.value = nn.Linear(dim, dim, bias=config.qkv_bias)
        k = config.kernel_size
        self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * k - 1, 2 * k - 1)) if config.use_rpb else None
        self.backend = backend
        self._attend = get_attention_fn(backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        q, k, v = (proj(x).view(B, H, W, self.num_heads, self.head_dim) for proj in (self.query, self.key, self.value))
        out = self._attend(
            q, k, v, self.kernel_size, self.dilation, rpb=self.rpb, attn_drop=self.attn_drop, training=self.training
        )  # (B, H, W, heads, head_dim)
        return out.reshape(B, H, W, C)


class NeighborhoodAttentionOutput(nn.Module):
    def __init__(self, config: DinatConfig, dim: int):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.dense(x))


class NeighborhoodAttentionModule(nn.Module):
    def __init__(self, config: DinatConfig, dim: int, num_heads: int, dilation: int, backend: str):
        super().__init__()
        self.self = NeighborhoodAttention(config, dim, num_heads, dilation, backend)
        self.output = NeighborhoodAttentionOutput(config, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x))


class DinatIntermediate(nn.Module):
    def __init__(self, config: DinatConfig, dim: int):
        super().__init__()
        if config.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {config.hidden_act!r} not supported; choose from {sorted(_ACTIVATIONS)}")
        self.dense = nn.Linear(dim, int(config.mlp_ratio * dim))
        self.intermediate_act_fn = _ACTIVATIONS[config.hidden_act]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(x))


class DinatMlpOutput(nn.Module):
    def __init__(self, config: DinatConfig, dim: int):
        super().__init__()
        self.dense = nn.Linear(int(config.mlp_ratio * dim), dim)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.dense(x))


class DinatLayer(nn.Module):
    """Pre-norm block: x + DropPath(NA(LN(x))), then x + DropPath(MLP(LN(x))); optional layer scale."""

    def __init__(self, config: DinatConfig, dim: int, num_heads: int, dilation: int, drop_path: float, backend: str):
        super().__init__()
        self.window_size = config.kernel_size * dilation
        self.layernorm_before = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attention = NeighborhoodAttentionModule(config, dim, num_heads, dilation, backend)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.layernorm_after = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.intermediate = DinatIntermediate(config, dim)
        self.output = DinatMlpOutput(config, dim)
        ls = config.layer_scale_init_value
        self.layer_scale_parameters = nn.Parameter(ls * torch.ones(2, dim)) if ls > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        h = self.layernorm_before(x)
        # transformers' rule: zero-pad right/bottom (after the norm) to kernel_size * dilation, crop after.
        pad_h, pad_w = max(0, self.window_size - H), max(0, self.window_size - W)
        if pad_h or pad_w:
            h = F.pad(h, (0, 0, 0, pad_w, 0, pad_h))
        h = self.attention(h)
        if pad_h or pad_w:
            h = h[:, :H, :W].contiguous()
        if self.layer_scale_parameters is not None:
            h = self.layer_scale_parameters[0] * h
        x = x + self.drop_path(h)
        h = self.output(self.intermediate(self.layernorm_after(x)))
        if self.layer_scale_parameters is not None:
            h = self.layer_scale_parameters[1] * h
        return x + self.drop_path(h)


class DinatDownsampler(nn.Module):
    """3x3 stride-2 conv (no bias) + LayerNorm: (B, H, W, C) -> (B, H/2, W/2, 2C)."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Conv2d(dim, 2 * dim, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class DinatStage(nn.Module):
    def __init__(self, config: DinatConfig, level: int, drop_paths: list[float], backend: str, first_layer: int):
        super().__init__()
        dim = config.embed_dim * 2**level
        self.layers = nn.ModuleList(
            DinatLayer(config, dim, config.num_heads[level], d, dp, backend)
            for d, dp in zip(config.dilations[level], drop_paths)
        )
        self.downsample = DinatDownsampler(dim) if level < len(config.depths) - 1 else None
        every = config.checkpoint_every
        self.checkpointed = [every > 0 and (first_layer + j) % every == 0 for j in range(len(self.layers))]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (output after downsampling, output before downsampling)."""
        for layer, ckpt in zip(self.layers, self.checkpointed):
            if ckpt and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return (self.downsample(x) if self.downsample is not None else x), x


class DinatEncoder(nn.Module):
    def __init__(self, config: DinatConfig, backend: str):
        super().__init__()
        dpr = torch.linspace(0, config.drop_path_rate, sum(config.depths)).tolist()
        starts = [sum(config.depths[:i]) for i in range(len(config.depths))]
        self.levels = nn.ModuleList(
            DinatStage(config, i, dpr[s : s + n], backend, s) for i, (s, n) in enumerate(zip(starts, config.depths))
        )

    def forward(
        self, x: torch.Tensor, output_hidden_states: bool = False, before_downsampling: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        hidden = [x] if output_hidden_states else None
        for level in self.levels:
            x, pre = level(x)
            if hidden is not None:
                hidden.append(pre if before_downsampling else x)
        return x, (tuple(hidden) if hidden is not None else None)


# ---------------------------------------------------------------------------- models


class DinatPreTrainedModel(nn.Module):
    """Shared init (as the original repository), config handling and save/load."""

    base_model_prefix = "dinat"

    def __init__(self, config: DinatConfig, device: torch.device | str | None = None, backend: str | None = None):
        super().__init__()
        self.config = config
        # ``backend``: already resolved by an enclosing model (resolve and log once per model).
        self.attention_backend = backend or resolve_backend(
            config.attention_backend, config.use_rpb, config.attention_probs_dropout_prob, device or "cpu"
        )

    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=self.config.initializer_range)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, NeighborhoodAttention) and m.rpb is not None:
                nn.init.trunc_normal_(m.rpb, std=0.02, a=-2.0, b=2.0)

    def no_weight_decay_keywords(self) -> set[str]:
        """Parameter-name fragments to exclude from weight decay (besides biases and norms)."""
        return {"rpb", "layer_scale_parameters"}

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, save_directory, **kwargs) -> None:
        from .hub import save_pretrained

        save_pretrained(self, save_directory, **kwargs)

    @classmethod
    def from_pretrained(cls, directory, **overrides):
        from .hub import from_pretrained

        return from_pretrained(directory, cls=cls, **overrides)


class DinatModel(DinatPreTrainedModel):
    """Backbone + final LayerNorm + average pool. forward(pixel_values (B, C, H, W)) -> DinatOutput."""

    def __init__(self, config: DinatConfig, device=None, backend: str | None = None, _init: bool = True):
        super().__init__(config, device, backend)
        self.num_features = config.num_features
        self.embeddings = DinatEmbeddings(config)
        self.encoder = DinatEncoder(config, self.attention_backend)
        self.layernorm = nn.LayerNorm(self.num_features, eps=config.layer_norm_eps)
        if _init:
            self.init_weights()

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> DinatOutput:
        x, hidden = self.encoder(self.embeddings(pixel_values), output_hidden_states)
        x = self.layernorm(x)  # (B, H, W, C)
        pooled = x.flatten(1, 2).mean(dim=1)  # (B, C)
        return DinatOutput(
            last_hidden_state=x,
            pooler_output=pooled,
            hidden_states=hidden,
            reshaped_hidden_states=tuple(h.permute(0, 3, 1, 2) for h in hidden) if hidden else None,
        )


class DinatForImageClassification(DinatPreTrainedModel):
    """DinatModel + linear classifier. ``labels``: class indices (B,) -> cross-entropy; soft targets
    (B, num_labels) float (Mixup/CutMix) -> soft-target cross-entropy."""

    def __init__(self, config: DinatConfig, device=None):
        super().__init__(config, device)
        self.dinat = DinatModel(config, backend=self.attention_backend, _init=False)
        n = config.n_labels
        self.classifier = nn.Linear(config.num_features, n) if n > 0 else nn.Identity()
        self.init_weights()

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, output_hidden_states: bool = False
    ) -> DinatOutput:
        out = self.dinat(pixel_values, output_hidden_states)
        out.logits = self.classifier(out.pooler_output)
        if labels is not None:
            out.loss = classification_loss(out.logits, labels)
        return out


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if labels.dtype in (torch.long, torch.int):
        return F.cross_entropy(logits.float(), labels)
    if labels.shape != logits.shape:
        raise ValueError(f"soft labels must have the logits' shape {tuple(logits.shape)}, got {tuple(labels.shape)}")
    return torch.sum(-labels * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


class DinatBackbone(DinatPreTrainedModel):
    """Multi-scale features for dense tasks: per ``config.out_features``, a LayerNorm'd (B, C, H, W) map
    taken before downsampling (transformers' DinatBackbone)."""

    def __init__(self, config: DinatConfig, device=None):
        super().__init__(config, device)
        self.embeddings = DinatEmbeddings(config)
        self.encoder = DinatEncoder(config, self.attention_backend)
        channels = [config.embed_dim] + [config.embed_dim * 2**i for i in range(len(config.depths))]
        self.channels = [channels[i] for i in config.out_indices]
        self.hidden_states_norms = nn.ModuleDict(
            {name: nn.LayerNorm(c) for name, c in zip(config.out_features, self.channels)}
        )
        self.init_weights()

    def forward(self, pixel_values: torch.Tensor) -> DinatOutput:
        _, hidden = self.encoder(self.embeddings(pixel_values), output_hidden_states=True, before_downsampling=True)
        maps = tuple(
            self.hidden_states_norms[name](hidden[i]).permute(0, 3, 1, 2)
            for name, i in zip(self.config.out_features, self.config.out_indices)
        )
        return DinatOutput(feature_maps=maps, hidden_states=hidden)
