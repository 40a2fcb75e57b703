"""``dinat-bench``: the command line (arguments, the run, the printed table and the JSON record)."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import platform
import sys
from pathlib import Path
from typing import Any

import torch

import dinat
from dinat.variants import default_resolution

from ..config import Config, ConfigError, load_config
from .memory_plan import GIB, MemoryPlan, ZeroSettings, plan_memory
from .search import max_micro_batch

logger = logging.getLogger("pipeline.bench")

EXAMPLES = """examples:
  dinat-bench --variant dinat_large --micro-batch 128 --compare swin_large_patch4_window7_224,convnext_large
  dinat-bench --variant dinat_large --plan --precision bf16 --attention-backend natten --zero-stage 2 --world-size 8
  dinat-bench --variant dinat_large --find-max-batch --zero-stage 3 --activation-checkpointing all
  torchrun --nproc_per_node 8 -m pipeline.bench --variant dinat_large --micro-batch 128 --zero-stage 3
"""


def _checkpointing(value: str) -> str | int:
    if value in ("none", "all"):
        return value
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise argparse.ArgumentTypeError(f"'none', 'all' or a positive integer k (every k-th layer), got {value!r}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dinat-bench",
        description="Timed DiNAT training steps through the training engine (DeepSpeed), and a memory plan.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--variant", default="dinat_large", help="a DiNAT variant (dinat.list_models())")
    p.add_argument("--micro-batch", type=int, default=32, help="images per GPU per step")
    p.add_argument("--resolution", type=int, default=None, help="image side in px (default: the variant's)")
    p.add_argument("--attention-backend", default="auto", choices=dinat.BACKENDS)
    p.add_argument("--activation-checkpointing", type=_checkpointing, default="none", help="none | all | k")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=None, help="default: the config's")
    p.add_argument("--compile", action="store_true", help="torch.compile the engine's model")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"))
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--compare", default="", help="comma-separated timm models timed in the same run")
    p.add_argument("--data", default=None, help="shards as data.train takes them, instead of synthetic")
    p.add_argument("--config", default=None, help="a run YAML: its deepspeed: and data: sections are used")
    p.add_argument("--json", default=None, help="write the machine-readable record here")
    p.add_argument("--plan", action="store_true", help="print the memory plan and exit without running")
    p.add_argument("--world-size", type=int, default=None, help="ranks for --plan (default: the launcher's)")
    p.add_argument("--find-max-batch", action="store_true", help="search the largest micro-batch that fits")
    p.add_argument("--memory-limit-gib", type=float, default=None, help="memory per rank for the search")
    p.add_argument("--reserve-gib", type=float, default=1.0, help="GPU memory the plan leaves free (context, ...)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s per device for MFU")
    return p


def validate(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One clear error (argparse's, exit 2) for a bad argument, before anything is built."""
    if args.variant not in dinat.list_models():
        p.error(f"--variant: unknown DiNAT variant {args.variant!r}; choose from {', '.join(dinat.list_models())}")
    args.resolution = args.resolution or default_resolution(args.variant)
    for name, value, low in (("--micro-batch", args.micro_batch, 1), ("--steps", args.steps, 1)):
        if value < low:
            p.error(f"{name}: must be >= {low}, got {value}")
    if args.warmup < 0:
        p.error(f"--warmup: must be >= 0, got {args.warmup}")
    if args.resolution < 32 or args.resolution % 32:
        p.error(f"--resolution: a multiple of 32 (the network's stride), got {args.resolution}")
    args.compare = [m for m in args.compare.split(",") if m]
    if args.compare:
        import timm

        unknown = [m for m in args.compare if not timm.is_model(m)]
        if unknown:
            p.error(f"--compare: unknown timm model(s) {', '.join(unknown)}")
    if args.plan and args.find_max_batch:
        p.error("--plan and --find-max-batch: choose one")
    if args.find_max_batch and args.compare:
        p.error("--find-max-batch searches the DiNAT variant only; drop --compare")
    if args.world_size is not None and (args.world_size < 1 or not args.plan):
        p.error("--world-size: a positive number, with --plan only (a run takes the launcher's)")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        p.error(f"--peak-tflops: must be > 0, got {args.peak_tflops}")
    if args.memory_limit_gib is not None and args.memory_limit_gib <= 0:
        p.error(f"--memory-limit-gib: must be > 0, got {args.memory_limit_gib}")
    gpu = torch.cuda.is_available()
    if not args.plan:
        if args.precision in ("bf16", "fp16") and not gpu:
            p.error(f"--precision {args.precision}: needs a GPU to run (fp32 on CPU; --plan takes any)")
        if args.find_max_batch and not gpu and args.memory_limit_gib is None:
            p.error("--find-max-batch on CPU: give --memory-limit-gib (the search compares measured peaks with it)")
    if args.precision == "auto":
        args.precision = "bf16" if gpu else "fp32"


def build_config(args: argparse.Namespace, world_size: int) -> Config:
    """The run config (``--config`` or the defaults) with this command's switches as dotted overrides."""
    overrides = [
        f"model.name={args.variant}",
        f"model.attention_backend={args.attention_backend}",
        f"model.activation_checkpointing={args.activation_checkpointing}",
        f"model.compile={str(args.compile).lower()}",
        f"train.precision={args.precision}",
        f"train.micro_batch_size={args.micro_batch}",
        "train.grad_accum=1",
        f"train.global_batch_size={args.micro_batch * world_size}",
        "train.steps=1000000",
    ]
    if args.zero_stage is not None:
        overrides.append(f"deepspeed.zero_optimization.stage={args.zero_stage}")
    if args.data is not None:
        overrides += [f"data.train={args.data}", f"data.image_size={args.resolution}"]
    return load_config(args.config, overrides)


def make_plan(cfg: Config, args: argparse.Namespace, world_size: int, micro: int, backend: str) -> MemoryPlan:
    config = dinat.variant_config(cfg.model.name, **cfg.model.dinat_fields())
    zero = ZeroSettings.from_deepspeed(cfg.deepspeed, world_size)
    return plan_memory(config, cfg.model.name, args.resolution, micro, args.precision, backend, zero)


def _with_checkpointing(cfg: Config, every: str | int) -> Config:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, activation_checkpointing=every))


def environment(device: torch.device, world_size: int) -> dict[str, Any]:
    """Versions, device and date for the JSON record."""
    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("natten", "deepspeed", "timm"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "versions": versions,
        "device": {"type": device.type, "name": name, "world_size": world_size, "threads": torch.get_num_threads()},
    }


def _cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or "cpu"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "cpu")


def write_json(path: str | None, record: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(record, indent=1, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    validate(p, args)
    from ..distributed import launch_env

    world = args.world_size or launch_env()[1]
    try:
        cfg = build_config(args, world)
        if args.data is not None:  # missing shards or classes.json: refused before any engine is built
            from ..data.build import resolve_dataset
            from ..distributed import DistInfo

            resolve_dataset(cfg.data, DistInfo())
    except ConfigError as e:
        p.error(str(e))
    if args.plan:
        return _print_plan(cfg, args, world)
    from .report import run

    return run(cfg, args)


def _describe(every: str | int) -> str:
    return {"none": "none", "all": "every layer"}.get(every, f"1 layer in {every}")


def _least_checkpointing(cfg: Config, args: argparse.Namespace, world: int, backend: str, limit: float):
    """The fewest checkpointed layers (each costs a recomputed forward) whose plan fits ``limit``, or None."""
    for every in ("none", 8, 4, 3, 2, "all"):
        if make_plan(_with_checkpointing(cfg, every), args, world, args.micro_batch, backend).total <= limit:
            return every
    return None


def _print_plan(cfg: Config, args: argparse.Namespace, world: int) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        backend = dinat.resolve_backend(args.attention_backend, cfg.model.use_rpb, 0.0, device)
    except ValueError as e:
        print(f"dinat-bench: --attention-backend: {e}", file=sys.stderr)
        return 2
    plan = make_plan(cfg, args, world, args.micro_batch, backend)
    print(plan.table())
    record: dict[str, Any] = {"plan": plan.as_dict(), **environment(device, world)}
    record["checkpointing"] = {}
    print("activation checkpointing:")
    for every in ("none", 2, "all"):  # the same run with each setting, side by side
        other = make_plan(_with_checkpointing(cfg, every), args, world, args.micro_batch, backend)
        record["checkpointing"][str(every)] = {"activations": other.activations, "total": other.total}
        acts, total = other.activations / GIB, other.total / GIB
        print(f"  {_describe(every):<16} activations {acts:8.3f} GiB  peak {total:8.3f} GiB")
    if args.memory_limit_gib is not None:
        limit = args.memory_limit_gib * GIB
        best = max_micro_batch(lambda m: make_plan(cfg, args, world, m, backend), limit)
        print(f"largest micro-batch within {args.memory_limit_gib:g} GiB by the plan: {best}")
        record["plan_max_micro_batch"] = best
        least = _least_checkpointing(cfg, args, world, backend, limit)
        record["plan_least_checkpointing"] = least
        what = "none fits" if least is None else _describe(least)
        print(f"least checkpointing for micro-batch {args.micro_batch} within {args.memory_limit_gib:g} GiB: {what}")
    write_json(args.json, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
