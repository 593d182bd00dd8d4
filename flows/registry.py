"""Every flow medlm runs, listed once: the `medlm` commands (flows/cli.py) and the Prefect
deployments (deployments/deploy.py) are both made from this list. A new flow is one line here.

Nothing is imported from the flows themselves until one is loaded, so `medlm --help` needs
neither Prefect nor torch.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Literal

NIGHTLY_CRON = "0 6 * * *"  # NCBI posts the day's update files overnight (US Eastern); 06:00 UTC follows them
GC_CRON = "0 8 * * *"  # after the nightly ingest


@dataclass(frozen=True)
class FlowEntry:
    entrypoint: str  # flows/<module>.py:<function>
    description: str
    command: str | None = None  # `medlm COMMAND` runs it; None: only as a deployment
    deployment: str | None = None  # registered as <flow name>/<deployment>; None: only as a command
    pool: str = "cpu"  # the work pool its deployment runs in
    tags: tuple[str, ...] = ()
    cron: str | None = None  # its deployment's schedule (nightly-ingest's is `deploy --cron`)
    schedule_on: bool = True  # the schedule registered switched on (off: a user switches it on in the UI)

    def load(self):
        """The Prefect flow object (imports its module)."""
        path, function = self.entrypoint.split(":")
        return getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), function)


FLOWS = (
    FlowEntry("flows/ingest.py:ingest", "Download, parse and snapshot PubMed into the store (the deployment: each night, the new update files).",
              command="ingest", deployment="nightly-ingest", tags=("ingest",), cron=NIGHTLY_CRON),
    FlowEntry("flows/tokenizing.py:tokenize", "Fit the tokenizer on a corpus snapshot and write uint16 token shards.",
              command="tokenize", deployment="tokenize", tags=("tokenize",)),
    FlowEntry("flows/pretrain.py:pretrain", "Pretrain on token shards and register the checkpoint in the store.",
              command="pretrain", deployment="pretrain", pool="gpu", tags=("pretrain",)),
    FlowEntry("flows/qa.py:qa", "Convert QA datasets (PubMedQA, MedMCQA, MedQA, instruction data) into canonical records.", command="qa"),
    FlowEntry("flows/finetune.py:finetune", "Fine-tune a checkpoint or a local Hugging Face model (full or LoRA) through a curriculum of QA sources, evaluating every stage.",
              command="finetune", deployment="finetune", pool="gpu", tags=("finetune", "evaluate")),
    FlowEntry("flows/evaluate.py:evaluate", "Evaluate a checkpoint or a local Hugging Face model on the medical QA benchmarks.",
              command="evaluate", deployment="evaluate", pool="gpu", tags=("evaluate",)),
    FlowEntry("flows/release.py:release", "Package an evaluated model for people: a transformers folder, GGUF files, a model card with its evaluation and provenance, the lineage (`medlm release push REPO` uploads it).",
              command="release", deployment="release", tags=("release",)),
    FlowEntry("flows/pipeline.py:pipeline", "The whole pipeline: ingest, tokenize, pretrain, fine-tune, evaluate, release (a run configuration's tables as its parameters).",
              command="pipeline", deployment="pipeline", pool="gpu", tags=("pipeline",)),
    FlowEntry("flows/join.py:join", "This machine's part of a multi-node training run (run.nodes > 1) another machine's stage started: give its rdzv_id.",
              deployment="join", pool="gpu", tags=("pretrain",)),
    FlowEntry("flows/store_gc.py:store_gc", "Remove old artifacts nothing kept needs (switch the schedule on, and dry_run off, to run it each night).",
              deployment="nightly-gc", tags=("store",), cron=GC_CRON, schedule_on=False),
)
COMMANDS = {entry.command: entry for entry in FLOWS if entry.command}
DEPLOYMENTS = tuple(entry for entry in FLOWS if entry.deployment)


@dataclass(frozen=True)
class Alias:
    """A name that was renamed and still works, with a one-line note saying the new one."""

    kind: Literal["command", "deployment", "option"]  # `medlm OLD`; a deployment registered with the entrypoint OLD; an option OLD of a flow command or of deploy
    old: str
    new: str


# Every old name medlm still accepts, and nowhere else (tests/test_names.py): one name per concept (docs/running.md, "Names").
ALIASES = (
    Alias("command", "retrain", "pretrain"),
    Alias("deployment", "flows/retrain.py:retrain", "flows/pretrain.py:pretrain"),  # retrain/retrain, as a stack registered before the rename has it
    Alias("option", "--hf-base", "--hf-model"),  # finetune's: the store's kind for such a model is hf_model, and evaluate's option
    Alias("option", "--retrain-after-ingest", "--pretrain-after-ingest"),  # python -m deployments.deploy's (make up DEPLOY_ARGS=...)
)


def current_name(kind: str, name: str) -> str:
    """``name``, or the name that replaced it (a one-line note on stderr says so)."""
    alias = next((a for a in ALIASES if a.kind == kind and a.old == name), None)
    if alias is None:
        return name
    print(f"note: the {kind} {alias.old} is now {alias.new}; the old name still works for now, but use the new one", file=sys.stderr)
    return alias.new
