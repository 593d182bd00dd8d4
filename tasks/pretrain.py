"""Pretrain: shards + tokenizer -> a checkpoint artifact, on one device in-process or many under torchrun.

The run folder (intermediate checkpoints, metrics) lives in the artifact's work folder, which the
store keeps across a crash (``resume=True``), so rerunning a killed pretrain continues from its
last checkpoint. The finished artifact holds the final weights and config, the tokenizer files
(so ``medlm export-hf`` needs nothing else), metrics.jsonl, loss.png and summary.json.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from model.checkpoint import CHECKPOINT_FILES, summary_report
from model.distributed import train_stage
from model.train import TrainConfig
from model.training_stages import PRETRAINING
from storage import Artifact, ArtifactError, Input, Stage, sha256_file
from storage.formats import META_FILE, TOKENIZER_FILE, TOKENIZER_FILES

log = logging.getLogger("medlm.pretrain")


def shards_tokenizer(shards: Artifact) -> str:
    """The ref of the tokenizer the shards were encoded with, as their meta.json names it."""
    ref = json.loads(shards.file(META_FILE).read_text()).get("tokenizer", {}).get("ref")
    if ref is None:
        raise ArtifactError(f"{shards.ref}: meta.json names no tokenizer; rebuild the shards with `medlm tokenize`")
    return ref


def shards_vocab(shards: Artifact) -> int:
    """The vocabulary size the shards were encoded with, as their meta.json says."""
    return json.loads(shards.file(META_FILE).read_text())["vocab_size"]


def build_pretrain(inputs: dict, out_dir: Path, config: TrainConfig) -> dict:
    shards, tokenizer = inputs["shards"], inputs["tokenizer"]
    expected = json.loads(shards.file(META_FILE).read_text()).get("tokenizer", {}).get("sha256")
    if expected and expected != sha256_file(tokenizer.file(TOKENIZER_FILE)):
        raise ArtifactError(f"{shards.ref} was encoded with a different tokenizer than {tokenizer.ref}; pass {shards_tokenizer(shards)}")
    return train_stage(
        out_dir, PRETRAINING, config, {"shards": shards.path},
        published=lambda run, summary: [run / summary["checkpoint"] / name for name in CHECKPOINT_FILES] + [tokenizer.file(name) for name in TOKENIZER_FILES],
        log=log.info,
    )


PRETRAIN = Stage(
    name="pretrain",
    version="3",  # 3: the config in sections (shape, optim, run)
    config=TrainConfig,
    inputs={"shards": Input("shards"), "tokenizer": Input("tokenizer")},
    build=build_pretrain,
    resume=True,  # the run folder's checkpoints survive a crash and training continues from them
    report=summary_report,
)
