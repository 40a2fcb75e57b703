"""Every command block of README.md runs, as written, with tiny data and tiny configs where it trains.

``BLOCKS`` names, for each block (by the start of its first command), the test that runs it, or why it cannot run
on this CPU machine. A block nobody runs fails :func:`test_every_block_is_run_by_a_test`, so the README cannot
drift from what works. Commands run through bash in the repository root; the only edits are the substitutions
each test spells out (data paths to tiny sets, 8 GPUs to 2 CPU ranks, DiNAT-L to the debug variant).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.e2e import REPO
from tests.pipeline.test_shards import make_tars
from tests.progress import wait_while_busy

README = REPO / "README.md"

# first command of a block -> the test that runs it ("module::function"), or ("not run here", why)
BLOCKS: dict[str, str | tuple[str, str]] = {
    "bash launch/venv.sh accelerate launch --config_file launch/accelerate_cpu_2proc.yaml": (
        "tests/test_readme.py::test_quickstart"
    ),
    "dinat-make-shards /data/imagenet22k-raw": "tests/test_readme.py::test_make_shards",
    "dinat-index-shards /data/imagenet-22k-wds": "tests/test_readme.py::test_index_shards",
    "accelerate launch --config_file launch/accelerate_all_gpus.yaml": "tests/test_readme.py::test_launchers",
    "dinat-export runs/": "tests/test_readme.py::test_export",
    "RAW=/data/imagenet22k-raw": "tests/slurm/test_slurm.py::test_readme_pipeline",
    "import dinat": "tests/test_readme.py::test_model_package",
    "# training steps through the DeepSpeed engine": "tests/test_readme.py::test_benchmarks",
    "bash launch/gpu_check.sh --out": "tests/test_readme.py::test_gpu_check_without_a_gpu",
    "NATTEN_CUDA_ARCH=9.0 bash launch/natten_wheel.sh": (
        "not run here",
        "compiles NATTEN's CUDA kernels (about an hour per architecture); tests/test_scripts.py checks the script",
    ),
}

# What a training command gets appended: tiny model, data and run (the README's configs are for GPUs).
TINY = [
    "model.name=dinat_debug", "data.image_size=32", "data.workers=1", "train.global_batch_size=8",
    "train.micro_batch_size=4", "train.steps=4", "train.log_every=1", "train.eval_every=4", "train.eval_batches=2",
    "train.checkpoint_every=4", "optim.warmup_steps=1",
]  # fmt: skip


@dataclass
class Block:
    line: int
    lang: str
    text: str

    @property
    def first(self) -> str:
        return next(x.strip() for x in self.text.splitlines() if x.strip())

    def commands(self) -> list[str]:
        """Shell commands: continuation lines joined, blank lines and comment lines dropped."""
        joined = re.sub(r"\\\n\s*", "", self.text)
        return [x.strip() for x in joined.splitlines() if x.strip() and not x.strip().startswith("#")]


def readme_blocks() -> list[Block]:
    blocks, current = [], None
    for n, raw in enumerate(README.read_text().splitlines(), 1):
        line = raw.strip()
        if current is None and line.startswith("```"):
            current, indent, body = Block(n, line[3:].strip(), ""), len(raw) - len(raw.lstrip()), []
        elif current is not None and line.startswith("```"):
            current.text = "\n".join(b[indent:] for b in body) + "\n"
            blocks.append(current)
            current = None
        elif current is not None:
            body.append(raw)
    return blocks


def block(key: str) -> Block:
    [found] = [b for b in readme_blocks() if b.first.startswith(key)]
    return found


def run(command: str, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    """One README command through bash, waiting while it makes progress (tests.progress)."""
    # A fresh job: not the rendezvous of a process group an earlier test joined inside pytest's own process
    # (its MASTER_PORT is bound here; a child that inherited it would try to bind it again).
    full_env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                                  "LOCAL_RANK")}  # fmt: skip
    full_env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"readme-{os.getpid()}.log", "w+")
    proc = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    wait_while_busy(lambda: [proc.pid], lambda: proc.poll() is not None, command[:80])
    log.seek(0)
    return subprocess.CompletedProcess(command, proc.returncode, log.read(), "")


def ok(command: str, **kw) -> str:
    result = run(command, **kw)
    assert result.returncode == 0, f"{command}\n{result.stdout[-4000:]}"
    return result.stdout


def losses(run_dir: Path) -> list[float]:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.value for e in acc.Scalars("train/loss")]


def test_every_block_is_run_by_a_test():
    firsts = [b.first for b in readme_blocks()]
    for first in firsts:
        keys = [k for k in BLOCKS if first.startswith(k)]
        assert len(keys) == 1, f"README block {first!r}: no test runs it; add it to BLOCKS in {__file__}"
    for key, runner in BLOCKS.items():
        assert any(f.startswith(key) for f in firsts), f"BLOCKS lists {key!r}, which the README no longer has"
        if isinstance(runner, str):
            path, name = runner.split("::")
            module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
            assert callable(getattr(module, name, None)), f"{runner} does not exist"


def test_quickstart(tmp_path):
    """The main job as the README's first line starts it (2 CPU processes, the embedded synthetic set), cut to
    30 steps; the second line is CI's own command."""
    demo, tests = block("bash launch/venv.sh accelerate launch").commands()
    run_dir, data = tmp_path / "run", tmp_path / "synthetic"
    out = ok(f"{demo} data.train={data} data.val={data} run.output_dir={run_dir} train.steps=30 train.eval_every=30")
    assert "x 2 ranks = 64" in out and "eval at step 30: loss" in out
    assert (run_dir / "export" / "model.safetensors").is_file()
    assert len(losses(run_dir)) == 2  # logged every 20 steps, and at the last
    assert json.loads((data / "classes.json").read_text())["num_classes"] == 10
    ci = [x for x in (REPO / ".ci" / "run").read_text().splitlines() if x and not x.startswith(("#", "set", "cd"))]
    assert ci == [tests]


def test_make_shards(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "shards"
    make_tars(raw, {f"n{i:08d}": 12 for i in range(4)})
    (tmp_path / "words.txt").write_text("".join(f"n{i:08d}\tthing {i}\n" for i in range(4)))
    [command] = block("dinat-make-shards").commands()
    command = command.replace("/data/imagenet22k-raw", str(raw)).replace("/data/imagenet22k-shards", str(out))
    command = re.sub(r"--workers \d+", "--workers 2", command)
    ok(f"PATH={Path(os.sys.executable).parent}:$PATH {command}", cwd=tmp_path)  # words.txt: relative, as written
    classes = json.loads((out / "classes.json").read_text())["classes"]
    assert [c["name"] for c in classes] == [f"thing {i}" for i in range(4)]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["samples"] + manifest["splits"]["val"]["samples"] == 48


def test_index_shards(tmp_path):
    """The indexing line on a small set laid out as timm's imagenet-22k-wds."""
    from tests.test_foreign_shards import write_timm_set

    src, out = tmp_path / "imagenet-22k-wds", tmp_path / "in22k-index"
    src.mkdir()
    write_timm_set(src)
    [command] = block("dinat-index-shards").commands()
    command = command.replace("/data/imagenet-22k-wds", str(src)).replace("/data/in22k-index", str(out))
    command = command.replace("/data/imagenet22k_synsets.txt", str(src / "imagenet22k_synsets.txt"))
    ok(command.replace("--workers 16", "--workers 2"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["samples"] == 48 and manifest["splits"]["val"]["samples"] == 8
    assert json.loads((out / "classes.json").read_text())["classes"][3]["id"] == "n00000003"


@pytest.fixture(scope="module")
def launched(shards, tmp_path_factory):
    """The README's three single-machine launchers, 8 GPUs -> 2 CPU ranks: {launcher: run directory}."""
    base = tmp_path_factory.mktemp("launchers")
    runs = {}
    for command in block("accelerate launch --config_file").commands():
        launcher = command.split()[0]
        command = command.replace("/data/imagenet22k-shards", str(shards))
        command = command.replace("--nproc_per_node 8", "--nproc_per_node 2").replace("--num_gpus 8", "--num_gpus 2")
        command = command.replace("accelerate launch ", "accelerate launch --num_processes 2 ")
        runs[launcher] = base / launcher
        shm = set(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*"))
        ok(f"{command} run.output_dir={runs[launcher]} {' '.join(TINY)}", env={"MASTER_PORT": ""})
        # DeepSpeed's CPU all-reduce segments (66 MB per rank; the deepspeed launcher sets LOCAL_SIZE, which
        # turns them on) are not left in memory after the job
        left = set(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*")) - shm
        assert not left, f"{launcher} left {sorted(left)}"
    return runs


def test_launchers(launched):
    """Each launcher forms the same 2-rank job: the same losses, step for step."""
    assert sorted(launched) == ["accelerate", "deepspeed", "torchrun"]
    curves = {name: losses(path) for name, path in launched.items()}
    assert len(curves["torchrun"]) == 4
    assert curves["accelerate"] == curves["torchrun"] == curves["deepspeed"], curves


def test_export(launched, tmp_path):
    """The export line on a real checkpoint; the push line refuses, in one line, without a token."""
    plain, push = block("dinat-export").commands()
    checkpoint = launched["torchrun"] / "checkpoints" / "step_00000004"
    plain = plain.replace("runs/dinat_large_in22k_224/checkpoints/step_00100000", str(checkpoint))
    ok(plain, cwd=tmp_path)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json", "model.safetensors", "preprocessor_config.json"
    ]  # fmt: skip
    push = push.replace("runs/dinat_large_in22k_224/checkpoints/step_00100000", str(checkpoint))
    result = run(push, cwd=tmp_path, env={"HF_TOKEN": "", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 2 and "HF_TOKEN" in result.stdout, result.stdout[-2000:]


def test_model_package(tmp_path):
    """The Python block with the debug variant (DiNAT-L is the same code, 700x the parameters), on the reference
    attention: NATTEN has no backward on CPU, and the block computes a training loss."""
    code = block("import dinat").text.replace('"dinat_large"', '"dinat_debug"').replace("export/", f"{tmp_path}/x/")
    code = code.replace('attention_backend="natten"', 'attention_backend="auto"')
    setup = "import torch\npixel_values = torch.randn(2, 3, 64, 64)\nlabels = torch.tensor([1, 2])\n"
    ok(f"python - <<'EOF'\n{setup}{code}print(model.config.num_labels, out.loss.item())\nEOF")
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == [
        "config.json", "model.safetensors", "preprocessor_config.json"
    ]  # fmt: skip


def test_benchmarks(tmp_path):
    """The benchmark lines on CPU: the debug variant and small timm models where they train; the attention
    benchmark is asked for CUDA and has none here."""
    for command in block("# training steps through").commands():
        command = command.replace("--json bench.json", f"--json {tmp_path}/bench.json")
        if "--device cuda" in command:
            result = run(command)
            assert result.returncode != 0 and "cuda" in result.stdout.lower()
            continue
        if "--plan" not in command:
            command = command.replace("dinat_large", "dinat_debug").replace("--micro-batch 128", "--micro-batch 2")
            command = command.replace("swin_large_patch4_window7_224,convnext_large", "resnet18")
            command = command.replace("--images 2000", "--images 40")
            if "--find-max-batch" in command:  # on CPU the search needs a limit: a small one, for a short search
                command += " --memory-limit-gib 0.05 --resolution 64 --steps 1 --warmup 0"
            elif "dinat-bench" in command:
                command += " --resolution 64 --steps 2 --warmup 1"
        ok(command)
    assert json.loads((tmp_path / "bench.json").read_text())["results"]


def test_gpu_check_without_a_gpu(tmp_path):
    """The GPU check on this CPU machine: one line that says so, exit 3, nothing written (its GPU runs are
    tested in tests/pipeline/test_gpu_check.py)."""
    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU is present: the check would run for minutes")
    [command] = block("bash launch/gpu_check.sh").commands()
    result = run(command.replace("--out runs/gpu_check", f"--out {tmp_path}/gc"))
    assert result.returncode == 3, result.stdout
    lines = [x for x in result.stdout.splitlines() if x.startswith("gpu_check:")]
    assert len(lines) == 1 and "no CUDA GPU" in lines[0]
    assert not (tmp_path / "gc").exists()
