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
from pathlib import Path

from model.checkpoint import summary_report
from model.distributed import train_stage
from model.dpo import DPORun
from model.finetune import model_files
from model.training_stages import PREFERENCE_TUNING
from storage import Input, Stage

log = logging.getLogger("medlm.dpo")


def build_dpo(inputs: dict, out_dir: Path, config: DPORun) -> dict:
    folders = {"base": inputs["base"].path, "data": [a.path for a in inputs["data"]], "held_out": [a.path for a in inputs.get("held_out") or []]}
    return train_stage(out_dir, PREFERENCE_TUNING, config, folders, published=model_files, log=log.info)


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
