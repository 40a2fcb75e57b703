import pytest
import torch

import dinat
from dinat.memory import PeakTensorMemory
from dinat.modeling import DinatBackbone, DinatModel

# Published parameter counts (FACTS.md; DiNAT.md of SHI-Labs/Neighborhood-Attention-Transformer), 1k head.
PUBLISHED_PARAMS_M = {
    "dinat_mini": 20,
    "dinat_tiny": 28,
    "dinat_small": 51,
    "dinat_base": 90,
    "dinat_large": 200,
    "dinat_large_384": 200,
    "dinat_large_384_11x11": 200,
}


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMS_M))
def test_parameter_counts_match_published(name):
    model = dinat.create_model(name, num_labels=1000, use_rpb=True)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(params - PUBLISHED_PARAMS_M[name]) / PUBLISHED_PARAMS_M[name] < 0.01, params


@pytest.mark.parametrize("name", dinat.list_models())
def test_every_variant_trains_one_step(name):
    model = dinat.create_model(name, num_labels=5)
    model.train()
    x = torch.randn(1, 3, 64, 64)
    out = model(x, labels=torch.tensor([3]))
    assert out.logits.shape == (1, 5)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_large_at_224_is_the_published_network():
    model = dinat.create_model("dinat_large").eval()
    assert model.config.n_labels == 21841
    assert [lv.layers[0].attention.self.head_dim for lv in model.dinat.encoder.levels] == [32, 32, 32, 32]
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
    shapes = [tuple(h.shape) for h in out.reshaped_hidden_states]
    assert shapes == [(1, 192, 56, 56), (1, 384, 28, 28), (1, 768, 14, 14), (1, 1536, 7, 7), (1, 1536, 7, 7)]
    assert out.logits.shape == (1, 21841)


def _loss_and_grads(model, x, y, seed):
    torch.manual_seed(seed)
    model.zero_grad()
    loss = model(x, labels=y).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def peak_step_memory(model, x, y):
    with PeakTensorMemory() as mem:
        model(x, labels=y).loss.backward()
    return mem.peak_bytes


@pytest.mark.parametrize("mode", ["all", 2])
def test_activation_checkpointing_is_exact_and_saves_memory(mode):
    base = dinat.create_model("dinat_debug", drop_path_rate=0.3, hidden_dropout_prob=0.1).train()
    ckpt = dinat.create_model("dinat_debug", drop_path_rate=0.3, hidden_dropout_prob=0.1, activation_checkpointing=mode)
    ckpt.load_state_dict(base.state_dict())
    ckpt.train()
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
    loss_a, grads_a = _loss_and_grads(base, x, y, seed=7)
    loss_b, grads_b = _loss_and_grads(ckpt, x, y, seed=7)
    assert torch.equal(loss_a, loss_b)
    for n in grads_a:
        torch.testing.assert_close(grads_a[n], grads_b[n], rtol=0, atol=1e-7, msg=n)
    full, saved = peak_step_memory(base, x, y), peak_step_memory(ckpt, x, y)
    assert saved < (0.5 if mode == "all" else 0.8) * full, (saved, full)


def test_checkpointing_schedule_every_k():
    model = dinat.create_model("dinat_debug", activation_checkpointing=3)
    flags = [f for level in model.dinat.encoder.levels for f in level.checkpointed]
    assert flags == [i % 3 == 0 for i in range(7)]


def test_soft_labels_give_soft_cross_entropy():
    model = dinat.create_model("dinat_debug").eval()
    x = torch.randn(2, 3, 64, 64)
    hard = torch.tensor([1, 4])
    soft = torch.nn.functional.one_hot(hard, 10).float()
    with torch.no_grad():
        torch.testing.assert_close(model(x, labels=soft).loss, model(x, labels=hard).loss)
    with pytest.raises(ValueError, match="soft labels must have the logits' shape"):
        model(x, labels=torch.zeros(2, 3))


def test_wrong_channel_count_is_a_clear_error():
    model = dinat.create_model("dinat_debug")
    with pytest.raises(ValueError, match=r"pixel_values must be \(batch, 3, height, width\); got \(2, 1, 64, 64\)"):
        model(torch.randn(2, 1, 64, 64))


def test_patch_size_other_than_4_is_refused():
    with pytest.raises(ValueError, match="patch_size must be 4"):
        dinat.create_model("dinat_debug", patch_size=16)


def test_backbone_feature_maps():
    cfg = dinat.variant_config("dinat_debug", out_features=["stem", "stage2", "stage4"])
    backbone = DinatBackbone(cfg).eval()
    with torch.no_grad():
        maps = backbone(torch.randn(2, 3, 64, 64)).feature_maps
    assert [tuple(m.shape) for m in maps] == [(2, 16, 16, 16), (2, 32, 8, 8), (2, 128, 2, 2)]
    assert backbone.channels == [16, 32, 128]


def test_base_model_shares_the_classifier_body():
    cls = dinat.create_model("dinat_debug").eval()
    base = DinatModel(cls.config).eval()
    base.load_state_dict({k.removeprefix("dinat."): v for k, v in cls.state_dict().items() if k.startswith("dinat.")})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(base(x).pooler_output, cls(x).pooler_output)


def test_no_rpb_model_has_no_rpb_parameters_and_init_follows_the_original():
    model = dinat.create_model("dinat_mini")
    assert not any("rpb" in n for n, _ in model.named_parameters())
    with_rpb = dinat.create_model("dinat_mini", use_rpb=True)
    rpb = with_rpb.dinat.encoder.levels[0].layers[0].attention.self.rpb
    assert rpb.shape == (2, 13, 13) and 0.01 < rpb.std().item() < 0.03
    q = model.dinat.encoder.levels[2].layers[0].attention.self.query
    assert abs(q.weight.std().item() - 0.02) < 0.002 and q.bias.abs().max().item() == 0.0
    dps = [getattr(layer.drop_path, "drop_prob", 0.0) for lv in model.dinat.encoder.levels for layer in lv.layers]
    torch.testing.assert_close(torch.tensor(dps), torch.linspace(0, 0.2, 18))
