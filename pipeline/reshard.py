"""Resuming a checkpoint on another number of ranks, or after a ZeRO stage change between 1 and 2.

DeepSpeed's ZeRO files are partitioned by rank. Its ``ds_to_universal`` rewrites a checkpoint per parameter (fp32
weights, Adam moments, step), in a form any number of ranks loads (``checkpoint.load_universal``). The conversion
runs once per checkpoint, on rank 0 while the others wait, into ``<checkpoint>/.tmp-universal``, renamed to
``<checkpoint>/universal`` when complete; later restarts reuse it. It costs about the checkpoint's size again on
disk, and every rank then reads the whole fp32 state (12 bytes per parameter) rather than its shard.

Tested on CPU with gloo (tests/pipeline/test_reshard.py): after loading on another world size, fp32 master
weights, Adam moments, step and learning rate equal the checkpoint's bitwise, for ZeRO 1, 2 and 3 in fp32 and
bf16. Two DeepSpeed 0.19 defects in the ZeRO-3 universal load are corrected here (:func:`repair_zero3`).
Refused, each with one line naming the checkpoint: a change from or to ZeRO-3 (the universal format has no
per-parameter step for ZeRO-3, and the model-state files differ), a checkpoint missing a rank's files, and a
model with buffers or frozen parameters (a universal load restores neither; DiNAT has none).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .data.manifest import fsync_path

logger = logging.getLogger(__name__)

UNIVERSAL_TAG = "universal"
_TMP = ".tmp-universal"


class Unresumable(ValueError):
    """A checkpoint that cannot be resumed as this job is set up; the message says what to do instead."""


def _advice(path: Path, written: int) -> str:
    return (
        f"resume it with {written} ranks and the ZeRO stage it was written with, or start a new run from its "
        f"weights (dinat-export {path} OUT, then model.init_from=OUT)"
    )


def needs_universal(path: Path, state: dict[str, Any], world_size: int, stage: int) -> bool:
    """Whether resuming ``path`` (``state``: its state.json) on ``world_size`` ranks with ZeRO ``stage`` goes
    through the universal format; Unresumable when it cannot be done at all."""
    written, written_stage = int(state["world_size"]), int(state["zero_stage"])
    if written_stage != stage and {written_stage, stage} != {1, 2}:
        raise Unresumable(
            f"{path}: written with ZeRO stage {written_stage}, this job uses stage {stage}; only 1 <-> 2 converts; "
            + _advice(path, written)
        )
    if stage == 0:
        return False  # not partitioned: every rank loads the whole state as it is
    return written != world_size or written_stage != stage


def check_model(model: torch.nn.Module, path: Path, written: int) -> None:
    """A universal load restores parameters that train, nothing else: refuse a model with more state."""
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    buffers = [n for n, _ in model.named_buffers()]
    if frozen or buffers:
        what = ", ".join((frozen + buffers)[:3])
        raise Unresumable(f"{path}: the model has buffers or frozen parameters ({what}), which a resharded "
                          "resume would not restore; " + _advice(path, written))  # fmt: skip


def _rank_files(ds_dir: Path) -> set[int]:
    ranks = set()
    for f in ds_dir.glob("*zero_pp_rank_*_optim_states.pt"):
        ranks.add(int(f.name.split("zero_pp_rank_")[1].split("_")[0]))
    return ranks


def ensure_universal(path: Path, ds_dir: Path, written: int, workers: int = 4) -> float | None:
    """Convert ``ds_dir`` (the DeepSpeed folder of checkpoint ``path``) into ``path/universal`` unless it is
    there; seconds taken, or None when it was already converted. Call on one rank only."""
    target = path / UNIVERSAL_TAG
    if target.is_dir():
        return None
    missing = sorted(set(range(written)) - _rank_files(ds_dir))
    if missing:
        raise Unresumable(f"{path}: the optimizer files of rank(s) {missing} are missing; " + _advice(path, written))
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    tmp = path / _TMP
    shutil.rmtree(tmp, ignore_errors=True)  # left by a conversion that was killed
    args = argparse.Namespace(
        input_folder=str(ds_dir),
        output_folder=str(tmp),  # not inside input_folder: the converter walks it
        num_extract_workers=workers,
        num_merge_workers=workers,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # the engine saves that info only for models that carry it
    )
    start = time.monotonic()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the converter prints its progress
            ds_to_universal(args)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise Unresumable(f"{path}: DeepSpeed could not convert it ({type(e).__name__}: {e}); "
                          + _advice(path, written)) from None  # fmt: skip
    (path / "latest_universal").unlink(missing_ok=True)  # names the temporary folder; the tag is always explicit
    _fsync_tree(tmp)
    os.rename(tmp, target)
    fsync_path(path)
    return time.monotonic() - start


def repair_zero3(engine, path: Path) -> None:
    """After a ZeRO-3 universal load, DeepSpeed 0.19 (``load_hp_checkpoint_state_from_checkpoint_dir_stage3``)
    gives every parameter group the first group's hyperparameters (the no-decay group comes back with weight
    decay), and one shared ``step`` tensor to every sub-group, which torch's AdamW then advances once per
    sub-group and step. Both are put back from the converted optimizer state."""
    saved = torch.load(path / UNIVERSAL_TAG / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False)
    groups = engine.optimizer.optimizer.param_groups
    for group, state in zip(groups, saved["optimizer_state_dict"]["param_groups"]):
        group.update({k: v for k, v in state.items() if k != "params"})
    for state in engine.optimizer.optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*"), reverse=True):
        fsync_path(p)
    fsync_path(root)
