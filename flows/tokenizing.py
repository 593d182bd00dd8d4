"""tokenize: corpus snapshot -> tokenizer -> token shards.

(This module is tokenizing.py: a flows/tokenize.py would stand in for the standard library's
`tokenize` wherever flows/ is on sys.path, as it is in a deployment's run.)

Runs on a snapshot ref, or the newest snapshot in the store. A pinned tokenizer re-shards a grown
corpus with the same vocabulary (and the split it was fitted with) instead of fitting a new one.
"""

from __future__ import annotations

from typing import Annotated

from prefect import flow, get_run_logger
from pydantic import Field

from flows.stage import publish_lineage, run_stage, submit
from storage import Store
from tasks.shards import SHARDS, ShardsConfig
from tasks.tokenizer import TOKENIZER, TokenizerConfig


@flow(name="tokenize")
def tokenize(
    tokenizer: TokenizerConfig = TokenizerConfig(),
    shards: ShardsConfig = ShardsConfig(),
    corpus_ref: Annotated[str | None, Field(description="Corpus snapshot to tokenize, e.g. corpus/3f9a... (unset: the newest).")] = None,
    tokenizer_ref: Annotated[str | None, Field(description="Re-use this tokenizer (and its split) instead of fitting one.")] = None,
) -> str:
    """Fit the tokenizer on a corpus snapshot (or re-use ``tokenizer_ref``) and write the shards; returns their ref."""
    store = Store()
    corpus = store.require(corpus_ref) if corpus_ref else store.newest("corpus")
    fitted = store.require(tokenizer_ref) if tokenizer_ref else submit(TOKENIZER, {"corpus": corpus}, tokenizer)
    written = run_stage(SHARDS, {"corpus": corpus, "tokenizer": fitted}, shards)
    get_run_logger().info("shards %s: %s", written.ref, written.summary)
    publish_lineage(written.ref)
    return written.ref
