"""``python tests/fault_inject.py --config ... [overrides]``: ``dinat-train`` with one fault injected (failure tests).

``DINAT_FAULT=WHERE:RANK:N`` chooses the fault; the time it fires is appended to the file ``DINAT_FAULT_MARK``.

* ``main``: the training step of optimizer step ``N`` raises.
* ``worker``: the data pipeline raises at its ``N``-th sample: in a DataLoader worker, or in the main process
  with ``data.workers=0``.
* ``loop``: the training step of step ``N`` never returns (a Python loop, as a bug would).
* ``startup``: start-up sleeps for ``N`` seconds before reading the dataset.

``RANK`` is the rank that faults, or ``all``. Test-only: the project itself has no fault hooks.
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages, not an installed copy

import pipeline.data.build as build  # noqa: E402
import pipeline.data.loader as loader  # noqa: E402
import pipeline.trainer as trainer  # noqa: E402
from pipeline.train import main  # noqa: E402

WHERE, RANK, N = os.environ["DINAT_FAULT"].split(":")
N = int(N)


def _mine(rank: int) -> bool:
    return RANK == "all" or int(RANK) == rank


def _mark() -> None:
    with open(os.environ["DINAT_FAULT_MARK"], "a") as f:
        f.write(f"{time.time()}\n")


if WHERE == "main":
    step = trainer.Trainer.train_step

    def train_step(self, batches, timer):
        if self.step + 1 == N and _mine(self.info.rank):
            _mark()
            raise RuntimeError(f"injected fault in the training step on rank {self.info.rank}")
        return step(self, batches, timer)

    trainer.Trainer.train_step = train_step

elif WHERE == "worker":
    samples = loader.ShardStream._samples

    def _samples(self, *args, **kw):
        for k, sample in enumerate(samples(self, *args, **kw), 1):
            if k == N and _mine(self.rank):
                _mark()
                raise RuntimeError(f"injected fault in the data pipeline on rank {self.rank}")
            yield sample

    loader.ShardStream._samples = _samples

elif WHERE == "loop":
    step = trainer.Trainer.train_step

    def train_step(self, batches, timer):
        if self.step + 1 == N and _mine(self.info.rank):
            _mark()
            while True:
                time.sleep(0.01)
        return step(self, batches, timer)

    trainer.Trainer.train_step = train_step

elif WHERE == "startup":
    resolve = build.resolve_dataset

    def resolve_dataset(data, info):
        _mark()
        time.sleep(N)
        return resolve(data, info)

    trainer.resolve_dataset = resolve_dataset

else:
    raise SystemExit(f"DINAT_FAULT: unknown place {WHERE!r}")

sys.exit(main())
