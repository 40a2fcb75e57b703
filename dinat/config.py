"""DinatConfig: transformers' DinatConfig fields (same names, same defaults) plus three project fields.

The project fields (``attention_backend``, ``activation_checkpointing``, ``use_rpb``) are written into
``config.json`` too; transformers keeps unknown keys as plain attributes, so HF loading is unaffected.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .attention import BACKENDS

# Fields that fix the parameter shapes: a config.json without them cannot describe a checkpoint.
ARCH_FIELDS = ("embed_dim", "depths", "num_heads", "kernel_size", "dilations", "mlp_ratio")


@dataclass
class DinatConfig:
    # -- transformers.DinatConfig (4.46.3) fields and defaults --
    patch_size: int = 4
    num_channels: int = 3
    embed_dim: int = 64
    depths: list[int] = field(default_factory=lambda: [3, 4, 6, 5])
    num_heads: list[int] = field(default_factory=lambda: [2, 4, 8, 16])
    kernel_size: int = 7
    dilations: list[list[int]] = field(default_factory=lambda: [[1, 8, 1], [1, 4, 1, 4], [1, 2, 1, 2, 1, 2], [1] * 5])
    mlp_ratio: float = 3.0
    qkv_bias: bool = True
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    drop_path_rate: float = 0.1
    hidden_act: str = "gelu"
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    layer_scale_init_value: float = 0.0
    out_features: list[str] | None = None
    out_indices: list[int] | None = None
    id2label: dict[int, str] | None = None  # None -> HF's default of two labels
    # -- project fields --
    num_labels: int | None = None  # set instead of id2label when labels have no names
    attention_backend: str = "auto"  # auto | natten | reference
    activation_checkpointing: str | int = "none"  # none | all | k (every k-th layer)
    use_rpb: bool = False  # relative positional bias; the published checkpoints have it, NATTEN >= 0.20 does not

    def __post_init__(self) -> None:
        if self.patch_size != 4:
            raise ValueError(f"patch_size must be 4 (DiNAT's two stride-2 convolutions), got {self.patch_size}")
        levels = len(self.depths)
        for name in ("num_heads", "dilations"):
            if len(getattr(self, name)) != levels:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries, depths has {levels}")
        for i, (depth, dil) in enumerate(zip(self.depths, self.dilations)):
            if len(dil) != depth:
                raise ValueError(f"dilations[{i}] has {len(dil)} entries, depths[{i}] is {depth}")
        for i, heads in enumerate(self.num_heads):
            if (self.embed_dim * 2**i) % heads:
                raise ValueError(f"level {i}: dim {self.embed_dim * 2**i} is not divisible by num_heads {heads}")
        if self.kernel_size < 3 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd number >= 3, got {self.kernel_size}")
        if self.attention_backend not in BACKENDS:
            raise ValueError(f"attention_backend must be one of {BACKENDS}, got {self.attention_backend!r}")
        _ = self.checkpoint_every  # validates activation_checkpointing
        if self.id2label is not None:
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
            if self.num_labels is not None and self.num_labels != len(self.id2label):
                raise ValueError(f"num_labels={self.num_labels} but id2label has {len(self.id2label)} entries")
            self.num_labels = None
        elif self.num_labels is None:
            self.num_labels = 2  # HF's PretrainedConfig default
        self.out_features, self.out_indices = self._aligned_outputs()

    # -- derived --
    @property
    def n_labels(self) -> int:
        return len(self.id2label) if self.id2label is not None else self.num_labels

    @property
    def labels(self) -> dict[int, str]:
        return self.id2label if self.id2label is not None else {i: f"LABEL_{i}" for i in range(self.num_labels)}

    @property
    def stage_names(self) -> list[str]:
        return ["stem"] + [f"stage{i}" for i in range(1, len(self.depths) + 1)]

    @property
    def num_features(self) -> int:
        return int(self.embed_dim * 2 ** (len(self.depths) - 1))

    @property
    def checkpoint_every(self) -> int:
        """0: no activation checkpointing; k: every k-th layer (1 = all)."""
        ac = self.activation_checkpointing
        if ac in ("none", False, 0):
            return 0
        if ac in ("all", True):
            return 1
        if isinstance(ac, int) and ac > 0:
            return ac
        raise ValueError(f"activation_checkpointing must be 'none', 'all' or a positive int, got {ac!r}")

    def _aligned_outputs(self) -> tuple[list[str], list[int]]:
        names = self.stage_names
        feats, idx = self.out_features, self.out_indices
        if feats is None and idx is None:
            return [names[-1]], [len(names) - 1]
        if feats is None:
            bad = [i for i in idx if not -len(names) <= i < len(names)]
            if bad:
                raise ValueError(f"out_indices {bad} out of range for stages {names}")
            return [names[i] for i in idx], list(idx)
        bad = [f for f in feats if f not in names]
        if bad:
            raise ValueError(f"out_features {bad} not among stages {names}")
        if idx is not None and [names[i] for i in idx] != list(feats):
            raise ValueError(f"out_features {feats} and out_indices {idx} disagree")
        return list(feats), [names.index(f) for f in feats]

    # -- HF config.json --
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("num_labels")
        labels = self.labels
        d["id2label"] = {str(k): v for k, v in labels.items()}
        d["label2id"] = {v: k for k, v in labels.items()}
        d["model_type"] = "dinat"
        d["architectures"] = ["DinatForImageClassification"]
        d["hidden_size"] = self.num_features
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> DinatConfig:
        if d.get("model_type", "dinat") != "dinat":
            raise ValueError(f"{source}: model_type is {d.get('model_type')!r}, expected 'dinat'")
        missing = [k for k in ARCH_FIELDS if k not in d]
        if missing:
            raise ValueError(f"{source}: missing fields {', '.join(missing)}")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}  # HF's generic keys (torch_dtype, ...) are dropped
        if "id2label" not in d and "num_labels" in d:
            kwargs["num_labels"] = d["num_labels"]
        if "use_rpb" not in d:
            kwargs["use_rpb"] = True  # written by transformers: its layers always carry RPB
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @staticmethod
    def read_json(path: str | Path) -> dict[str, Any]:
        """The raw object of a config.json (checked to be one)."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object")
        return d

    @classmethod
    def load(cls, path: str | Path) -> DinatConfig:
        return cls.from_dict(cls.read_json(path), source=str(path))

    def replace(self, **overrides: Any) -> DinatConfig:
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown DinatConfig field(s): {', '.join(unknown)}")
        d = dataclasses.asdict(self)
        if "num_labels" in overrides:
            d["id2label"] = None
        if "id2label" in overrides:
            d["num_labels"] = None
        for a, b in (("out_features", "out_indices"), ("out_indices", "out_features")):
            if a in overrides and b not in overrides:
                d[b] = None  # re-derived from the new one
        d.update(overrides)
        return DinatConfig(**d)
