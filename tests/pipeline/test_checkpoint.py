"""Resume checkpoints with real DeepSpeed engines in a real 2-rank gloo group (ZeRO 2 and 3)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import COMPLETE, STATE_NAME, Checkpointer, latest_checkpoint
from pipeline.distributed import DistInfo
from tests.progress import wait_while_busy

from .ds_helpers import PRECISIONS, resume_worker, run_ranks, zero_run

pytest.importorskip("deepspeed")
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_round_trip_restores_params_optimizer_and_rank_state(stage, precision, tmp_path_factory):
    root, results = zero_run(stage, tmp_path_factory, precision)
    for rank, res in enumerate(results):
        ref, loaded, cont = res["ref"], res["loaded"], res["continued"]
        assert not torch.equal(res["fresh_params"], ref[4]["params"])  # the fresh engine starts elsewhere
        assert torch.equal(loaded["params"], ref[4]["params"])
        assert torch.equal(loaded["logits"], ref[4]["logits"])
        assert loaded["global_steps"] == 4
        assert loaded["lr"] == ref[4]["lr"]  # DeepSpeed's WarmupLR came back
        # Adam moments and step came back: one more step from the loaded state is the original step 5.
        assert torch.equal(cont["params"], ref[5]["params"])
        assert cont["lr"] == ref[5]["lr"]
        assert res["rank_state"]["rank"] == rank and res["rank_state"]["position"] == 400 + rank
        assert res["state"]["step"] == 4 and res["state"]["world_size"] == 2 and res["state"]["zero_stage"] == stage
        assert res["state"]["image_size"] == 32 and len(res["state"]["classes"]) == 4
    assert [p.name for p in results[0]["paths"]] == ["step_00000002", "step_00000004", "step_00000005"]
    assert results[0]["dirs"] == ["step_00000004", "step_00000005"]  # keep=2 pruned step 2, no tmp left
    assert results[0]["latest"] == results[1]["latest"] == root / "step_00000005"
    ckpt = root / "step_00000005"
    names = {p.name for p in ckpt.iterdir()}
    assert {COMPLETE, STATE_NAME, "rank_00000.pt", "rank_00001.pt", "latest", "deepspeed"} <= names
    assert (ckpt / "latest").read_text() == "deepspeed"  # DeepSpeed's own tools can read the directory


def _fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    d = root / f"step_{step:08d}"
    (d / "deepspeed").mkdir(parents=True)
    (d / STATE_NAME).write_text(json.dumps({"step": step, "world_size": 1}))
    if complete:
        (d / COMPLETE).write_text("\n")
    return d


def test_latest_ignores_incomplete_and_temporary_dirs(tmp_path):
    _fake_checkpoint(tmp_path, 10)
    ok = _fake_checkpoint(tmp_path, 200)
    _fake_checkpoint(tmp_path, 300, complete=False)  # no marker
    (tmp_path / ".tmp-step_00000400" / "deepspeed").mkdir(parents=True)
    (tmp_path / ".tmp-step_00000400" / COMPLETE).write_text("\n")
    (tmp_path / "step_00000500").write_text("a file")
    assert latest_checkpoint(tmp_path) == ok
    assert latest_checkpoint(tmp_path / "missing") is None
    Checkpointer(tmp_path, keep=2, dist=DistInfo())  # startup removes the leftover temporary directory
    assert not (tmp_path / ".tmp-step_00000400").exists()
    assert Checkpointer(tmp_path, keep=2, dist=DistInfo()).latest() == ok


def test_load_and_save_refuse_bad_input_with_one_line(tmp_path):
    ck = Checkpointer(tmp_path, keep=1, dist=DistInfo())
    partial = _fake_checkpoint(tmp_path, 5, complete=False)
    with pytest.raises(ValueError, match=r"step_00000005: not a complete checkpoint \(no COMPLETE marker\)$"):
        ck.load(None, partial)  # refused before DeepSpeed is touched
    with pytest.raises(ValueError, match="must be JSON-serialisable"):
        ck.save(None, 1, {"config": object()}, {})
    with pytest.raises(ValueError, match="keep must be >= 1"):
        Checkpointer(tmp_path, keep=0, dist=DistInfo())


def test_kill_9_during_save_leaves_previous_checkpoint_usable(tmp_path):
    root, ready = tmp_path / "ckpt", tmp_path / "ready"
    code = (
        "from tests.pipeline.ds_helpers import run_ranks, save_then_hang_worker; "
        f"run_ranks(save_then_hang_worker, {str(root)!r}, {str(ready)!r}, idle_s=3600)"
    )
    log = open(tmp_path / "job.log", "w")  # a file, not a pipe that nobody drains
    job = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, start_new_session=True, stdout=log, stderr=log)
    try:

        def there() -> bool:
            assert job.poll() is None, (tmp_path / "job.log").read_text()[-3000:]
            return ready.exists()

        wait_while_busy(lambda: [job.pid], there, "the job reaching the save of step 3")
        tmp = Path(ready.read_text())
        assert tmp.name == ".tmp-step_00000003"
        assert len(list((tmp / "deepspeed").glob("*optim_states.pt"))) == 2  # DeepSpeed had written its files
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # the whole job: launcher and both ranks
        job.wait()
        log.close()
    assert latest_checkpoint(root) == root / "step_00000002"
    assert (root / ".tmp-step_00000003").is_dir()

    run_ranks(resume_worker, str(root), str(tmp_path))
    ref = torch.load(tmp_path / "ref2.pt")
    for rank in range(2):
        res = torch.load(tmp_path / f"resume{rank}.pt", weights_only=False)
        assert res["latest"] == root / "step_00000002"
        # an engine not built for a universal load refuses another world size or stage (pipeline.resume decides)
        built = "this engine has 2 ranks and stage 3: it must be built to load the universal conversion"
        assert "written by 4 ranks with ZeRO stage 3; " + built in res["world_size_error"]
        assert "written by 2 ranks with ZeRO stage 2; " + built in res["zero_stage_error"]
        assert res["state"]["step"] == 2 and res["rank_state"] == {"rank": rank}
        assert torch.equal(res["logits"], ref)
        assert res["saved"] == root / "step_00000003"
        assert res["dirs_at_end"] == ["step_00000002", "step_00000003"]
    assert ".tmp-step_00000003" not in torch.load(tmp_path / "resume0.pt", weights_only=False)["dirs_at_start"]
