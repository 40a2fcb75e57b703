"""Benchmarks of the model package: attention backends per DiNAT level, activation-checkpointing memory.

    python -m dinat.benchmark attention --device cpu --batch-size 2
    python -m dinat.benchmark attention --device cuda --dtype bf16 --batch-size 32
    python -m dinat.benchmark memory --variant dinat_mini --batch-size 8

``attention`` times forward and forward+backward of each level's layer stack of a variant (its first
``--layers`` layers, with that level's dilations) for every backend that can run there, and reports the
max |difference| of the other backends' output and input gradient against ``reference``.
``memory`` measures the peak memory of one training step (forward + backward, beyond the parameters)
for activation_checkpointing none / 2 / all: CUDA's allocator peak on a GPU, PeakTensorMemory on CPU.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial

import torch

from .attention import natten_available
from .memory import PeakTensorMemory
from .modeling import DinatLayer
from .variants import create_model, default_resolution, variant_config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, repeats: int) -> float:
    fn()  # warm-up (kernel selection, index tables)
    _sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - t) / repeats * 1e3


def _forward(stack, x):
    with torch.no_grad():
        return stack(x)


def _forward_backward(stack, x):
    stack(x).float().sum().backward()


def _train_step(model, x, y):
    model(x, labels=y).loss.backward()


def level_stack(config, level: int, layers: int, backend: str, device, dtype) -> torch.nn.Sequential:
    dim = config.embed_dim * 2**level
    dils = config.dilations[level][:layers]
    torch.manual_seed(level)
    stack = torch.nn.Sequential(*(DinatLayer(config, dim, config.num_heads[level], d, 0.0, backend) for d in dils))
    return stack.to(device=device, dtype=dtype)


def bench_attention(args) -> list[dict]:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    config = variant_config(args.variant)
    res = args.resolution or default_resolution(args.variant)
    backends = ["reference"] + (["natten"] if natten_available() else [])
    rows = []
    for level in range(len(config.depths)):
        size = res // 4 // 2**level
        dim = config.embed_dim * 2**level
        x = torch.randn(args.batch_size, size, size, dim, device=device, dtype=dtype)
        outs = {}
        weights = level_stack(config, level, args.layers, "reference", device, dtype).state_dict()
        for backend in backends:
            stack = level_stack(config, level, args.layers, backend, device, dtype)
            stack.load_state_dict(weights)
            row = dict(level=level, map=size, dim=dim, layers=len(stack), backend=backend, dtype=args.dtype)
            row["fwd_ms"] = round(_time(partial(_forward, stack, x), device, args.repeats), 2)
            xg = x.clone().requires_grad_(True)
            try:
                row["fwd_bwd_ms"] = round(_time(partial(_forward_backward, stack, xg), device, args.repeats), 2)
                xg.grad = None
                y = stack(xg)
                y.float().square().mean().backward()
                outs[backend] = (y.detach().float(), xg.grad.float())
            except RuntimeError as e:  # NATTEN's CPU path has no backward
                row["fwd_bwd_ms"] = None
                row["note"] = str(e).split(";")[0]
                outs[backend] = (_forward(stack, x).float(), None)
            rows.append(row)
        ref_out, ref_grad = outs["reference"]
        for row in rows[-len(backends) :]:
            out, grad = outs[row["backend"]]
            row["max_abs_diff_out"] = float((out - ref_out).abs().max())
            if grad is not None:
                row["max_abs_diff_grad"] = float((grad - ref_grad).abs().max())
    return rows


def bench_memory(args) -> list[dict]:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    res = args.resolution or default_resolution(args.variant)
    rows = []
    for mode in ("none", 2, "all"):
        torch.manual_seed(0)
        model = create_model(args.variant, device=device, activation_checkpointing=mode).to(device).train()
        x = torch.randn(args.batch_size, 3, res, res, device=device)
        y = torch.randint(0, model.config.n_labels, (args.batch_size,), device=device)
        row = dict(variant=args.variant, resolution=res, batch=args.batch_size, checkpointing=str(mode))
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                model(x, labels=y).loss.backward()
                row["peak_step_gib"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)
            else:
                with PeakTensorMemory() as mem:
                    model(x, labels=y).loss.backward()
                row["peak_step_gib"] = round(mem.peak_bytes / 2**30, 3)
            row["step_ms"] = round(_time(partial(_train_step, model, x, y), device, args.repeats), 1)
        rows.append(row)
        del model
    return rows


def _print(rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    print(" | ".join(keys))
    for r in rows:
        print(" | ".join("" if r.get(k) is None else f"{r[k]:.2e}" if "diff" in k else str(r[k]) for k in keys))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["attention", "memory"])
    p.add_argument("--variant", default="dinat_large")
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--layers", type=int, default=2, help="layers per level in the attention stack")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = bench_attention(args) if args.what == "attention" else bench_memory(args)
    header = dict(torch=torch.__version__, device=str(args.device), threads=torch.get_num_threads())
    if args.device.startswith("cuda"):
        header["gpu"] = torch.cuda.get_device_name()
    print(json.dumps(header))
    _print(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(header=header, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
