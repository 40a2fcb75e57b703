"""Measured memory on any device: live tensor storages, a step's peak beyond them, an engine's model states.

On CPU there are no allocator statistics; these count tensor storages exactly (unique storages, so views
and shared buffers count once). They see Python-reachable tensors only (autograd's saved tensors are
reachable through the graph while it exists, so measure between steps).
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Iterable

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from dinat.memory import PeakTensorMemory


def live_tensors() -> list[torch.Tensor]:
    """Every tensor the garbage collector can reach, meta tensors excluded."""
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on deprecated module attributes warns
        warnings.simplefilter("ignore", FutureWarning)
        return [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.device.type != "meta"]


def live_storages() -> dict[int, int]:
    """{storage id: bytes} of every tensor the garbage collector can reach (meta tensors excluded)."""
    out: dict[int, int] = {}
    for t in live_tensors():
        try:
            storage = t.untyped_storage()
        except RuntimeError:  # tensors without storage (e.g. some subclasses)
            continue
        key = StorageWeakRef(storage).cdata
        out[key] = max(out.get(key, 0), storage.nbytes())
    return out


def storage_bytes(tensors: Iterable[torch.Tensor], exclude: set[int] | None = None) -> int:
    """Bytes of the unique storages of ``tensors`` (those in ``exclude`` left out; ids are added to it)."""
    seen = set() if exclude is None else exclude
    total = 0
    for t in tensors:
        key = StorageWeakRef(t.untyped_storage()).cdata
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


class NewTensorMemory(PeakTensorMemory):
    """:class:`dinat.memory.PeakTensorMemory` that ignores the storages of ``existing`` tensors.

    PeakTensorMemory counts a pre-existing storage as new once an op inside the context returns a view
    of it (``weight.t()`` in a linear's backward), so it would count parameters and optimizer states
    part-way through a step. Seeding them as zero-byte entries keeps them out (``setdefault`` keeps the
    first entry).
    """

    def __init__(self, existing: Iterable[torch.Tensor] = ()):
        super().__init__()
        for t in existing:
            ref = StorageWeakRef(t.untyped_storage())
            self._live[ref.cdata] = (ref, 0)


def _inner_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)


def engine_state_bytes(engine) -> dict[str, int]:
    """Bytes this rank holds of model parameters (ZeRO-3: its partitions plus whole persistent ones), fp32
    master weights and Adam moments of a DeepSpeed engine, read from DeepSpeed's own attributes."""
    seen: set[int] = set()
    params = list(engine.module.parameters())
    partitions = [p.ds_tensor for p in params if getattr(p, "ds_tensor", None) is not None]
    out = {"params": storage_bytes([p for p in params if p.numel() > 0] + partitions, seen)}
    opt = engine.optimizer
    master: list[torch.Tensor] = []
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups"):
        for group in getattr(opt, name, None) or []:
            master.extend(group if isinstance(group, list) else [group])
    out["master"] = storage_bytes(master, seen)
    inner = _inner_optimizer(opt)
    moments = [t for state in inner.state.values() for t in state.values() if torch.is_tensor(t) and t.numel() > 1]
    out["moments"] = storage_bytes(moments, seen)
    return out
