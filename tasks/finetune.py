"""Finetune: a checkpoint (pretrain, finetune or hf_model artifact) + QA records (qa artifacts, or
the cleaned training sets of tasks/trainset.py, which the flows give it) -> a fine-tuned checkpoint artifact.

The work is model/finetune.py's; this module declares it as a stage. The run folder lives in the
artifact's work folder, which the store keeps across a crash (``resume=True``): a killed
fine-tuning continues from its last checkpoint with the same losses. The artifact is a
checkpoint like pretrain's (``model.safetensors``, ``config.json``, ``state.json``, tokenizer files
with a chat template, metrics), LoRA merged, plus ``adapter/`` (PEFT format) for LoRA; from a
Hugging Face base it is a Hugging Face folder. Evaluation, ``medlm export-hf`` and a
curriculum's next fine-tuning read it as they read a pretrain artifact.

Its config (``FinetuneRun``, model/finetune.py) is three tables: ``FinetuneConfig`` (method, LoRA, template, packing),
and pretraining's ``OptimConfig`` (optimizer, schedule, steps) and ``RunConfig`` (cadence, device,
processes): one definition of each, and none of pretraining's shape, which the base decides.
"""

from __future__ import annotations

import logging
from pathlib import Path

from model.checkpoint import summary_report
from model.distributed import train_stage
from model.finetune import FinetuneRun, model_files
from model.training_stages import FINETUNING
from storage import Input, Stage
from storage.formats import MODEL_KINDS

log = logging.getLogger("medlm.finetune")


def build_finetune(inputs: dict, out_dir: Path, config: FinetuneRun) -> dict:
    folders = {"base": inputs["base"].path, "data": [a.path for a in inputs["data"]]}
    return train_stage(out_dir, FINETUNING, config, folders, published=model_files, log=log.info)


def finetune_label(inputs: dict, config: FinetuneRun) -> str:
    data = ", ".join(a.label or a.ref for a in inputs["data"])
    return f"{config.finetune.method} of {inputs['base'].ref} on {data}"


FINETUNE = Stage(
    name="finetune",
    version="2",  # 2: the config in sections (finetune, optim, run)
    config=FinetuneRun,
    inputs={"base": Input(MODEL_KINDS), "data": Input(("qa", "trainset"), many=True)},
    build=build_finetune,
    resume=True,  # the run folder's checkpoints survive a crash and fine-tuning continues from them
    label=finetune_label,
    report=summary_report,
)
