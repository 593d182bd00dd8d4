"""hf_model: a Hugging Face causal-LM folder on disk, copied into the store as an artifact.

Fine-tuning's base and evaluation's model are always artifacts: ours (pretrain, finetune) or
this one, so every stage after it reads a model the same way and lineage names the folder it
came from. The key is the folder's content (every file's path and sha256), not where it lies: a
moved copy is the same artifact, a changed file a new one. The folder must be inside
MEDLM_DATA_ROOTS (storage/access.py), links included.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import ClassVar

from pydantic import Field

from model.checkpoint import CONFIG_FILE, check_causal_lm
from storage import Stage, sha256_folder
from storage.access import DataPath, readable, readable_files
from storage.config import config_dataclass


@config_dataclass
class HFModelConfig:
    """Which folder to take in."""

    folder: DataPath = Field(description="A local Hugging Face causal-LM folder (inside MEDLM_DATA_ROOTS), as save_pretrained wrote it.")

    # The folder's bytes decide the key (content_params), not where it is.
    RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = ("folder",)

    def content_params(self) -> dict:
        check_causal_lm(Path(self.folder))
        return {"sha256": sha256_folder(Path(self.folder))}


def build_hf_model(inputs: dict, out_dir: Path, config: HFModelConfig) -> dict:
    folder = readable(config.folder, "model folder")  # a causal LM: content_params checked it for the key
    files = readable_files(folder, "model folder")
    for source in files:
        target = out_dir / source.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    model_config = json.loads((folder / CONFIG_FILE).read_text())
    return {
        "architectures": model_config.get("architectures") or [],
        "model_type": model_config.get("model_type"),
        "files": len(files),
        "bytes": sum(f.stat().st_size for f in files),
    }


HF_MODEL = Stage(
    name="hf_model",
    version="1",
    config=HFModelConfig,
    inputs={},
    build=build_hf_model,
    label=lambda inputs, config: Path(config.folder).name,
)
