"""Which checkpoint a run resumes from, and how: as written, or resharded for another world size.

Decided before the DeepSpeed engine exists (an engine that loads a universal checkpoint is configured for it):
:func:`plan_resume` picks the checkpoint (``run.resume``), reads its state.json, refuses what cannot be resumed
(a ConfigError naming the checkpoint), and has rank 0 convert it once when the world size or the ZeRO stage (1 <->
2) changed (:mod:`pipeline.reshard`).
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import Checkpointer, read_state
from .config import ConfigError
from .distributed import DistInfo
from .reshard import Unresumable, check_model, needs_universal


@dataclass(frozen=True)
class Resume:
    path: Path
    state: dict[str, Any]  # the checkpoint's state.json
    universal: bool  # load the universal conversion (another world size or ZeRO stage)
    converted_s: float | None = None  # seconds rank 0 spent converting (None: not converted by this job)

    def describe(self, info: DistInfo, data: str) -> str:
        """One line for the log and TensorBoard: from where, on how many ranks, and what the data does."""
        text = f"resumed from {self.path} at step {self.state['step']}"
        written = self.state["world_size"]
        if self.universal:
            how = (f"converted to DeepSpeed's universal format in {self.converted_s:.1f} s" if self.converted_s
                   else "from its universal conversion")  # fmt: skip
            text += f" written by {written} ranks on {info.world_size} ranks ({how})"
        return f"{text}; data: {data}"


def plan_resume(choice: str, checkpointer: Checkpointer, model: torch.nn.Module, info: DistInfo,
                zero_stage: int) -> Resume | None:  # fmt: skip
    """The checkpoint to resume from (``run.resume``: auto, none or a path) and how to load it."""
    path = None if choice == "none" else checkpointer.latest() if choice == "auto" else Path(choice)
    if path is None:
        return None
    try:
        state = read_state(path)
        universal = needs_universal(path, state, info.world_size, zero_stage)
        if universal:
            check_model(model, path, int(state["world_size"]))
        seconds = checkpointer.prepare_universal(path, state) if universal else None
    except (Unresumable, ValueError, FileNotFoundError) as e:
        raise ConfigError(f"run.resume: {e}") from None
    return Resume(path, state, universal, seconds)


def reseed(seed: int, step: int, rank: int) -> None:
    """Fresh global RNG streams for a rank that has no saved ones (a resume on another world size)."""
    value = zlib.crc32(f"{seed}/{step}/{rank}".encode())
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)
