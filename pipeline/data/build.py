"""From the config to training and evaluation streams (checked before any training starts)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, DataConfig
from ..distributed import DistInfo
from .loader import SampleFormat, ShardStream
from .manifest import MANIFEST_NAME, read_classes
from .plan import Origin, Shard
from .shardset import classes_file, list_shards, missing_shards
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


def make_synthetic_if_requested(data: DataConfig, info: DistInfo) -> None:
    """Rank 0 writes the embedded synthetic dataset into ``data.train`` when asked and missing."""
    if not data.synthetic:
        return
    if info.is_main:
        from .synthetic import make_synthetic

        make_synthetic(data.train)
    info.barrier()


def resolve_dataset(data: DataConfig, info: DistInfo) -> Dataset:
    """Shards and classes, or a ConfigError naming the key (no manifest, no classes.json, missing shards ...).
    Only rank 0 looks for every shard file: at 512 ranks x 5,000 shards the others would add 2.5M stats on the
    shared filesystem; its error ends every rank (pipeline.lifecycle)."""
    try:
        train = list_shards(data.train, data.manifest, split="train")
        val = None
        if data.val is not None:
            same_dir = Path(data.val).is_dir() and (Path(data.val) / MANIFEST_NAME).is_file()
            val = list_shards(data.val, data.manifest if not same_dir else None, split="val")
        classes = read_classes(classes_file(data.train, data.manifest))
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"data: {e}") from None
    if info.is_main:
        missing = missing_shards(train + (val or []))
        if missing:
            more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ConfigError(f"data: not found: {missing[0]}{more}")
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


def _format(data: DataConfig, num_classes: int) -> SampleFormat:
    return SampleFormat(data.image_key, data.label_key, num_classes)


def train_stream(
    data: DataConfig,
    dataset: Dataset,
    info: DistInfo,
    micro_batch: int,
    seed: int,
    state: dict | None = None,
    origin: Origin | None = None,
    generation: int = 0,
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
        origin=origin,
        generation=generation,
        sample_format=_format(data, dataset.num_classes),
        max_skip_fraction=data.max_skip_fraction,
    )


def eval_stream(data: DataConfig, dataset: Dataset, info: DistInfo, batch_size: int) -> ShardStream:
    """The validation split once, in shard order, split over every rank and worker (any number of either,
    however few the shards: ranks share a shard by sample ranges)."""
    try:
        return ShardStream(
            dataset.val,
            mode="epoch",
            batch_size=batch_size,
            transform=eval_transform(data.image_size, crop_pct=data.eval_crop_pct, interpolation=data.interpolation),
            rank=info.rank,
            world_size=info.world_size,
            workers=data.workers,
            shuffle_buffer=0,
            finite=True,
            sample_format=_format(data, dataset.num_classes),
            max_skip_fraction=data.max_skip_fraction,
        )
    except ValueError as e:
        raise ConfigError(f"data.val: {e}") from None
