import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import dinat
from dinat.convert import convert_checkpoint


@pytest.fixture
def saved(tmp_path):
    model = dinat.create_model("dinat_debug", use_rpb=True).eval()
    model.save_pretrained(tmp_path, image_size=64)
    return model, tmp_path


def test_save_writes_hf_files(saved):
    model, path = saved
    assert {p.name for p in path.iterdir()} == {"config.json", "model.safetensors", "preprocessor_config.json"}
    sd = load_file(path / "model.safetensors")
    assert set(sd) == set(model.state_dict())
    pre = json.loads((path / "preprocessor_config.json").read_text())
    assert pre["size"] == {"height": 64, "width": 64} and pre["image_mean"] == [0.485, 0.456, 0.406]


def test_preprocessor_config_loads_in_transformers(saved):
    transformers = pytest.importorskip("transformers")
    proc = transformers.AutoImageProcessor.from_pretrained(saved[1])
    out = proc(torch.zeros(3, 100, 120, dtype=torch.uint8), return_tensors="pt")
    assert out["pixel_values"].shape == (1, 3, 64, 64)


def test_load_round_trip_and_backend_override(saved):
    model, path = saved
    back = dinat.DinatForImageClassification.from_pretrained(path, attention_backend="reference")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x).logits, back.eval()(x).logits)


def _rewrite(path, edit):
    sd = load_file(path / "model.safetensors")
    edit(sd)
    save_file(sd, str(path / "model.safetensors"))


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda sd: sd.pop("dinat.layernorm.weight"), "missing keys dinat.layernorm.weight"),
        (lambda sd: sd.update({"dinat.extra.weight": torch.zeros(2)}), "unexpected keys dinat.extra.weight"),
        (
            lambda sd: sd.update({"classifier.weight": torch.zeros(3, 128)}),
            r"mis-shaped keys classifier.weight \(3, 128\) != \(10, 128\)",
        ),
    ],
)
def test_bad_weights_are_named(saved, edit, message):
    _, path = saved
    _rewrite(path, edit)
    with pytest.raises(ValueError, match=message) as e:
        dinat.DinatForImageClassification.from_pretrained(path)
    assert "model.safetensors" in str(e.value)


def test_non_zero_rpb_cannot_be_dropped(saved):
    _, path = saved
    with pytest.raises(ValueError, match="non-zero relative positional bias .* use_rpb=False"):
        dinat.DinatForImageClassification.from_pretrained(path, use_rpb=False)


def test_missing_or_corrupt_files(saved, tmp_path):
    _, path = saved
    (path / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        dinat.DinatForImageClassification.from_pretrained(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors: no such file"):
        dinat.DinatForImageClassification.from_pretrained(path)
    with pytest.raises(FileNotFoundError, match="config.json: no such file"):
        dinat.DinatForImageClassification.from_pretrained(tmp_path / "nowhere")


def test_pickle_only_checkpoint_is_named(saved):
    _, path = saved
    (path / "model.safetensors").rename(path / "pytorch_model.bin")  # what transformers < 4.35 writes by default
    with pytest.raises(
        FileNotFoundError, match=r"only pytorch_model.bin; .*save_pretrained\(\.\.\., safe_serialization=True\)"
    ):
        dinat.DinatForImageClassification.from_pretrained(path)


def test_bf16_export_loads_close(tmp_path):
    model = dinat.create_model("dinat_debug").eval()
    model.save_pretrained(tmp_path, dtype=torch.bfloat16)
    assert load_file(tmp_path / "model.safetensors")["classifier.weight"].dtype == torch.bfloat16
    back = dinat.DinatForImageClassification.from_pretrained(tmp_path).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, model(x).logits, atol=0.05, rtol=0.05)


def to_original_layout(model):
    """Our (HF) names -> the original repository's names, written independently of dinat.convert."""
    out = {}
    for k, v in model.state_dict().items():
        k = k.removeprefix("dinat.")
        k = k.replace("embeddings.patch_embeddings.projection", "patch_embed.proj").replace(
            "embeddings.norm", "patch_embed.norm"
        )
        k = k.replace("encoder.levels", "levels").replace(".layers.", ".blocks.")
        k = k.replace("layernorm_before", "norm1").replace("layernorm_after", "norm2")
        k = k.replace("attention.self.rpb", "attn.rpb").replace("attention.output.dense", "attn.proj")
        k = k.replace("intermediate.dense", "mlp.fc1").replace("output.dense", "mlp.fc2")
        k = k.replace("classifier", "head")
        if k.startswith("layernorm."):
            k = "norm." + k.removeprefix("layernorm.")
        if k.endswith("layer_scale_parameters"):
            base = k.removesuffix("layer_scale_parameters")
            out[base + "gamma1"], out[base + "gamma2"] = v[0].clone(), v[1].clone()
            continue
        out[k] = v
    for k in [k for k in out if ".attention.self.query." in k]:
        kind = k.rsplit(".", 1)[1]
        base = k.split(".attention.self.")[0]
        parts = [out.pop(f"{base}.attention.self.{n}.{kind}") for n in ("query", "key", "value")]
        out[f"{base}.attn.qkv.{kind}"] = torch.cat(parts)
    return out


def test_convert_original_checkpoint(tmp_path):
    source = dinat.create_model("dinat_debug", use_rpb=True, layer_scale_init_value=0.2, num_labels=6).eval()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    torch.save({"model": to_original_layout(source)}, tmp_path / "orig.pth")
    converted = convert_checkpoint(tmp_path / "orig.pth", "dinat_debug", tmp_path / "out").eval()
    assert converted.config.use_rpb and converted.config.n_labels == 6
    reloaded = dinat.DinatForImageClassification.from_pretrained(tmp_path / "out").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, source(x).logits, rtol=0, atol=0)


def test_convert_rejects_unknown_keys(tmp_path):
    torch.save({"levels.0.blocks.0.attn.mystery": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="unrecognised key in original checkpoint: levels.0.blocks.0.attn.mystery"):
        convert_checkpoint(tmp_path / "bad.pth", "dinat_debug", tmp_path / "out")
