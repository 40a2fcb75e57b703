"""Augmentation, all from timm: the ImageNet-22k recipe (RandomResizedCrop, flip, RandAugment) on the CPU
workers, producing uint8 (3, H, W) arrays; normalisation, random erasing and Mixup/CutMix with label
smoothing on the device, where they are cheaper (see ``python -m pipeline.data.benchmark``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from PIL import Image, ImageOps
from timm.data import Mixup, create_transform
from timm.data import auto_augment as _timm_aa
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.random_erasing import RandomErasing

logger = logging.getLogger(__name__)


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize op, with bits 0 meaning "keep no bits" (a black image), as Pillow <= 12 did.

    timm's 'inc1' RandAugment asks for 0 bits at magnitude 10 (reached by m9 + mstd0.5); Pillow 13
    raises ValueError there, which kills DataLoader workers. This keeps the published recipe's behaviour.
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


for _name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
    _timm_aa.NAME_TO_OP[_name] = _posterize


def train_transform(
    image_size: int = 224,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    auto_augment: str | None = "rand-m9-mstd0.5-inc1",
    interpolation: str = "bicubic",
    color_jitter: float = 0.4,
    uint8: bool = True,
    re_prob: float = 0.25,
) -> Callable[[Image.Image], object]:
    """PIL image -> uint8 array (3, H, W) (``uint8=True``: normalise and erase on the device with
    :class:`DeviceAugment`), or a normalised, erased float tensor (``uint8=False``)."""
    return create_transform(
        input_size=image_size,
        is_training=True,
        scale=scale,
        ratio=ratio,
        hflip=hflip,
        auto_augment=auto_augment,
        interpolation=interpolation,
        color_jitter=color_jitter,
        re_prob=0.0 if uint8 else re_prob,
        re_mode="pixel",
        use_prefetcher=uint8,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
    )


def eval_transform(
    image_size: int = 224, crop_pct: float = 0.875, interpolation: str = "bicubic", uint8: bool = True
) -> Callable[[Image.Image], object]:
    """Resize (shorter side image_size / crop_pct) + center crop."""
    return create_transform(
        input_size=image_size,
        is_training=False,
        crop_pct=crop_pct,
        interpolation=interpolation,
        use_prefetcher=uint8,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
    )


class DeviceAugment:
    """On the training device: uint8 (B, 3, H, W) -> normalised float, random erasing, Mixup/CutMix.

    Returns (images, targets): soft targets (B, num_classes) when training with Mixup/CutMix or label
    smoothing, class indices otherwise. Mixup needs an even batch; an odd one (possible only at the end
    of an epoch-mode pass) gets label smoothing alone.
    """

    def __init__(
        self,
        num_classes: int,
        device: torch.device | str,
        training: bool = True,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        label_smoothing: float = 0.1,
        re_prob: float = 0.25,
        dtype: torch.dtype = torch.float32,
    ):
        self.device, self.dtype, self.training, self.num_classes = torch.device(device), dtype, training, num_classes
        self.mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_DEFAULT_STD, device=self.device).view(1, 3, 1, 1) * 255
        self.label_smoothing = label_smoothing
        self.erase = RandomErasing(re_prob, mode="pixel", device=self.device) if training and re_prob > 0 else None
        self.mixup = None
        if training and (mixup_alpha > 0 or cutmix_alpha > 0):
            self.mixup = Mixup(
                mixup_alpha=mixup_alpha,
                cutmix_alpha=cutmix_alpha,
                label_smoothing=label_smoothing,
                num_classes=num_classes,
            )

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.to(self.device, non_blocking=True).float().sub_(self.mean).div_(self.std)  # (B, 3, H, W)
        y = labels.to(self.device, non_blocking=True)
        if not self.training:
            return x.to(self.dtype), y
        if self.erase is not None:
            x = self.erase(x)
        if self.mixup is not None and len(x) % 2 == 0:
            x, y = self.mixup(x, y)
        elif self.label_smoothing > 0:
            off = self.label_smoothing / self.num_classes
            y = torch.full((len(y), self.num_classes), off, device=self.device).scatter_(
                1, y[:, None], 1.0 - self.label_smoothing + off
            )
        return x.to(self.dtype), y
