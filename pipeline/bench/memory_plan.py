"""Predicted memory per GPU of a DiNAT training step under DeepSpeed ZeRO 0-3, before running anything.

Model states follow DeepSpeed's own bookkeeping (read from deepspeed/runtime/{fp16/unfused_optimizer,
zero/stage_1_and_2,zero/stage3}.py of 0.19 and checked against a real engine in
tests/pipeline/test_memory_plan.py). With Psi parameters, N ranks, b = 2 (bf16/fp16) or 4 (fp32) bytes per
parameter/gradient element, Psi_N = ceil(Psi / N), and, for ZeRO-3, every parameter partitioned
separately (sum of ceil(n_i / N)) while those of at most ``stage3_param_persistence_threshold`` elements
also stay whole on every rank:

    stage  parameters   gradients                    fp32 master   Adam moments  buffers
    0      b*Psi        b*Psi                        4*Psi (b=2)   8*Psi         b*min(Psi, R) after backward (N>1)
    1      b*Psi        b*Psi (whole until reduced)  4*Psi_N       8*Psi_N       k*b*R in backward
    2      b*Psi        b*Psi_N                      4*Psi_N       8*Psi_N       k*b*R in backward
    3      b*(Psi_N+P)  b*Psi_N                      4*Psi_N       8*Psi_N       b*R always; gathered parameters

R = ``reduce_bucket_size`` (contiguous gradients), k = 2 with ``overlap_comm`` else 1 (DeepSpeed's default:
on for ZeRO-3 only); P = the persistent small parameters (N > 1). ZeRO 1-3 keep an fp32 master copy even
in fp32. ``step`` is DeepSpeed's fp32 copy of the gradients it hands to the optimizer (the optimizer's own
temporaries are not included: none for fused AdamW on a GPU, a few times the partition for CPU's foreach).

The peak adds the activations (:mod:`.activations`) to the gradients as if both were live at once, an
upper bound: ``persistent + max(backward, step)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import dinat

from .activations import activation_memory

GIB = 2**30
PRECISION_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class ZeroSettings:
    """The ZeRO knobs that change memory, with DeepSpeed's defaults."""

    stage: int = 0
    world_size: int = 1
    reduce_bucket_size: int = 500_000_000
    overlap_comm: bool | None = None  # None: DeepSpeed's default (on for ZeRO-3 only)
    contiguous_gradients: bool = True
    persistence_threshold: int = 100_000
    prefetch_bucket_size: int = 50_000_000

    def __post_init__(self):
        if self.stage not in (0, 1, 2, 3):
            raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {self.stage}")
        if self.world_size < 1:
            raise ValueError(f"world size must be >= 1, got {self.world_size}")

    @classmethod
    def from_deepspeed(cls, ds: dict[str, Any], world_size: int) -> ZeroSettings:
        """From a DeepSpeed config dict (``cfg.deepspeed`` or :func:`pipeline.engine.deepspeed_config`)."""
        z = ds.get("zero_optimization", {})

        def get(*names, default):
            return next((z[n] for n in names if n in z), default)

        return cls(
            stage=int(z.get("stage", 0)),
            world_size=world_size,
            reduce_bucket_size=int(get("reduce_bucket_size", default=cls.reduce_bucket_size)),
            overlap_comm=get("overlap_comm", default=None),
            contiguous_gradients=bool(get("contiguous_gradients", default=True)),
            persistence_threshold=int(
                get("stage3_param_persistence_threshold", "param_persistence_threshold", default=100_000)
            ),
            prefetch_bucket_size=int(get("stage3_prefetch_bucket_size", "prefetch_bucket_size", default=50_000_000)),
        )

    @property
    def overlap(self) -> bool:
        return self.stage == 3 if self.overlap_comm is None else bool(self.overlap_comm)


def state_memory(numels: list[int], precision: str, zero: ZeroSettings) -> dict[str, float]:
    """Bytes per rank of the model states of parameters with ``numels`` elements (trainable ones).

    Keys: ``params``, ``grads`` (most held at once), ``master``, ``moments``, ``buffers_persistent``,
    ``buffers_backward`` (live while gradients are reduced), ``step`` (transient of the optimizer step).
    """
    if precision not in PRECISION_BYTES:
        raise ValueError(f"precision must be one of {', '.join(PRECISION_BYTES)}, got {precision!r}")
    b, n, s = PRECISION_BYTES[precision], zero.world_size, zero.stage
    psi = sum(numels)
    bucket = zero.reduce_bucket_size * b if zero.contiguous_gradients else 0.0
    if s == 0:
        part = psi
    elif s in (1, 2):
        part = math.ceil(psi / n)
    else:
        part = sum(math.ceil(k / n) for k in numels)
    out = {"master": 4.0 * part if (s > 0 or b < 4) else 0.0, "moments": 8.0 * part}
    out["params"] = float(b * psi)
    out["grads"] = float(b * (psi if s <= 1 else part))
    out["buffers_persistent"] = 0.0
    out["buffers_backward"] = 0.0
    out["step"] = 4.0 * part if (b < 4 or s in (1, 2)) else 0.0
    if s == 0 and n > 1:
        out["step"] = max(out["step"], float(b * min(psi, zero.reduce_bucket_size)))  # flattened all-reduce
    elif s in (1, 2):
        out["buffers_backward"] = bucket * (2 if zero.overlap else 1)
    elif s == 3:
        persistent = sum(k for k in numels if k <= zero.persistence_threshold) if n > 1 else 0
        out["params"] = float(b * (part + persistent))
        out["buffers_persistent"] = float(bucket)
        if n > 1:  # parameters gathered for the module that runs plus the prefetched ones
            partitioned = psi - persistent
            out["buffers_backward"] = float(b * min(partitioned, zero.prefetch_bucket_size + max(numels)))
    return out


@dataclass(frozen=True)
class MemoryPlan:
    """Predicted bytes per rank of one training step; :attr:`total` is the predicted peak."""

    variant: str
    resolution: int
    micro_batch: int
    precision: str
    backend: str
    checkpointing: str
    zero_stage: int
    world_size: int
    num_params: int
    params: float
    grads: float
    master: float
    moments: float
    buffers_persistent: float
    buffers_backward: float
    step: float
    activations: float  # peak, parameter gradients not included
    activations_saved: float  # kept at the end of the forward
    inputs: float

    @property
    def persistent(self) -> float:
        return self.params + self.master + self.moments + self.buffers_persistent

    @property
    def backward_phase(self) -> float:
        return self.grads + self.buffers_backward + self.activations + self.inputs

    @property
    def step_phase(self) -> float:
        return self.grads + self.step

    @property
    def total(self) -> float:
        return self.persistent + max(self.backward_phase, self.step_phase)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "persistent": self.persistent, "total": self.total}

    def table(self) -> str:
        """Human-readable breakdown in GiB."""
        rows = [
            ("parameters", self.params),
            ("gradients", self.grads),
            ("fp32 master weights", self.master),
            ("Adam moments (fp32 x 2)", self.moments),
            ("buffers, persistent", self.buffers_persistent),
            ("buffers, during backward", self.buffers_backward),
            ("optimizer step transient", self.step),
            ("activations, peak", self.activations),
            (" (kept after forward)", self.activations_saved),
            ("input batch", self.inputs),
            ("predicted peak", self.total),
        ]
        head = (
            f"{self.variant} @ {self.resolution}px, micro-batch {self.micro_batch}, {self.precision}, "
            f"{self.backend} attention, checkpointing {self.checkpointing}, ZeRO-{self.zero_stage} x {self.world_size}"
            f" ranks, {self.num_params / 1e6:.1f}M params"
        )
        return "\n".join([head] + [f"  {name:<28}{value / GIB:10.3f} GiB" for name, value in rows])


def trainable_numels(config: dinat.DinatConfig) -> list[int]:
    """Element counts of the parameters of ``DinatForImageClassification(config)``, built without memory
    (parameters on the meta device; ``torch.device("meta")`` would also move the drop-path schedule there)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = dinat.DinatForImageClassification(config.replace(attention_backend="reference"))
    return [p.numel() for p in model.parameters() if p.requires_grad]


def plan_memory(
    config: dinat.DinatConfig,
    variant: str,
    resolution: int,
    micro_batch: int,
    precision: str,
    backend: str,
    zero: ZeroSettings,
    numels: list[int] | None = None,
) -> MemoryPlan:
    """The plan for ``config`` (its ``activation_checkpointing`` counts) on ``backend`` ("reference" or "natten")."""
    if micro_batch < 1:
        raise ValueError(f"micro-batch must be >= 1, got {micro_batch}")
    numels = trainable_numels(config) if numels is None else numels
    states = state_memory(numels, precision, zero)
    acts = activation_memory(config, resolution, micro_batch, backend, PRECISION_BYTES[precision])
    return MemoryPlan(
        variant=variant,
        resolution=resolution,
        micro_batch=micro_batch,
        precision=precision,
        backend=backend,
        checkpointing=str(config.activation_checkpointing),
        zero_stage=zero.stage,
        world_size=zero.world_size,
        num_params=sum(numels),
        activations=acts["peak"],
        activations_saved=acts["saved"],
        inputs=acts["input"],
        **states,
    )
