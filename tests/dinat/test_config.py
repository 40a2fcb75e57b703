import dataclasses
import json

import pytest

import dinat
from dinat.config import DinatConfig


def test_hf_fields_and_defaults_match_transformers():
    transformers = pytest.importorskip("transformers")
    hf = transformers.DinatConfig()
    ours = DinatConfig()
    project = {"attention_backend", "activation_checkpointing", "use_rpb", "num_labels", "id2label"}
    for f in dataclasses.fields(DinatConfig):
        if f.name in project:
            continue
        assert hasattr(hf, f.name), f.name
        hf_value = getattr(hf, f.name)
        assert getattr(ours, f.name) == hf_value, f.name
    assert ours.n_labels == hf.num_labels
    assert ours.stage_names == hf.stage_names


def test_config_json_round_trip(tmp_path):
    cfg = dinat.variant_config("dinat_mini", id2label={0: "cat", 1: "dog"}, activation_checkpointing=2)
    cfg.save(tmp_path / "config.json")
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["model_type"] == "dinat"
    assert raw["label2id"] == {"cat": 0, "dog": 1}
    assert raw["id2label"] == {"0": "cat", "1": "dog"}
    back = DinatConfig.load(tmp_path / "config.json")
    assert back == cfg
    assert back.n_labels == 2


def test_config_json_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = dinat.variant_config("dinat_large", num_labels=7)
    cfg.save(tmp_path / "config.json")
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(hf).__name__ == "DinatConfig"
    assert hf.num_labels == 7 and hf.depths == cfg.depths and hf.dilations == cfg.dilations
    assert hf.num_heads == [6, 12, 24, 48] and hf.embed_dim == 192
    assert hf.use_rpb is False  # project fields ride along as attributes


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"patch_size": 8}, "patch_size must be 4"),
        ({"depths": [2, 2]}, "num_heads has 4 entries, depths has 2"),
        ({"dilations": [[1], [1, 4, 1, 4], [1, 2] * 3, [1] * 5]}, "dilations\\[0\\] has 1 entries, depths\\[0\\] is 3"),
        ({"num_heads": [3, 4, 8, 16]}, "level 0: dim 64 is not divisible by num_heads 3"),
        ({"kernel_size": 6}, "kernel_size must be an odd number"),
        ({"attention_backend": "flash"}, "attention_backend must be one of"),
        ({"activation_checkpointing": "some"}, "activation_checkpointing must be"),
        ({"out_features": ["stage9"]}, "out_features \\['stage9'\\] not among stages"),
        ({"bogus": 1}, "unknown DinatConfig field\\(s\\): bogus"),
    ],
)
def test_bad_config_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        dinat.variant_config("dinat_mini", **overrides)


def test_config_json_missing_fields(tmp_path):
    d = DinatConfig().to_dict()
    del d["depths"], d["dilations"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="config.json: missing fields depths, dilations"):
        DinatConfig.load(tmp_path / "config.json")


def test_config_json_wrong_model_type_and_bad_json(tmp_path):
    d = DinatConfig().to_dict() | {"model_type": "swin"}
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="model_type is 'swin'"):
        DinatConfig.load(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        DinatConfig.load(tmp_path / "config.json")


def test_transformers_config_without_project_fields_means_rpb(tmp_path):
    d = DinatConfig().to_dict()
    for k in ("use_rpb", "attention_backend", "activation_checkpointing"):
        del d[k]
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert DinatConfig.load(tmp_path / "config.json").use_rpb is True


def test_out_features_and_indices_align():
    cfg = DinatConfig(out_indices=[1, 3])
    assert cfg.out_features == ["stage1", "stage3"]
    cfg = DinatConfig(out_features=["stem", "stage4"])
    assert cfg.out_indices == [0, 4]
    with pytest.raises(ValueError, match="disagree"):
        DinatConfig(out_features=["stage1"], out_indices=[2])
