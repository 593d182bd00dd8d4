"""Finetune: a checkpoint (pretrain, finetune or hf_model artifact) + QA records -> a fine-tuned checkpoint artifact.

The work is model/finetune.py's; this module declares it as a stage. The run folder lives in the
artifact's work folder, which the store keeps across a crash (``resume=True``): a killed
fine-tuning continues from its last checkpoint with the same losses. The artifact is a
checkpoint like pretrain's (``model.safetensors``, ``config.json``, ``state.json``, tokenizer files
with a chat template, metrics), LoRA merged, plus ``adapter/`` (PEFT format) for LoRA; from a
Hugging Face base it is a Hugging Face folder. Evaluation, ``medlm export-hf`` and a
curriculum's next fine-tuning read it as they read a pretrain artifact.

Its config (``FinetuneRun``) is three tables: ``FinetuneConfig`` (method, LoRA, template, packing),
and pretraining's ``OptimConfig`` (optimizer, schedule, steps) and ``RunConfig`` (cadence, device,
processes): one definition of each, and none of pretraining's shape, which the base decides.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from model.checkpoint import RUN_DIR, finished_summary, publish_checkpoint
from model.distributed import train_distributed
from model.finetune import MODEL_DIR, FinetuneConfig, finetune, read_data
from model.train import OptimConfig, RunConfig
from storage import Input, Stage
from storage.config import config_dataclass
from tasks.hf_model import MODEL_KINDS

log = logging.getLogger("medlm.finetune")


@config_dataclass
class FinetuneRun:
    """One fine-tuning stage: how (FinetuneConfig), the optimization (OptimConfig) and where it runs (RunConfig)."""

    finetune: FinetuneConfig = FinetuneConfig()
    optim: OptimConfig = OptimConfig()
    run: RunConfig = RunConfig()


def build_finetune(inputs: dict, out_dir: Path, config: FinetuneRun) -> dict:
    train, validation = read_data([a.path for a in inputs["data"]], [a.label or a.ref for a in inputs["data"]])
    if (summary := finished_summary(out_dir)) is not None:
        return summary
    run = out_dir / RUN_DIR
    if config.run.devices == 1 and config.run.nodes == 1:
        finetune(config.finetune, config.optim, config.run, inputs["base"].path, train, run, validation)
    else:  # torchrun, on this machine or as one of run.nodes
        args = ("--base", str(inputs["base"].path), "--data", *(str(a.path) for a in inputs["data"]))
        train_distributed("model.finetune", asdict(config), args, config.run, run, log.info)
    return publish_checkpoint(run, out_dir, sorted((run / MODEL_DIR).iterdir()))


def finetune_label(inputs: dict, config: FinetuneRun) -> str:
    data = ", ".join(a.label or a.ref for a in inputs["data"])
    return f"{config.finetune.method} of {inputs['base'].ref} on {data}"


FINETUNE = Stage(
    name="finetune",
    version="2",  # 2: the config in sections (finetune, optim, run)
    config=FinetuneRun,
    inputs={"base": Input(MODEL_KINDS), "data": Input("qa", many=True)},
    build=build_finetune,
    resume=True,  # the run folder's checkpoints survive a crash and fine-tuning continues from them
    label=finetune_label,
    report=lambda checkpoint: [
        {"metric": k, "value": v} for k, v in checkpoint.summary.items() if isinstance(v, (int, float)) and v is not None
    ],
)
