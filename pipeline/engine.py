"""The DeepSpeed engine around DiNAT: parameter groups, AdamW, warmup + cosine, the DeepSpeed config the
pipeline derives, and the one call to ``deepspeed.initialize``."""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from .config import Config, ConfigError
from .distributed import DistInfo, unlink_deepspeed_shm

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Schedule:
    """Learning rate per optimizer step: linear warmup from 0, then cosine down to ``min_lr``."""

    peak_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr + 0.5 * (self.peak_lr - self.min_lr) * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: decayed weights, and biases / norms / RPB / layer scale without weight decay."""
    keywords = model.no_weight_decay_keywords() if hasattr(model, "no_weight_decay_keywords") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(".bias") or any(k in name for k in keywords)
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on GPUs, fp32 on CPUs. Any precision DeepSpeed's accelerator runs is allowed (bf16 runs on
    CPUs too); the others are a ConfigError naming the device."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return precision
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    supported = accelerator.is_bf16_supported() if precision == "bf16" else accelerator.is_fp16_supported()
    if not supported:
        raise ConfigError(
            f"train.precision: DeepSpeed does not run {precision} on this {accelerator.device_name()} device; "
            f"use {'bf16 or ' if accelerator.is_bf16_supported() else ''}fp32"
        )
    return precision


def deepspeed_config(
    cfg: Config, micro: int, accum: int, global_batch: int, precision: str, load_universal: bool = False
) -> dict[str, Any]:
    """The user's ``deepspeed:`` section plus what the pipeline derives (one source of truth). ``load_universal``:
    the engine will load a checkpoint's universal conversion (a resume on another world size)."""
    ds = copy.deepcopy(cfg.deepspeed)
    if load_universal:
        ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
    ds.update(
        train_batch_size=global_batch,
        train_micro_batch_size_per_gpu=micro,
        gradient_accumulation_steps=accum,
        gradient_clipping=cfg.optim.grad_clip,
        steps_per_print=10**12,  # the pipeline logs
    )
    ds.setdefault("wall_clock_breakdown", False)
    if precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return ds


def build_optimizer(cfg: Config, model: torch.nn.Module, device: torch.device, lr: float) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.optim.weight_decay)
    offload = cfg.deepspeed.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if offload == "cpu":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, betas=cfg.optim.betas, eps=cfg.optim.eps, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=lr, betas=cfg.optim.betas, eps=cfg.optim.eps, fused=device.type == "cuda")


def build_engine(
    cfg: Config,
    model: torch.nn.Module,
    info: DistInfo,
    micro: int,
    accum: int,
    global_batch: int,
    schedule: Schedule,
    load_universal: bool = False,
):
    """-> (engine, optimizer, lr_scheduler). The scheduler steps once per optimizer step (DeepSpeed calls it)."""
    import deepspeed

    precision = resolve_precision(cfg.train.precision, info.device)
    optimizer = build_optimizer(cfg, model, info.device, schedule.peak_lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule.lr(step) / schedule.peak_lr)
    ds_config = deepspeed_config(cfg, micro, accum, global_batch, precision, load_universal)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
    )
    unlink_deepspeed_shm(info)
    if cfg.model.compile:
        # Fixed shapes: a recompile for the next level's map size would otherwise switch dynamo to dynamic
        # shapes, and inductor (torch 2.14) fails on the padding arithmetic of DinatLayer with them.
        engine.compile(compile_kwargs={"dynamic": False})
    logger.info(
        "DeepSpeed ZeRO-%d, %s, micro batch %d x accumulation %d x %d ranks = %d",
        ds_config.get("zero_optimization", {}).get("stage", 0),
        precision,
        micro,
        accum,
        info.world_size,
        global_batch,
    )
    return engine, optimizer, scheduler
