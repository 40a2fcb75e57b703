"""Export of ZeRO checkpoints (written by real 2-rank DeepSpeed jobs) to the HF DiNAT layout."""

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dinat
from pipeline import export
from pipeline.checkpoint import COMPLETE, STATE_NAME

from .ds_helpers import CLASSES, probe, zero_run

pytest.importorskip("deepspeed")
REPO = Path(__file__).resolve().parents[2]
TOKEN = "hf_SECRETtoken1234567890"
HF_FILES = ["config.json", "model.safetensors", "preprocessor_config.json"]


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    """(step-5 checkpoint of a ZeRO-3 job, the live model's logits on probe() when it was saved)."""
    root, results = zero_run(3, tmp_path_factory)
    return root / "step_00000005", results[0]["ref"][5]["logits"]


@pytest.fixture(scope="module")
def exported(zero3, tmp_path_factory):
    return export.export_checkpoint(zero3[0], tmp_path_factory.mktemp("export") / "hf")


def test_zero3_export_gives_the_live_models_logits(zero3, exported):
    assert sorted(p.name for p in exported.iterdir()) == HF_FILES
    model = dinat.DinatForImageClassification.from_pretrained(exported).eval()
    with torch.no_grad():
        logits = model(probe()).logits
    torch.testing.assert_close(logits, zero3[1], atol=1e-5, rtol=0)
    assert model.config.id2label == {c["index"]: c["name"] for c in CLASSES}
    assert json.loads((exported / "preprocessor_config.json").read_text())["size"] == {"height": 32, "width": 32}
    assert json.loads((exported / "config.json").read_text())["attention_backend"] == "auto"


def test_zero3_export_loads_in_transformers(zero3, exported):
    transformers = pytest.importorskip("transformers")
    from dinat.compat import patch_transformers

    patch_transformers()
    model = transformers.DinatForImageClassification.from_pretrained(exported).eval()
    with torch.no_grad():
        logits = model(probe()).logits
    torch.testing.assert_close(logits, zero3[1], atol=1e-4, rtol=0)
    assert model.config.id2label == {0: "class 0", 1: "class 1", 2: "class 2", 3: "class 3"}


@pytest.mark.parametrize("stage", [1, 2])
def test_zero12_export_from_checkpoint_root(stage, tmp_path_factory, tmp_path):
    root, results = zero_run(stage, tmp_path_factory)
    out = export.export_checkpoint(root, tmp_path / "hf")  # a root exports its newest checkpoint (step 5)
    model = dinat.DinatForImageClassification.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(probe()).logits, results[0]["ref"][5]["logits"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_export_holds_the_fp32_master_weights(stage, tmp_path_factory, tmp_path):
    """A bf16 run exports float32 weights: the optimizer's master copy, of which the model's bf16 weights are
    the rounding."""
    root, results = zero_run(stage, tmp_path_factory, "bf16")
    out = export.export_checkpoint(root, tmp_path / "hf")
    model = dinat.DinatForImageClassification.from_pretrained(out)
    weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert weights.dtype == torch.float32
    live = results[0]["ref"][5]["params"]
    assert live.dtype == torch.bfloat16
    assert torch.equal(weights.to(torch.bfloat16), live)
    assert not torch.equal(weights, live.float())  # finer than bf16: not the model's copy cast back


def test_strip_prefixes():
    t = torch.zeros(1)
    assert export.strip_prefixes({"module._orig_mod.a": t, "module._orig_mod.b": t}).keys() == {"a", "b"}
    assert export.strip_prefixes({"module.a": t, "b": t}).keys() == {"module.a", "b"}  # not shared: kept


def test_cli_subprocess(zero3, tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.export", str(zero3[0]), str(out)], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines() == [str(out)]  # DeepSpeed's chatter kept off stdout
    assert (out / "model.safetensors").is_file()


def _broken(checkpoint: Path, tmp_path: Path, case: str) -> Path:
    """A copy of ``checkpoint`` damaged as ``case`` says (or no checkpoint at all)."""
    path = tmp_path / case
    if case == "missing":
        return path
    if case == "empty":
        path.mkdir()
        return path
    shutil.copytree(checkpoint, path)
    state = json.loads((path / STATE_NAME).read_text())
    if case == "incomplete":
        (path / COMPLETE).unlink()
    elif case == "no_state":
        (path / STATE_NAME).unlink()
    elif case == "damaged":
        shard = next((path / "deepspeed").glob("*optim_states.pt"))
        shard.write_bytes(shard.read_bytes()[:1000])
    else:
        if case == "no_config":
            del state["dinat_config"]
        else:
            state["classes"] = CLASSES[:3]
        (path / STATE_NAME).write_text(json.dumps(state))
    return path


@pytest.mark.parametrize(
    "case,message",
    [
        ("missing", r"missing: no such checkpoint directory"),
        ("empty", r"empty: not a checkpoint directory \(no deepspeed/ inside, no complete step_\* below\)"),
        ("incomplete", r"incomplete: incomplete checkpoint \(no COMPLETE marker"),
        ("no_state", r"no_state/state.json: missing; the checkpoint has no pipeline state"),
        ("no_config", r"no_config/state.json: no 'dinat_config'"),
        ("wrong_classes", r"wrong_classes/state.json: 3 classes but the model has 4 labels"),
        ("damaged", r"damaged: DeepSpeed could not consolidate it \("),
    ],
)
def test_cli_bad_inputs_give_one_line(case, message, zero3, tmp_path, capsys):
    path = _broken(zero3[0], tmp_path, case)
    assert export.main([str(path), str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()  # DeepSpeed's progress bars may come first
    assert [line for line in lines if "error" in line] == lines[-1:]
    assert lines[-1].startswith("dinat-export: error: ") and re.search(message, lines[-1]), lines[-1]
    assert not (tmp_path / "out").exists()


@pytest.fixture
def hub_calls(monkeypatch):
    """The Hub's network boundary: HfApi.create_repo and upload_folder record what they were asked."""
    from huggingface_hub import HfApi

    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs, self.token))

    def upload_folder(self, **kwargs):
        files = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
        calls.append(("upload_folder", kwargs["repo_id"], {**kwargs, "files": files}, self.token))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_push_uploads_the_export_without_showing_the_token(zero3, tmp_path, hub_calls, monkeypatch, capsys, caplog):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "hf"
    assert export.main([str(zero3[0]), str(out), "--push-to", "me/dinat-debug", "--private"]) == 0
    (op1, repo1, kw1, tok1), (op2, repo2, kw2, tok2) = hub_calls
    assert (op1, repo1, kw1["private"], kw1["exist_ok"], tok1) == ("create_repo", "me/dinat-debug", True, True, TOKEN)
    assert (op2, repo2, kw2["folder_path"], tok2) == ("upload_folder", "me/dinat-debug", str(out), TOKEN)
    assert kw2["files"] == HF_FILES
    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err + caplog.text
    assert "me/dinat-debug" in caplog.text


def test_push_without_token_is_one_clear_error(zero3, tmp_path, hub_calls, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert export.main([str(zero3[0]), str(tmp_path / "hf"), "--push-to", "me/dinat-debug"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "dinat-export: error: pushing to me/dinat-debug needs a Hugging Face token: set HF_TOKEN " + (
        "(or huggingface-cli login)"
    )
    assert hub_calls == [] and not (tmp_path / "hf").exists()  # refused before the export's work
