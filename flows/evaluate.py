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
        raise ArtifactError(f"no checkpoint in the store at {store.root}; train one (`medlm pretrain`) or give {flag} FOLDER (a Hugging Face model)")
    return max(found, key=lambda a: a.manifest.get("created", 0))


def lineage_inputs(store: Store, model: Artifact, held_out: Artifact | None = None) -> dict:
    """The shards and corpus a checkpoint came from (its perplexity data and contamination check:
    the cleaned snapshot it pretrained on, else the snapshot), and ``held_out``, a snapshot whose
    abstracts that corpus never had are its temporal hold-out (the flow resolves it once, at its
    start: what the store holds later changes no evaluation's inputs)."""
    root = lineage(store, model.ref)
    corpus = next((node for kind in CORPUS_KINDS if (node := ancestor(root, kind))), None)
    found = {"shards": store.require(node.ref) if (node := ancestor(root, "shards")) else None, "corpus": corpus and store.require(corpus.ref)}
    if held_out is not None:
        if corpus is None:
            raise ValueError(f"held_out_ref {held_out.ref}: {model.ref} has no corpus snapshot in its lineage to hold its abstracts out from; leave held_out_ref unset")
        found["newer"] = held_out
    return found


def held_out_snapshot(store: Store, ref: str | None) -> Artifact | None:
    """The snapshot ``held_out_ref`` names (a corpus or hygiene artifact), or None."""
    if ref is None:
        return None
    held_out = store.require(ref)
    if held_out.kind not in CORPUS_KINDS:
        raise ValueError(f"held_out_ref {ref} is a {held_out.kind} artifact; give a corpus snapshot, {' or '.join(f'{k}/KEY' for k in CORPUS_KINDS)} (medlm store ls)")
    return held_out


HELD_OUT_HELP = ("A corpus snapshot built after the model's, e.g. corpus/3f9a...: its abstracts the model's corpus never had are a temporal "
                 "hold-out, measured in bits per byte (unset: none).")


@flow(name="evaluate")
def evaluate(
    *,
    evaluation: EvaluationConfig = EvaluationConfig(),
    qa: QASources = QASources(),
    model_ref: Annotated[str | None, Field(description="Checkpoint to evaluate, e.g. finetune/3f9a... (unset: the newest; not used with hf_model).")] = None,
    hf_model: Annotated[DataPath | None, Field(description="A local Hugging Face causal-LM folder (inside MEDLM_DATA_ROOTS) to evaluate instead of a checkpoint: taken into the store as an hf_model artifact.")] = None,
    held_out_ref: Annotated[str | None, Field(description=HELD_OUT_HELP)] = None,
) -> str:
    """Evaluate a checkpoint or a Hugging Face folder; returns the evaluation's ref."""
    store = Store()
    held_out = held_out_snapshot(store, held_out_ref)
    data = list(convert(qa).values())
    model = model_artifact(store, model_ref, hf_model, "--hf-model")
    result = run_stage(EVALUATE, {"model": model, "qa": data, **lineage_inputs(store, model, held_out)}, evaluation)
    create_markdown_artifact(key="evaluation-report", markdown=result.file(REPORT_FILE).read_text(), description=f"{result.ref} {result.label}")
    publish_lineage(result.ref)
    get_run_logger().info("evaluation %s: %s", result.ref, result.summary)
    return result.ref
