"""From the config to training and evaluation streams (checked before any training starts)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, DataConfig
from ..distributed import DistInfo
from .loader import ShardStream, list_shards
from .manifest import CLASSES_NAME, MANIFEST_NAME, read_classes
from .plan import Shard
from .transforms import DeviceAugment, eval_transform, train_transform

logger = logging.getLogger(__name__)


@dataclass
class Dataset:
    train: list[Shard]
    val: list[Shard] | None
    classes: list[dict[str, Any]]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def train_samples(self) -> int | None:
        counts = [s.samples for s in self.train]
        return None if None in counts else sum(counts)


def _metadata_dir(data: DataConfig) -> Path | None:
    if Path(data.train).is_dir():
        return Path(data.train)
    return Path(data.manifest).parent if data.manifest else None


def make_synthetic_if_requested(data: DataConfig, info: DistInfo) -> None:
    """Rank 0 writes the embedded synthetic dataset into ``data.train`` when asked and missing."""
    if not data.synthetic:
        return
    if info.is_main:
        from .synthetic import make_synthetic

        make_synthetic(data.train)
    info.barrier()


def resolve_dataset(data: DataConfig) -> Dataset:
    """Shards and classes, or a ConfigError naming the key (missing shards, no classes.json ...)."""
    try:
        train = list_shards(data.train, data.manifest, split="train")
        val = None
        if data.val is not None:
            same_dir = Path(data.val).is_dir() and (Path(data.val) / MANIFEST_NAME).is_file()
            val = list_shards(data.val, data.manifest if not same_dir else None, split="val")
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"data: {e}") from None
    meta = _metadata_dir(data)
    if meta is None or not (meta / CLASSES_NAME).is_file():
        raise ConfigError(f"data.train: no {CLASSES_NAME} beside the shards (give data.manifest for remote shards)")
    try:
        classes = read_classes(meta / CLASSES_NAME)
    except ValueError as e:
        raise ConfigError(f"data: {e}") from None
    return Dataset(train, val, classes)


def train_augment(data: DataConfig, num_classes: int, device: torch.device, dtype: torch.dtype) -> DeviceAugment:
    """The on-device half of the training recipe (normalise, erase, Mixup/CutMix, label smoothing)."""
    return DeviceAugment(
        num_classes,
        device,
        training=True,
        mixup_alpha=data.mixup,
        cutmix_alpha=data.cutmix,
        label_smoothing=data.label_smoothing,
        re_prob=data.re_prob,
        dtype=dtype,
    )


def train_stream(
    data: DataConfig, dataset: Dataset, info: DistInfo, micro_batch: int, seed: int, state: dict | None = None
) -> ShardStream:
    transform = train_transform(
        data.image_size,
        scale=(data.scale_min, 1.0),
        hflip=data.hflip,
        auto_augment=data.auto_augment,
        interpolation=data.interpolation,
        uint8=True,
    )
    return ShardStream(
        dataset.train,
        mode=data.mode,
        batch_size=micro_batch,
        transform=transform,
        rank=info.rank,
        world_size=info.world_size,
        workers=data.workers,
        seed=seed,
        shuffle_buffer=data.shuffle_buffer,
        state=state,
    )


def eval_stream(data: DataConfig, dataset: Dataset, info: DistInfo, batch_size: int) -> ShardStream:
    """Exactly-once evaluation; fewer workers when there are few validation shards."""
    workers = max(0, min(data.workers, len(dataset.val) // info.world_size))
    transform = eval_transform(data.image_size, crop_pct=data.eval_crop_pct, interpolation=data.interpolation)
    return ShardStream(
        dataset.val,
        mode="epoch",
        batch_size=batch_size,
        transform=transform,
        rank=info.rank,
        world_size=info.world_size,
        workers=workers,
        shuffle_buffer=0,
    )
