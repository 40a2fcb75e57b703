"""The memory plan against measurement: activations (saved tensors, step peak) and DeepSpeed's model states."""

import math
from pathlib import Path

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

import dinat
import pipeline.engine
from pipeline.bench.activations import activation_memory
from pipeline.bench.measure import NewTensorMemory, live_storages
from pipeline.bench.memory_plan import MemoryPlan, ZeroSettings, plan_memory, state_memory
from pipeline.bench.search import max_micro_batch
from pipeline.bench.steps import build_model, make_engine, synthetic_batches, train_step
from pipeline.config import load_config

from .ds_helpers import run_ranks

pytest.importorskip("deepspeed")


def _saved_bytes(model, x, y) -> int:
    """Bytes of the unique storages autograd saves for backward (parameters left out)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, labels=y)
    return sum(seen.values())


def _model(name, checkpointing, dtype):
    model = dinat.create_model(name, attention_backend="reference", activation_checkpointing=checkpointing)
    return model.to(dtype).train()


@pytest.mark.parametrize(
    ("name", "res", "batch", "dtype"),
    [
        ("dinat_debug", 64, 2, torch.float32),  # drop path masks
        ("dinat_mini", 64, 2, torch.float32),  # every level padded to kernel x dilation
        ("dinat_mini", 96, 1, torch.bfloat16),
        ("dinat_base", 64, 1, torch.float32),  # layer scale
    ],
)
def test_saved_activations_match_the_structure(name, res, batch, dtype):
    model = _model(name, "none", dtype)
    x, y = torch.randn(batch, 3, res, res, dtype=dtype), torch.randint(0, 10, (batch,))
    plan = activation_memory(model.config, res, batch, "reference", 2 if dtype == torch.bfloat16 else 4)
    measured = _saved_bytes(model, x, y)  # includes the input batch, which the first conv saves
    if dtype == torch.float32:
        assert measured == plan["saved"] + plan["input"]
    else:  # CPU keeps LayerNorm statistics of bf16 inputs in bf16 (CUDA: fp32, as planned)
        assert measured == pytest.approx(plan["saved"] + plan["input"], rel=0.005)
        assert measured <= plan["saved"] + plan["input"]


@pytest.mark.parametrize(
    ("name", "res", "batch", "checkpointing"),
    [
        ("dinat_debug", 64, 2, "none"),
        ("dinat_debug", 128, 3, "all"),
        ("dinat_debug", 128, 3, 3),
        ("dinat_mini", 96, 2, "none"),
        ("dinat_mini", 96, 2, "all"),
        ("dinat_mini", 96, 2, 2),
    ],
)
def test_activation_peak_matches_a_measured_step(name, res, batch, checkpointing):
    model = _model(name, checkpointing, torch.float32)
    x, y = torch.randn(batch, 3, res, res), torch.randint(0, 10, (batch,))
    model(x, labels=y).loss.backward()  # gradients exist: the next backward accumulates into them
    existing = [*model.parameters(), *(p.grad for p in model.parameters()), x, y]
    with NewTensorMemory(existing) as mem:
        model(x, labels=y).loss.backward()
    plan = activation_memory(model.config, res, batch, "reference", 4)
    # No checkpointing: within 1.5%; checkpointing: the plan errs high by up to 6% (working-set estimate).
    assert 0.94 <= mem.peak_bytes / plan["peak"] <= 1.015
    if checkpointing != "none":
        unchecked = model.config.replace(activation_checkpointing="none")
        assert plan["peak"] < activation_memory(unchecked, res, batch, "reference", 4)["peak"]


def storage_bytes(tensors, exclude: set[int] | None = None) -> int:
    """Bytes of the unique storages of ``tensors`` (those in ``exclude`` left out; ids are added to it)."""
    seen = set() if exclude is None else exclude
    total = 0
    for t in tensors:
        key = StorageWeakRef(t.untyped_storage()).cdata
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def engine_state_bytes(engine) -> dict[str, int]:
    """Bytes this rank holds of model parameters (ZeRO-3: its partitions plus whole persistent ones), fp32
    master weights and Adam moments of a DeepSpeed engine, read from DeepSpeed's own attributes."""
    seen: set[int] = set()
    params = list(engine.module.parameters())
    partitions = [p.ds_tensor for p in params if getattr(p, "ds_tensor", None) is not None]
    out = {"params": storage_bytes([p for p in params if p.numel() > 0] + partitions, seen)}
    opt = engine.optimizer
    master: list[torch.Tensor] = []
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups"):
        for group in getattr(opt, name, None) or []:
            master.extend(group if isinstance(group, list) else [group])
    out["master"] = storage_bytes(master, seen)
    inner = getattr(opt, "optimizer", opt)  # the torch optimizer inside DeepSpeed's wrapper
    moments = [t for state in inner.state.values() for t in state.values() if torch.is_tensor(t) and t.numel() > 1]
    out["moments"] = storage_bytes(moments, seen)
    return out


def _engine_states(info, stage: int, precision: str, extra: list[str] = ()) -> dict:
    """Model-state bytes of a real engine (dinat_debug, micro-batch 2 at 64 px) and the plan's, on this rank."""
    cfg = load_config(
        None,
        [
            "model.name=dinat_debug",
            "model.attention_backend=reference",
            f"train.precision={precision}",
            "train.micro_batch_size=2",
            "train.grad_accum=1",
            f"train.global_batch_size={2 * info.world_size}",
            f"deepspeed.zero_optimization.stage={stage}",
            *extra,
        ],
    )
    baseline = set(live_storages())
    model = build_model(cfg, "dinat_debug", info, 64, None)
    numels = [p.numel() for p in model.parameters()]
    engine = make_engine(cfg, model, info, 2)
    batches = synthetic_batches(2, 64, 10, info.device, pipeline.engine.PRECISION_DTYPES[precision])
    train_step(engine, *next(batches), None)  # Adam's moments exist after a first step
    x, y = next(batches)
    engine.backward(engine(x, labels=y).loss)

    def resident():
        return sum(n for k, n in live_storages().items() if k not in baseline) - x.nbytes - y.nbytes

    out = {"after_backward": resident(), **engine_state_bytes(engine)}
    engine.step()
    out["after_step"] = resident()
    out["plan"] = state_memory(numels, precision, ZeroSettings.from_deepspeed(cfg.deepspeed, info.world_size))
    out["psi"] = sum(numels)
    return out


def _check_states(got: dict, stage: int, precision: str, world: int) -> None:
    plan, b = got["plan"], 2 if precision == "bf16" else 4
    for key in ("params", "master", "moments"):  # DeepSpeed pads partitions to a few elements
        assert got[key] == pytest.approx(plan[key], abs=64 * world), key
    grads = b * math.ceil(got["psi"] / world) if stage == 1 else plan["grads"]  # ZeRO-1: reduced to a partition
    states = plan["params"] + plan["master"] + plan["moments"] + plan["buffers_persistent"]
    if stage in (1, 2) and world > 1:  # what DeepSpeed still holds of the reduce buckets: within the plan's bound
        assert states + grads <= got["after_backward"] <= states + grads + plan["buffers_backward"]
    else:
        assert got["after_backward"] == pytest.approx(states + grads, rel=0.01)
    kept = grads if stage == 3 else 0  # ZeRO-3 keeps its flat gradient partition between steps
    assert got["after_step"] == pytest.approx(states + kept, rel=0.01)


def single_rank_worker(info, out: str) -> None:
    """Every ZeRO stage and precision, one engine after another, in a fresh process. DeepSpeed keeps
    process-wide state between engines (ZeRO-3 replaces torch.nn.functional.linear; a backward-graph
    tracker): built after other tests' engines, a ZeRO-2 engine kept its reduce bucket past backward."""
    pipeline.engine.resolve_precision = lambda p, d: p  # the pipeline refuses bf16 on CPU; DeepSpeed runs it
    linear = torch.nn.functional.linear
    results = {}
    for precision in ("fp32", "bf16"):
        for stage in range(4):
            results[stage, precision] = _engine_states(info, stage, precision)
            torch.nn.functional.linear = linear
    torch.save(results, Path(out) / "rank0.pt")


@pytest.fixture(scope="module")
def single_rank_states(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("states")
    run_ranks(single_rank_worker, str(out), world_size=1)
    return torch.load(out / "rank0.pt", weights_only=False)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_model_states_match_a_real_engine(stage, precision, single_rank_states):
    got = single_rank_states[stage, precision]
    _check_states(got, stage, precision, 1)
    b = 2 if precision == "bf16" else 4
    assert got["master"] == (0 if (stage == 0 and b == 4) else 4 * got["psi"])  # ZeRO 1-3: fp32 master in fp32 too


def partition_worker(info, out: str) -> None:
    """ZeRO 1-3 on 2 ranks, bf16, persistence threshold 1000 so that dinat_debug has both kinds of ZeRO-3
    parameters; a small reduce bucket."""
    pipeline.engine.resolve_precision = lambda p, d: p
    extra = ["deepspeed.zero_optimization.stage3_param_persistence_threshold=1000"]
    extra.append("deepspeed.zero_optimization.reduce_bucket_size=100000")
    results = {stage: _engine_states(info, stage, "bf16", extra) for stage in (1, 2, 3)}
    torch.save(results, Path(out) / f"rank{info.rank}.pt")


def test_zero_partitioning_on_two_ranks(tmp_path):
    run_ranks(partition_worker, str(tmp_path))
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for stage, got in results.items():
            _check_states(got, stage, "bf16", 2)
            assert got["moments"] == pytest.approx(8 * got["psi"] / 2, abs=128)  # halved by the partition
        # ZeRO-3 at 2 ranks: this rank's partition plus the whole persistent parameters, as measured above
        assert results[3]["params"] > 2 * math.ceil(results[3]["psi"] / 2)


def test_state_formulas_and_deepspeed_defaults():
    numels = [300_000, 200_000, 1_000, 10]  # two partitioned, two persistent (<= 100,000) under ZeRO-3
    psi = sum(numels)
    z = ZeroSettings.from_deepspeed({"zero_optimization": {"stage": 3}}, world_size=4)
    assert (z.reduce_bucket_size, z.overlap, z.persistence_threshold) == (500_000_000, True, 100_000)
    s3 = state_memory(numels, "bf16", z)
    part = sum(math.ceil(n / 4) for n in numels)
    assert s3["params"] == 2 * (part + 1_010) and s3["grads"] == 2 * part
    assert (s3["master"], s3["moments"], s3["buffers_persistent"]) == (4 * part, 8 * part, 2 * 500_000_000)
    s2 = state_memory(numels, "bf16", ZeroSettings(stage=2, world_size=4, reduce_bucket_size=10**6, overlap_comm=True))
    assert s2["grads"] == 2 * math.ceil(psi / 4) and s2["buffers_backward"] == 2 * 2 * 10**6
    s0 = state_memory(numels, "fp32", ZeroSettings(stage=0))
    assert (s0["params"], s0["grads"], s0["master"], s0["moments"], s0["step"]) == (4 * psi, 4 * psi, 0, 8 * psi, 0)
    with pytest.raises(ValueError, match="ZeRO stage must be 0, 1, 2 or 3"):
        ZeroSettings(stage=4)


def test_plan_search_and_dinat_large_on_80gb():
    cfg = dinat.variant_config("dinat_large", activation_checkpointing="none")
    zero = ZeroSettings(stage=2, world_size=8, reduce_bucket_size=200_000_000, overlap_comm=True)

    def plan_at(m: int) -> MemoryPlan:
        return plan_memory(cfg, "dinat_large", 224, m, "bf16", "natten", zero)

    limit = 78 * 2**30
    best = max_micro_batch(plan_at, limit)
    assert plan_at(best).total <= limit < plan_at(best + 1).total
    # Activations grow linearly with the batch; model states do not.
    a, b = plan_at(64), plan_at(128)
    assert b.activations == pytest.approx(2 * a.activations, rel=1e-3) and b.persistent == a.persistent
    assert max_micro_batch(plan_at, 1.0) == 0
