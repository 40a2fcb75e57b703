"""``dinat-bench``: timed DiNAT training steps through the training engine, and a memory plan.

    dinat-bench --variant dinat_large --micro-batch 128 --compare swin_large_patch4_window7_224,convnext_large
    dinat-bench --variant dinat_large --plan --precision bf16 --attention-backend natten --zero-stage 2
    dinat-bench --variant dinat_large --find-max-batch --zero-stage 3 --activation-checkpointing all

Modules: :mod:`.cli` (arguments, entry point), :mod:`.report` (a run, figures, table), :mod:`.steps` (one
model in the engine, timed), :mod:`.measure` (memory measured on any device), :mod:`.activations` and
:mod:`.memory_plan` (memory predicted), :mod:`.search` (largest micro-batch); :mod:`.gpu_check` runs all of
it on a GPU in bounded time.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """``dinat-bench``; imported on call, so that ``pipeline.bench.gpu_check`` loads without torch and timm."""
    from .cli import main as cli_main

    return cli_main(argv)


__all__ = ["main"]
