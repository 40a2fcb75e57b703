"""Timed training steps of one model through the training engine (``pipeline.engine.build_engine``).

A model here is anything called as ``model(pixel_values, labels=labels).loss``: a DiNAT variant, or a timm
model wrapped by :class:`TimmClassifier` for side-by-side figures. Each step is timed in three phases
(forward, ``engine.backward``, ``engine.step``) with the device synchronised between them, so the phases
add up to the step; data wait is timed only for real data (:class:`pipeline.metrics.StepTimer`).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

import dinat
import dinat.flops
from dinat.modeling import classification_loss

from ..config import Config
from ..distributed import DistInfo
from ..engine import PRECISION_DTYPES, Schedule, build_engine
from ..metrics import StepTimer
from .measure import NewTensorMemory, live_storages, live_tensors

logger = logging.getLogger(__name__)

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


class TimmClassifier(torch.nn.Module):
    """A timm classifier with DiNAT's call signature: ``forward(pixel_values, labels)`` -> ``.loss``."""

    def __init__(self, name: str, num_labels: int, resolution: int, checkpointing: bool):
        super().__init__()
        import timm

        kwargs = {"img_size": resolution} if "swin" in name and resolution != 224 else {}
        try:
            self.model = timm.create_model(name, num_classes=num_labels, **kwargs)
        except RuntimeError as e:  # timm's "Unknown model"
            raise ValueError(f"--compare: {e}") from None
        if checkpointing:
            self.model.set_grad_checkpointing(True)  # timm checkpoints every block

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dinat.DinatOutput:
        logits = self.model(pixel_values)
        loss = classification_loss(logits, labels) if labels is not None else None
        return dinat.DinatOutput(logits=logits, loss=loss)


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one training step on one rank: ``useful`` (forward + backward), ``hardware`` (+ recompute)."""

    useful: float
    hardware: float | None
    source: str


def dinat_step_flops(config: dinat.DinatConfig, resolution: int, micro: int) -> StepFlops:
    fraction = dinat.flops.checkpoint_recompute_fraction(config, resolution)
    f = dinat.flops.train_step_flops(config, resolution, micro, fraction)
    return StepFlops(f["useful"], f["hardware"], "analytic (dinat.flops.train_step_flops)")


def timm_step_flops(name: str, num_labels: int, resolution: int, micro: int, checkpointing: bool) -> StepFlops:
    """3 x the forward FLOPs that FlopCounterMode counts on the meta device (no analytic count for timm)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = TimmClassifier(name, num_labels, resolution, checkpointing=False)
        x = torch.empty(1, 3, resolution, resolution)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    useful = 3.0 * counter.get_total_flops() * micro
    hardware = None if checkpointing else useful  # timm's recomputation is not counted
    return StepFlops(useful, hardware, "FlopCounterMode, 1 forward x 3 (timm: no analytic count)")


def build_model(cfg: Config, name: str, info: DistInfo, resolution: int, num_labels: int | None) -> torch.nn.Module:
    """DiNAT ``cfg.model.name`` (as the trainer builds it) when ``name`` is that variant, else a timm model."""
    m = cfg.model
    if name != m.name:
        labels = num_labels or dinat.variant_config(m.name, **m.overrides).n_labels
        return TimmClassifier(name, labels, resolution, m.activation_checkpointing != "none").to(info.device)
    overrides = m.dinat_fields()
    if num_labels is not None:
        overrides["num_labels"] = num_labels
    return dinat.create_model(m.name, device=info.device, **overrides).to(info.device)


def make_engine(cfg: Config, model: torch.nn.Module, info: DistInfo, micro: int):
    """The training engine for ``micro`` images per rank, no accumulation, a flat learning rate."""
    schedule = Schedule(peak_lr=1e-4, min_lr=1e-4, warmup_steps=0, total_steps=10**9)
    engine, _, _ = build_engine(cfg, model, info, micro, 1, micro * info.world_size, schedule)
    return engine


def synthetic_batches(
    micro: int, resolution: int, num_labels: int, device: torch.device, dtype: torch.dtype
) -> Batches:
    """The same random batch forever: (micro, 3, R, R) images in ``dtype``, (micro,) labels."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(micro, 3, resolution, resolution, generator=g).to(device=device, dtype=dtype)
    y = torch.randint(0, num_labels, (micro,), generator=g).to(device)
    while True:
        yield x, y


def _sync(device: torch.device) -> Callable[[], None] | None:
    return torch.cuda.synchronize if device.type == "cuda" else None


def train_step(engine, x: torch.Tensor, y: torch.Tensor, sync: Callable[[], None] | None) -> tuple[float, float, float]:
    """One optimizer step; returns (forward, backward, optimizer step) seconds."""
    marks = [time.perf_counter()]
    for phase in range(3):
        if phase == 0:
            loss = engine(x, labels=y).loss
        elif phase == 1:
            engine.backward(loss)
        else:
            engine.step()
        if sync is not None:
            sync()
        marks.append(time.perf_counter())
    return marks[1] - marks[0], marks[2] - marks[1], marks[3] - marks[2]


def timed_steps(engine, batches: Batches, steps: int, warmup: int, device: torch.device, real_data: bool) -> dict:
    """Mean seconds per step and per phase over ``steps`` steps after ``warmup`` untimed ones."""
    sync = _sync(device)
    for _ in range(warmup):
        train_step(engine, *next(batches), sync)
    timer = StepTimer(sync)
    phases = torch.zeros(3, dtype=torch.float64)
    for _ in range(steps):
        x, y = next(batches)
        timer.data_ready()
        phases += torch.tensor(train_step(engine, x, y, sync), dtype=torch.float64)
        timer.step_done()
    total, data = timer.pop()
    out = {"step_s": total / steps, "forward_s": float(phases[0]) / steps, "backward_s": float(phases[1]) / steps}
    out["optimizer_s"] = float(phases[2]) / steps
    if real_data:
        out["data_wait_s"] = data / steps
    return out


def peak_memory(engine, batches: Batches, device: torch.device, baseline: set[int]) -> dict:
    """Peak bytes of a step on this rank: the CUDA allocator's peak (call after
    ``torch.cuda.reset_peak_memory_stats`` and the timed steps); on CPU, the live tensor storages before one
    more step (beyond ``baseline``) plus :class:`NewTensorMemory` of that step."""
    if device.type == "cuda":
        return {
            "peak_bytes": torch.cuda.max_memory_allocated(device),
            "method": "torch.cuda.max_memory_allocated over the timed steps",
        }
    resident = sum(n for k, n in live_storages().items() if k not in baseline)
    x, y = next(batches)
    with NewTensorMemory(live_tensors()) as mem:
        train_step(engine, x, y, None)
    return {
        "peak_bytes": resident + mem.peak_bytes,
        "resident_bytes": resident,
        "method": "CPU: live tensor storages between steps (gc) + NewTensorMemory over one step",
    }


def agree_max(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """The maximum over ranks of each value (the slowest rank sets the step time)."""
    if info.world_size == 1 or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(values, t.tolist()))


def free_memory() -> None:
    """Give a dropped engine's memory back before the next one (call after ``del engine, model``)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class RunSpec:
    """What every model of one run shares."""

    resolution: int
    micro: int
    steps: int
    warmup: int
    precision: str  # resolved: bf16 | fp16 | fp32
    data: str | None = None  # WebDataset shard directory; None: a synthetic batch


def real_batches(cfg: Config, info: DistInfo, spec: RunSpec) -> tuple[Batches, int]:
    """(batches, number of classes) from ``cfg.data`` through the training input pipeline (loader, device augment)."""
    from ..data.build import resolve_dataset, train_augment, train_stream
    from ..data.loader import build_loader

    dataset = resolve_dataset(cfg.data, info)
    augment = train_augment(cfg.data, dataset.num_classes, info.device, PRECISION_DTYPES[spec.precision])
    stream = train_stream(cfg.data, dataset, info, spec.micro, cfg.train.seed)

    def batches() -> Batches:
        while True:
            for batch in build_loader(stream, pin_memory=info.device.type == "cuda"):
                yield augment(batch["images"].to(info.device, non_blocking=True), batch["labels"].to(info.device))

    return batches(), dataset.num_classes


def bench_model(cfg: Config, name: str, info: DistInfo, spec: RunSpec) -> dict:
    """Build ``name`` into the training engine, time ``spec.steps`` steps, measure the peak memory.

    Returns per-rank figures (times and memory are the maximum over ranks): ``params``, ``flops``
    (:class:`StepFlops` of one rank's micro-batch), ``step_s``, ``forward_s``, ``backward_s``,
    ``optimizer_s`` (``data_wait_s`` with real data), ``peak_bytes`` and ``memory_method``.
    """
    baseline = set(live_storages()) if info.device.type != "cuda" else set()
    if spec.data is not None:
        batches, num_labels = real_batches(cfg, info, spec)
    else:
        num_labels = None
    model = build_model(cfg, name, info, spec.resolution, num_labels)
    ac = cfg.model.activation_checkpointing
    if isinstance(model, dinat.DinatForImageClassification):
        flops = dinat_step_flops(model.config, spec.resolution, spec.micro)
        labels = model.config.n_labels
    else:
        labels = model.model.num_classes
        flops = timm_step_flops(name, labels, spec.resolution, spec.micro, ac != "none")
    if spec.data is None:
        batches = synthetic_batches(spec.micro, spec.resolution, labels, info.device, PRECISION_DTYPES[spec.precision])
    params = sum(p.numel() for p in model.parameters())
    engine = make_engine(cfg, model, info, spec.micro)
    if info.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(info.device)
    times = timed_steps(engine, batches, spec.steps, spec.warmup, info.device, spec.data is not None)
    memory = peak_memory(engine, batches, info.device, baseline)
    del engine, model
    free_memory()
    figures = agree_max({**times, "peak_bytes": float(memory["peak_bytes"])}, info)
    return {"model": name, "params": params, "flops": flops, **figures, "memory_method": memory["method"]}
