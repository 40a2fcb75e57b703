"""A ``dinat-bench`` run: the models in one process group, derived figures (images/s, MFU), the table."""

from __future__ import annotations

import argparse
import logging
from typing import Any

import torch
import torch.distributed as dist

import dinat

from ..config import Config
from ..distributed import DistInfo, init_distributed, setup_logging
from ..engine import PRECISION_DTYPES
from ..metrics import mfu, peak_flops
from .cli import environment, make_plan, write_json
from .memory_plan import GIB
from .search import find_max, max_micro_batch, trial
from .steps import RunSpec, bench_model

logger = logging.getLogger("pipeline.bench")


def figures(raw: dict[str, Any], info: DistInfo, precision: str, micro: int, peak_tflops: float | None) -> dict:
    """Per-GPU and total images/s, achieved TFLOP/s, MFU and hardware-FLOPs utilisation of one model."""
    flops, step = raw["flops"], raw["step_s"]
    peak = peak_flops(info.device, PRECISION_DTYPES[precision], None if peak_tflops is None else peak_tflops * 1e12)
    out = {k: v for k, v in raw.items() if k != "flops"}
    out["images_per_s_per_gpu"] = micro / step
    out["images_per_s"] = micro * info.world_size / step
    out["flops_per_step_per_gpu"] = {"useful": flops.useful, "hardware": flops.hardware, "source": flops.source}
    out["tflops_per_s_per_gpu"] = flops.useful / step / 1e12
    out["peak_flops_per_gpu"] = peak
    out["mfu"] = mfu(flops.useful * info.world_size, step, info.world_size, peak)
    out["hfu"] = None if flops.hardware is None else mfu(flops.hardware * info.world_size, step, info.world_size, peak)
    out["peak_gib"] = raw["peak_bytes"] / GIB
    return out


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def table(rows: list[dict[str, Any]]) -> str:
    """Aligned text table; the last column is speed relative to the first model."""
    head = ["model", "params", "img/s/GPU", "img/s", "step ms", "fwd", "bwd", "opt", "data", "TFLOP/s", "MFU", "HFU"]
    head += ["peak GiB", "speed"]
    lines = []
    for r in rows:
        ms = {k: f"{1e3 * r[k]:.1f}" if r.get(k) is not None else "-" for k in ("step_s", "forward_s", "backward_s")}
        lines.append(
            [
                r["model"],
                f"{r['params'] / 1e6:.1f}M",
                f"{r['images_per_s_per_gpu']:.2f}",
                f"{r['images_per_s']:.2f}",
                ms["step_s"],
                ms["forward_s"],
                ms["backward_s"],
                f"{1e3 * r['optimizer_s']:.1f}",
                f"{1e3 * r['data_wait_s']:.1f}" if "data_wait_s" in r else "-",
                f"{r['tflops_per_s_per_gpu']:.3f}",
                _pct(r["mfu"]),
                _pct(r["hfu"]),
                f"{r['peak_gib']:.2f}",
                f"{r['images_per_s'] / rows[0]['images_per_s']:.2f}x",
            ]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*row) for row in [head, *lines])


def _search(cfg: Config, args: argparse.Namespace, info: DistInfo, backend: str) -> dict[str, Any]:
    """Plan bracket, then real trials; a trial runs 1 warm-up + up to 2 timed steps."""
    if args.memory_limit_gib is not None:
        limit = args.memory_limit_gib * GIB
    else:
        limit = torch.cuda.get_device_properties(info.device).total_memory - args.reserve_gib * GIB
    guess = max_micro_batch(lambda m: make_plan(cfg, args, info.world_size, m, backend), limit)
    logger.info("plan: micro-batch %d fits %.2f GiB; verifying by running steps", guess, limit / GIB)
    trials: list[dict[str, Any]] = []

    def fits(micro: int) -> bool:
        spec = RunSpec(args.resolution, micro, min(args.steps, 2), min(args.warmup, 1), args.precision, args.data)
        result = trial(cfg, args.variant, info, spec, limit if args.memory_limit_gib is not None else None)
        result["plan_total_bytes"] = make_plan(cfg, args, info.world_size, micro, backend).total
        trials.append(result)
        logger.info("micro-batch %d: %s", micro, "fits" if result["fits"] else "does not fit")
        return result["fits"]

    best, _ = find_max(fits, max(guess, 1))
    return {"limit_bytes": limit, "plan_guess": guess, "max_micro_batch": best, "trials": trials}


def run(cfg: Config, args: argparse.Namespace) -> int:
    """Time the models (or search the micro-batch), print, and write the JSON record on rank 0."""
    created = not dist.is_initialized()
    info = init_distributed()
    setup_logging(info)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its per-engine INFO lines would bury the table
    backend = dinat.resolve_backend(args.attention_backend, cfg.model.use_rpb, 0.0, info.device)
    record: dict[str, Any] = {"tool": "dinat-bench", "argv": args.argv, **environment(info.device, info.world_size)}
    record["config"] = {
        "variant": args.variant,
        "resolution": args.resolution,
        "micro_batch": args.micro_batch,
        "precision": args.precision,
        "attention_backend": backend,
        "activation_checkpointing": cfg.model.activation_checkpointing,
        "zero_stage": cfg.deepspeed.get("zero_optimization", {}).get("stage", 0),
        "compile": cfg.model.compile,
        "steps": args.steps,
        "warmup": args.warmup,
        "data": args.data or "synthetic",
        "deepspeed": cfg.deepspeed,
    }
    if args.find_max_batch:
        record["search"] = _search(cfg, args, info, backend)
        if info.is_main:
            s = record["search"]
            for t in s["trials"]:
                meas = "OOM" if t["peak_bytes"] is None else f"{t['peak_bytes'] / GIB:.3f} GiB"
                print(f"micro-batch {t['micro_batch']}: measured {meas}, plan {t['plan_total_bytes'] / GIB:.3f} GiB")
            limit = s["limit_bytes"] / GIB
            print(f"largest micro-batch: {s['max_micro_batch']} (plan: {s['plan_guess']}, limit {limit:.2f} GiB)")
    else:
        spec = RunSpec(args.resolution, args.micro_batch, args.steps, args.warmup, args.precision, args.data)
        rows = [
            figures(bench_model(cfg, name, info, spec), info, args.precision, args.micro_batch, args.peak_tflops)
            for name in [args.variant, *args.compare]
        ]
        plan = make_plan(cfg, args, info.world_size, args.micro_batch, backend)
        rows[0]["plan_total_bytes"] = plan.total
        record["results"], record["plan"] = rows, plan.as_dict()
        if info.is_main:
            print(table(rows))
            print(f"{args.variant}: measured peak {rows[0]['peak_gib']:.3f} GiB, plan {plan.total / GIB:.3f} GiB")
            print(f"memory: {rows[0]['memory_method']}")
    if info.is_main:
        write_json(args.json, record)
    if created and info.world_size > 1:  # a 1-process group stays for later calls (DeepSpeed keeps a handle to it)
        dist.destroy_process_group()
    return 0
