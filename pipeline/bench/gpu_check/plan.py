"""What the GPU check runs: one :class:`Step` per command, in priority order, each with its own time limit.

The plan is a pure function of the options and the environment probe (:mod:`.probe`), so it is tested on a
CPU: the command lines, the limits, and what is left out and why. Every step is a separate process (a
crashed or hung step costs only its own limit); the runner (:mod:`.runner`) gives each step the smaller of
its limit and what is left of the total budget, so the whole check stays within ``budget_s``.

Priority: the GPU tests, then the speed figures of issue 6 (DiNAT-L vs Swin-L and ConvNeXt-L, the
reference backend, the training loop, checkpointing, ``--compile``), then the micro-batch searches, which
cost the most; a step that no longer fits the budget is skipped and listed as such.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]  # the repository: steps run there (configs/, tests/)

VARIANT = "dinat_large"
RESOLUTION = 224
COMPARE = ("swin_large_patch4_window7_224", "convnext_large")
SHORT_NAMES = {VARIANT: "DiNAT-L", COMPARE[0]: "Swin-L", COMPARE[1]: "ConvNeXt-L"}
ZERO_STAGES = (1, 2, 3)
CHECKPOINTING = ("none", "all")
TRAIN_STEPS, TRAIN_CHECKPOINT_AT = 30, 15  # the first run checkpoints at 15; the resumed run restarts there
REFERENCE_MEMORY_FRACTION = 0.85  # the reference backend's micro-batch is halved until its plan fits this

# The goals of issue 6 ("Know the speed"), in the order BENCHMARKS.md lists them.
GOALS = {
    "mfu": "DiNAT-L bf16 at 224: MFU >= 40%",
    "vs_swin": "DiNAT-L images/s >= Swin-L's in the same run",
    "max_batch": "largest micro-batch for ZeRO 1/2/3, with and without checkpointing",
    "natten_vs_reference": "NATTEN (fused, or FlexAttention) against the reference on the GPU",
    "training": "the bf16 training loop: steps, checkpoint, resume, export",
}

# Seconds for one H100/H200; scaled by Options.limit_scale. Estimates until a GPU run calibrates them (the
# record keeps each step's time).
LIMITS = {
    "gpu_tests": 150,
    "speed": 150,
    "speed_reference": 120,
    "train": 180,
    "train_resume": 150,
    "speed_ckpt_all": 150,
    "speed_compile": 300,
    "max_batch": 75,
    "probe": 90,
}


@dataclass(frozen=True)
class Options:
    """The check's knobs (``python -m pipeline.bench.gpu_check --help``)."""

    out: Path
    python: str = sys.executable
    budget_s: float = 480.0
    micro_batch: int = 64  # the speed runs'; 128 at 224 px does not fit the reference backend on 141 GB
    steps: int = 10  # timed steps per speed run
    warmup: int = 3
    limit_scale: float = 1.0
    only: tuple[str, ...] = ()  # step names or prefixes ("max_batch")
    skip: tuple[str, ...] = ()
    train_variant: str = VARIANT
    train_image_size: int = RESOLUTION
    train_batch: int = 32
    train_workers: int = 8  # DataLoader workers of the training loop
    train_precision: str = "bf16"
    train_data: str | None = None  # shards to train on; None: the embedded synthetic set, written under out

    def __post_init__(self):
        checks = {
            "--budget-s": self.budget_s > 0,
            "--micro-batch": self.micro_batch >= 1,
            "--steps": self.steps >= 1,
            "--warmup": self.warmup >= 0,
            "--limit-scale": self.limit_scale > 0,
            "--train-batch": self.train_batch >= 1,
            "train_workers": self.train_workers >= 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"{bad[0]}: out of range")


@dataclass(frozen=True)
class Step:
    """One command of the check. ``artifact``: the file or folder it writes that :mod:`.parse` reads."""

    name: str
    kind: str  # probe | tests | speed | max_batch | train | command
    argv: tuple[str, ...]
    limit_s: float
    what: str
    goals: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()  # steps that must have passed first
    artifact: str | None = None

    @property
    def command(self) -> str:
        return shlex.join(self.argv)


def probe_step(opts: Options) -> Step:
    path = opts.out / "environment.json"
    argv = (opts.python, "-m", "pipeline.bench.gpu_check.probe", str(path))
    what = "device, versions, attention backends"
    return Step("probe", "probe", argv, _limit(opts, "probe"), what, (), (), str(path))


def build_plan(opts: Options, probe: dict[str, Any]) -> tuple[list[Step], list[dict[str, str]]]:
    """(the steps to run, in order; the steps left out, each ``{"name", "reason"}``)."""
    steps: list[Step] = []
    left_out: list[dict[str, str]] = []
    natten = probe.get("natten", {"error": "unknown (the probe did not finish)"})
    backend = "natten" if natten.get("available") else "reference"
    if backend == "reference":
        left_out.append({"name": "speed (natten)", "reason": f"NATTEN not importable: {natten.get('error')}"})
    memory = max((d["total_memory"] for d in probe.get("devices", [])), default=None)

    steps.append(_gpu_tests(opts))
    steps.append(_speed(opts, memory, "speed", backend, "none", False, COMPARE, ("mfu", "vs_swin")))
    if backend != "reference":
        goals = ("natten_vs_reference",)
        steps.append(_speed(opts, memory, "speed_reference", "reference", "none", False, (), goals))
    steps += _training(opts)
    steps.append(_speed(opts, memory, "speed_ckpt_all", backend, "all", False, COMPARE, ("mfu",)))
    steps.append(_speed(opts, memory, "speed_compile", backend, "none", True, COMPARE, ("mfu", "vs_swin")))
    steps += [_max_batch(opts, backend, z, ac) for z in ZERO_STAGES for ac in CHECKPOINTING]

    chosen = []
    for step in steps:
        reason = _deselected(step.name, opts)
        if reason:
            left_out.append({"name": step.name, "reason": reason})
        else:
            chosen.append(step)
    return chosen, left_out


def _deselected(name: str, opts: Options) -> str | None:
    def match(patterns: tuple[str, ...]) -> bool:  # a name, or a prefix of names: "max_batch", "speed"
        return any(name == p or name.startswith(p + "_") for p in patterns)

    if opts.only and not match(opts.only):
        return f"not selected (--only {','.join(opts.only)})"
    if opts.skip and match(opts.skip):
        return f"deselected (--skip {','.join(opts.skip)})"
    return None


def _limit(opts: Options, key: str) -> float:
    return LIMITS[key] * opts.limit_scale


def _bench(opts: Options) -> tuple[str, ...]:
    return (opts.python, "-m", "pipeline.bench", "--variant", VARIANT, "--resolution", str(RESOLUTION))


def _gpu_tests(opts: Options) -> Step:
    junit = opts.out / "gpu_tests.xml"
    # Collection errors in modules without GPU tests (a package missing there) must not hide the GPU tests.
    argv = (opts.python, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider")
    argv += ("--continue-on-collection-errors", "--junitxml", str(junit), "tests")
    what = "pytest -m gpu: NATTEN against the reference, forward and backward, bf16 and fp32, DiNAT-L's levels"
    return Step("gpu_tests", "tests", argv, _limit(opts, "gpu_tests"), what, ("natten_vs_reference",), (), str(junit))


def _speed(
    opts: Options,
    memory: float | None,
    name: str,
    backend: str,
    checkpointing: str,
    compile_: bool,
    compare: tuple[str, ...],
    goals: tuple[str, ...],
) -> Step:
    """A dinat-bench speed run; on ``reference`` at the largest halving of the micro-batch that fits."""
    micro = opts.micro_batch
    if backend == "reference":
        micro = fitting_micro_batch(backend, micro, memory, checkpointing)
    path = opts.out / "bench" / f"{name}.json"
    argv = _bench(opts) + ("--precision", "bf16", "--micro-batch", str(micro), "--attention-backend", backend)
    argv += ("--activation-checkpointing", checkpointing, "--zero-stage", "2")
    argv += ("--steps", str(opts.steps), "--warmup", str(opts.warmup))
    argv += ("--compile",) if compile_ else ()
    argv += ("--compare", ",".join(compare)) if compare else ()
    argv += ("--json", str(path))
    models = " vs ".join(("DiNAT-L", *(SHORT_NAMES.get(m, m) for m in compare)))
    what = f"{models}, bf16, {backend}, checkpointing {checkpointing}{', compiled' if compile_ else ''}, micro {micro}"
    return Step(name, "speed", argv, _limit(opts, name), what, goals, (), str(path))


def _max_batch(opts: Options, backend: str, zero: int, checkpointing: str) -> Step:
    name = f"max_batch_z{zero}_{checkpointing}"
    path = opts.out / "bench" / f"{name}.json"
    argv = _bench(opts) + ("--precision", "bf16", "--attention-backend", backend, "--find-max-batch")
    # One step per trial: the peak is reached in the first step (optimizer states appear in it).
    argv += ("--zero-stage", str(zero), "--activation-checkpointing", checkpointing, "--steps", "1", "--warmup", "0")
    argv += ("--json", str(path))
    what = f"largest micro-batch, ZeRO-{zero}, checkpointing {checkpointing}, {backend}"
    return Step(name, "max_batch", argv, _limit(opts, "max_batch"), what, ("max_batch",), (), str(path))


def train_overrides(opts: Options, run_dir: Path) -> list[str]:
    """The trainer's overrides on ``configs/demo_cpu.yaml`` (gentle augmentation, no Mixup: comparable losses)."""
    data = opts.train_data or str(opts.out / "train" / "data")
    out = [
        f"model.name={opts.train_variant}",
        "model.drop_path_rate=0.0",
        f"data.train={data}",
        f"data.val={data}",
        f"data.synthetic={str(opts.train_data is None).lower()}",
        f"data.image_size={opts.train_image_size}",
        f"data.workers={opts.train_workers}",
        f"train.global_batch_size={opts.train_batch}",
        f"train.micro_batch_size={opts.train_batch}",
        f"train.precision={opts.train_precision}",
        f"train.steps={TRAIN_STEPS}",
        "train.log_every=5",
        f"train.eval_every={TRAIN_STEPS}",
        "train.eval_batches=4",
        f"train.checkpoint_every={TRAIN_CHECKPOINT_AT}",
        "train.keep_checkpoints=2",
        "optim.lr=1e-4",  # the demo's 3e-3 is for its tiny model
        "optim.min_lr=1e-5",
        "optim.warmup_steps=5",
        f"run.output_dir={run_dir}",
    ]
    return out


def _training(opts: Options) -> list[Step]:
    """30 steps checkpointing at 15 and 30; then a second run resumed from step 15 to 30 that exports.
    The two runs' losses at steps 20-30 should agree (bitwise on CPU; GPU kernels may differ slightly)."""
    from pipeline.checkpoint import step_dir_name

    first, resumed = opts.out / "train" / "run", opts.out / "train" / "resumed"
    base = (opts.python, "-m", "pipeline.train", "--config", "configs/demo_cpu.yaml")
    argv = base + (*train_overrides(opts, first), "run.resume=none", "run.export=false")
    what = f"{TRAIN_STEPS} steps of the trainer, {opts.train_variant} {opts.train_precision} at "
    what += f"{opts.train_image_size} px, batch {opts.train_batch}, checkpoints at {TRAIN_CHECKPOINT_AT}, {TRAIN_STEPS}"
    train = Step("train", "train", argv, _limit(opts, "train"), what, ("training",), (), str(first))
    checkpoint = first / "checkpoints" / step_dir_name(TRAIN_CHECKPOINT_AT)
    argv = base + (*train_overrides(opts, resumed), f"run.resume={checkpoint}", "run.export=true")
    what = f"resume from step {TRAIN_CHECKPOINT_AT} to {TRAIN_STEPS} (losses compared with the first run), export"
    limit = _limit(opts, "train_resume")
    resume = Step("train_resume", "train", argv, limit, what, ("training",), ("train",), str(resumed))
    return [train, resume]


def fitting_micro_batch(backend: str, micro: int, memory_bytes: float | None, checkpointing: str = "none") -> int:
    """``micro``, halved until the memory plan of DiNAT-L (bf16, ZeRO-2, one GPU) on ``backend`` fits
    :data:`REFERENCE_MEMORY_FRACTION` of ``memory_bytes`` (the reference backend gathers each query's
    neighbourhood: a predicted peak of 85 GiB at 64 images, 165 GiB at 128). Unknown memory: ``micro``."""
    if memory_bytes is None:
        return micro
    import dinat

    from ..memory_plan import ZeroSettings, plan_memory, trainable_numels

    config = dinat.variant_config(VARIANT, attention_backend=backend, activation_checkpointing=checkpointing)
    numels = trainable_numels(config)
    zero = ZeroSettings(stage=2, world_size=1)
    while micro > 1:
        plan = plan_memory(config, VARIANT, RESOLUTION, micro, "bf16", backend, zero, numels)
        if plan.total <= REFERENCE_MEMORY_FRACTION * memory_bytes:
            break
        micro //= 2
    return micro
