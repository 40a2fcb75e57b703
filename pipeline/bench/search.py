"""The largest micro-batch that fits: bracketed by the memory plan, settled by running steps.

``find_max(fits, guess)`` is the search alone (any monotonic ``fits``); :func:`trial` is the ``fits`` of a
real run: build the engine at that micro-batch, run steps, and count a CUDA out-of-memory error, or a
measured peak above ``limit_bytes`` (how the search is exercised on CPU), as not fitting. All ranks agree.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from ..config import Config
from ..distributed import DistInfo
from .memory_plan import MemoryPlan
from .steps import RunSpec, bench_model, free_memory


def find_max(fits: Callable[[int], bool], guess: int, cap: int = 65536) -> tuple[int, list[tuple[int, bool]]]:
    """Largest m in [1, cap] with ``fits(m)`` (0 if even 1 does not fit), probing from ``guess`` outwards
    in growing steps, then bisecting. Returns (m, the probes in order as (m, fitted))."""
    probes: list[tuple[int, bool]] = []
    known: dict[int, bool] = {}

    def probe(m: int) -> bool:
        if m not in known:
            known[m] = fits(m)
            probes.append((m, known[m]))
        return known[m]

    m = min(max(1, guess), cap)
    step = max(1, m // 8)
    if probe(m):
        lo, hi = m, cap + 1
        while lo + step <= cap and probe(lo + step):
            lo, step = lo + step, step * 2
        hi = min(lo + step, cap + 1)
    else:
        lo, hi = 0, m
        while hi - step >= 1 and not probe(hi - step):
            hi, step = hi - step, step * 2
        lo = max(hi - step, 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if probe(mid) else (lo, mid)
    return lo, probes


def max_micro_batch(plan_at: Callable[[int], MemoryPlan], limit_bytes: float) -> int:
    """Largest micro-batch m with ``plan_at(m).total <= limit_bytes`` (0 if none)."""
    return find_max(lambda m: plan_at(m).total <= limit_bytes, 1)[0]


def trial(cfg: Config, variant: str, info: DistInfo, spec: RunSpec, limit_bytes: float | None) -> dict:
    """Run ``spec`` (a couple of steps); ``fits`` is False on CUDA OOM or a measured peak above ``limit_bytes``."""
    oom = False
    result: dict = {"micro_batch": spec.micro}
    try:
        result.update(bench_model(cfg, variant, info, spec))
    except torch.cuda.OutOfMemoryError:
        oom = True
    if oom:  # outside the except block: its traceback holds the failed step's tensors
        free_memory()
        result["peak_bytes"] = None
    flag = torch.tensor([1.0 if oom else 0.0], device=info.device)
    if info.world_size > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    over = limit_bytes is not None and result.get("peak_bytes") is not None and result["peak_bytes"] > limit_bytes
    result["oom"] = bool(flag.item())
    result["fits"] = not result["oom"] and not over
    result.pop("flops", None)
    return result
