"""Resuming on another world size through DeepSpeed's universal checkpoint, with the pipeline's own engine (two
parameter groups, AdamW, LambdaLR, clipping), ZeRO 1, 2 and 3, fp32 and bf16: 2 ranks -> 1 rank -> 3 ranks.

After each resume the loaded state, saved again and converted again, equals the checkpoint's conversion tensor
for tensor (fp32 master weights, Adam moments, step), bitwise; step and learning rate continue. Every step uses
the same 6 samples whatever the world size (each rank takes its slice), so the next step's loss equals the
uninterrupted run's up to the order in which ranks sum gradients.
"""

from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import Checkpointer, read_state
from pipeline.config import load_config
from pipeline.engine import Schedule, build_engine
from pipeline.reshard import UNIVERSAL_TAG, Unresumable, ensure_universal, needs_universal

from .ds_helpers import NUM_LABELS, RES, run_ranks

GLOBAL = 6  # samples per step, divisible by 1, 2 and 3 ranks
CASES = [(1, "fp32"), (3, "fp32"), (2, "bf16"), (3, "bf16")]  # every stage, both precisions, ZeRO-3 both


def _engine(info, stage: int, precision: str, universal: bool = False):
    import dinat

    cfg = load_config(None, ["data.train=unused", f"deepspeed.zero_optimization.stage={stage}",
                             f"train.precision={precision}", "optim.grad_clip=1.0"])  # fmt: skip
    torch.manual_seed(0)
    model = dinat.create_model("dinat_debug", num_labels=NUM_LABELS, attention_backend="reference",
                               drop_path_rate=0.0)  # fmt: skip
    micro = GLOBAL // info.world_size
    schedule = Schedule(peak_lr=1e-3, min_lr=1e-5, warmup_steps=2, total_steps=20)
    engine, *_ = build_engine(cfg, model, info, micro, 1, GLOBAL, schedule, load_universal=universal)
    return engine


def _step(engine, info, step: int) -> float:
    """One optimizer step on the fixed global batch of ``step``; returns the mean loss over ranks."""
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(GLOBAL, 3, RES, RES, generator=g), torch.randint(0, NUM_LABELS, (GLOBAL,), generator=g)
    per = GLOBAL // info.world_size
    mine = slice(info.rank * per, (info.rank + 1) * per)
    dtype = next(engine.module.parameters()).dtype
    loss = engine(x[mine].to(dtype), labels=y[mine]).loss
    engine.backward(loss)
    engine.step()
    mean = loss.detach().float().reshape(1)
    torch.distributed.all_reduce(mean)
    return mean.item() / info.world_size


def _state(step: int) -> dict:
    return {"step": step, "note": "test"}


def phase(info, base: str, load_from: str | None, out: str) -> None:
    """For every case: build (or resume) an engine on this world size, then train and save as the test says."""
    results = {}
    for stage, precision in CASES:
        root = Path(base) / f"z{stage}-{precision}-w{info.world_size}"
        ck = Checkpointer(root, keep=5, dist=info)
        res: dict = {}
        if load_from is None:  # the first job: 3 steps, save, then 2 more steps as the reference
            engine = _engine(info, stage, precision)
            for s in range(3):
                _step(engine, info, s)
            res["saved"], res["lr_at_save"] = str(ck.save(engine, 3, _state(3), {})), engine.get_lr()[0]
            res["losses"] = {s: _step(engine, info, s) for s in (3, 4)}
        else:
            path = Path(load_from.format(stage=stage, precision=precision))
            state = read_state(path)
            universal = needs_universal(path, state, info.world_size, stage)
            ck.prepare_universal(path, state)
            engine = _engine(info, stage, precision, universal)
            ck.load(engine, path, universal=universal)
            res.update(universal=universal, lr=engine.get_lr()[0], global_steps=engine.global_steps)
            res["reloaded"] = str(ck.save(engine, state["step"], _state(state["step"]), {}))
            step = state["step"]
            res["losses"] = {step: _step(engine, info, step)}
            if step == 3:  # the middle job saves after its step 3 for the last one
                res["saved"], res["lr_at_save"] = str(ck.save(engine, 4, _state(4), {})), engine.get_lr()[0]
                res["losses"][4] = _step(engine, info, 4)
        results[(stage, precision)] = res
    if info.rank == 0:
        torch.save(results, out)


def _tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every per-parameter file of the checkpoint's universal conversion (made here when missing)."""
    state = read_state(checkpoint)
    ensure_universal(checkpoint, checkpoint / "deepspeed", state["world_size"], workers=1)
    zero = checkpoint / UNIVERSAL_TAG / "zero"
    out = {}
    for f in sorted(zero.rglob("*.pt")):
        if f.parent != zero:
            value = torch.load(f, map_location="cpu", weights_only=False)
            out[str(f.relative_to(zero))] = value["param"] if isinstance(value, dict) else value
    return out


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    base = tmp_path_factory.mktemp("reshard")
    run_ranks(phase, str(base), None, str(base / "w2.pt"), world_size=2)
    first = torch.load(base / "w2.pt", weights_only=False)
    run_ranks(phase, str(base), str(base / "z{stage}-{precision}-w2" / "step_00000003"), str(base / "w1.pt"),
              world_size=1)  # fmt: skip
    run_ranks(phase, str(base), str(base / "z{stage}-{precision}-w1" / "step_00000004"), str(base / "w3.pt"),
              world_size=3)  # fmt: skip
    return first, torch.load(base / "w1.pt", weights_only=False), torch.load(base / "w3.pt", weights_only=False)


@pytest.mark.parametrize("stage,precision", CASES)
def test_two_ranks_to_one_to_three(chain, stage, precision):
    first, middle, last = (r[(stage, precision)] for r in chain)
    loss_tol = 1e-6 if precision == "fp32" else 2e-2  # the same samples, gradients summed in another order
    for before, after, step in ((first, middle, 3), (middle, last, 4)):
        assert after["universal"]
        saved, reloaded = _tensors(Path(before["saved"])), _tensors(Path(after["reloaded"]))
        assert saved.keys() == reloaded.keys() and any(k.endswith("exp_avg.pt") for k in saved)
        for key in saved:
            assert torch.equal(saved[key], reloaded[key]), key
        assert after["global_steps"] == step and after["lr"] == before["lr_at_save"]
        assert after["losses"][step] == pytest.approx(before["losses"][step], abs=loss_tol)
    assert middle["losses"][4] == pytest.approx(first["losses"][4], abs=10 * loss_tol)


def test_what_cannot_be_resharded_is_refused_in_one_line(chain, tmp_path):
    first = chain[0][(2, "bf16")]
    path = Path(first["saved"])
    state = read_state(path)
    with pytest.raises(Unresumable, match=r"written with ZeRO stage 2, this job uses stage 3; only 1 <-> 2 converts; "
                       r"resume it with 2 ranks .*dinat-export"):  # fmt: skip
        needs_universal(path, state, 2, 3)
    assert (
        not needs_universal(path, state, 2, 2)
        and needs_universal(path, state, 4, 2)
        and needs_universal(path, state, 2, 1)
    )
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(path, broken, ignore=shutil.ignore_patterns(UNIVERSAL_TAG))  # not converted yet
    for f in (broken / "deepspeed").glob("*zero_pp_rank_1_*optim_states.pt"):
        f.unlink()
    with pytest.raises(Unresumable, match=rf"{broken}: the optimizer files of rank\(s\) \[1\] are missing"):
        ensure_universal(broken, broken / "deepspeed", 2)
