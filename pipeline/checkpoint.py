"""Resume checkpoints: DeepSpeed's own sharded checkpoint plus the pipeline's state, written atomically.

One checkpoint, ``ROOT/step_00000100``::

    COMPLETE          written last, just before the rename; a directory without it is ignored
    state.json        global state from rank 0: the caller's dict + step, world_size, zero_stage
    rank_00000.pt     torch.save of each rank's rank_state (RNG states, data position ...)
    latest            DeepSpeed's tag pointer ("deepspeed"): DeepSpeed's own tools read the directory as is
    zero_to_fp32.py   DeepSpeed's consolidation script, copied by save_checkpoint
    deepspeed/        DeepSpeed's sharded checkpoint (model states, ZeRO optimizer shards, lr scheduler)
    universal/        added by the first resume on another world size (pipeline.reshard), then reused

A save writes ``ROOT/.tmp-step_00000100`` and renames it once every rank's files are on disk, so a job
killed mid-save leaves the earlier checkpoints as they were and a temporary directory that nothing
reads (removed when the next Checkpointer starts or saves). ROOT must be one filesystem shared by all
ranks. ``save`` and ``load`` are collective: every rank calls them (DeepSpeed's ``save_checkpoint`` and
``load_checkpoint`` synchronise all ranks; ZeRO-3 gathers during both).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .data.manifest import fsync_path, read_json, write_json_atomic
from .distributed import DistInfo
from .reshard import UNIVERSAL_TAG, ensure_universal, repair_zero3

logger = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
STATE_NAME = "state.json"
DS_TAG = "deepspeed"  # DeepSpeed's tag: its files live in <checkpoint>/deepspeed/
TMP_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def rank_file_name(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def is_complete(path: Path) -> bool:
    return (Path(path) / COMPLETE).is_file()


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in root.iterdir() if (m := _STEP_DIR.match(d.name)) and is_complete(d)]
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def read_state(path: Path) -> dict[str, Any]:
    """state.json of a complete checkpoint; ValueError naming it otherwise."""
    path = Path(path)
    if not is_complete(path):
        raise ValueError(f"{path}: not a complete checkpoint (no {COMPLETE} marker)")
    return read_json(path / STATE_NAME)


class Checkpointer:
    """Writes, finds, prunes and loads the resume checkpoints under ``root``, keeping the newest ``keep``.

    ``before_commit``: test hook, called on every rank with the temporary directory once all files are
    written and before rank 0 marks it complete (the kill -9 test sleeps there).
    """

    def __init__(self, root: Path, keep: int, dist: DistInfo):
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (the checkpoint just written is always kept), got {keep}")
        self.root, self.keep, self.dist = Path(root), keep, dist
        self.before_commit: Callable[[Path], None] | None = None
        if dist.is_main and self.root.is_dir():
            self._remove_tmp()

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        return latest_checkpoint(self.root)

    def save(self, engine, step: int, state: dict[str, Any], rank_state: dict[str, Any]) -> Path:
        """Write checkpoint ``step`` (all ranks call this); returns ``root/step_XXXXXXXX``."""
        try:  # before any collective, so that every rank fails alike
            json.dumps(state)
        except (TypeError, ValueError) as e:
            raise ValueError(f"checkpoint state must be JSON-serialisable: {e}") from None
        stage = engine.zero_optimization_stage()
        state = {**state, "step": step, "world_size": self.dist.world_size, "zero_stage": stage}
        final = self.root / step_dir_name(step)
        tmp = self.root / f"{TMP_PREFIX}{final.name}"
        if self.dist.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            self._remove_tmp()
            tmp.mkdir()
        self.dist.barrier()
        engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=True)  # collective; ends with a barrier
        torch.save(rank_state, tmp / rank_file_name(self.dist.rank))
        if self.dist.is_main:
            write_json_atomic(tmp / STATE_NAME, state)
        self.dist.barrier()
        self._sync_share(tmp)
        self.dist.barrier()
        if self.before_commit is not None:
            self.before_commit(tmp)
        if self.dist.is_main:
            self._commit(tmp, final)
            self._prune(final)
        self.dist.barrier()
        logger.debug("checkpoint %s written", final)
        return final

    def load(self, engine, path: Path, universal: bool = False) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Load model, optimizer and lr scheduler into ``engine`` (all ranks call this); ``universal``: from the
        checkpoint's universal conversion (:mod:`pipeline.reshard`; the engine was built to load it).

        Returns (state.json's dict, this rank's rank_state; None when the world size changed)."""
        path = Path(path)
        state = read_state(path)
        written, stage = state.get("world_size"), engine.zero_optimization_stage()
        if not universal and (written != self.dist.world_size or state.get("zero_stage") != stage):
            raise ValueError(
                f"{path}: written by {written} ranks with ZeRO stage {state.get('zero_stage')}; this engine has "
                f"{self.dist.world_size} ranks and stage {stage}: it must be built to load the universal conversion"
            )
        newer = [p.name for s, p in complete_checkpoints(self.root) if s > state["step"]]
        if newer and self.dist.is_main:
            logger.warning("loading %s; the newer %s will be replaced as training passes them", path, newer)
        tag = UNIVERSAL_TAG if universal else DS_TAG
        load_path, _ = engine.load_checkpoint(str(path), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)  # fmt: skip
        if load_path is None:
            raise ValueError(f"{path}: DeepSpeed found no checkpoint in {tag}/")
        if universal and stage == 3:
            repair_zero3(engine, path)
        rank_state = None
        if written == self.dist.world_size:  # our own file (RNG states are tuples/numpy, which weights_only refuses)
            rank_state = torch.load(path / rank_file_name(self.dist.rank), map_location="cpu", weights_only=False)
        logger.debug("loaded %s (step %d)", path, state["step"])
        return state, rank_state

    def prepare_universal(self, path: Path, state: dict[str, Any]) -> float | None:
        """Rank 0 converts ``path`` for a resharded resume unless it was already; the others wait. Returns the
        conversion's seconds on rank 0 (None when there was nothing to do, and on the other ranks)."""
        seconds = None
        if self.dist.is_main:
            seconds = ensure_universal(Path(path), Path(path) / DS_TAG, int(state["world_size"]))
        self.dist.barrier()
        return seconds

    # -- internals --
    def _sync_share(self, tmp: Path) -> None:
        """fsync this rank's share of the files (any rank may fsync any file of a shared filesystem)."""
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        for f in files[self.dist.rank :: self.dist.world_size]:
            fsync_path(f)

    def _commit(self, tmp: Path, final: Path) -> None:
        missing = [rank_file_name(r) for r in range(self.dist.world_size) if not (tmp / rank_file_name(r)).is_file()]
        if missing:
            raise RuntimeError(f"{tmp}: missing {', '.join(missing)}; is {self.root} on a filesystem all ranks share?")
        for d in (tmp / DS_TAG, tmp):
            fsync_path(d)
        with open(tmp / COMPLETE, "w") as f:
            f.write(f"{final.name}\n")
            f.flush()
            os.fsync(f.fileno())
        fsync_path(tmp)
        if final.exists():  # a rerun over an older trajectory: replace it (it is never half visible)
            logger.warning("%s exists; replacing it", final)
            self._delete(final)
        os.rename(tmp, final)
        fsync_path(self.root)

    def _prune(self, just_written: Path) -> None:
        found = complete_checkpoints(self.root)
        for _, path in found[: max(0, len(found) - self.keep)]:
            if path != just_written:
                self._delete(path)

    def _delete(self, path: Path) -> None:
        """Hide ``path`` under a temporary name first, so that an interrupted delete leaves nothing visible."""
        trash = self.root / f"{TMP_PREFIX}deleting-{path.name}"
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(path, trash)
        shutil.rmtree(trash)
        logger.info("removed checkpoint %s", path.name)

    def _remove_tmp(self) -> None:
        for d in self.root.glob(f"{TMP_PREFIX}*"):
            logger.warning("removing %s (left by an interrupted save)", d)
            shutil.rmtree(d, ignore_errors=True)
