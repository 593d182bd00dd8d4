"""The corpus flow (snapshot -> tokenizer -> shards) with a pinned tokenizer, on a real Prefect server."""

from __future__ import annotations

import json

import pytest

from flows.corpus import corpus as corpus_flow

pytestmark = pytest.mark.usefixtures("prefect_server")


def test_a_pinned_tokenizer_reshards_without_refitting(session_store, corpus, tokenizer):
    tokenizers_before = {a.ref for a in session_store.ls("tokenizer")}
    shards_ref = corpus_flow(
        corpus_ref=corpus.ref, tokenizer_ref=tokenizer.ref, shard_tokens=50_000, store_root=str(session_store.root)
    )
    shards = session_store.require(shards_ref)
    assert shards.parents == [corpus.ref, tokenizer.ref]
    assert json.loads(shards.file("meta.json").read_text())["tokenizer"]["ref"] == tokenizer.ref
    assert {a.ref for a in session_store.ls("tokenizer")} == tokenizers_before  # nothing was fitted


def test_a_pinned_tokenizer_must_match_the_split(session_store, corpus, tokenizer):
    state = corpus_flow(
        corpus_ref=corpus.ref, tokenizer_ref=tokenizer.ref, val_fraction=0.05, store_root=str(session_store.root),
        return_state=True,
    )
    assert state.is_failed() and "would put text it trained on into val or test" in state.message
