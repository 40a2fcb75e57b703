"""Resume checkpoint -> HF DiNAT checkpoint (config.json + model.safetensors + preprocessor_config.json).

    dinat-export runs/x/checkpoints/step_00100000 exports/dinat-large-22k [--push-to org/name] [--private]

DeepSpeed's own consolidation (``zero_to_fp32``, ZeRO stages 1-3) gathers the fp32 master weights from
the shards on disk, so an export needs neither the training job nor its ranks: the trainer calls
:func:`export_checkpoint` on rank 0 after its final save. ``--push-to`` takes the token from HF_TOKEN
(or a ``huggingface-cli login``) and never prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import pickle
import sys
from pathlib import Path
from typing import Any

import torch

from dinat.config import DinatConfig
from dinat.hub import load_hf_weights, save_pretrained
from dinat.modeling import DinatForImageClassification

from .checkpoint import DS_TAG, STATE_NAME, is_complete, latest_checkpoint
from .data.manifest import read_json

logger = logging.getLogger(__name__)

WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP/DeepSpeed wrappers, torch.compile


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory, or a checkpoint root (its newest complete checkpoint)."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path}: no such checkpoint directory")
    if not (path / DS_TAG).is_dir() and not is_complete(path):
        newest = latest_checkpoint(path)
        if newest is None:
            raise ValueError(f"{path}: not a checkpoint directory (no {DS_TAG}/ inside, no complete step_* below)")
        logger.info("%s: exporting its newest checkpoint %s", path, newest.name)
        return newest
    if not is_complete(path):
        raise ValueError(f"{path}: incomplete checkpoint (no COMPLETE marker: an interrupted save?)")
    return path


def read_state(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / STATE_NAME
    if not path.is_file():
        raise ValueError(f"{path}: missing; the checkpoint has no pipeline state to rebuild the model from")
    state = read_json(path)
    if not isinstance(state, dict) or not isinstance(state.get("dinat_config"), dict):
        raise ValueError(f"{path}: no 'dinat_config' (a DinatConfig.to_dict()) to rebuild the model from")
    return state


def strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes ("module.", "_orig_mod.", nested in any order) shared by every key."""
    while sd:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in sd)), None)
        if prefix is None:
            return sd
        sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def consolidate(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The fp32 state dict gathered from the ZeRO shards of ``checkpoint`` by DeepSpeed's zero_to_fp32."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    chatter = io.StringIO()  # zero_to_fp32 reports with print(); keep stdout for the CLI's result
    try:
        with contextlib.redirect_stdout(chatter):
            sd = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=DS_TAG)
    except (OSError, ValueError, KeyError, RuntimeError, EOFError, pickle.UnpicklingError) as e:  # damaged shards
        raise ValueError(f"{checkpoint}: DeepSpeed could not consolidate it ({' '.join(str(e).split())})") from None
    logger.debug("zero_to_fp32: %s", chatter.getvalue())
    return strip_prefixes({k: v.float().contiguous() for k, v in sd.items()})


def build_model(state: dict[str, Any], source: str) -> DinatForImageClassification:
    """The classifier described by ``state["dinat_config"]``, labelled from ``state["classes"]`` if present."""
    config = DinatConfig.from_dict(state["dinat_config"], source=f"{source}: dinat_config")
    # The export is for inference anywhere: the attention backend is chosen where it runs, no activation
    # checkpointing (both are runtime choices, not weights; from_pretrained can override them).
    overrides: dict[str, Any] = {"attention_backend": "auto", "activation_checkpointing": "none"}
    classes = state.get("classes")
    if classes:
        if len(classes) != config.n_labels:
            raise ValueError(f"{source}: {len(classes)} classes but the model has {config.n_labels} labels")
        overrides["id2label"] = {int(c["index"]): str(c["name"]) for c in classes}
    return DinatForImageClassification(config.replace(**overrides))


def export_checkpoint(checkpoint: Path, out_dir: Path, push_to: str | None = None, private: bool = False) -> Path:
    """Write the HF checkpoint of ``checkpoint`` into ``out_dir`` (and push it to ``push_to``); returns out_dir."""
    token = hub_token(push_to) if push_to else None  # before the work, not after it
    checkpoint = resolve_checkpoint(Path(checkpoint))
    state = read_state(checkpoint)
    model = build_model(state, str(checkpoint / STATE_NAME))
    load_hf_weights(model, consolidate(checkpoint), str(checkpoint))
    out_dir = save_pretrained(model, out_dir, image_size=int(state.get("image_size", 224)))
    logger.info("exported %s (step %s) to %s", checkpoint, state.get("step"), out_dir)
    if push_to:
        push_folder(out_dir, push_to, token, private)
    return out_dir


def hub_token(repo_id: str) -> str:
    """The Hub token (HF_TOKEN, else the stored login); never logged."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise ValueError(f"pushing to {repo_id} needs a Hugging Face token: set HF_TOKEN (or huggingface-cli login)")
    return token


def push_folder(folder: Path, repo_id: str, token: str, private: bool = False) -> None:
    """Create the model repo ``repo_id`` if needed and upload ``folder`` into it."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder), commit_message="dinat-export")
    logger.info("pushed %s to https://huggingface.co/%s", folder, repo_id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dinat-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a checkpoint directory (or a root: its newest checkpoint)")
    parser.add_argument("out", type=Path, help="output directory for the HF checkpoint")
    parser.add_argument("--push-to", metavar="REPO", help="also upload to this Hub model repo (token: HF_TOKEN)")
    parser.add_argument("--private", action="store_true", help="create the Hub repo private")
    args = parser.parse_args(argv)
    if args.private and not args.push_to:
        parser.error("--private needs --push-to")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:  # stdout carries only the result: DeepSpeed's import-time notices go to stderr with the logs
        with contextlib.redirect_stdout(sys.stderr):
            out = export_checkpoint(args.checkpoint, args.out, push_to=args.push_to, private=args.private)
    except (ValueError, FileNotFoundError) as e:
        print(f"dinat-export: error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
