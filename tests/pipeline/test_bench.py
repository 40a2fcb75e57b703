"""dinat-bench: a real run through the training engine on CPU, its JSON record, bad arguments, the search."""

import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import dinat
from dinat.flops import checkpoint_recompute_fraction, train_step_flops
from pipeline.bench import main
from pipeline.bench.memory_plan import GIB
from pipeline.bench.search import find_max
from pipeline.bench.steps import TimmClassifier

pytest.importorskip("deepspeed")

RUN = ["--variant", "dinat_debug", "--micro-batch", "2", "--steps", "2", "--warmup", "1"]


def _run(tmp_path, *extra: str) -> dict:
    path = tmp_path / "bench.json"
    assert main([*RUN, *extra, "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_dinat_and_timm_in_one_run_json_record(tmp_path, capsys):
    argv = ["--activation-checkpointing", "2", "--zero-stage", "1", "--compare", "convnext_atto"]
    rec = _run(tmp_path, *argv, "--peak-tflops", "0.5")
    out = capsys.readouterr().out
    assert "dinat_debug" in out and "convnext_atto" in out and "peak GiB" in out
    for name in ("torch", "natten", "deepspeed", "timm"):
        assert rec["versions"][name] == __import__(name).__version__
    assert rec["device"] == {**rec["device"], "type": "cpu", "world_size": 1}
    assert rec["date"].startswith(str(__import__("datetime").date.today().year))
    assert rec["config"]["zero_stage"] == 1 and rec["config"]["attention_backend"] == "reference"
    ours, timm_row = rec["results"]
    assert (ours["model"], timm_row["model"]) == ("dinat_debug", "convnext_atto")

    # FLOPs: the analytic count of this config, recomputation of every 2nd layer on top.
    cfg = dinat.variant_config("dinat_debug", activation_checkpointing=2)
    expected = train_step_flops(cfg, 64, 2, checkpoint_recompute_fraction(cfg, 64))
    assert ours["flops_per_step_per_gpu"]["useful"] == expected["useful"]
    assert ours["flops_per_step_per_gpu"]["hardware"] == expected["hardware"] > expected["useful"]
    assert ours["params"] == dinat.create_model("dinat_debug").num_parameters

    # timm: 3 x FlopCounterMode's forward, labelled as such.
    with torch.device("meta"):
        model = TimmClassifier("convnext_atto", 10, 64, checkpointing=False)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.empty(1, 3, 64, 64, device="meta"))
    assert timm_row["flops_per_step_per_gpu"]["useful"] == 3 * 2 * counter.get_total_flops()
    assert "FlopCounterMode" in timm_row["flops_per_step_per_gpu"]["source"]
    assert timm_row["flops_per_step_per_gpu"]["hardware"] is None  # checkpointed: recompute unknown

    for row in rec["results"]:
        assert row["images_per_s"] > 0 and row["images_per_s"] == pytest.approx(2 / row["step_s"])
        phases = row["forward_s"] + row["backward_s"] + row["optimizer_s"]
        assert 0 < phases <= row["step_s"] and "data_wait_s" not in row  # synthetic data: no data wait
        flops = row["flops_per_step_per_gpu"]
        assert row["tflops_per_s_per_gpu"] == pytest.approx(flops["useful"] / row["step_s"] / 1e12)
        assert row["peak_flops_per_gpu"] == 0.5e12  # --peak-tflops: the only peak a CPU has
        assert row["mfu"] == pytest.approx(row["tflops_per_s_per_gpu"] / 0.5)
        assert row["peak_gib"] * GIB == row["peak_bytes"] > 0
    assert ours["hfu"] == pytest.approx(ours["mfu"] * expected["hardware"] / expected["useful"])
    assert timm_row["hfu"] is None
    # the measured peak against the plan (model states + activations; ZeRO-1's 5e8-element bucket dominates)
    assert ours["peak_bytes"] == pytest.approx(rec["plan"]["total"], rel=0.02)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--variant", "dinat_huge"], "--variant: unknown DiNAT variant 'dinat_huge'"),
        (["--micro-batch", "0"], "--micro-batch: must be >= 1, got 0"),
        (["--steps", "0"], "--steps: must be >= 1"),
        (["--resolution", "100"], "--resolution: a multiple of 32"),
        (["--activation-checkpointing", "some"], "'none', 'all' or a positive integer"),
        (["--zero-stage", "4"], "invalid choice: 4"),
        (["--compare", "swin_huge_nonexistent"], "--compare: unknown timm model(s) swin_huge_nonexistent"),
        (["--precision", "bf16"], "--precision bf16: needs a GPU to run"),
        (["--find-max-batch"], "give --memory-limit-gib"),
        (["--world-size", "8"], "--world-size: a positive number, with --plan only"),
        (["--peak-tflops", "0"], "--peak-tflops: must be > 0, got 0.0"),
        (["--data", "/nonexistent/shards"], "data: "),
        (["--plan", "deepspeed.zero_optimization.stage=7"], "unrecognized arguments"),
    ],
)
def test_bad_arguments_one_clear_error(argv, message, capsys):
    if "--precision" in argv and torch.cuda.is_available():
        pytest.skip("bf16 runs on a GPU")
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert sum(line.startswith("dinat-bench: error:") for line in err.splitlines()) == 1


def test_plan_only_dinat_large_bf16_zero2(tmp_path, capsys):
    path = tmp_path / "plan.json"
    argv = ["--plan", "--variant", "dinat_large", "--precision", "bf16", "--attention-backend", "natten"]
    argv += ["--zero-stage", "2", "--world-size", "8", "--micro-batch", "64", "--json", str(path)]
    assert main(argv) == 0
    plan = json.loads(path.read_text())["plan"]
    psi = 232_851_409  # DiNAT-L with the 21,841-class head
    assert plan["num_params"] == psi and plan["backend"] == "natten"
    assert (plan["params"], plan["grads"]) == (2 * psi, 2 * math.ceil(psi / 8))
    assert (plan["master"], plan["moments"]) == (4 * math.ceil(psi / 8), 8 * math.ceil(psi / 8))
    assert plan["buffers_backward"] == 2 * 5e8  # one bf16 reduce bucket (overlap_comm off by default)
    out = capsys.readouterr().out
    assert "predicted peak" in out and "1 layer in 2" in out
    # the same plan with each checkpointing setting: activations shrink, model states stay
    ckpt = json.loads(path.read_text())["checkpointing"]
    assert ckpt["none"]["activations"] == plan["activations"]
    assert ckpt["all"]["activations"] < ckpt["2"]["activations"] < ckpt["none"]["activations"]
    assert ckpt["none"]["total"] - ckpt["all"]["total"] <= ckpt["none"]["activations"] - ckpt["all"]["activations"]


@pytest.mark.parametrize("threshold", [0, 1, 7, 19, 20, 64, 65536])
@pytest.mark.parametrize("guess", [1, 3, 19, 20, 21, 40, 1000])
def test_find_max_any_guess(threshold, guess):
    calls = []

    def fits(m):
        calls.append(m)
        return m <= threshold

    best, probes = find_max(fits, guess)
    assert best == threshold
    assert len(calls) == len(set(calls)) == len(probes)  # every micro-batch tried once
    if 0 < threshold < 65536:
        assert (threshold, True) in probes and (threshold + 1, False) in probes
    assert len(probes) <= 2 * math.log2(max(guess, threshold, 2)) + 4


def test_find_max_batch_on_cpu_against_a_memory_limit(tmp_path, capsys):
    # ZeRO-0, fp32: ~1.3 MB of model states and ~2 MB of activations per image at 64 px.
    rec = _run(tmp_path, "--find-max-batch", "--zero-stage", "0", "--memory-limit-gib", "0.02")
    search = rec["search"]
    best, trials = search["max_micro_batch"], {t["micro_batch"]: t for t in search["trials"]}
    assert best >= 2
    assert trials[best]["fits"] and trials[best]["peak_bytes"] <= search["limit_bytes"]
    assert not trials[best + 1]["fits"] and trials[best + 1]["peak_bytes"] > search["limit_bytes"]
    assert abs(search["plan_guess"] - best) <= 1  # the plan brackets the answer
    assert f"largest micro-batch: {best}" in capsys.readouterr().out


def bench_worker(info, path: str) -> None:
    main([*RUN, "--zero-stage", "3", "--json", path])


def test_two_ranks_zero3(tmp_path):
    from .ds_helpers import run_ranks

    path = tmp_path / "bench.json"
    run_ranks(bench_worker, str(path))
    rec = json.loads(path.read_text())  # written by rank 0 only
    assert rec["device"]["world_size"] == 2 and rec["config"]["zero_stage"] == 3
    (row,) = rec["results"]
    assert row["images_per_s"] == pytest.approx(2 * row["images_per_s_per_gpu"])
    assert rec["plan"]["world_size"] == 2 and rec["plan"]["zero_stage"] == 3
    assert row["peak_bytes"] == pytest.approx(rec["plan"]["total"], rel=0.02)  # partitioned states, one rank


def test_real_shards_time_the_data_wait(tmp_path):
    from pipeline.data.synthetic import make_synthetic

    make_synthetic(tmp_path / "data", num_classes=4, train_per_class=8, val_per_class=2, image_size=48, shard_samples=8)
    (tmp_path / "run.yaml").write_text("data:\n  train: unused\n  workers: 1\n")
    rec = _run(tmp_path, "--data", str(tmp_path / "data"), "--config", str(tmp_path / "run.yaml"))
    (row,) = rec["results"]
    assert rec["config"]["data"] == str(tmp_path / "data")
    assert 0 <= row["data_wait_s"] < row["step_s"]  # the loader's wait is part of the step, beside the phases
    phases = row["forward_s"] + row["backward_s"] + row["optimizer_s"]
    assert phases + row["data_wait_s"] == pytest.approx(row["step_s"], rel=0.05)


def test_compile_runs_compiled_graphs(tmp_path):
    # model.compile through the engine: fixed shapes (dynamic=False). Automatic dynamic shapes made
    # inductor fail on DiNAT's padding arithmetic ("cannot determine truth value of Relational").
    from torch._dynamo.utils import counters

    counters.clear()
    rec = _run(tmp_path, "--compile")
    assert rec["config"]["compile"] is True and rec["results"][0]["step_s"] > 0
    assert counters["stats"]["unique_graphs"] > 0


def _plan(tmp_path, *extra: str) -> dict:
    path = tmp_path / "plan.json"
    assert (
        main(
            [
                "--plan",
                "--variant",
                "dinat_mini",
                "--resolution",
                "224",
                "--micro-batch",
                "32",
                *extra,
                "--json",
                str(path),
            ]
        )
        == 0
    )
    return json.loads(path.read_text())


def test_plan_least_checkpointing_that_fits(tmp_path, capsys):
    ckpt = _plan(tmp_path)["checkpointing"]
    # a limit that every 2nd layer meets and no checkpointing does not: the least lies in between
    limit = (ckpt["2"]["total"] + ckpt["none"]["total"]) / 2 / GIB
    rec = _plan(tmp_path, "--memory-limit-gib", str(limit))
    least = rec["plan_least_checkpointing"]
    assert least in (8, 4, 3, 2)
    fits = _plan(tmp_path, "--activation-checkpointing", str(least))["plan"]["total"]
    order = ["none", 8, 4, 3, 2]
    before = order[order.index(least) - 1]  # the next-fewer checkpointed layers do not fit
    assert fits <= limit * GIB < _plan(tmp_path, "--activation-checkpointing", str(before))["plan"]["total"]
    assert f"least checkpointing for micro-batch 32 within {limit:g} GiB: 1 layer in {least}" in capsys.readouterr().out
    assert _plan(tmp_path, "--memory-limit-gib", "1000")["plan_least_checkpointing"] == "none"
    assert _plan(tmp_path, "--memory-limit-gib", "0.01")["plan_least_checkpointing"] is None
