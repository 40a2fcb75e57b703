"""Package boundaries, timm registration and the smoke entry point."""

import subprocess
import sys

import pytest
import timm
import torch

import dinat

from .fresh import run_fresh


def test_import_dinat_without_training_stack():
    code = (
        "import sys\n"
        "for m in ('deepspeed', 'webdataset', 'accelerate', 'tensorboard', 'pipeline'):\n"
        "    sys.modules[m] = None  # any import of these now raises ImportError\n"
        "import torch, dinat\n"
        "m = dinat.create_model('dinat_debug')\n"
        "print(tuple(m(torch.randn(1, 3, 64, 64)).logits.shape))\n"
    )
    assert run_fresh(code).strip() == "(1, 10)"


def test_timm_registration():
    assert set(timm.list_models("dinat_*")) == set(dinat.list_models())
    model = timm.create_model("dinat_debug", num_classes=3, in_chans=1, drop_path_rate=0.0).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert model(x).shape == (2, 3)
        assert model.forward_features(x).shape == (2, 2, 2, 128)
    assert model.pretrained_cfg["input_size"] == (3, 64, 64)
    assert set(model.state_dict()) == set(dinat.create_model("dinat_debug", num_labels=3, num_channels=1).state_dict())
    with_extras = timm.create_model("dinat_debug", use_rpb=True, layer_scale_init_value=0.1)
    names = {n for n, _ in with_extras.named_parameters() if n.endswith(("rpb", "layer_scale_parameters"))}
    assert len(names) == 2 * 7 and with_extras.no_weight_decay() == names
    with pytest.raises(ValueError, match="no hub weights"):
        timm.create_model("dinat_debug", pretrained=True)
    with pytest.raises(ValueError, match="unknown DinatConfig field"):
        timm.create_model("dinat_debug", bogus=1)


def test_smoke_entry_point_trains():
    out = subprocess.run([sys.executable, "-m", "dinat", "--steps", "8"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "loss" in out.stderr and "img/s" in out.stderr
