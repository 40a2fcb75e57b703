"""Evaluation on held-out shards: loss, top-1, top-5, summed exactly over all ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


@torch.no_grad()
def evaluate(
    engine, loader, augment, device: torch.device, batches: int, image_size: int, whole: bool = True
) -> dict[str, float]:
    """Run exactly ``batches`` forward passes on every rank (ZeRO-3 gathers parameters collectively in forward):
    the rank's own batches, then, once its share of the split is done, a one-image padding batch that counts for
    nothing. ``whole``: ``batches`` is the plan's count for the whole split (else a cap, ``train.eval_batches``).
    Returns eval/loss, eval/top1, eval/top5 (percent) and eval/samples over what was read."""
    was_training = engine.module.training
    engine.module.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top1, top5, count
    real = iter(loader)
    for _ in range(batches):
        batch = next(real, None)
        if batch is None:  # this rank's share is done; the others may still need it in the collective forward
            images = torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8)
            x, _ = augment(images, torch.zeros(1, dtype=torch.long))
            engine(x)
            continue
        x, y = augment(batch["images"], batch["labels"])
        logits = engine(x).logits.float()  # (B, classes)
        totals[0] += F.cross_entropy(logits, y, reduction="sum")
        top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # (B, 5)
        totals[1] += (top5[:, 0] == y).sum()
        totals[2] += (top5 == y[:, None]).any(dim=-1).sum()
        totals[3] += len(y)
    if whole and next(real, None) is not None:  # a share longer than planned would be a bug in the plan
        raise AssertionError("evaluation stream longer than its planned batch count")
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
