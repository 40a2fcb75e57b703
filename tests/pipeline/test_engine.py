import math

import pytest

import dinat
from pipeline.engine import Schedule, param_groups


def test_weight_decay_excludes_norms_biases_rpb_and_layer_scale():
    model = dinat.create_model("dinat_debug", use_rpb=True, layer_scale_init_value=0.1)
    decay, no_decay = param_groups(model, 0.05)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert decayed | skipped == set(names.values()) and not decayed & skipped
    assert all(n.endswith(".weight") and ("norm" not in n) for n in decayed)
    for fragment in ("rpb", "layer_scale_parameters", "layernorm_before.weight", "query.bias", "downsample.norm"):
        assert any(fragment in n for n in skipped), fragment
    assert "dinat.encoder.levels.0.layers.0.attention.self.query.weight" in decayed


def test_schedule_warmup_then_cosine():
    s = Schedule(peak_lr=1e-3, min_lr=1e-5, warmup_steps=4, total_steps=20)
    assert [s.lr(i) for i in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert s.lr(4) == pytest.approx(1e-3)
    assert s.lr(12) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 0.5)))
    assert s.lr(20) == pytest.approx(1e-5) and s.lr(100) == pytest.approx(1e-5)
    assert all(s.lr(i) >= s.lr(i + 1) for i in range(4, 25))
