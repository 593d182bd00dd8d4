"""pipeline: the whole DAG: ingest -> tokenize (hygiene, tokenizer, shards) -> retrain -> finetune (a curriculum of QA
sources, each cleaned first by the trainset stage, then preference tuning, the model evaluated after each stage, when
the curriculum names any sources) or evaluate ->
release (the last model evaluated, packaged with its card).

Each step is one of the flows the CLI and deployments run on their own, called here through
``.fn``: its tasks run in this one flow run, not in a subflow run per step (each flow run costs
Prefect about a second of bookkeeping, which a cached rerun would notice).

Every stage goes through the store, so a second run with the same configuration does no work,
and a changed parameter reruns its stage and what is downstream of it, nothing upstream.
"""

from __future__ import annotations

from dataclasses import replace

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows.evaluate import evaluate
from flows.finetune import Curriculum, finetune as finetune_flow
from flows.ingest import DOWNLOADS_AT_ONCE, ingest
from flows.qa import convert
from flows.release import release as release_flow
from model.dpo import DPOConfig
from flows.retrain import retrain
from flows.tokenizing import tokenize
from model.finetune import FinetuneConfig
from model.train import ModelShape, OptimConfig, RunConfig
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


@flow(name="pipeline", task_runner=ThreadPoolTaskRunner(max_workers=DOWNLOADS_AT_ONCE))
def pipeline(
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
) -> list[str]:
    """Ingest, tokenize, pretrain, fine-tune and preference-tune through the curriculum (if it names sources), evaluate and
    release; returns the refs of the evaluations (the pretrained model's, then the model's after
    each source), then the release's."""
    convert(qa)  # the QA files are read first: a bad one fails in seconds, not after pretraining
    corpus_ref = ingest.fn(source, corpus, parse)
    shards_ref = tokenize.fn(tokenizer, shards, hygiene, qa, corpus_ref=corpus_ref)
    checkpoint_ref = retrain.fn(shape, optim, run, shards_ref=shards_ref)
    if curriculum.sources or curriculum.preference_sources:
        evaluations = finetune_flow.fn(finetune, finetune_optim, finetune_run, replace(curriculum, evaluate_base=True), qa, evaluation, dpo, dpo_optim,
                                       trainset, base_ref=checkpoint_ref)
    else:
        evaluations = [evaluate.fn(evaluation, qa, model_ref=checkpoint_ref)]
    return [*evaluations, release_flow.fn(release, evaluation_ref=evaluations[-1])]
