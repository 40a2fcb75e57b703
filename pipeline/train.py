"""``dinat-train --config FILE [key=value ...]`` (or ``python -m pipeline.train``): the main job.

Launch with ``accelerate launch``, ``torchrun``, the ``deepspeed`` launcher or ``srun``; rank and world
size come from the process group. Exit codes (:mod:`pipeline.lifecycle`): 0 done, 1 failed (on any rank),
2 bad configuration (nothing was started), 75 checkpointed on SIGTERM/SIGUSR1 (requeue the job to continue),
128+N stopped by signal N without a checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn

import torch.distributed as dist

from .config import ConfigError, load_config
from .distributed import init_distributed, setup_logging
from .lifecycle import EXIT_CONFIG, Lifecycle, exit_code

logger = logging.getLogger("pipeline.train")


def main(argv: list[str] | None = None) -> NoReturn | int:
    p = argparse.ArgumentParser(prog="dinat-train", description="Pretrain DiNAT with DeepSpeed on WebDataset shards.")
    p.add_argument("--config", help="YAML config (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.base_lr=5e-4 train.steps=1000")
    # The deepspeed launcher passes --local_rank=N (it also sets LOCAL_RANK, which is what is used).
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"dinat-train: {e}", file=sys.stderr)
        return EXIT_CONFIG
    info = init_distributed()
    setup_logging(info)
    life = Lifecycle(info)
    life.start()
    try:
        from .trainer import Trainer  # after logging is set up: imports DeepSpeed

        code = Trainer(cfg, info, life).run()
    except BaseException as e:  # any error, on any rank, ends every rank (see pipeline.lifecycle)
        life.fail(exit_code(e), e)
    dist.destroy_process_group()
    life.exit(code)


if __name__ == "__main__":
    sys.exit(main())
