"""``python -m pipeline.bench.resume_benchmark``: what a resume on another world size costs, for DiNAT-L's states.

A ZeRO checkpoint of ``--variant`` (default dinat_large with the 21,841-class head) is written by ``--ranks``
ranks on this machine (one training step at ``--resolution`` px: the states, not the model's speed, are what is
measured), then:

* the conversion to DeepSpeed's universal format (:mod:`pipeline.reshard`): seconds and the extra disk;
* the restart to the end of the first step (engine, load, one step), on the same number of ranks (a plain load)
  and on one rank (the universal load), the latter with and without the conversion in it.

Each job runs under ``torchrun`` (CPU, gloo); the figures come back as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _job(ranks: int, *args: str) -> dict:
    """Run this module's ``--phase`` under torchrun on ``ranks`` CPU ranks; rank 0's JSON line."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
           str(29400 + os.getpid() % 500), "-m", "pipeline.bench.resume_benchmark", *args]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"resume_benchmark: {' '.join(args)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def _phase(args) -> None:
    """Inside torchrun: build the engine, (resume,) train one step, (save,) and report times from rank 0."""
    t0 = time.monotonic()
    import torch

    import dinat
    from pipeline.checkpoint import Checkpointer, read_state
    from pipeline.config import load_config
    from pipeline.distributed import init_distributed
    from pipeline.engine import Schedule, build_engine
    from pipeline.reshard import needs_universal

    info = init_distributed()
    stage = args.zero_stage
    cfg = load_config(None, ["data.train=unused", f"deepspeed.zero_optimization.stage={stage}", "train.precision=fp32"])
    root = Path(args.dir)
    ck = Checkpointer(root / f"written-by-{info.world_size}", keep=2, dist=info)
    times: dict[str, float] = {}
    universal, path, state = False, None, None
    if args.phase == "restart":
        path = Path(args.checkpoint)
        state = read_state(path)
        universal = needs_universal(path, state, info.world_size, stage)
        start = time.monotonic()
        converted = ck.prepare_universal(path, state) if universal else None
        times["conversion_s"] = converted or 0.0
        times["prepare_s"] = time.monotonic() - start
    start = time.monotonic()
    torch.manual_seed(0)
    model = dinat.create_model(args.variant, attention_backend="reference")
    micro = 2
    engine, *_ = build_engine(cfg, model, info, micro, 1, micro * info.world_size, Schedule(1e-4, 1e-5, 1, 10),
                              load_universal=universal)  # fmt: skip
    times["engine_s"] = time.monotonic() - start
    if path is not None:
        start = time.monotonic()
        ck.load(engine, path, universal=universal)
        times["load_s"] = time.monotonic() - start
    start = time.monotonic()
    x = torch.randn(micro, 3, args.resolution, args.resolution)
    y = torch.randint(0, model.config.num_labels, (micro,))
    engine.backward(engine(x, labels=y).loss)
    engine.step()
    times["step_s"] = time.monotonic() - start
    if args.phase == "save":
        start = time.monotonic()
        saved = ck.save(engine, 1, {"note": "resume benchmark"}, {})
        times["save_s"] = time.monotonic() - start
        times["checkpoint"] = str(saved)
    times["total_s"] = time.monotonic() - t0
    times["params"] = sum(p.numel() for p in model.parameters())
    if info.is_main:
        print(json.dumps(times), flush=True)
    torch.distributed.destroy_process_group()


def run(args) -> None:
    from pipeline.checkpoint import read_state
    from pipeline.reshard import UNIVERSAL_TAG, ensure_universal

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        common = ["--dir", tmp, "--variant", args.variant, "--resolution", str(args.resolution), "--zero-stage",
                  str(args.zero_stage)]  # fmt: skip
        saved = _job(args.ranks, "--phase", "save", *common)
        ckpt = Path(saved["checkpoint"])
        fresh = Path(tmp) / "copy"
        shutil.copytree(ckpt, fresh)  # the same checkpoint, not yet converted
        size = _du(ckpt)
        start = time.monotonic()
        ensure_universal(ckpt, ckpt / "deepspeed", read_state(ckpt)["world_size"])
        convert_s = time.monotonic() - start
        extra = _du(ckpt / UNIVERSAL_TAG)
        same = _job(args.ranks, "--phase", "restart", "--checkpoint", str(ckpt), *common)
        one = _job(1, "--phase", "restart", "--checkpoint", str(ckpt), *common)
        one_converting = _job(1, "--phase", "restart", "--checkpoint", str(fresh), *common)
    gb = 1e9
    print(f"{args.variant}: {saved['params'] / 1e6:.1f}M parameters, ZeRO-{args.zero_stage} fp32 checkpoint of "
          f"{args.ranks} ranks: {size / gb:.2f} GB")  # fmt: skip
    print(f"conversion to the universal format: {convert_s:.1f} s, +{extra / gb:.2f} GB "
          f"({extra / size:.2f}x the checkpoint)")  # fmt: skip
    rows = [(f"{args.ranks} ranks, plain load", same), ("1 rank, universal load (converted before)", one),
            ("1 rank, conversion + universal load", one_converting)]  # fmt: skip
    head = ("restart to the end of the first step", "convert", "engine", "load", "step", "all")
    print(f"{head[0]:<42} " + " ".join(f"{h:>8}" for h in head[1:]))
    for name, t in rows:
        print(f"{name:<42} {t.get('prepare_s', 0):>7.1f}s {t['engine_s']:>7.1f}s {t['load_s']:>7.1f}s "
              f"{t['step_s']:>7.1f}s {t['total_s']:>7.1f}s")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="dinat_large")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--zero-stage", type=int, default=2, choices=(1, 2, 3))
    p.add_argument("--resolution", type=int, default=32, help="px of the one training step (the states are measured)")
    p.add_argument("--tmp", default=None, help="where the checkpoints go (needs ~3x the checkpoint's size)")
    p.add_argument("--phase", choices=("save", "restart"), help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.phase:
        _phase(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
