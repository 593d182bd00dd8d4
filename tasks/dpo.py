"""DPO: a fine-tuned model + QA records -> a preference-tuned checkpoint artifact (model/dpo.py's work).

Pairs come from the ``data`` artifacts' train questions with options (qa artifacts, or the cleaned
training sets of tasks/trainset.py, which the flows give it); no question that the
``held_out`` artifacts (the other QA data the evaluation scores) or the data itself ask in a
validation or test split becomes a pair, and the held-out artifacts are the stage's parents in
the role ``held_out``, so the lineage names what was guarded and a release's card does not count
them as training data. A share of the train questions (``val_fraction``, by a hash of the record
id) is held out too: the validation pairs, never trained on. The artifact is a checkpoint like finetune's (LoRA merged, ``adapter/``
beside it, the tokenizer with the chat template), which evaluation, release and chat read as
they read a finetune artifact. A killed run resumes from its last checkpoint, as fine-tuning does.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from model.checkpoint import summary_report
from model.distributed import train_stage
from model.dpo import DPOConfig, dpo
from model.finetune import FinetuneConfig, model_files, read_data
from model.train import OptimConfig, RunConfig
from storage import Input, Stage
from storage.config import config_dataclass
from storage.formats import read_records

log = logging.getLogger("medlm.dpo")


@config_dataclass
class DPORun:
    """One preference tuning: how the network trains (FinetuneConfig), DPO's own settings, the optimization and where it runs."""

    finetune: FinetuneConfig = FinetuneConfig()
    dpo: DPOConfig = DPOConfig()
    optim: OptimConfig = OptimConfig()
    run: RunConfig = RunConfig()


def build_dpo(inputs: dict, out_dir: Path, config: DPORun) -> dict:
    train, validation = read_data([a.path for a in inputs["data"]], [a.label or a.ref for a in inputs["data"]])
    guarded = inputs.get("held_out") or []
    held_out = [r for a in guarded + inputs["data"] for r in read_records(a.path)]
    args = ("--base", str(inputs["base"].path), "--data", *(str(a.path) for a in inputs["data"]), "--held-out", *(str(a.path) for a in guarded))
    return train_stage(
        out_dir, config.run, lambda run: dpo(config.finetune, config.dpo, config.optim, config.run, inputs["base"].path, train + validation, held_out, run),
        "model.dpo", asdict(config), args, published=model_files, log=log.info,
    )


DPO = Stage(
    name="dpo",
    version="2",  # 2: a share of the train questions held out for validation (DPOConfig.val_fraction)
    config=DPORun,
    inputs={"base": Input(("finetune", "dpo")), "data": Input(("qa", "trainset"), many=True), "held_out": Input("qa", many=True, optional=True)},
    build=build_dpo,
    resume=True,  # the run folder's checkpoints survive a crash and training continues from them
    label=lambda inputs, config: f"DPO on {' + '.join(a.label or a.ref for a in inputs['data'])}",
    report=summary_report,
)
