"""Checkpoint folders: written atomically, loaded without unpickling anything untrusted.

A run folder holds ``ckpt_NNNNNNN/`` folders (``model.safetensors``, ``config.json`` with the
model and training config, ``optimizer.pt``, ``state.json`` with the step and the data position)
and a ``latest`` pointer. A checkpoint only gets its final name once complete, so a folder with
that name is always whole. A checkpoint artifact (pretrain, finetune) holds the same
``model.safetensors`` + ``config.json`` + ``state.json`` at its top level, its run folder
having been published and removed (``publish_checkpoint``, ``finished_summary``); a model
fine-tuned from a Hugging Face base is published as a Hugging Face folder instead
(``is_hf_folder``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import load_model as load_safetensors
from safetensors.torch import save_model as save_safetensors

from model.model import ModelConfig, Transformer

CHECKPOINT_PREFIX = "ckpt_"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"
CHECKPOINT_FILES = (WEIGHTS_FILE, CONFIG_FILE, STATE_FILE)  # what a checkpoint artifact keeps
RUN_DIR = "run"  # a training stage's run folder inside the artifact's work folder
RUN_FILES = ("metrics.jsonl", "loss.png", "summary.json")  # what a checkpoint artifact keeps of its run


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:07d}"


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder only gets its final name once complete)."""
    return sorted(p for p in out_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and (p / STATE_FILE).is_file())


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = checkpoint_dirs(out_dir)
    return found[-1] if found else None


def remove_unfinished(out_dir: Path) -> None:
    """Delete the temporary folders of saves that a killed run left behind."""
    for stale in out_dir.glob(f".tmp_{CHECKPOINT_PREFIX}*"):
        shutil.rmtree(stale)


def save_checkpoint(out_dir: Path, step: int, model: torch.nn.Module, optimizer, config: dict, state: dict, keep_last: int) -> Path:
    """Write ckpt_{step} under a temporary name, fsync it, rename it into place, prune old ones."""
    name = checkpoint_name(step)
    tmp = out_dir / f".tmp_{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_safetensors(model, str(tmp / WEIGHTS_FILE))
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
    for file in tmp.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    final = out_dir / name
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)  # its name is the commit: no pointer file to update after it
    for old in checkpoint_dirs(out_dir)[:-keep_last]:
        shutil.rmtree(old)
    return final


def load_checkpoint_config(checkpoint_dir: str | Path) -> dict:
    path = Path(checkpoint_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; pass a ckpt_NNNNNNN folder or a checkpoint artifact folder")
    return json.loads(path.read_text())


def load_state(checkpoint_dir: Path) -> dict:
    return json.loads((checkpoint_dir / STATE_FILE).read_text())


def load_weights(model: torch.nn.Module, checkpoint_dir: str | Path, device: str | torch.device = "cpu") -> None:
    """Our weights into ``model`` (safetensors: nothing is unpickled)."""
    load_safetensors(model, str(Path(checkpoint_dir) / WEIGHTS_FILE), device=str(device))


def load_model(checkpoint_dir: str | Path, device: str | torch.device = "cpu") -> Transformer:
    """The network saved in a checkpoint folder."""
    cfg = ModelConfig.from_dict(load_checkpoint_config(checkpoint_dir)["model"])
    model = Transformer(cfg)
    load_weights(model, checkpoint_dir, device)
    return model.to(device)


def load_optimizer_state(checkpoint_dir: Path, optimizer, device: torch.device) -> None:
    # weights_only: tensors and plain containers only; a pickled object in the file raises.
    optimizer.load_state_dict(torch.load(checkpoint_dir / OPTIMIZER_FILE, map_location=device, weights_only=True))


def is_hf_folder(folder: str | Path) -> bool:
    """Whether a checkpoint folder is a Hugging Face model folder (its config.json names a model_type)
    rather than ours (config.json with "model", "train" and "tokens")."""
    path = Path(folder) / CONFIG_FILE
    return path.is_file() and "model_type" in json.loads(path.read_text())


def check_causal_lm(folder: Path) -> None:
    """A one-line error unless ``folder`` holds a Hugging Face causal language model."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        raise ValueError(f"{folder} is not a Hugging Face model folder (no config.json); give the folder save_pretrained wrote")
    config = json.loads(config_file.read_text())
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    architectures = config.get("architectures") or []
    if not (any(a in causal for a in architectures) or (not architectures and config.get("model_type") in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)):
        named = ", ".join(architectures) or f"model_type {config.get('model_type')!r}"
        raise ValueError(f"{folder} is not a causal LM ({named}); give a folder saved from a ...ForCausalLM model, such as LlamaForCausalLM")


def remove_run(run: Path) -> None:
    """Delete a published run folder. It is renamed first, so a crash while deleting never leaves a
    run that looks resumable (``finished_summary`` then finishes the clean-up)."""
    finished = run.with_name(f"{run.name}.done")
    os.rename(run, finished)
    shutil.rmtree(finished)


def publish_checkpoint(run: Path, out_dir: Path, files: Iterable[Path]) -> dict:
    """Copy a finished run's model ``files`` (a folder whole) and its metrics, plot and summary to
    the top of the artifact folder ``out_dir``, then drop the run folder (intermediate
    checkpoints, optimizer state); return the summary. Pretraining publishes its final
    checkpoint and the tokenizer files, fine-tuning the model folder it wrote."""
    for source in files:
        if source.is_dir():
            shutil.copytree(source, out_dir / source.name, dirs_exist_ok=True)  # over a copy a crash interrupted
        else:
            shutil.copyfile(source, out_dir / source.name)
    for name in RUN_FILES:
        shutil.copyfile(run / name, out_dir / name)
    remove_run(run)
    return json.loads((out_dir / "summary.json").read_text())


def summary_report(checkpoint) -> list[dict]:
    """A training stage's report (a table on its task run's page): the numbers of the checkpoint artifact's summary."""
    return [{"metric": k, "value": v} for k, v in checkpoint.summary.items() if isinstance(v, (int, float)) and v is not None]


def finished_summary(out_dir: Path) -> dict | None:
    """The summary of a build killed after its run was published: only clean-up was left."""
    run, finished = out_dir / RUN_DIR, out_dir / f"{RUN_DIR}.done"
    if finished.exists() or ((out_dir / "summary.json").is_file() and not run.exists()):
        shutil.rmtree(finished, ignore_errors=True)
        return json.loads((out_dir / "summary.json").read_text())
    return None
