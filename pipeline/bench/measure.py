"""Measured memory on CPU: live tensor storages, and a step's peak beyond them.

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
