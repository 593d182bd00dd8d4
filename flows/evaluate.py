"""evaluate: a checkpoint (or a local Hugging Face model) on the medical QA benchmarks, its test
shards and held-out PubMed text, with contamination against its own pretraining corpus."""

from __future__ import annotations

from typing import Annotated

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import Field

from flows.qa import convert
from flows.stage import publish_lineage, run_stage
from storage import Artifact, ArtifactError, Store
from storage.lineage import ancestor, lineage
from storage.access import DataPath
from storage.formats import CORPUS_KINDS
from tasks.evaluate import EVALUATE, REPORT_FILE, EvaluationConfig
from tasks.hf_model import HF_MODEL, HFModelConfig
from tasks.qa import QASources

CHECKPOINT_KINDS = ("dpo", "finetune", "pretrain")


def model_artifact(store: Store, ref: str | None, hf_folder: str | None, flag: str) -> Artifact:
    """The model a run reads: the artifact ``ref`` names, a Hugging Face folder taken into the
    store as an hf_model artifact, or (neither given) the newest checkpoint."""
    if ref and hf_folder:
        raise ValueError(f"give a checkpoint ref or {flag} FOLDER, not both")
    if hf_folder:
        return run_stage(HF_MODEL, {}, HFModelConfig(folder=hf_folder))
    if ref:
        return store.require(ref)
    found = [a for kind in CHECKPOINT_KINDS for a in store.ls(kind)]
    if not found:
        raise ArtifactError(f"no checkpoint in the store at {store.root}; train one (`medlm retrain`) or give {flag} FOLDER (a Hugging Face model)")
    return max(found, key=lambda a: a.manifest.get("created", 0))


def lineage_inputs(store: Store, model: Artifact) -> dict:
    """The shards and corpus a checkpoint came from (its perplexity data and contamination check:
    the cleaned snapshot it pretrained on, else the snapshot), and the newest snapshot of that
    kind built after it, if any (the articles it never saw)."""
    root = lineage(store, model.ref)
    corpus = next((node for kind in CORPUS_KINDS if (node := ancestor(root, kind))), None)
    found = {"shards": store.require(node.ref) if (node := ancestor(root, "shards")) else None, "corpus": corpus and store.require(corpus.ref)}
    if corpus is not None:
        since = found["corpus"].manifest.get("created", 0)
        later = [c for c in store.ls(corpus.kind) if c.manifest.get("created", 0) > since]
        found["newer"] = store.require(later[-1].ref) if later else None
    return found


@flow(name="evaluate")
def evaluate(
    evaluation: EvaluationConfig = EvaluationConfig(),
    qa: QASources = QASources(),
    model_ref: Annotated[str | None, Field(description="Checkpoint to evaluate, e.g. finetune/3f9a... (unset: the newest; not used with hf_model).")] = None,
    hf_model: Annotated[DataPath | None, Field(description="A local Hugging Face causal-LM folder (inside MEDLM_DATA_ROOTS) to evaluate instead of a checkpoint: taken into the store as an hf_model artifact.")] = None,
) -> str:
    """Evaluate a checkpoint or a Hugging Face folder; returns the evaluation's ref."""
    store = Store()
    data = list(convert(qa).values())
    model = model_artifact(store, model_ref, hf_model, "--hf-model")
    result = run_stage(EVALUATE, {"model": model, "qa": data, **lineage_inputs(store, model)}, evaluation)
    create_markdown_artifact(key="evaluation-report", markdown=result.file(REPORT_FILE).read_text(), description=f"{result.ref} {result.label}")
    publish_lineage(result.ref)
    get_run_logger().info("evaluation %s: %s", result.ref, result.summary)
    return result.ref
