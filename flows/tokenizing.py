"""tokenize: corpus snapshot -> hygiene -> tokenizer -> token shards.

(This module is tokenizing.py: a flows/tokenize.py would stand in for the standard library's
`tokenize` wherever flows/ is on sys.path, as it is in a deployment's run.)

Runs on a snapshot ref, or the newest snapshot in the store. The hygiene stage first removes
from it the evaluation items of the QA data (by PMID and by 13-gram), near-duplicates and
boilerplate, starting from the newest cleaning of an older snapshot with the same settings and
QA data when there is one. A pinned tokenizer re-shards a grown corpus with the same vocabulary
(and the split it was fitted with) instead of fitting a new one.
"""

from __future__ import annotations

from typing import Annotated

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import Field

from flows.qa import convert
from flows.stage import publish_lineage, publish_result, run_stage, submit
from storage import Artifact, Store
from tasks.hygiene import HYGIENE, REPORT_MD, HygieneConfig, previous_cleaning
from tasks.qa import QASources
from tasks.shards import SHARDS, ShardsConfig
from tasks.tokenizer import TOKENIZER, TokenizerConfig


@flow(name="tokenize")
def tokenize(
    *,
    tokenizer: TokenizerConfig = TokenizerConfig(),
    shards: ShardsConfig = ShardsConfig(),
    hygiene: HygieneConfig = HygieneConfig(),
    qa: QASources = QASources(),
    corpus_ref: Annotated[str | None, Field(description="Corpus snapshot to tokenize, e.g. corpus/3f9a... (unset: the newest).")] = None,
    tokenizer_ref: Annotated[str | None, Field(description="Re-use this tokenizer (and its split) instead of fitting one.")] = None,
) -> str:
    """Clean a corpus snapshot of the QA data's evaluation items, near-duplicates and boilerplate,
    fit the tokenizer on it (or re-use ``tokenizer_ref``) and write the shards; returns their ref."""
    store, log = Store(), get_run_logger()
    corpus = store.require(corpus_ref) if corpus_ref else store.newest("corpus")
    evaluation = list(convert(qa).values()) if qa.configs() else []
    if not evaluation:
        log.warning("no QA data given: the corpus is cleaned of no evaluation item (give the benchmarks' data, e.g. --pubmedqa DIR)")
    cleaned = clean(store, corpus, evaluation, hygiene)
    fitted = store.require(tokenizer_ref) if tokenizer_ref else submit(TOKENIZER, {"corpus": cleaned}, tokenizer)
    written = run_stage(SHARDS, {"corpus": cleaned, "tokenizer": fitted}, shards)
    log.info("shards %s: %s", written.ref, written.summary)
    publish_lineage(written.ref)
    return publish_result(written.ref)


def clean(store: Store, corpus: Artifact, evaluation: list[Artifact], hygiene: HygieneConfig, report: str = "hygiene-report") -> Artifact:
    """The hygiene stage's cleaning of a snapshot, of the ``evaluation`` QA data's items among the
    rest, started from an earlier cleaning when one fits; its report the run's markdown artifact ``report``."""
    inputs = {"corpus": corpus, "qa": evaluation or None}
    cleaned = run_stage(HYGIENE, inputs | {"previous": previous_cleaning(store, inputs, hygiene)}, hygiene)
    create_markdown_artifact(key=report, markdown=cleaned.file(REPORT_MD).read_text(), description=f"{cleaned.ref} {cleaned.label}")
    get_run_logger().info("hygiene %s: %s", cleaned.ref, cleaned.summary)
    return cleaned
