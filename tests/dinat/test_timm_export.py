"""An export (config.json + model.safetensors + preprocessor_config.json, as dinat-export writes it) through
timm's own calls: create_model(pretrained=True, pretrained_cfg_overlay=dict(file=...)), create_model(
checkpoint_path=...), and timm.data's data config."""

import json

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.data import resolve_data_config, resolve_model_data_config

import dinat

SIZE = 96  # dinat_debug's default resolution is 64: the data config must come from the export
LABELS = 5  # dinat_debug's default is 10: the class count must come from the export
NAMES = {i: f"n0000000{i}" for i in range(LABELS)}


def export(path, size=SIZE, **overrides):
    """A tiny trained-looking model written by the exporter's writer (dinat.hub.save_pretrained)."""
    model = dinat.create_model("dinat_debug", id2label=NAMES, **overrides).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # nothing at its init value
    model.save_pretrained(path, image_size=size)
    return model


def logits(model, size=SIZE):
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.eval()(x)
    return out.logits if hasattr(out, "logits") else out


def from_export(path, **kwargs):
    """timm's pretrained=True with the export's weights file."""
    overlay = dict(file=str(path / "model.safetensors"))
    return timm.create_model("dinat_debug", pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)


@pytest.fixture
def exported(tmp_path):
    model = export(tmp_path)
    rpb = [k for k, v in load_file(tmp_path / "model.safetensors").items() if k.endswith(".rpb")]
    assert len(rpb) == sum(model.config.depths)  # the zero RPB that timm's strict load must get past
    return model, tmp_path


@pytest.mark.parametrize("form", ["file", "local-dir"])
def test_pretrained_true_loads_the_export_and_its_data_config(exported, form):
    model, path = exported
    overlay = dict(file=str(path / "model.safetensors")) if form == "file" else dict(source="local-dir", file=str(path))
    timm_model = timm.create_model("dinat_debug", pretrained=True, pretrained_cfg_overlay=overlay)
    assert timm_model.num_classes == LABELS
    assert timm_model.pretrained_cfg["label_names"] == tuple(NAMES.values())
    torch.testing.assert_close(logits(timm_model), logits(model), rtol=0, atol=0)
    for config in (resolve_data_config({}, model=timm_model), resolve_model_data_config(timm_model)):
        assert config["input_size"] == (3, SIZE, SIZE)
        assert config["interpolation"] == "bicubic"
        assert config["mean"] == pytest.approx((0.485, 0.456, 0.406)) and config["std"] == pytest.approx(
            (0.229, 0.224, 0.225)
        )


def test_checkpoint_path_loads_the_export(exported):
    model, path = exported
    weights = str(path / "model.safetensors")
    timm_model = timm.create_model("dinat_debug", num_classes=LABELS, checkpoint_path=weights)
    torch.testing.assert_close(logits(timm_model), logits(model), rtol=0, atol=0)
    # timm builds the model before reading checkpoint_path: the input size is passed as timm passes it
    sized = timm.create_model(
        "dinat_debug", num_classes=LABELS, checkpoint_path=weights, pretrained_cfg_overlay=dict(input_size=(3, 96, 96))
    )
    assert resolve_model_data_config(sized)["input_size"] == (3, 96, 96)


def test_new_head_keeps_the_backbone(exported):
    """timm's fine-tuning call: another class count drops the export's classifier, loads everything else."""
    model, path = exported
    timm_model = from_export(path, num_classes=3).eval()
    assert timm_model.num_classes == 3
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(timm_model.forward_features(x), model.dinat(x).last_hidden_state, rtol=0, atol=0)


def test_export_with_rpb_needs_use_rpb(tmp_path):
    model = export(tmp_path, use_rpb=True)
    weights = str(tmp_path / "model.safetensors")
    with_rpb = from_export(tmp_path, use_rpb=True)
    torch.testing.assert_close(logits(with_rpb), logits(model), rtol=0, atol=0)
    for call in (
        lambda: from_export(tmp_path),
        lambda: timm.create_model("dinat_debug", num_classes=LABELS, checkpoint_path=weights),
    ):
        with pytest.raises(ValueError, match=r"non-zero relative positional bias .* use_rpb=True"):
            call()


def test_export_of_another_architecture_is_named(tmp_path):
    export(tmp_path, dilations=[[1, 1], [1, 1], [1, 1], [1]])  # same parameter shapes, another network
    with pytest.raises(ValueError, match=r"model.safetensors: dilations=\[\[1, 1\].* but dinat_debug has \[\[1, 4\]"):
        from_export(tmp_path)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda p: p.update(size={"longest_edge": 96}), "'size' must be a list of positive numbers"),
        (lambda p: p.update(image_mean=None), "'image_mean' must be a list of positive numbers, got None"),
        (lambda p: p.update(resample=9), "'resample' must be a PIL resample code 0-5, got 9"),
    ],
)
def test_bad_preprocessor_config_is_named(exported, edit, message):
    _, path = exported
    pre = json.loads((path / "preprocessor_config.json").read_text())
    edit(pre)
    (path / "preprocessor_config.json").write_text(json.dumps(pre))
    with pytest.raises(ValueError, match="preprocessor_config.json: " + message):
        from_export(path)
