"""Smoke run: a few optimizer steps of a DiNAT variant on one random batch (the loss must fall).

python -m dinat --variant dinat_debug --steps 20
"""

from __future__ import annotations

import argparse
import logging
import math
import time

import torch

from .variants import create_model, default_resolution, list_models


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="forward/backward smoke run of a DiNAT variant")
    p.add_argument("--variant", default="dinat_debug", choices=list_models())
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--backend", default="auto", choices=["auto", "natten", "reference"])
    p.add_argument("--activation-checkpointing", default="none")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    log = logging.getLogger("dinat.smoke")

    torch.manual_seed(0)
    ac = args.activation_checkpointing
    model = create_model(
        args.variant,
        device=args.device,
        attention_backend=args.backend,
        activation_checkpointing=int(ac) if ac.isdigit() else ac,
        drop_path_rate=0.0,
    ).to(args.device)
    res = args.resolution or default_resolution(args.variant)
    x = torch.randn(args.batch_size, 3, res, res, device=args.device)
    y = torch.randint(0, model.config.n_labels, (args.batch_size,), device=args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    log.info(
        "%s: %.2fM parameters, %dpx, backend %s", args.variant, model.num_parameters / 1e6, res, model.attention_backend
    )
    losses = []
    t0 = time.perf_counter()
    for step in range(args.steps):
        loss = model(x, labels=y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise SystemExit(f"non-finite loss at step {step}: {losses[-1]}")
    dt = (time.perf_counter() - t0) / args.steps
    log.info(
        "loss %.4f -> %.4f over %d steps, %.3f s/step, %.1f img/s",
        losses[0],
        losses[-1],
        args.steps,
        dt,
        args.batch_size / dt,
    )
    if args.steps >= 5 and not losses[-1] < losses[0]:
        raise SystemExit(f"loss did not fall: {losses[0]:.4f} -> {losses[-1]:.4f}")


if __name__ == "__main__":
    main()
