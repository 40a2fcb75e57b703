"""Real DeepSpeed engines in a real 2-rank gloo group on CPU, for the checkpoint and export tests.

``run_ranks(fn, *args)`` runs ``fn(info, *args)`` in ``world_size`` spawned processes that joined one
process group through :func:`pipeline.distributed.init_distributed`; a failure in any rank fails the
caller with that rank's traceback, and ranks that stop using CPU are killed as hung (:mod:`tests.progress`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from tests.progress import wait_while_busy

NUM_LABELS = 4
RES = 32  # px: every DiNAT level of dinat_debug is padded at this size, which the export must survive
CLASSES = [{"index": i, "id": f"n{i:08d}", "name": f"class {i}"} for i in range(NUM_LABELS)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world_size: int, port: int, args: tuple) -> None:
    # A launcher's environment, as torchrun would set it; the pipeline reads it in one place.
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)  # two ranks on a 2-core machine
    logging.basicConfig(level=logging.WARNING)
    from pipeline.distributed import init_distributed

    info = init_distributed(timeout_minutes=3)
    try:
        fn(info, *args)
    finally:
        torch.distributed.destroy_process_group()


def run_ranks(fn: Callable, *args: Any, world_size: int = 2, idle_s: float = 120) -> None:
    """Run ``fn(info, *args)`` on ``world_size`` ranks (fn must be importable: a module-level function). The ranks
    may take as long as they need while they use CPU; ``idle_s`` seconds without any means they hang."""
    ctx = mp.start_processes(
        _entry, args=(fn, world_size, free_port(), args), nprocs=world_size, join=False, start_method="spawn"
    )
    try:
        wait_while_busy(lambda: [p.pid for p in ctx.processes], lambda: ctx.join(timeout=1), fn.__name__, idle_s)
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


PRECISIONS = ("fp32", "bf16")  # bf16 runs on DeepSpeed's CPU accelerator too


def make_engine(stage: int, seed: int = 0, precision: str = "fp32"):
    """dinat_debug (4 labels) in a DeepSpeed engine: ZeRO ``stage``, ``precision``, torch AdamW, DeepSpeed's
    WarmupLR."""
    import deepspeed

    import dinat

    torch.manual_seed(seed)
    model = dinat.create_model("dinat_debug", num_labels=NUM_LABELS, attention_backend="reference")
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 1e-3, "warmup_num_steps": 10}},
        "steps_per_print": 10**9,
        **({"bf16": {"enabled": True}} if precision == "bf16" else {}),
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The micro-batch of ``rank`` at ``step``: (2, 3, RES, RES) images, (2,) labels."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(2, 3, RES, RES, generator=g), torch.randint(0, NUM_LABELS, (2,), generator=g)


def _dtype(engine) -> torch.dtype:
    return next(engine.module.parameters()).dtype


def train(engine, rank: int, steps: range) -> None:
    for step in steps:
        x, y = batch(step, rank)
        loss = engine(x.to(_dtype(engine)), labels=y).loss
        engine.backward(loss)
        engine.step()


def probe() -> torch.Tensor:
    """Fixed inputs for comparing models: (3, 3, RES, RES)."""
    return torch.randn(3, 3, RES, RES, generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def logits(engine) -> torch.Tensor:
    """(3, NUM_LABELS) eval-mode logits of the engine's model on :func:`probe` (collective under ZeRO-3)."""
    engine.eval()
    out = engine(probe().to(_dtype(engine))).logits.detach().clone()
    engine.train()
    return out


def flat_params(engine) -> torch.Tensor:
    """All parameters of the engine's model as one vector (gathered under ZeRO-3: collective)."""
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3):
        return torch.cat([p.detach().reshape(-1).clone() for p in params])


def train_state(engine) -> dict[str, Any]:
    """What the trainer would put into state.json, minus the loop counters."""
    return {"dinat_config": engine.module.config.to_dict(), "classes": CLASSES, "image_size": RES}


def roundtrip_worker(info, stage: int, base: str) -> None:
    """:func:`roundtrip` in each precision, one after the other in the same processes (a rank's start-up is the
    slow part on CPU)."""
    for precision in PRECISIONS:
        roundtrip(info, stage, precision, str(Path(base) / f"ckpt-{precision}"), base)


def roundtrip(info, stage: int, precision: str, root: str, out: str) -> None:
    """Train, save at steps 2, 4, 5 (keep=2), then load step 4 into a fresh engine and continue to 5.

    Writes ``out/rank{r}-{precision}.pt`` with what the tests compare (reference values from the live engine at
    save time).
    """
    from pipeline.checkpoint import Checkpointer

    r = info.rank
    ck = Checkpointer(Path(root), keep=2, dist=info)
    engine = make_engine(stage, seed=0, precision=precision)
    paths = []
    ref: dict[str, Any] = {}
    for start, step in ((0, 2), (2, 4), (4, 5)):
        train(engine, r, range(start, step))
        ref[step] = {"params": flat_params(engine), "logits": logits(engine), "lr": engine.get_lr()[0]}
        rank_state = {"rank": r, "position": 100 * step + r, "rng": torch.get_rng_state()}  # drop path draws
        paths.append(ck.save(engine, step, train_state(engine), rank_state))
    fresh = make_engine(stage, seed=1, precision=precision)
    res: dict[str, Any] = {"paths": paths, "ref": ref, "fresh_params": flat_params(fresh), "latest": ck.latest()}
    res["dirs"] = sorted(p.name for p in Path(root).iterdir())
    res["state"], res["rank_state"] = ck.load(fresh, paths[1])
    res["loaded"] = {"params": flat_params(fresh), "logits": logits(fresh), "lr": fresh.get_lr()[0]}
    res["loaded"]["global_steps"] = fresh.global_steps
    torch.set_rng_state(res["rank_state"]["rng"])
    train(fresh, r, range(4, 5))
    res["continued"] = {"params": flat_params(fresh), "logits": logits(fresh), "lr": fresh.get_lr()[0]}
    torch.save(res, Path(out) / f"rank{r}-{precision}.pt")


_RUNS: dict[int, Path] = {}


def zero_run(stage: int, tmp_path_factory, precision: str = "fp32") -> tuple[Path, list[dict[str, Any]]]:
    """(checkpoint root, per-rank results) of :func:`roundtrip` in ``precision``; one 2-rank job per stage and
    session runs both precisions."""
    if stage not in _RUNS:
        base = tmp_path_factory.mktemp(f"zero{stage}")
        run_ranks(roundtrip_worker, stage, str(base))
        _RUNS[stage] = base
    base = _RUNS[stage]
    results = [torch.load(base / f"rank{r}-{precision}.pt", weights_only=False) for r in range(2)]
    return base / f"ckpt-{precision}", results


def save_then_hang_worker(info, root: str, ready: str) -> None:
    """Save step 2 (reference logits in root/../ref2.pt), train, then hang inside the save of step 3 after
    every file is written and before it is committed; ``ready`` appears when the job is there."""
    from pipeline.checkpoint import Checkpointer

    ck = Checkpointer(Path(root), keep=3, dist=info)
    engine = make_engine(3, seed=0)
    train(engine, info.rank, range(0, 2))
    ref = logits(engine)
    ck.save(engine, 2, train_state(engine), {"rank": info.rank})
    if info.is_main:
        torch.save(ref, Path(root).parent / "ref2.pt")
    train(engine, info.rank, range(2, 3))

    def hang(tmp: Path) -> None:
        if info.is_main:
            Path(ready).write_text(str(tmp))
        time.sleep(600)

    ck.before_commit = hang
    ck.save(engine, 3, train_state(engine), {"rank": info.rank})


def resume_worker(info, root: str, out: str) -> None:
    """A fresh job after the kill: a checkpoint of another world size is refused by an engine not built for a
    universal load; the latest one loads and the job saves step 3 again (over the name the killed save used)."""
    import shutil

    from pipeline.checkpoint import STATE_NAME, Checkpointer

    ck = Checkpointer(Path(root), keep=3, dist=info)
    res: dict[str, Any] = {"dirs_at_start": sorted(p.name for p in Path(root).iterdir()), "latest": ck.latest()}
    engine = make_engine(3, seed=1)
    for key, value in (("world_size", 4), ("zero_stage", 2)):  # the same checkpoint, as if written otherwise
        other = Path(out) / f"{key}{info.rank}" / ck.latest().name
        shutil.copytree(ck.latest(), other)
        state = json.loads((other / STATE_NAME).read_text())
        (other / STATE_NAME).write_text(json.dumps({**state, key: value}))
        try:
            ck.load(engine, other)
        except ValueError as e:
            res[f"{key}_error"] = str(e)
    res["state"], res["rank_state"] = ck.load(engine, ck.latest())
    res["logits"] = logits(engine)
    train(engine, info.rank, range(2, 3))
    res["saved"] = ck.save(engine, 3, train_state(engine), {"rank": info.rank})
    res["dirs_at_end"] = sorted(p.name for p in Path(root).iterdir())
    torch.save(res, Path(out) / f"resume{info.rank}.pt")
