"""The project's sbatch scripts on a real Slurm (two slurmd on this host, see cluster.py), with the CPU
demo config: a 2-node job that is signalled and requeued twice and finishes from its checkpoints, the
export job that waits for it, and the shards array with its merge job."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.data.manifest import read_manifest
from pipeline.data.shards import main as make_shards
from tests.pipeline.test_shards import make_tars
from tests.slurm.cluster import LocalSlurm, SlurmUnavailable

ROOT = Path(__file__).resolve().parents[2]
# The scripts ask for GPUs and many CPUs; this host has neither.
CPU_JOB = ["--gpus-per-node=0", "--cpus-per-task=1"]
STEPS = 60


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    try:
        cluster = LocalSlurm(tmp_path_factory.mktemp("slurm")).start()
    except SlurmUnavailable as e:
        pytest.skip(f"no local Slurm: {e}")
    yield cluster
    cluster.stop()


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def _steps_logged(log: Path) -> list[int]:
    text = log.read_text() if log.exists() else ""
    return [int(s) for s in re.findall(rf"step (\d+)/{STEPS} loss", text)]


def _release_requeued(slurm: LocalSlurm, jid: int, restarts: int) -> None:
    """Wait until the job is pending again after its n-th requeue, then start it now: Slurm holds a
    requeued job back for about two minutes. slurmd refuses a credential issued in the same second as the
    previous run's revocation ("Job credential revoked"), so let the nodes go idle and a second pass first."""
    _wait_for(
        lambda: (j := slurm.job(jid)).get("Restarts") == str(restarts) and j.get("JobState") == "PENDING",
        120,
        f"job {jid} pending after requeue {restarts}",
    )
    _wait_for(slurm.nodes_idle, 60, "the nodes to finish the previous run")
    time.sleep(2)
    slurm.scontrol("update", f"jobid={jid}", "StartTime=now")


def test_pretrain_two_nodes_requeue_then_export(slurm, tmp_path):
    run, data = tmp_path / "run", tmp_path / "synthetic"
    log = tmp_path / "pretrain.out"
    overrides = [
        f"data.train={data}",
        f"data.val={data}",
        f"run.output_dir={run}",
        "run.export=false",  # the export job does it
        f"train.steps={STEPS}",
        "train.log_every=5",
        f"train.eval_every={STEPS}",
        "train.eval_batches=2",
        "train.checkpoint_every=1000",  # only the signals and the end write checkpoints
    ]
    jid = slurm.sbatch(
        "--nodes=2", "--ntasks-per-node=1", *CPU_JOB, f"--output={log}",
        "slurm/pretrain.sbatch", "configs/demo_cpu.yaml", *overrides, cwd=ROOT,
    )  # fmt: skip
    export_dir = tmp_path / "export"
    ejid = slurm.sbatch(
        f"--dependency=afterok:{jid}", "--cpus-per-task=1", f"--output={tmp_path / 'export.out'}",
        "slurm/export.sbatch", str(run / "checkpoints"), str(export_dir), cwd=ROOT,
    )  # fmt: skip

    # 1. Two nodes, one rank each, training.
    _wait_for(lambda: any(s >= 15 for s in _steps_logged(log)), 400, "step 15 in the log")
    job = slurm.job(jid)
    assert (job["NodeList"], job["NumNodes"], job["NumTasks"]) == ("n[1-2]", "2", "2")
    assert slurm.job(ejid)["JobState"] == "PENDING"  # held by afterok
    # 2. The time-limit signal (what --signal=USR1@600 sends the ranks): checkpoint, exit 75, self-requeue.
    slurm.scancel("--signal=USR1", str(jid))
    _release_requeued(slurm, jid, 1)
    _wait_for(lambda: any(s >= 35 for s in _steps_logged(log)), 300, "step 35 after the first resume")
    # 3. A requeue from outside (preemption does the same): TERM, checkpoint, Slurm requeues the job.
    slurm.scontrol("requeue", str(jid))
    _release_requeued(slurm, jid, 2)
    job = slurm.wait(jid, 400)
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), log.read_text()[-3000:]

    text = log.read_text()
    assert "micro batch 32 x accumulation 1 x 2 ranks = 64" in text
    resumed = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", text)]
    assert len(resumed) == 2 and 15 <= resumed[0] < resumed[1] < STEPS, resumed
    assert "checkpointed on the time-limit signal; requeueing" in text
    assert "checkpointed after TERM" in text
    # Every run continued from where the previous one stopped: no step logged twice, none missing.
    steps = _steps_logged(log)
    assert steps == list(range(5, STEPS + 1, 5)), steps
    assert f"done: {STEPS} steps" in text
    final = run / "checkpoints" / f"step_{STEPS:08d}"
    assert (final / "COMPLETE").is_file()

    # 4. The export ran after the training job completed, from its final checkpoint.
    job = slurm.wait(ejid, 300)
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), (tmp_path / "export.out").read_text()[-3000:]
    exported = load_file(export_dir / "model.safetensors")
    trained = torch.load(final / "deepspeed" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    trained = trained["module"]
    assert set(trained) < set(exported)
    for key, value in exported.items():
        if key in trained:
            torch.testing.assert_close(value, trained[key].float(), rtol=0, atol=0, msg=key)
        else:  # the model trains without RPB; HF's layout has the tensor, zero
            assert key.endswith(".rpb") and not value.any(), key


SHARDS_JOB = [*CPU_JOB, "--mem=1G"]  # the script asks for what ImageNet-22k needs


def submit_shards(
    slurm, tmp_path, array: str, name: str, *args: str, env: str = "ALL", plan: bool = True
) -> tuple[str, str]:
    """shards.sbatch's three jobs: the plan (unless ``plan`` is False), the array that waits for it, and the merge
    that waits for the array: (array job id, merge job id)."""
    out = args[1]
    after = []
    if plan:
        planned = slurm.sbatch(*SHARDS_JOB, f"--output={tmp_path}/{name}-plan.out", "slurm/shards.sbatch", "--plan",
                               *args, cwd=ROOT)  # fmt: skip
        after = [f"--dependency=afterok:{planned}"]
    tasks = slurm.sbatch(
        *after, f"--array={array}", f"--export={env}", *SHARDS_JOB, f"--output={tmp_path}/{name}-%a.out",
        "slurm/shards.sbatch", *args, cwd=ROOT,
    )  # fmt: skip
    merge = slurm.sbatch(
        f"--dependency=afterok:{tasks}", *SHARDS_JOB, f"--output={tmp_path}/{name}-merge.out",
        "slurm/shards.sbatch", "--merge", out, cwd=ROOT,
    )  # fmt: skip
    return tasks, merge


def test_shards_array_then_merge(slurm, tmp_path):
    src = tmp_path / "raw"
    make_tars(src, {f"n{i:08d}": 14 for i in range(6)})
    common = ["--val-per-class", "2", "--shard-samples", "8", "--seed", "3"]
    out = tmp_path / "shards"
    array, merge = submit_shards(slurm, tmp_path, "0-2", "shards", str(src), str(out), *common)
    slurm.wait(array, 300)
    tasks = slurm.array_jobs(array)
    assert sorted(t["ArrayTaskId"] for t in tasks) == ["0", "1", "2"]
    assert {(t["JobState"], t["ExitCode"]) for t in tasks} == {("COMPLETED", "0:0")}
    job = slurm.wait(merge, 120)
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), (tmp_path / "shards-merge.out").read_text()
    assert sorted(p.name for p in out.glob("manifest.part-*.json")) == [
        f"manifest.part-{i:05d}-of-00003.json" for i in range(3)
    ]
    # The tars' headers were read once, by the plan job; each task read only its own shards' members.
    assert "I/O: 84 tar headers read" in (tmp_path / "shards-plan.out").read_text()
    reads = [re.search(r"I/O: (\d+) tar headers read .* (\d+) members read", (tmp_path / f"shards-{i}.out").read_text())
             for i in range(3)]  # fmt: skip
    assert [int(m[1]) for m in reads] == [0, 0, 0] and sum(int(m[2]) for m in reads) == 6 * 14

    # The three parts and their merge are the shards a single process writes.
    make_shards([str(src), str(tmp_path / "single"), *common, "--workers", "1"])
    merged, single = read_manifest(out), read_manifest(tmp_path / "single")
    assert merged["splits"] == single["splits"]
    assert sum(e["samples"] for e in merged["splits"]["train"]["shards"]) == 6 * 12

    # One task re-run alone (a lost shard): it rewrites only that shard, and the merge is unchanged.
    part1 = read_manifest(out / "manifest.part-00001-of-00003.json")
    lost = part1["splits"]["train"]["shards"][0]["name"]
    (out / lost).unlink()
    _, merge = submit_shards(slurm, tmp_path, "1", "rerun", str(src), str(out), *common, env="ALL,SHARD_PARTS=3",
                             plan=False)  # fmt: skip
    assert slurm.wait(merge, 120)["JobState"] == "COMPLETED"
    kept = sum(len(part1["splits"][s]["shards"]) for s in ("train", "val")) - 1
    assert f"shards: 1 written, {kept} kept (verified)" in (tmp_path / "rerun-1.out").read_text()
    assert read_manifest(out)["splits"] == single["splits"]


def test_readme_pipeline(slurm, tmp_path):
    """The README's Slurm block as written, on this 2-node CPU cluster: raw tars -> plan -> shards array ->
    merge -> pretrain -> export. The edits: tiny paths and data, 3 array tasks, 2 nodes x 1 CPU rank, 1 GB per
    job, the debug model, and no push (the Hub is not reachable from here; tests/test_readme.py checks the push
    line's refusal)."""
    from tests.test_readme import TINY, block

    raw, shards, run = tmp_path / "raw", tmp_path / "shards", tmp_path / "run"
    make_tars(raw, {f"n{i:08d}": 14 for i in range(4)})
    (raw / "words.txt").write_text("".join(f"n{i:08d}\tthing {i}\n" for i in range(4)))
    script = block("RAW=/data/imagenet22k-raw").text
    script = script.replace("RAW=/data/imagenet22k-raw", f"RAW={raw}").replace(
        "SHARDS=/data/imagenet22k-shards", f"SHARDS={shards}"
    )
    script = script.replace("RUN=/checkpoints/dinat-large-in22k", f"RUN={run}")
    script = script.replace("--array=0-63%16", "--array=0-2").replace("--nodes 4", "--nodes 2 --ntasks-per-node=1")
    command = re.compile(r"(?<![\w./])sbatch ")  # the command, not the scripts' names
    script = command.sub(f"sbatch {' '.join(SHARDS_JOB)} --output={tmp_path}/%x-%j-%a.out ", script)
    script = script.replace("run.output_dir=$RUN)", f"run.output_dir=$RUN {' '.join(TINY)} run.export=false)")
    script = script.replace(" --push-to org/dinat-large-in22k", "")
    assert len(command.findall(script)) == 5 and "--push-to" not in script
    out = subprocess.run(["bash", "-c", f"set -e\n{script}\necho $plan $shards $merge $train"], cwd=ROOT, env=slurm.env,
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr
    *submitted, ids = out.stdout.strip().splitlines()
    export_job = int(re.search(r"Submitted batch job (\d+)", submitted[-1])[1])
    for jid in [*map(int, ids.split()), export_job]:
        job = slurm.wait(jid, 600)
        logs = "".join(p.read_text() for p in tmp_path.glob("*.out"))
        assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), logs[-4000:]
    assert read_manifest(shards)["splits"]["train"]["samples"] > 0
    assert (run / "checkpoints" / "step_00000004" / "COMPLETE").is_file()
    assert sorted(p.name for p in (run / "export").iterdir()) == [
        "config.json", "model.safetensors", "preprocessor_config.json"
    ]  # fmt: skip
