"""finetune: a checkpoint (or a local Hugging Face model) through a curriculum of fine-tuning stages,
the base and every stage evaluated, side by side (the GPU work pool runs this).

    medlm finetune --stages pubmedqa medmcqa medqa --method lora --pubmedqa DIR --medmcqa FILE --medqa DIR

Each stage trains on the train split of one QA source, starting from the previous stage's model,
and is a store artifact of its own; so a curriculum stopped half-way, or extended by a stage,
redoes only what is new. The table (a Prefect table and markdown artifact of the run) puts the
base model, each stage and the baseline of every benchmark side by side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import Field

from flows.evaluate import lineage_inputs, model_artifact
from flows.qa import convert
from flows.stage import publish_lineage, run_stage
from model.finetune import FinetuneConfig
from model.train import OptimConfig, RunConfig
from storage import Artifact, Store
from storage.access import DataPath
from storage.config import config_dataclass
from tasks.evaluate import EVALUATE, REPORT_FILE, EvaluationConfig, comparison_rows, rows_markdown
from tasks.finetune import FINETUNE, FinetuneRun
from tasks.hf_model import MODEL_KINDS
from tasks.qa import QASources


@config_dataclass
class Curriculum:
    """Fine-tuning stages in order, each on the train split of one QA source, each evaluated."""

    stages: tuple[Literal["pubmedqa", "medmcqa", "medqa", "instructions"], ...] = Field(
        (),
        description="QA sources to fine-tune on, in order, e.g. pubmedqa medmcqa medqa: each stage starts from the previous one's model (instructions: every instruction file). Empty: no fine-tuning.",
    )
    evaluate_base: bool = Field(True, description="Evaluate the base model first, for the before/after table.")


def stage_data(stage: str, converted: dict[str, Artifact], qa: QASources) -> list[Artifact]:
    """The qa artifacts a curriculum stage trains on: one source's, or every instruction file's."""
    names = [Path(p).stem for p in qa.instructions] if stage == "instructions" else [stage]
    found = [converted[name] for name in names if name in converted]
    if not found:
        raise ValueError(f"curriculum stage {stage!r} has no data: set qa.{stage} (a file or folder of it)")
    return found


def columns(store: Store, evaluation_refs: list[str]) -> list[tuple[str, Artifact]]:
    """(column label, evaluation) for evaluations of a base and the stages fine-tuned from it, in order."""
    out = []
    for ref in evaluation_refs:
        evaluation = store.require(ref)
        model = next((store.require(p) for p in evaluation.parents if p.split("/")[0] in MODEL_KINDS), None)
        if model is None or model.kind != "finetune":
            label = "base"
        else:
            data = [store.require(p).label or p for p in model.parents if p.startswith("qa/")]
            label = f"{sum(label != 'base' for label, _ in out) + 1}. {' + '.join(data)}"
        out.append((label, evaluation))
    return out


def comparison(store: Store, evaluation_refs: list[str]) -> list[dict]:
    """The evaluations side by side (tasks/evaluate.py ``comparison_rows``): what every stage added."""
    return comparison_rows(columns(store, evaluation_refs))


@flow(name="finetune")
def finetune(
    finetune: FinetuneConfig = FinetuneConfig(),
    finetune_optim: OptimConfig = OptimConfig(),
    finetune_run: RunConfig = RunConfig(),
    curriculum: Curriculum = Curriculum(),
    qa: QASources = QASources(),
    evaluation: EvaluationConfig = EvaluationConfig(),
    base_ref: Annotated[str | None, Field(description="Checkpoint to fine-tune, e.g. pretrain/3f9a... (unset: the newest pretrain or finetune checkpoint; not used with hf_base).")] = None,
    hf_base: Annotated[DataPath | None, Field(description="A local Hugging Face causal-LM folder (inside MEDLM_DATA_ROOTS) to fine-tune instead of a checkpoint: taken into the store as an hf_model artifact.")] = None,
) -> list[str]:
    """Fine-tune through the curriculum's stages, evaluating the base and every stage; returns the
    evaluations' refs, base first (each names the model it evaluated)."""
    if not curriculum.stages:
        raise ValueError("curriculum.stages is empty: name the QA sources to fine-tune on, in order, e.g. --stages pubmedqa medmcqa medqa")
    store = Store()
    converted = convert(qa)
    data = {stage: stage_data(stage, converted, qa) for stage in curriculum.stages}
    everything = list(converted.values())
    model = model_artifact(store, base_ref, hf_base, "--hf-base")
    log = get_run_logger()

    evaluations = []
    if curriculum.evaluate_base:
        evaluations.append(run_stage(EVALUATE, {"model": model, "qa": everything, **lineage_inputs(store, model)}, evaluation, label="base"))
    config = FinetuneRun(finetune, finetune_optim, finetune_run)
    for i, stage in enumerate(curriculum.stages, 1):
        model = run_stage(FINETUNE, {"base": model, "data": data[stage]}, config, label=f"{i}/{len(curriculum.stages)} {stage}")
        log.info("stage %d (%s): %s %s", i, stage, model.ref, model.summary.get("final_loss"))
        evaluations.append(run_stage(EVALUATE, {"model": model, "qa": everything, **lineage_inputs(store, model)}, evaluation, label=f"after {stage}"))

    refs = [e.ref for e in evaluations]
    rows = comparison(store, refs)
    create_table_artifact(key="finetune-comparison", table=rows, description=f"{model.ref}: the base and every stage, evaluated")
    create_markdown_artifact(key="finetune-comparison-markdown", markdown=rows_markdown(rows), description=f"Fine-tuning curriculum ending in {model.ref}")
    create_markdown_artifact(key="evaluation-report", markdown=evaluations[-1].file(REPORT_FILE).read_text(), description=f"{evaluations[-1].ref} of {model.ref}")
    publish_lineage(model.ref)
    return refs
