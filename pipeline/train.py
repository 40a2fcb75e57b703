"""``dinat-train --config FILE [key=value ...]`` (or ``python -m pipeline.train``): the main job.

Launch with ``accelerate launch``, ``torchrun``, the ``deepspeed`` launcher or ``srun``; rank and world
size come from the process group. Exit codes: 0 done, 2 bad configuration (nothing was started),
75 checkpointed on SIGTERM/SIGUSR1 (requeue the job to continue), 1 anything else.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch.distributed as dist

from .config import ConfigError, load_config
from .distributed import init_distributed, setup_logging

logger = logging.getLogger("pipeline.train")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dinat-train", description="Pretrain DiNAT with DeepSpeed on WebDataset shards.")
    p.add_argument("--config", help="YAML config (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.base_lr=5e-4 train.steps=1000")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"dinat-train: {e}", file=sys.stderr)
        return 2
    info = init_distributed()
    setup_logging(info)
    from .trainer import Trainer  # after logging is set up: imports DeepSpeed

    try:
        trainer = Trainer(cfg, info)
    except ConfigError as e:
        logger.error("%s", e)
        dist.destroy_process_group()
        return 2
    code = trainer.run()
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
