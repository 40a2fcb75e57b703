import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hp_metadata
from tensorboard.plugins.hparams import plugin_data_pb2

from pipeline.distributed import DistInfo
from pipeline.metrics import Metrics, StepTimer, flatten_config, mfu, peak_flops

SCALARS = {
    "train/loss": 6.25,
    "train/lr": 1e-3,
    "train/grad_norm": 1.5,
    "eval/loss": 5.5,
    "eval/top1": 0.125,
    "eval/top5": 0.375,
    "perf/images_per_sec": 3000.0,
    "perf/images_per_sec_per_gpu": 375.0,
    "perf/mfu": 0.42,
    "perf/data_wait_fraction": 0.03,
    "mem/peak_gib": 61.5,
    "data/skipped_samples": 2.0,
}


def _events(log_dir) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_scalars_images_hparams_read_back(tmp_path):
    m = Metrics(tmp_path, DistInfo(rank=0, world_size=1))
    m.scalars(10, SCALARS)
    m.scalars(20, {"train/loss": 5.0, "eval/top1": torch.tensor(0.25)})
    m.images(10, "data/batch", torch.randint(0, 256, (5, 3, 16, 24), dtype=torch.uint8))
    config = {"optim": {"lr": 1e-3, "betas": [0.9, 0.999]}, "model": {"name": "dinat_large", "ckpt": True}, "x": None}
    m.hparams(config, {"eval/top1": None, "eval/top5": 0.5}, step=30)
    m.close()

    acc = _events(tmp_path)
    assert set(acc.Tags()["scalars"]) == set(SCALARS)
    for tag, value in SCALARS.items():
        assert acc.Scalars(tag)[0].step == 10
        assert acc.Scalars(tag)[0].value == pytest.approx(value, rel=1e-6), tag
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(10, 6.25), (20, 5.0)]
    assert [(e.step, e.value) for e in acc.Scalars("eval/top1")] == [(10, 0.125), (20, 0.25)]  # None: no point
    assert [(e.step, e.value) for e in acc.Scalars("eval/top5")] == [(10, 0.375), (30, 0.5)]

    (img,) = acc.Images("data/batch")
    # 5 images, 3 per row -> 2 rows; make_grid pads 2 pixels around every cell
    assert (img.step, img.width, img.height) == (10, 3 * (24 + 2) + 2, 2 * (16 + 2) + 2)

    content = acc.PluginTagToContent(hp_metadata.PLUGIN_NAME)
    assert set(content) == {
        hp_metadata.EXPERIMENT_TAG,
        hp_metadata.SESSION_START_INFO_TAG,
        hp_metadata.SESSION_END_INFO_TAG,
    }
    start = plugin_data_pb2.HParamsPluginData.FromString(content[hp_metadata.SESSION_START_INFO_TAG])
    hp = start.session_start_info.hparams
    assert hp["optim.lr"].number_value == 1e-3
    assert hp["optim.betas"].string_value == "[0.9, 0.999]"
    assert hp["model.name"].string_value == "dinat_large"
    assert hp["model.ckpt"].bool_value is True
    assert hp["x"].string_value == "None"
    exp = plugin_data_pb2.HParamsPluginData.FromString(content[hp_metadata.EXPERIMENT_TAG]).experiment
    assert [mi.name.tag for mi in exp.metric_infos] == ["eval/top1", "eval/top5"]


def test_only_rank0_writes(tmp_path):
    log_dir = tmp_path / "tb"
    for m in (Metrics(log_dir, DistInfo(rank=1, world_size=2)), Metrics(log_dir, DistInfo(), enabled=False)):
        assert not m.active
        m.scalars(1, {"train/loss": 1.0})
        m.images(1, "data/batch", torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
        m.hparams({"a": 1}, {"eval/top1": 0.0})
        m.flush()
        m.close()
    assert not log_dir.exists()


def test_bad_names_and_images(tmp_path):
    m = Metrics(tmp_path, DistInfo())
    with pytest.raises(ValueError, match="must start with one of"):
        m.scalars(1, {"loss": 1.0})
    with pytest.raises(ValueError, match="must start with one of"):
        m.scalars(1, {"training/loss": 1.0})
    with pytest.raises(ValueError, match="uint8"):
        m.images(1, "data/batch", torch.zeros(2, 3, 8, 8))
    m.close()


def test_flatten_config():
    flat = flatten_config({"a": {"b": {"c": 3}}, "d": (1, 2), "e": False, "f": "x"})
    assert flat == {"a.b.c": 3.0, "d": "(1, 2)", "e": False, "f": "x"}


def test_mfu_arithmetic():
    # 8 GPUs at 1e15 peak, 2 s per step, 4e15 useful FLOPs per step -> 4e15 / 16e15
    assert mfu(4e15, 2.0, 8, 1e15) == pytest.approx(0.25)
    # DiNAT-L-ish: 184 GFLOPs/image/step (FACTS), 4096 images, 1 s, 64 H100s at 989 TFLOP/s bf16
    assert mfu(184e9 * 4096, 1.0, 64, 989e12) == pytest.approx(184e9 * 4096 / (64 * 989e12))
    assert mfu(1e12, 1.0, 1, None) is None
    assert mfu(1e12, 0.0, 1, 1e12) is None


def test_peak_flops(monkeypatch):
    cpu = torch.device("cpu")
    assert peak_flops(cpu, torch.bfloat16) is None
    assert peak_flops(cpu, torch.bfloat16, override=2e12) == 2e12
    cuda = torch.device("cuda", 0)
    names = iter(["NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA A100-SXM4-80GB", "NVIDIA H100 PCIe", "Mystery X"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: next(names))
    assert peak_flops(cuda, torch.bfloat16) == 989e12
    assert peak_flops(cuda, torch.bfloat16) == 989e12
    assert peak_flops(cuda, torch.bfloat16) == 312e12
    assert peak_flops(cuda, torch.float16) == 756e12
    assert peak_flops(cuda, torch.bfloat16) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert peak_flops(cuda, torch.float32) in (19.5e12, 156e12)  # fp32 or TF32, by matmul precision
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    assert peak_flops(cuda, torch.float32) == 19.5e12
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert peak_flops(cuda, torch.float32) == 156e12


def test_step_timer_sanity():
    timer = StepTimer()
    for _ in range(3):
        time.sleep(0.01)  # "waiting for data"
        timer.data_ready()
        timer.step_done()
    s = timer.summary()
    assert s["steps"] == 3
    assert s["step_seconds"] > 0
    assert 0 < s["data_wait_fraction"] <= 1
    assert timer.summary()["steps"] == 0  # reset
    with pytest.raises(RuntimeError, match="data_ready"):
        timer.step_done()


def test_step_timer_with_a_fake_clock():
    now = [0.0]
    timer = StepTimer(clock=lambda: now[0])
    for wait, compute in ((1.0, 3.0), (0.0, 4.0)):
        now[0] += wait
        timer.data_ready()
        now[0] += compute
        assert timer.step_done() == wait + compute
    now[0] += 100.0  # eval between steps, excluded by step_start()
    timer.step_start()
    # gradient accumulation: wait 2, compute 1, wait 0.5 (marked by fetch_start), compute 1.5
    now[0] += 2.0
    timer.data_ready()
    now[0] += 1.0
    timer.fetch_start()
    now[0] += 0.5
    timer.data_ready()
    now[0] += 1.5
    timer.data_ready()  # no fetch_start: adds no wait
    timer.step_done()
    assert timer.summary() == {"steps": 3.0, "step_seconds": 13.0 / 3, "data_wait_fraction": 3.5 / 13.0}
    now[0] += 1.0
    timer.data_ready()
    timer.step_done()
    assert timer.pop() == (1.0, 1.0)
    assert timer.pop() == (0.0, 0.0)
