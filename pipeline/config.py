"""The run configuration: one typed tree, loaded from YAML and overridden by dotted keys.

    cfg = load_config("configs/dinat_large_in22k_224.yaml", ["optim.base_lr=5e-4", "train.steps=100"])

Unknown keys and bad values raise :class:`ConfigError` naming the dotted key, before any work starts.
The ``deepspeed:`` section is passed to DeepSpeed as is, except for what the pipeline derives (batch
sizes, precision, gradient clipping), which it fills and which must not contradict the tree.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user mistake in the configuration; the message names the key."""


@dataclass
class ModelConfig:
    name: str = "dinat_large"  # a dinat variant
    attention_backend: str = "auto"
    activation_checkpointing: str | int = "none"  # none | all | k (every k-th layer)
    drop_path_rate: float | None = None  # None: the variant's
    use_rpb: bool = False
    compile: bool = False  # torch.compile the model
    init_from: str | None = None  # an HF checkpoint directory to start from
    overrides: dict[str, Any] = field(default_factory=dict)  # any DinatConfig field, e.g. {embed_dim: 32}

    def __post_init__(self):
        import dinat

        if self.name not in dinat.list_models():
            raise ConfigError(
                f"model.name: unknown variant {self.name!r}; choose from {', '.join(dinat.list_models())}"
            )
        if self.attention_backend not in dinat.BACKENDS:
            raise ConfigError(f"model.attention_backend: must be one of {dinat.BACKENDS}")
        ac = self.activation_checkpointing
        if not (ac in ("none", "all") or (isinstance(ac, int) and not isinstance(ac, bool) and ac > 0)):
            raise ConfigError(f"model.activation_checkpointing: 'none', 'all' or a positive int, got {ac!r}")
        _check_range("model.drop_path_rate", self.drop_path_rate, 0.0, 1.0)
        try:
            dinat.variant_config(self.name, **self.overrides)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model.overrides: {e}") from None

    def dinat_fields(self) -> dict[str, Any]:
        """The DinatConfig fields this section sets: ``overrides`` plus the named keys."""
        fields = dict(
            self.overrides,
            attention_backend=self.attention_backend,
            activation_checkpointing=self.activation_checkpointing,
            use_rpb=self.use_rpb,
        )
        if self.drop_path_rate is not None:
            fields["drop_path_rate"] = self.drop_path_rate
        return fields


@dataclass
class DataConfig:
    train: str = ""  # shard directory, brace pattern, '::'-joined list or pipe: URLs
    val: str | None = None  # same forms; None: no evaluation
    manifest: str | None = None  # manifest.json for URLs that are not a local shard directory
    synthetic: bool = False  # write the embedded synthetic dataset into `train` if it is missing
    mode: str = "resampled"  # resampled | epoch (training); evaluation always reads exactly once
    workers: int = 8  # DataLoader workers per rank
    shuffle_buffer: int = 1000  # samples read as one window and shuffled together (0: shard order)
    image_key: str = "auto"  # the sample's image: jpg | jpeg | png | webp | ..., auto: the first of those present
    label_key: str = "cls"  # the class index: a key (cls), or json:FIELD for a field of the sample's JSON
    max_skip_fraction: float = 0.05  # more skipped (undecodable, mislabelled) samples than this stops the run
    image_size: int = 224
    eval_crop_pct: float = 0.875
    interpolation: str = "bicubic"
    scale_min: float = 0.08
    hflip: float = 0.5
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    re_prob: float = 0.25
    mixup: float = 0.8
    cutmix: float = 1.0
    label_smoothing: float = 0.1

    def __post_init__(self):
        if not self.train:
            raise ConfigError("data.train: required (a shard directory, brace pattern or URL list)")
        if self.mode not in ("resampled", "epoch"):
            raise ConfigError(f"data.mode: 'resampled' or 'epoch', got {self.mode!r}")
        if self.workers < 0:
            raise ConfigError(f"data.workers: must be >= 0, got {self.workers}")
        if self.shuffle_buffer < 0:
            raise ConfigError(f"data.shuffle_buffer: must be >= 0, got {self.shuffle_buffer}")
        if not self.image_key or not self.label_key or self.label_key.endswith(":"):
            raise ConfigError("data.image_key / data.label_key: a key (e.g. jpg, cls) or json:FIELD for the label")
        _check_range("data.max_skip_fraction", self.max_skip_fraction, 0.0, 1.0)
        if self.image_size < 32 or self.image_size % 32:
            raise ConfigError(f"data.image_size: a multiple of 32 (the network's stride), got {self.image_size}")
        for key in ("hflip", "re_prob", "label_smoothing", "scale_min"):
            _check_range(f"data.{key}", getattr(self, key), 0.0, 1.0)
        _check_range("data.eval_crop_pct", self.eval_crop_pct, 0.1, 1.0)
        for key in ("mixup", "cutmix"):
            _check_range(f"data.{key}", getattr(self, key), 0.0, 100.0)


@dataclass
class OptimConfig:
    lr: float | None = None  # absolute peak lr; None: base_lr * global_batch_size / base_batch_size
    base_lr: float = 1e-3
    base_batch_size: int = 4096
    min_lr: float = 1e-5
    warmup_epochs: float = 5.0
    warmup_steps: int | None = None  # overrides warmup_epochs
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 5.0  # max global grad norm; 0 disables

    def __post_init__(self):
        for key in ("lr", "base_lr", "min_lr", "weight_decay", "eps", "grad_clip"):
            _check_range(f"optim.{key}", getattr(self, key), 0.0, None)
        if self.base_batch_size < 1:
            raise ConfigError("optim.base_batch_size: must be >= 1")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas: each in [0, 1), got {self.betas}")


@dataclass
class TrainConfig:
    global_batch_size: int = 4096
    micro_batch_size: int | None = None  # per GPU; None: global / (world x grad_accum)
    grad_accum: int | None = None  # None: derived
    steps: int | None = None  # optimizer steps; None: from epochs and the training set size
    epochs: float | None = 90.0
    seed: int = 0
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    log_every: int = 50
    eval_every: int = 1000
    eval_batches: int | None = None  # None: the whole validation split
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    max_nonfinite: int = 10  # consecutive non-finite losses before the run aborts

    def __post_init__(self):
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ConfigError(f"train.precision: auto | bf16 | fp16 | fp32, got {self.precision!r}")
        for key in (
            "global_batch_size",
            "log_every",
            "eval_every",
            "checkpoint_every",
            "keep_checkpoints",
            "max_nonfinite",
        ):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("micro_batch_size", "grad_accum", "steps", "eval_batches"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"train.{key}: must be >= 1, got {getattr(self, key)}")
        if self.steps is None and (self.epochs is None or self.epochs <= 0):
            raise ConfigError("train.steps or train.epochs: one must be set (> 0)")


@dataclass
class RunConfig:
    output_dir: str = "runs/dinat"
    resume: str = "auto"  # auto (latest complete checkpoint, if any) | none | a checkpoint directory
    export: bool = True  # HF export at the end
    push_to: str | None = None  # also push the export to this Hub repo (token: HF_TOKEN)
    tensorboard: bool = True
    image_grid: bool = True  # a grid of augmented training images in TensorBoard at the start

    def __post_init__(self):
        if not self.output_dir:
            raise ConfigError("run.output_dir: required")
        if self.push_to is not None and not self.export:
            raise ConfigError("run.push_to: needs run.export=true")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(train="data/shards"))
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    deepspeed: dict[str, Any] = field(default_factory=lambda: {"zero_optimization": {"stage": 2}})

    def __post_init__(self):
        zero = self.deepspeed.get("zero_optimization", {})
        if not isinstance(zero, dict) or zero.get("stage", 0) not in (0, 1, 2, 3):
            raise ConfigError("deepspeed.zero_optimization.stage: must be 0, 1, 2 or 3")
        for key, ours in (
            ("train_batch_size", "train.global_batch_size"),
            ("train_micro_batch_size_per_gpu", "train.micro_batch_size"),
            ("gradient_accumulation_steps", "train.grad_accum"),
            ("gradient_clipping", "optim.grad_clip"),
        ):
            if key in self.deepspeed:
                raise ConfigError(f"deepspeed.{key}: derived by the pipeline; set {ours} instead")
        for key in ("bf16", "fp16", "optimizer", "scheduler"):
            if key in self.deepspeed:
                raise ConfigError(f"deepspeed.{key}: set by the pipeline (train.precision, optim.*); remove it")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- loading


def _check_range(key: str, value, lo: float | None, hi: float | None) -> None:
    if value is None:
        return
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ConfigError(f"{key}: {value} is outside [{lo}, {'inf' if hi is None else hi}]")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` (from YAML or the command line) as type ``tp``; ConfigError naming ``key`` otherwise."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in options:
                return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} is not {' or '.join(_type_name(o) for o in options)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, args)))
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    raise AssertionError(f"unhandled config type {tp} for {key}")


def _type_name(tp) -> str:
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _build(cls, raw: dict[str, Any], prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in raw.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{prefix.rstrip('.')}: {e}") from None


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for i, k in enumerate(keys[:-1]):
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(keys[: i + 1])}: not a section, cannot set {dotted}")
    node[keys[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """YAML file (optional) + ``key.sub=value`` overrides -> a validated :class:`Config`."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. optim.base_lr=5e-4)")
        key, value = item.split("=", 1)
        if not key.startswith("deepspeed.") and key.split(".")[0] not in {f.name for f in dataclasses.fields(Config)}:
            raise ConfigError(f"{key}: unknown key")
        _set_dotted(raw, key, yaml.safe_load(value) if value else value)
    return _build(Config, raw, "")


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(_plain(cfg.to_dict()), sort_keys=False))


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def resolve_batch(train: TrainConfig, world_size: int) -> tuple[int, int, int]:
    """(micro batch per GPU, gradient accumulation, global batch) for ``world_size`` ranks, consistent."""
    g, m, a = train.global_batch_size, train.micro_batch_size, train.grad_accum
    if m is not None and a is not None:
        if m * a * world_size != g:
            raise ConfigError(
                f"train.global_batch_size: {g} != micro_batch_size {m} x grad_accum {a} x "
                f"world size {world_size} = {m * a * world_size}"
            )
    elif m is not None:
        if g % (m * world_size):
            raise ConfigError(
                f"train.global_batch_size: {g} is not divisible by micro_batch_size {m} x world size {world_size}"
            )
        a = g // (m * world_size)
    else:
        a = a or 1
        if g % (a * world_size):
            raise ConfigError(
                f"train.global_batch_size: {g} is not divisible by grad_accum {a} x world size {world_size}"
            )
        m = g // (a * world_size)
    return m, a, g
