"""Elastic resume of real training jobs (CPU, gloo, DeepSpeed ZeRO-2): 2 ranks x 2 workers -> 1 rank x 1 worker
-> 3 ranks x 1 worker in epoch mode, each job stopped mid-epoch. Every sample of the interrupted epoch is trained
on exactly once, and the next epoch whole; the logs and TensorBoard say how each job resumed."""

import json
import re
from collections import Counter

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline.data.manifest import read_manifest
from tests.e2e import REPO, launch, wait

RECORD = str(REPO / "tests" / "record_samples.py")


def test_two_to_one_to_three_ranks_in_epoch_mode(shards, tmp_path):
    run, record = tmp_path / "run", tmp_path / "samples"
    record.mkdir()
    common = ["data.mode=epoch", "train.global_batch_size=12", "train.checkpoint_every=100", "run.export=false",
              "train.eval_every=1000"]  # fmt: skip
    n = read_manifest(shards)["splits"]["train"]["samples"]  # 192: 16 steps an epoch
    jobs = [(2, 2, 7), (1, 1, 13), (3, 1, 2 * n // 12)]  # ranks, workers, train.steps (the last ends epoch 1)
    for i, (world, workers, steps) in enumerate(jobs):
        procs = launch(run, shards, *common, f"data.workers={workers}", f"train.steps={steps}", world=world,
                       script=RECORD, extra_env={"DINAT_RECORD": str(record)}, log_name=f"job{i}")  # fmt: skip
        assert wait(procs) == [0] * world, (tmp_path / f"job{i}.rank0.log").read_text()[-3000:]
    consumed = Counter()
    for path in record.glob("rank*.jsonl"):
        for line in path.read_text().splitlines():
            batch = json.loads(line)
            consumed.update(zip(batch["epochs"], batch["keys"]))
    keys = {key for _, key in consumed}
    assert len(keys) == n
    for epoch in (0, 1):
        assert Counter(k for e, k in consumed.elements() if e == epoch) == Counter(keys), epoch
    assert {e for e, _ in consumed} == {0, 1}
    second, third = (tmp_path / "job1.rank0.log").read_text(), (tmp_path / "job2.rank0.log").read_text()
    assert re.search(r"resumed from \S+step_00000007 at step 7 written by 2 ranks on 1 ranks \(converted to "
                     r"DeepSpeed's universal format in [\d.]+ s\); data: 2 ranks x 2 workers -> 1 x 1: \d+ unread "
                     r"samples of epoch\(s\) 0 re-split, then epoch 1 on", second)  # fmt: skip
    assert re.search(r"at step 13 written by 1 ranks on 3 ranks .* 1 ranks x 1 workers -> 3 x 1", third)
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    assert "train/resume/text_summary" in acc.Tags()["tensors"]
