"""pipeline: the whole DAG: ingest -> tokenize (hygiene, tokenizer, shards) -> pretrain -> finetune (a curriculum of QA
sources, each cleaned first by the trainset stage, then preference tuning, the model evaluated after each stage, when
the curriculum names any sources) or evaluate ->
release (the last model evaluated, packaged with its card).

With ``held_out.held_out_folders``, a second snapshot (the corpus's files and those folders', cleaned
like the corpus) is built after the corpus, and every evaluation measures its new abstracts: a
temporal hold-out named once, at this run's start, so what else the store holds changes no input.

Each step is one of the flows the CLI and deployments run on their own, called here through
``.fn``: its tasks run in this one flow run, not in a subflow run per step (each flow run costs
Prefect about a second of bookkeeping, which a cached rerun would notice). Run as a deployment,
on a cluster, a step of another work pool than the pipeline's runs as that step's deployment
instead, on a worker of its pool (ingest, tokenize and release on a `cpu` machine; the pipeline
itself, with training and evaluation, on a `gpu` one), and the pipeline waits for it and reads its
result; the stores meet through the remote (MEDLM_REMOTE).

Every stage goes through the store, so a second run with the same configuration does no work,
and a changed parameter reruns its stage and what is downstream of it, nothing upstream.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from prefect import flow
from prefect.context import FlowRunContext
from prefect.deployments import run_deployment
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import Field
from pydantic_core import to_jsonable_python

from flows.evaluate import evaluate
from flows.finetune import Curriculum, finetune as finetune_flow
from flows.ingest import DOWNLOADS_AT_ONCE
from flows.qa import convert
from flows.registry import COMMANDS
from flows.pretrain import pretrain
from flows.stage import read_result
from flows.tokenizing import clean
from model.dpo import DPOConfig
from model.finetune import FinetuneConfig
from model.train import ModelShape, OptimConfig, RunConfig, TrainConfig, require_training_fits
from storage import Store
from storage.config import config_dataclass
from tasks.corpus import CorpusConfig
from tasks.download import SourceConfig
from tasks.evaluate import EvaluationConfig
from tasks.hygiene import HygieneConfig
from tasks.parse import ParseConfig
from tasks.qa import QASources
from tasks.release import ReleaseConfig
from tasks.shards import ShardsConfig
from tasks.tokenizer import TokenizerConfig
from tasks.trainset import TrainsetConfig


@config_dataclass
class HeldOut:
    """PubMed folders kept out of the corpus for a temporal hold-out: after the corpus, a snapshot of
    its files and theirs is built and cleaned like it, and every evaluation of the run measures
    (bits per byte) its abstracts the corpus never had: the articles a model trained on it meets next."""

    held_out_folders: tuple[Literal["baseline", "updatefiles"], ...] = Field(
        (), description="Source folders the corpus leaves out (not in source.folders) whose new abstracts are held out, e.g. updatefiles. Empty: no temporal hold-out.",
    )


@flow(name="pipeline", task_runner=ThreadPoolTaskRunner(max_workers=DOWNLOADS_AT_ONCE))
def pipeline(
    *,
    source: SourceConfig = SourceConfig(),
    corpus: CorpusConfig = CorpusConfig(),
    hygiene: HygieneConfig = HygieneConfig(),
    tokenizer: TokenizerConfig = TokenizerConfig(),
    shards: ShardsConfig = ShardsConfig(),
    shape: ModelShape = ModelShape(),
    optim: OptimConfig = OptimConfig(),
    run: RunConfig = RunConfig(),
    parse: ParseConfig = ParseConfig(),
    qa: QASources = QASources(),
    evaluation: EvaluationConfig = EvaluationConfig(),
    finetune: FinetuneConfig = FinetuneConfig(),
    finetune_optim: OptimConfig = OptimConfig(),
    finetune_run: RunConfig = RunConfig(),
    curriculum: Curriculum = Curriculum(),
    trainset: TrainsetConfig = TrainsetConfig(),
    dpo: DPOConfig = DPOConfig(),
    dpo_optim: OptimConfig = OptimConfig(),
    release: ReleaseConfig = ReleaseConfig(),
    held_out: HeldOut = HeldOut(),
) -> list[str]:
    """Ingest, tokenize, pretrain, fine-tune and preference-tune through the curriculum (if it names sources), evaluate and
    release; returns the refs of the evaluations (the pretrained model's, then the model's after
    each source), then the release's."""
    check_held_out(source, held_out)
    converted = convert(qa)  # the QA files are read first: a bad one fails in seconds, not after pretraining
    corpus_ref = step("ingest", source=source, corpus=corpus, parse=parse)
    shards_ref = step("tokenize", tokenizer=tokenizer, shards=shards, hygiene=hygiene, qa=qa, corpus_ref=corpus_ref)
    held_out_ref = None
    if held_out.held_out_folders:
        store = Store()
        later_ref = step("ingest", source=replace(source, folders=(*source.folders, *held_out.held_out_folders)), corpus=corpus, parse=parse)
        held_out_ref = clean(store, store.require(later_ref), list(converted.values()), hygiene, report="hygiene-report-held-out").ref
    checkpoint_ref = pretrain.fn(shape=shape, optim=optim, run=run, shards_ref=shards_ref)
    if curriculum.sources or curriculum.preference_sources:
        evaluations = finetune_flow.fn(finetune=finetune, finetune_optim=finetune_optim, finetune_run=finetune_run, curriculum=replace(curriculum, evaluate_base=True),
                                       qa=qa, evaluation=evaluation, dpo=dpo, dpo_optim=dpo_optim, trainset=trainset, base_ref=checkpoint_ref, held_out_ref=held_out_ref)
    else:
        evaluations = [evaluate.fn(evaluation=evaluation, qa=qa, model_ref=checkpoint_ref, held_out_ref=held_out_ref)]
    return [*evaluations, step("release", release=release, evaluation_ref=evaluations[-1])]


def before_start(kwargs: dict, tables: dict[str, dict], config: str | None) -> None:
    """What `medlm pipeline` refuses before any flow run is made: a hold-out the corpus would
    hold, a batch that does not divide the step, and a pretraining that cannot fit in this
    machine's memory (estimated at the vocabulary the tokenizer table builds)."""
    check_held_out(kwargs.get("source", SourceConfig()), kwargs.get("held_out", HeldOut()))
    require_training_fits(TrainConfig(kwargs.get("shape", ModelShape()), kwargs.get("optim", OptimConfig()), kwargs.get("run", RunConfig())),
                          kwargs.get("tokenizer", TokenizerConfig()).vocab_size)


def check_held_out(source: SourceConfig, held_out: HeldOut) -> None:
    """A one-line error when the corpus's folders include a held-out one."""
    if both := set(held_out.held_out_folders) & set(source.folders):
        raise ValueError(f"held_out.held_out_folders {sorted(both)} are also in source.folders: the corpus would hold what is held out; remove them from one")


def step(command: str, **parameters) -> str:
    """Run the registry's flow ``command`` (one that returns a ref and publishes it, ``publish_result``):
    in this flow run, or, when this run is a deployment's on another pool than the step's, as the
    step's deployment on its pool (a subflow run a worker of that pool takes), waiting for it. A
    step that fails there fails here. (Training and evaluation share the pipeline's pool.)"""
    entry = COMMANDS[command]
    context = FlowRunContext.get()
    here = context.flow_run.work_pool_name if context else None
    if here is None or here == entry.pool:
        return entry.load().fn(**parameters)
    name = f"{entry.load().name}/{entry.deployment}"
    run = run_deployment(name, parameters=to_jsonable_python(parameters), timeout=None)
    if not run.state.is_completed():
        raise RuntimeError(f"{command}, run on the {entry.pool} pool as {name} (flow run {run.name}), ended {run.state.name}: {run.state.message}")
    return read_result(run.id)
