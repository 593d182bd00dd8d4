"""pipeline: the whole DAG, each step a flow of its own: ingest -> tokenize -> retrain -> finetune
(a curriculum of stages, each evaluated, when curriculum.stages names any) or evaluate.

Every stage goes through the store, so a second run with the same configuration does no work,
and a changed parameter reruns its stage and what is downstream of it, nothing upstream.
"""

from __future__ import annotations

from dataclasses import replace

from prefect import flow

from flows.evaluate import evaluate
from flows.finetune import finetune as finetune_flow
from flows.ingest import ingest
from flows.retrain import retrain
from flows.tokenizing import tokenize
from model.finetune import FinetuneConfig
from model.train import TrainConfig
from tasks.corpus import CorpusConfig
from tasks.download import SourceConfig
from tasks.evaluate import EvaluationConfig
from tasks.finetune import Curriculum
from tasks.parse import ParseConfig
from tasks.qa import QASources
from tasks.shards import ShardsConfig
from tasks.tokenizer import TokenizerConfig


@flow(name="pipeline")
def pipeline(
    source: SourceConfig = SourceConfig(),
    corpus: CorpusConfig = CorpusConfig(),
    tokenizer: TokenizerConfig = TokenizerConfig(),
    shards: ShardsConfig = ShardsConfig(),
    train: TrainConfig = TrainConfig(),
    parse: ParseConfig = ParseConfig(),
    qa: QASources = QASources(),
    evaluation: EvaluationConfig = EvaluationConfig(),
    finetune: FinetuneConfig = FinetuneConfig(),
    finetune_train: TrainConfig = TrainConfig(),
    curriculum: Curriculum = Curriculum(),
) -> list[str]:
    """Ingest, tokenize, pretrain, fine-tune through the curriculum (if it has stages) and evaluate;
    returns the refs of the evaluations: the pretrained model's, then each fine-tuning stage's."""
    corpus_ref = ingest(source, corpus, parse)
    shards_ref = tokenize(tokenizer, shards, corpus_ref=corpus_ref)
    checkpoint_ref = retrain(train, shards_ref=shards_ref)
    if curriculum.stages:
        return finetune_flow(finetune, finetune_train, replace(curriculum, evaluate_base=True), qa, evaluation, base_ref=checkpoint_ref)
    return [evaluate(evaluation, qa, model_ref=checkpoint_ref)]
