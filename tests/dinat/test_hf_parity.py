"""Parity with transformers' own DiNAT (made runnable by dinat.compat) on the same weights.

The oracle is the environment's transformers (4.46.3); to check another release, install it aside and put it
first on the path: `pip install --target /tmp/tf-X transformers==X --no-deps` (+ its tokenizers and
huggingface_hub), then `PYTHONPATH=/tmp/tf-X python -m pytest tests/dinat/test_hf_parity.py`.
"""

import pytest
import torch

import dinat

from .fresh import run_fresh

transformers = pytest.importorskip("transformers")
from dinat.compat import check_version, patch_transformers  # noqa: E402

patch_transformers()


def randomize(model, scale=0.02):
    """Perturb every parameter (non-zero RPB and layer scale included) so nothing is at its init."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def compare(ours, hf, x):
    with torch.no_grad():
        a = ours(x, output_hidden_states=True)
        b = hf(x, output_hidden_states=True)
    assert (a.logits - b.logits).abs().max().item() <= 1e-4
    assert len(a.reshaped_hidden_states) == len(b.reshaped_hidden_states)
    for i, (p, q) in enumerate(zip(a.reshaped_hidden_states, b.reshaped_hidden_states)):
        assert p.shape == q.shape, i
        assert (p - q).abs().max().item() <= 1e-4, i


# (variant, resolution, overrides): resolutions with and without padding (maps smaller than kernel x dilation)
CASES = [
    ("dinat_debug", 64, {}),  # last levels padded
    ("dinat_debug", 192, {}),  # no padding
    ("dinat_debug", 80, {"layer_scale_init_value": 0.3, "num_labels": 3}),
    ("dinat_mini", 96, {}),  # levels 0-2 padded
    ("dinat_mini", 224, {}),
    ("dinat_base", 96, {}),  # layer scale
    ("dinat_large", 160, {}),  # level 0: 40 < 7 x 8, padded
    ("dinat_large", 224, {}),
]


@pytest.mark.parametrize("name,res,overrides", CASES)
def test_logits_and_hidden_states_equal_transformers(name, res, overrides, tmp_path):
    ours = randomize(dinat.create_model(name, use_rpb=True, **overrides)).eval()
    ours.save_pretrained(tmp_path)
    hf = transformers.DinatForImageClassification.from_pretrained(tmp_path).eval()
    compare(ours, hf, torch.randn(2 if res < 200 else 1, 3, res, res))


def test_weights_round_trip_through_transformers(tmp_path):
    ours = randomize(dinat.create_model("dinat_debug", use_rpb=True, layer_scale_init_value=0.1)).eval()
    ours.save_pretrained(tmp_path / "a")
    hf = transformers.DinatForImageClassification.from_pretrained(tmp_path / "a")
    assert set(hf.state_dict()) == set(ours.state_dict())
    hf.save_pretrained(tmp_path / "b", safe_serialization=True)  # the default only from 4.35
    back = dinat.DinatForImageClassification.from_pretrained(tmp_path / "b").eval()
    assert back.config.use_rpb
    for k, v in ours.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(x).logits, back(x).logits)


def test_model_without_rpb_exports_zero_rpb_and_transformers_agrees(tmp_path):
    ours = randomize(dinat.create_model("dinat_mini")).eval()
    ours.save_pretrained(tmp_path)
    hf = transformers.DinatForImageClassification.from_pretrained(tmp_path).eval()
    rpb = [v for k, v in hf.state_dict().items() if k.endswith("rpb")]
    assert len(rpb) == sum(ours.config.depths) and all(not t.any() for t in rpb)
    compare(ours, hf, torch.randn(1, 3, 96, 96))
    back = dinat.DinatForImageClassification.from_pretrained(tmp_path)
    assert not back.config.use_rpb


def test_transformers_initialised_checkpoint_loads_without_rpb(tmp_path):
    hf_cfg = transformers.DinatConfig(
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 2, 4, 8],
        kernel_size=3,
        dilations=[[2], [1], [1], [1]],
        num_labels=4,
    )
    hf = transformers.DinatForImageClassification(hf_cfg).eval()  # HF initialises RPB to zeros
    hf.save_pretrained(tmp_path, safe_serialization=True)  # the default only from 4.35
    ours = dinat.DinatForImageClassification.from_pretrained(tmp_path).eval()
    assert not ours.config.use_rpb  # all-zero RPB: same function without it, so fused kernels can run
    compare(ours, hf, torch.randn(2, 3, 48, 48))


def test_compat_is_an_attribute_of_dinat_and_leaves_transformers_unimported():
    """The README's `import dinat; dinat.compat.patch_transformers()`, in a fresh interpreter."""
    code = (
        "import sys, dinat\n"
        "assert 'transformers' not in sys.modules, 'import dinat imported transformers'\n"
        "module = dinat.compat.patch_transformers()\n"
        "import transformers\n"
        "print(transformers.__version__, module.natten2dav is dinat.attention.natten2dav)\n"
    )
    assert run_fresh(code).split() == [transformers.__version__, "True"]


# Read from each release's models/dinat/modeling_dinat.py (see dinat/compat.py): 4.25-4.27 call the
# kernel-size-less natten2dqkrpb, 4.54.0 on reshape (B, H, W, C) maps as (B, L, C), 5.5.1 on use the wrong axes.
@pytest.mark.parametrize(
    "version", ["4.25.1", "4.27.4", "4.54.0", "4.54.0.dev0", "4.57.6", "5.0.0", "5.5.0", "5.5.1", "5.24.0"]
)
def test_broken_releases_are_refused_in_one_line(version):
    with pytest.raises(RuntimeError) as e:
        check_version(version)
    message = str(e.value)
    assert message.startswith(f"transformers {version}: ") and "\n" not in message
    assert "pip install 'transformers>=4.28,<4.54'" in message


@pytest.mark.parametrize("version", ["4.28.0", "4.46.3", "4.53.3"])
def test_working_releases_are_accepted(version):
    assert check_version(version) is None


def test_patch_transformers_checks_the_installed_version(monkeypatch):
    monkeypatch.setattr(transformers, "__version__", "4.57.6")
    with pytest.raises(RuntimeError, match=r"^transformers 4\.57\.6: .*rewritten in 4\.54\.0"):
        patch_transformers()
