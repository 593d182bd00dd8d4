"""corpus: snapshot -> tokenizer -> token shards. Runs on its own (a snapshot ref, or the newest
snapshot in the store) or after `ingest`; a pinned tokenizer re-shards a grown corpus with the
same vocabulary instead of fitting a new one."""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.stage import asset_key, materializing
from storage import Store
from tasks.binarize import BinarizeConfig, binarize_task
from tasks.tokenizer import TokenizerConfig, fit_tokenizer_task, resolve_tokenizer


@flow(name="corpus")
def corpus(
    corpus_ref: str | None = None,
    tokenizer_ref: str | None = None,
    vocab_size: int = 32_000,
    max_documents: int | None = None,
    shard_tokens: int = 2**28,
    val_fraction: float = 0.005,
    test_fraction: float = 0.005,
    store_root: str | None = None,
) -> str:
    """Tokenize a corpus snapshot into uint16 shards; returns the shards' ref."""
    log = get_run_logger()
    store = Store(store_root)
    snapshot = store.require(corpus_ref) if corpus_ref else store.newest("corpus")
    if tokenizer_ref:
        tokenizer = resolve_tokenizer(store, tokenizer_ref)
        fitted_split = (tokenizer.params["val_fraction"], tokenizer.params["test_fraction"])
        if fitted_split != (val_fraction, test_fraction):
            raise ValueError(
                f"{tokenizer.ref} was fitted on the train split of val/test fractions {fitted_split}; shards cut with "
                f"{(val_fraction, test_fraction)} would put text it trained on into val or test. Pass those fractions."
            )
        log.info("re-using the pinned tokenizer %s", tokenizer.ref)
    else:
        fit = materializing(fit_tokenizer_task, asset_key("tokenizer"), [asset_key("corpus")])
        config = TokenizerConfig(vocab_size, max_documents=max_documents, val_fraction=val_fraction, test_fraction=test_fraction)
        tokenizer = fit.submit(store, snapshot, config).result()
    binarize = materializing(binarize_task, asset_key("shards"), [asset_key("corpus"), asset_key("tokenizer")])
    shards = binarize.submit(store, snapshot, tokenizer, BinarizeConfig(shard_tokens, val_fraction, test_fraction)).result()
    log.info("shards %s from %s with %s: %s", shards.ref, snapshot.ref, tokenizer.ref, shards.summary)
    return shards.ref
