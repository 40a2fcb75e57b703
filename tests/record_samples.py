"""``DINAT_RECORD=DIR python tests/record_samples.py --config ... [overrides]``: ``dinat-train`` that appends each
micro-batch it trains on (sample keys and the epoch each is read for) to ``DIR/rank<r>.jsonl`` (elastic-resume
tests: which samples a job consumed, across restarts). Test-only: the project itself records nothing per sample.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages, not an installed copy

import pipeline.trainer as trainer  # noqa: E402
from pipeline.train import main  # noqa: E402

batches = trainer.Trainer._batches


def _recorded(self):
    path = Path(os.environ["DINAT_RECORD"]) / f"rank{self.info.rank}.jsonl"
    with open(path, "a") as f:
        for batch in batches(self):
            f.write(json.dumps({"step": self.step, "keys": batch["keys"], "epochs": batch["epochs"].tolist()}) + "\n")
            f.flush()
            yield batch


trainer.Trainer._batches = _recorded
sys.exit(main())
