"""The GPU check on CPU: its plan (commands against the real CLIs, limits), the runner with real
subprocesses that fail, run out of time or are interrupted, the record and its markdown, the no-GPU exit."""

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from pipeline.bench.cli import parser as bench_parser
from pipeline.bench.gpu_check import cli, record
from pipeline.bench.gpu_check.parse import junit_figures, search_figures, settle, speed_figures
from pipeline.bench.gpu_check.plan import (
    COMPARE,
    LIMITS,
    REFERENCE_MEMORY_FRACTION,
    ROOT,
    Options,
    Step,
    build_plan,
    fitting_micro_batch,
)
from pipeline.bench.gpu_check.runner import Interrupted, Outcome, execute, run_command
from pipeline.checkpoint import step_dir_name
from pipeline.config import load_config

GIB = 2**30
NAMES = ["gpu_tests", "speed", "speed_reference", "train", "train_resume", "speed_ckpt_all", "speed_compile"]
NAMES += [f"max_batch_z{z}_{ac}" for z in (1, 2, 3) for ac in ("none", "all")]


def probe(natten: bool = True, memory_gib: float = 139.8) -> dict:
    status = {"available": True, "fused_kernels": False} if natten else {"available": False, "error": "No module"}
    return {"natten": status, "devices": [{"name": "NVIDIA H200", "total_memory": int(memory_gib * GIB)}]}


def test_plan_steps_limits_and_commands_that_the_real_clis_accept(tmp_path):
    opts = Options(out=tmp_path, limit_scale=2.0)
    steps, left_out = build_plan(opts, probe())
    assert [s.name for s in steps] == NAMES and left_out == []
    by = {s.name: s for s in steps}
    for s in steps:
        assert s.argv[0] == sys.executable
        key = "max_batch" if s.kind == "max_batch" else s.name
        assert s.limit_s == 2.0 * LIMITS[key]
    tests = by["gpu_tests"].argv
    assert tests[1:5] == ("-m", "pytest", "-m", "gpu") and "--continue-on-collection-errors" in tests

    p = bench_parser()
    for s in steps:
        if s.kind not in ("speed", "max_batch"):
            continue
        assert s.argv[1:3] == ("-m", "pipeline.bench")
        args = p.parse_args(list(s.argv[3:]))  # argparse exits on any flag dinat-bench does not have
        assert (args.variant, args.resolution, args.precision, args.json) == ("dinat_large", 224, "bf16", s.artifact)
        assert args.find_max_batch == (s.kind == "max_batch")
        if s.kind == "max_batch":
            assert (args.steps, args.warmup) == (1, 0)
            assert s.name == f"max_batch_z{args.zero_stage}_{args.activation_checkpointing}"
    speed = {n: p.parse_args(list(by[n].argv[3:])) for n in NAMES if n.startswith("speed")}
    assert speed["speed"].compare == ",".join(COMPARE) and speed["speed"].attention_backend == "natten"
    assert speed["speed_reference"].attention_backend == "reference" and speed["speed_reference"].compare == ""
    assert speed["speed_compile"].compile and not speed["speed"].compile
    assert speed["speed_ckpt_all"].activation_checkpointing == "all"

    # The trainer's overrides are valid keys of the real config, with the values meant.
    first, resumed = by["train"], by["train_resume"]
    assert resumed.needs == ("train",)
    for s in (first, resumed):
        assert s.argv[1:5] == ("-m", "pipeline.train", "--config", "configs/demo_cpu.yaml")
        cfg = load_config(ROOT / s.argv[4], list(s.argv[5:]))
        assert (cfg.model.name, cfg.train.precision, cfg.train.steps) == ("dinat_large", "bf16", 30)
        assert (cfg.train.checkpoint_every, cfg.data.image_size, cfg.data.synthetic) == (15, 224, True)
        assert cfg.run.output_dir == s.artifact
    assert load_config(None, [a for a in first.argv[5:] if a.startswith("run.")]).run.resume == "none"
    resume = load_config(None, [a for a in resumed.argv[5:] if a.startswith("run.")]).run
    assert resume.resume == str(Path(first.artifact) / "checkpoints" / step_dir_name(15)) and resume.export


@pytest.mark.parametrize("memory_gib", [139.8, 79.6])
def test_reference_micro_batch_fits_the_gpu_by_the_plan(tmp_path, memory_gib):
    import dinat
    from pipeline.bench.gpu_check.plan import VARIANT
    from pipeline.bench.memory_plan import ZeroSettings, plan_memory

    steps, _ = build_plan(Options(out=tmp_path, micro_batch=128), probe(memory_gib=memory_gib))
    reference = next(s for s in steps if s.name == "speed_reference")
    micro = bench_parser().parse_args(list(reference.argv[3:])).micro_batch
    assert micro == fitting_micro_batch("reference", 128, memory_gib * GIB)
    config = dinat.variant_config(VARIANT, attention_backend="reference")
    total = lambda m: plan_memory(config, VARIANT, 224, m, "bf16", "reference", ZeroSettings(2, 1)).total  # noqa: E731
    assert total(micro) <= REFERENCE_MEMORY_FRACTION * memory_gib * GIB < total(2 * micro)  # the largest halving


def test_plan_without_natten_and_with_only_and_skip(tmp_path):
    steps, left_out = build_plan(Options(out=tmp_path), probe(natten=False, memory_gib=79.6))
    assert "speed_reference" not in [s.name for s in steps]
    assert all("natten" not in s.argv for s in steps)
    assert left_out == [{"name": "speed (natten)", "reason": "NATTEN not importable: No module"}]
    micro = {s.name: bench_parser().parse_args(list(s.argv[3:])).micro_batch for s in steps if s.kind == "speed"}
    assert micro["speed"] == fitting_micro_batch("reference", 64, 79.6 * GIB) < 64  # 80 GB: the reference halves
    assert micro["speed_ckpt_all"] == fitting_micro_batch("reference", 64, 79.6 * GIB, "all") == 64

    steps, left_out = build_plan(Options(out=tmp_path, only=("max_batch", "gpu_tests")), probe())
    assert [s.name for s in steps] == ["gpu_tests"] + [n for n in NAMES if n.startswith("max_batch")]
    assert {x["name"] for x in left_out} == {"speed", "speed_reference", "train", "train_resume"} | {
        "speed_ckpt_all",
        "speed_compile",
    }
    assert all(x["reason"] == "not selected (--only max_batch,gpu_tests)" for x in left_out)
    steps, _ = build_plan(Options(out=tmp_path, skip=("speed",)), probe())
    assert not [s for s in steps if s.name.startswith("speed")] and len(steps) == len(NAMES) - 4


def _py(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_a_step_past_its_limit_is_stopped_with_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    code = (
        "import subprocess, sys, time\n"
        f"c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(c.pid))\n"
        "print('started', flush=True)\n"
        "time.sleep(120)\n"
    )
    start = time.monotonic()
    out = run_command(_py(code), tmp_path / "slow.log", limit_s=2.0, grace_s=1.0)
    assert time.monotonic() - start < 15
    assert out.status == "timeout" and out.reason == "stopped at its 2 s limit" and out.returncode == -signal.SIGTERM
    assert "started" in (tmp_path / "slow.log").read_text()
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child)  # the whole process group went, not only the step's own process


def test_a_failed_step_keeps_its_exit_code_and_the_line_that_names_the_error(tmp_path):
    code = "print('step 1 ok'); raise RuntimeError('CUDA out of memory. Tried to allocate 2.00 GiB')"
    out = run_command(_py(code), tmp_path / "f.log", limit_s=60)
    assert (out.status, out.returncode) == ("failed", 1)
    assert out.reason == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert out.tail[0] == "step 1 ok" and out.tail[-1] == out.reason
    out = run_command(("/nonexistent/python",), tmp_path / "g.log", limit_s=5)
    assert out.status == "failed" and out.reason.startswith("could not start /nonexistent/python")


def _saver(tmp_path: Path, rec: dict):
    def save(step, outcome, figures):
        record.add_step(rec, step, outcome, figures)
        record.save(rec, tmp_path)

    return save


def test_partial_record_after_a_failure_and_a_timeout(tmp_path):
    """Steps that pass, fail, depend on a failure and run out of time: each is in the record on disk, saved
    before the next step starts; the search that ran out of time keeps the bracket of its logged trials."""
    rec = record.new_record("test", 600)
    json_path = tmp_path / record.JSON_NAME
    search = (
        "import json, time\n"
        f"print('steps already recorded:', len(json.load(open({str(json_path)!r}))['steps']), flush=True)\n"
        "for m, r in ((96, 'fits'), (108, 'does not fit'), (100, 'fits'), (104, 'does not fit')):\n"
        "    print(f'12:00:00 [rank0] pipeline.bench: micro-batch {m}: {r}', flush=True)\n"
        "time.sleep(120)\n"
    )
    steps = [
        Step("ok", "command", _py("print('fine')"), 30, "passes"),
        Step("fails", "command", _py("import sys; print('ValueError: bad shard'); sys.exit(3)"), 30, "fails"),
        Step("after_fail", "command", _py("print('never')"), 30, "needs fails", needs=("fails",)),
        Step("max_batch_z2_none", "max_batch", _py(search), 3, "search", ("max_batch",), (), str(tmp_path / "no.json")),
    ]
    outcomes = execute(steps, _saver(tmp_path, rec), budget_s=600, logs=tmp_path / "logs", grace_s=1.0)
    assert [o.status for o in outcomes.values()] == ["ok", "failed", "skipped", "timeout"]
    on_disk = json.loads(json_path.read_text())
    assert [s["name"] for s in on_disk["steps"]] == [s.name for s in steps]
    fails, skipped, search_entry = on_disk["steps"][1:]
    assert (fails["returncode"], fails["reason"]) == (3, "ValueError: bad shard")
    assert skipped["reason"] == "needs fails, which failed" and skipped["seconds"] == 0
    assert "steps already recorded: 3" in Path(search_entry["log"]).read_text()
    assert search_entry["figures"] == {
        "trials": [[96, True], [108, False], [100, True], [104, False]],
        "at_least": 100,
        "below": 104,
        "settled": False,
    }
    md = (tmp_path / record.MARKDOWN_NAME).read_text()
    assert "| max_batch_z2_none | timeout |" in md and "| 2 | none | >= 100, < 104 | - |" in md
    assert "- after_fail: needs fails, which failed" in md


def test_the_budget_skips_what_no_longer_fits(tmp_path):
    rec = record.new_record("test", 100)
    steps = [Step("a", "command", _py("print(1)"), 30, "a"), Step("b", "command", _py("print(2)"), 30, "b")]
    outcomes = execute(steps, _saver(tmp_path, rec), 100, tmp_path / "logs", started=time.monotonic() - 95)
    assert {o.status for o in outcomes.values()} == {"skipped"}
    assert all(o.reason == "the total budget (100 s) was spent" for o in outcomes.values())
    # A step's limit is cut to what is left, and the reason says so when it runs out.
    steps = [Step("c", "command", _py("import time; time.sleep(60)"), 60, "c")]
    out = execute(steps, _saver(tmp_path, rec), 100, tmp_path / "logs", time.monotonic() - 97, 1.0, 0.5)["c"]
    assert out.status == "timeout" and out.limit_s <= 3 and "(cut from 60 s by the total budget)" in out.reason


def test_sigterm_stops_the_running_step_and_keeps_the_record(tmp_path):
    rec = record.new_record("test", 600)
    steps = [Step("long", "command", _py("import time; print('x', flush=True); time.sleep(120)"), 100, "long")]
    timer = threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    start = time.monotonic()
    with pytest.raises(Interrupted, match="SIGTERM"):
        execute(steps, _saver(tmp_path, rec), 600, tmp_path / "logs", grace_s=1.0)
    timer.join()
    assert time.monotonic() - start < 30
    entry = json.loads((tmp_path / record.JSON_NAME).read_text())["steps"][0]
    assert (entry["name"], entry["status"], entry["reason"]) == ("long", "interrupted", "SIGTERM received")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the check's handler is gone again


def _entry(name: str, kind: str, status: str, figures: dict, seconds: float = 10.0) -> dict:
    step = Step(name, kind, ("python",), 100, f"what {name}")
    entry = {"name": name, "kind": kind, "what": step.what, "goals": [], "command": step.command, "figures": figures}
    return entry | Outcome(status, seconds, 0, 100).as_dict()


@pytest.mark.slow
def test_markdown_from_real_bench_records(tmp_path, capsys):
    """Figures parsed from real dinat-bench records (a speed run with a timm model, a micro-batch search on
    CPU) and the log lines of that search, rendered from the JSON alone."""
    from pipeline.bench import main as bench

    speed_json, search_json = tmp_path / "speed.json", tmp_path / "search.json"
    common = ["--variant", "dinat_debug", "--micro-batch", "2", "--steps", "1", "--warmup", "0"]
    assert bench([*common, "--compare", "convnext_atto", "--peak-tflops", "0.5", "--json", str(speed_json)]) == 0
    capsys.readouterr()
    # Between the plan's 1 and 2 images (6.8 and 8.7 MiB): two trials, micro-batch 1 fits and 2 does not.
    args = ["--find-max-batch", "--zero-stage", "0", "--memory-limit-gib", "0.0078", "--json", str(search_json)]
    assert bench([*common, *args]) == 0
    log = capsys.readouterr().err.splitlines()  # dinat-bench logs to stderr, as a step's log file gets it
    speed = speed_figures(json.loads(speed_json.read_text()))
    search = search_figures(json.loads(search_json.read_text()), [])
    bracket = search_figures(None, log)  # what a search stopped at its limit leaves
    assert search["settled"] and search["trials"] == bracket["trials"] == [[1, True], [2, False]]
    assert bracket["at_least"] == search["max_micro_batch"] and bracket["below"] == search["max_micro_batch"] + 1

    dinat_row, timm_row = speed["rows"]
    assert (dinat_row["model"], timm_row["model"]) == ("dinat_debug", "convnext_atto")
    assert dinat_row["mfu"] == pytest.approx(dinat_row["tflops_per_s_per_gpu"] / 0.5)
    assert speed["config"] == {
        "attention_backend": "reference",
        "activation_checkpointing": "none",
        "compile": False,
        "micro_batch": 2,
        "zero_stage": 2,
    }

    rec = record.new_record("bash launch/gpu_check.sh --out x", 480)
    rec["steps"] = [_entry("speed", "speed", "ok", speed), _entry("max_batch_z1_all", "max_batch", "ok", search)]
    md = record.markdown(rec)
    ratio = timm_row["images_per_s_per_gpu"] / dinat_row["images_per_s_per_gpu"]
    assert f"| speed | convnext_atto | - | none | no | 2 | {timm_row['images_per_s_per_gpu']:.1f} |" in md
    assert f"| {100 * dinat_row['mfu']:.1f}% |" in md and f"| {ratio:.2f}x |" in md
    trials = ", ".join(f"{m}{'' if ok else ' (no)'}" for m, ok in search["trials"])
    assert f"| 1 | all | {search['max_micro_batch']} | {search['plan_guess']} | {trials} | ok |" in md
    assert "| DiNAT-L bf16 at 224: MFU >= 40% | no DiNAT-L speed run finished | not measured |" in md  # debug != L


def test_goals_and_tables_from_a_json_record(tmp_path, capsys):
    def row(model, ips, mfu):
        times = {"step_s": 64 / ips, "forward_s": 0.1, "backward_s": 0.2, "optimizer_s": 0.01}
        rest = {"tflops_per_s_per_gpu": 400.0, "mfu": mfu, "hfu": None, "peak_gib": 30.0}
        return {"model": model, "params": 2e8, "images_per_s_per_gpu": ips} | times | rest

    config = {"attention_backend": "natten", "activation_checkpointing": "none", "compile": True, "micro_batch": 64}
    speed = {"config": config | {"zero_stage": 2}, "rows": [row("dinat_large", 1100.0, 0.43)], "plan_gib": 20.0}
    speed["rows"].append(row(COMPARE[0], 1000.0, 0.45))
    ref_config = config | {"attention_backend": "reference", "zero_stage": 2}
    ref = {"config": ref_config, "rows": [row("dinat_large", 275.0, 0.1)]}
    tests = {"passed": 10, "failures": 0, "errors": 0, "skipped": 0, "tests": 10, "problems": []}
    tests |= {"collection_errors": ["tests.dinat.test_hf_parity"]}
    first = {"losses": {"25": 2.0, "30": 1.5}, "checkpoints": ["step_00000015", "step_00000030"]}
    resumed = {"losses": {"25": 2.0, "30": 1.5001}, "resumed_at": 15, "checkpoints": ["step_00000030"]}
    resumed |= {"export": {"config.json": 2048, "model.safetensors": 3 * 2**20}, "eval": {"step": 30, "top1": 40.0}}
    rec = record.new_record("cmd", 480)
    rec["steps"] = [
        _entry("gpu_tests", "tests", "failed", tests),
        _entry("speed_compile", "speed", "ok", speed),
        _entry("speed", "speed", "ok", {"config": speed["config"], "rows": [row("dinat_large", 1100.0, 0.43)]}),
        _entry("speed_reference", "speed", "ok", ref),
        _entry("train", "train", "ok", first),
        _entry("train_resume", "train", "ok", resumed),
    ]
    rec["left_out"] = [{"name": "max_batch_z1_none", "reason": "not selected (--only speed)"}]
    goals = {g["goal"]: (g["figure"], g["met"]) for g in record.goals(rec)}
    assert goals["DiNAT-L bf16 at 224: MFU >= 40%"] == ("best 43.0% (speed_compile)", "yes")
    vs_swin = ("DiNAT-L / Swin-L images/s: 1.10x (speed_compile)", "yes")
    assert goals["DiNAT-L images/s >= Swin-L's in the same run"] == vs_swin
    assert goals["NATTEN (fused, or FlexAttention) against the reference on the GPU"] == (
        "GPU tests: 10 passed, 0 failed, 0 errors; natten / reference images/s 4.00x",
        "yes",  # a module that does not import there is reported, not counted against the GPU tests
    )
    figure, met = goals["the bf16 training loop: steps, checkpoint, resume, export"]
    assert met == "yes"
    assert figure == "resumed at step 15, export written, largest loss difference after resuming 1.00e-04"
    assert goals["largest micro-batch for ZeRO 1/2/3, with and without checkpointing"][1] == "not measured"

    path = tmp_path / "rec.json"
    path.write_text(json.dumps(rec))
    assert cli.main(["--markdown", str(path)]) == 0
    md = capsys.readouterr().out
    assert md == record.markdown(json.loads(path.read_text()))
    swin = "| speed_compile | Swin-L | - | none | yes | 64 | 1000.0 | 64.0 | 100.0 / 200.0 / 10.0 | 400.0 | 45.0% |"
    assert swin in md
    assert "| train_resume | ok | 25: 2.0000, 30: 1.5001 | - | - | step_00000030 | 40.00% at 30 |" in md
    assert "model.safetensors (3.0 MiB)" in md and "step 25: 0.00e+00, step 30: 1.00e-04" in md
    assert "Modules that did not import there (their tests are not GPU tests): tests.dinat.test_hf_parity." in md
    assert "- max_batch_z1_none: not selected (--only speed)" in md


def test_no_gpu_one_clear_line_and_its_own_exit_code(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    import subprocess

    r = subprocess.run(
        [sys.executable, "-m", "pipeline.bench.gpu_check", "--out", str(tmp_path / "x")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == cli.EXIT_NO_GPU == 3 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        f"gpu_check: no CUDA GPU visible to torch {torch.__version__} (CUDA {torch.version.cuda}) in "
        f"{sys.executable}; nothing was run"
    ]
    assert not (tmp_path / "x").exists()  # nothing written either


def test_pytest_junit_counts_and_collection_errors(tmp_path):
    """A real pytest run (one pass, one failure, one skip, one module that does not import) read back."""
    import subprocess

    (tmp_path / "test_a.py").write_text(
        "import pytest\n"
        "def test_ok(): assert 1\n"
        "def test_bad(): assert 1 == 2, 'one is not two'\n"
        "@pytest.mark.skip(reason='no')\n"
        "def test_skip(): pass\n"
    )
    (tmp_path / "test_b.py").write_text("raise RuntimeError('transformers 5.17.0: refused')\n")
    junit = tmp_path / "out.xml"
    argv = ["-q", "-p", "no:cacheprovider", "--continue-on-collection-errors", "--junitxml", str(junit), str(tmp_path)]
    subprocess.run([sys.executable, "-m", "pytest", *argv], cwd=tmp_path, capture_output=True)
    f = junit_figures(str(junit))
    assert {k: f[k] for k in ("tests", "passed", "failures", "errors", "skipped")} == {
        "tests": 3,
        "passed": 1,
        "failures": 1,
        "errors": 0,
        "skipped": 1,
    }
    assert f["collection_errors"] == ["test_b"] and len(f["problems"]) == 1
    assert f["problems"][0].startswith("test_a::test_bad: AssertionError: one is not two")

    # pytest exits 1 for the module that does not import; the step still passes when its tests do.
    step = Step("gpu_tests", "tests", ("pytest",), 60, "tests", artifact=str(junit))
    failed = Outcome("failed", 1.0, 1, 60, None, "1 failed")
    settle(step, failed, f)
    assert failed.status == "failed"
    (tmp_path / "test_a.py").write_text("def test_ok(): assert 1\n")
    subprocess.run([sys.executable, "-m", "pytest", *argv], cwd=tmp_path, capture_output=True)
    f = junit_figures(str(junit))
    outcome = Outcome("failed", 1.0, 1, 60, None, "1 error")
    settle(step, outcome, f)
    assert (outcome.status, outcome.reason) == ("ok", "did not import there: test_b")


@pytest.mark.slow
def test_the_training_steps_checkpoint_resume_and_export_on_cpu(tmp_path):
    """The two trainer steps of the plan, run for real (tiny model, fp32 on CPU): the resumed run logs the
    same losses as the uninterrupted one at every step after the resume, and exports."""
    from pipeline.data.synthetic import make_synthetic

    data = tmp_path / "data"
    make_synthetic(data, num_classes=4, train_per_class=24, val_per_class=4, image_size=64, shard_samples=32)
    opts = Options(
        out=tmp_path / "check",
        only=("train",),
        train_variant="dinat_debug",
        train_image_size=64,
        train_batch=8,
        train_precision="fp32",
        train_data=str(data),
        train_workers=1,
    )
    steps, _ = build_plan(opts, probe())
    assert [s.name for s in steps] == ["train", "train_resume"]
    rec = record.new_record("test", 900)
    outcomes = execute(steps, _saver(tmp_path, rec), 900, tmp_path / "logs")
    assert [o.status for o in outcomes.values()] == ["ok", "ok"], [o.reason for o in outcomes.values()]
    first, resumed = (s["figures"] for s in rec["steps"])
    assert list(first["losses"]) == ["5", "10", "15", "20", "25", "30"] and first["done_steps"] == 30
    assert first["checkpoints"] == [step_dir_name(15), step_dir_name(30)] and "export" not in first
    assert resumed["resumed_at"] == 15 and list(resumed["losses"]) == ["20", "25", "30"]
    assert {k: first["losses"][k] for k in resumed["losses"]} == resumed["losses"]  # bitwise on CPU
    assert resumed["eval"] == first["eval"] and resumed["eval"]["step"] == 30
    assert set(resumed["export"]) >= {"config.json", "model.safetensors"} and resumed["export"]["model.safetensors"] > 0
    training = record.goals(rec)[-1]
    assert training["met"] == "yes" and "largest loss difference after resuming 0.00e+00" in training["figure"]


@pytest.mark.slow
def test_a_whole_run_probe_plan_record_here(tmp_path):
    """cli.run as on a GPU node (the no-GPU refusal is main's), with only the GPU tests: the probe's record
    of this machine, pytest -m gpu for real (skipped here), the files on disk."""
    out = tmp_path / "gc"
    assert cli.run(Options(out=out, only=("gpu_tests",), budget_s=600), "a command") == 0
    rec = json.loads((out / record.JSON_NAME).read_text())
    assert rec["status"] == "complete" and rec["command"] == "a command" and rec["finished"]
    assert [(s["name"], s["status"]) for s in rec["steps"]] == [("probe", "ok"), ("gpu_tests", "ok")]
    env = rec["environment"]
    assert (env["torch"], env["python"], env["devices"]) == (torch.__version__, sys.version.split()[0], [])
    import natten

    assert env["natten"]["available"] and env["packages"]["natten"]["version"] == natten.__version__
    tests = rec["steps"][1]["figures"]
    assert tests["skipped"] == tests["tests"] > 0 and tests["passed"] == 0  # every GPU test skips on a CPU
    assert len(rec["left_out"]) == len(NAMES) - 1
    md = (out / record.MARKDOWN_NAME).read_text()
    assert md.startswith("# GPU check: no GPU recorded") and f"torch {torch.__version__}" in md
    assert f"GPU tests: 0 passed, 0 failed, 0 errors, {tests['skipped']} skipped | not measured |" in md
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["gpu_tests.log", "probe.log"]
