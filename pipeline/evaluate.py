"""Evaluation on held-out shards: loss, top-1, top-5, summed exactly over all ranks."""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
import torch.nn.functional as F


@torch.no_grad()
def evaluate(engine, loader, augment, device: torch.device, max_batches: int | None = None) -> dict[str, float]:
    """Every rank must run the same number of batches (epoch mode guarantees it; ZeRO-3 gathers
    parameters collectively in forward). Returns eval/loss, eval/top1, eval/top5 (percent), eval/samples."""
    was_training = engine.module.training
    engine.module.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top1, top5, count
    for batch in itertools.islice(loader, max_batches):
        x, y = augment(batch["images"], batch["labels"])
        logits = engine(x).logits.float()
        totals[0] += F.cross_entropy(logits, y, reduction="sum")
        top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        totals[1] += (top5[:, 0] == y).sum()
        totals[2] += (top5 == y[:, None]).any(dim=-1).sum()
        totals[3] += len(y)
    if dist.is_initialized():
        dist.all_reduce(totals)
    engine.module.train(was_training)
    n = max(totals[3].item(), 1.0)
    return {
        "eval/loss": totals[0].item() / n,
        "eval/top1": 100 * totals[1].item() / n,
        "eval/top5": 100 * totals[2].item() / n,
        "eval/samples": totals[3].item(),
    }
