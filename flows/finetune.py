"""finetune: a checkpoint (or a local Hugging Face model) fine-tuned through a curriculum of QA
sources, then preference-tuned (DPO), the base and the model after every stage evaluated, side
by side (the GPU work pool runs this).

    medlm finetune --sources pubmedqa medmcqa medqa --method lora --pubmedqa DIR --medmcqa FILE --medqa DIR
    medlm finetune --sources pubmedqa --preference-sources pubmedqa --beta 0.1 --dpo-optim.lr 5e-6 --pubmedqa DIR

Each source's train split is cleaned first (tasks/trainset.py: records sharing a 13-gram with an
evaluation item of any of the QA data dropped, PII masked, exact and near-duplicates dropped; its
report a markdown artifact of the run). Each source's fine-tuning trains on that, starting from
the model the previous one made, and is a finetune artifact of its own; so a curriculum stopped
half-way, or extended by a source, redoes only what is new. Preference tuning (tasks/dpo.py) then
starts from the last fine-tuned model, the reference, on pairs from the preference sources'
cleaned train questions; no question any of the evaluated QA data asks outside its train split
becomes a pair. The table (a Prefect table and markdown artifact of the run) puts the base model,
the model after each stage and the baseline of every benchmark side by side.
"""

from __future__ import annotations

from typing import Annotated, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import Field

from flows.evaluate import HELD_OUT_HELP, held_out_snapshot, lineage_inputs, model_artifact
from flows.qa import convert
from flows.stage import publish_lineage, run_stage
from model.dpo import DPOConfig
from model.finetune import FinetuneConfig
from model.train import OptimConfig, RunConfig
from storage import Artifact, Store
from storage.access import DataPath
from storage.config import config_dataclass
from storage.formats import MODEL_KINDS
from tasks.dpo import DPO, DPORun
from tasks.evaluate import EVALUATE, REPORT_FILE, EvaluationConfig, comparison_rows, rows_markdown
from tasks.finetune import FINETUNE, FinetuneRun
from tasks.qa import QASources
from tasks.qa.registry import PREFERRED, TRAINED
from tasks.trainset import REMOVING, REPORT_MD, TRAINSET, TrainsetConfig


@config_dataclass
class Curriculum:
    """QA sources to fine-tune on in order, each on its train split, then those whose questions
    preference tuning pairs; the model evaluated after each stage."""

    sources: tuple[Literal[TRAINED], ...] = Field(  # the datasets that train (tasks/qa/registry.py), an enum for the UI form
        (),
        description="QA sources to fine-tune on, in order, e.g. pubmedqa medmcqa medqa: each starts from the model the previous one made (instructions: every instruction file). Empty: no fine-tuning.",
    )
    preference_sources: tuple[Literal[PREFERRED], ...] = Field(
        (),
        description="Multiple-choice QA sources whose train questions become DPO pairs (gold answer over a distractor), tuned after the fine-tuning, the last fine-tuned model as the reference. Empty: no preference tuning.",
    )
    evaluate_base: bool = Field(True, description="Evaluate the base model first, for the before/after table.")


def source_data(source: str, converted: dict[str, Artifact], qa: QASources) -> list[Artifact]:
    """The qa artifacts fine-tuning on a curriculum's source trains on: one source's, or every instruction file's."""
    found = [converted[name] for name in qa.names(source) if name in converted]
    if not found:
        raise ValueError(f"curriculum source {source!r} has no data: set qa.{source} (a file or folder of it)")
    return found


def cleaned(source: str, data: list[Artifact], evaluated: list[Artifact], config: TrainsetConfig) -> Artifact:
    """The training set of a curriculum's source: its data's train split cleaned against every
    evaluated QA artifact (tasks/trainset.py); its report a markdown artifact of the run."""
    trainset = run_stage(TRAINSET, {"data": data, "held_out": [a for a in evaluated if a not in data] or None}, config, label=source)
    create_markdown_artifact(key=f"trainset-{source}", markdown=trainset.file(REPORT_MD).read_text(), description=f"{trainset.ref}: what fine-tuning on {source} does not train on")
    train = trainset.summary["train"]
    if train["before"] and not train["after"]:
        removed = ", ".join(f"{rule} {n}" for rule, n in trainset.summary.items() if rule in REMOVING and n)
        raise ValueError(f"curriculum source {source!r}: the trainset stage removed all {train['before']} train records ({removed}); see {trainset.ref}/{REPORT_MD}, or switch a rule off (medlm finetune --help: trainset)")
    return trainset


def columns(store: Store, evaluation_refs: list[str]) -> list[tuple[str, Artifact]]:
    """(column label, evaluation) for evaluations of a base and the models fine-tuned from it, in order."""
    out = []
    for ref in evaluation_refs:
        evaluation = store.require(ref)
        model = next((store.require(p) for p in evaluation.parents if p.split("/")[0] in MODEL_KINDS), None)
        if model is None or model.kind not in ("finetune", "dpo"):
            label = "base"
        else:
            data = model.label if model.kind == "dpo" else " + ".join(store.require(p).label or p for p in model.parents if p.split("/")[0] in ("qa", "trainset"))
            label = f"{sum(label != 'base' for label, _ in out) + 1}. {data}"
        out.append((label, evaluation))
    return out


def comparison(store: Store, evaluation_refs: list[str]) -> list[dict]:
    """The evaluations side by side (tasks/evaluate/report.py ``comparison_rows``): what every fine-tuning added."""
    return comparison_rows(columns(store, evaluation_refs))


@flow(name="finetune")
def finetune(
    *,
    finetune: FinetuneConfig = FinetuneConfig(),
    finetune_optim: OptimConfig = OptimConfig(),
    finetune_run: RunConfig = RunConfig(),
    curriculum: Curriculum = Curriculum(),
    qa: QASources = QASources(),
    evaluation: EvaluationConfig = EvaluationConfig(),
    dpo: DPOConfig = DPOConfig(),
    dpo_optim: OptimConfig = OptimConfig(),
    trainset: TrainsetConfig = TrainsetConfig(),
    base_ref: Annotated[str | None, Field(description="Checkpoint to fine-tune, e.g. pretrain/3f9a... (unset: the newest pretrain, finetune or dpo checkpoint; not used with hf_model).")] = None,
    hf_model: Annotated[DataPath | None, Field(description="A local Hugging Face causal-LM folder (inside MEDLM_DATA_ROOTS) to fine-tune instead of a checkpoint: taken into the store as an hf_model artifact.")] = None,
    held_out_ref: Annotated[str | None, Field(description=HELD_OUT_HELP)] = None,
) -> list[str]:
    """Fine-tune through the curriculum's sources, then preference-tune, evaluating the base and the
    model after each stage; returns the evaluations' refs, base first (each names the model it evaluated)."""
    if not curriculum.sources and not curriculum.preference_sources:
        raise ValueError("curriculum.sources is empty: name the QA sources to fine-tune on, in order, e.g. --sources pubmedqa medmcqa medqa")
    store = Store()
    held_out = held_out_snapshot(store, held_out_ref)
    converted = convert(qa)
    everything = list(converted.values())
    model = model_artifact(store, base_ref, hf_model, "--hf-model")
    if curriculum.preference_sources and not curriculum.sources and model.kind not in ("finetune", "dpo"):
        raise ValueError(f"preference tuning starts from a fine-tuned model, not {model.ref}: name --sources to fine-tune it first, or give --base-ref finetune/KEY")
    log = get_run_logger()
    data = {source: cleaned(source, source_data(source, converted, qa), everything, trainset)
            for source in dict.fromkeys((*curriculum.sources, *curriculum.preference_sources))}
    preference_data = [data[source] for source in curriculum.preference_sources]

    evaluations = []
    if curriculum.evaluate_base:
        evaluations.append(run_stage(EVALUATE, {"model": model, "qa": everything, **lineage_inputs(store, model, held_out)}, evaluation, label="base"))
    config = FinetuneRun(finetune, finetune_optim, finetune_run)
    for i, source in enumerate(curriculum.sources, 1):
        model = run_stage(FINETUNE, {"base": model, "data": [data[source]]}, config, label=f"{i}/{len(curriculum.sources)} {source}")
        log.info("fine-tuned on %s (%d of %d): %s, final loss %s", source, i, len(curriculum.sources), model.ref, model.summary.get("final_loss"))
        evaluations.append(run_stage(EVALUATE, {"model": model, "qa": everything, **lineage_inputs(store, model, held_out)}, evaluation, label=f"after {source}"))
    if preference_data:
        names = " + ".join(curriculum.preference_sources)
        model = run_stage(DPO, {"base": model, "data": preference_data, "held_out": everything}, DPORun(finetune, dpo, dpo_optim, finetune_run), label=f"DPO on {names}")
        log.info("preference-tuned on %s: %s, reward accuracy %s", names, model.ref, model.summary.get("val_reward_accuracy"))
        evaluations.append(run_stage(EVALUATE, {"model": model, "qa": everything, **lineage_inputs(store, model, held_out)}, evaluation, label=f"after DPO on {names}"))

    refs = [e.ref for e in evaluations]
    rows = comparison(store, refs)
    create_table_artifact(key="finetune-comparison", table=rows, description=f"{model.ref}: the base and the model after every source, evaluated")
    create_markdown_artifact(key="finetune-comparison-markdown", markdown=rows_markdown(rows), description=f"Fine-tuning curriculum ending in {model.ref}")
    create_markdown_artifact(key="evaluation-report", markdown=evaluations[-1].file(REPORT_FILE).read_text(), description=f"{evaluations[-1].ref} of {model.ref}")
    publish_lineage(model.ref)
    return refs
