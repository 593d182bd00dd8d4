"""The tokenize flow (snapshot -> hygiene -> tokenizer -> shards) with a pinned tokenizer, on a real Prefect server."""

from __future__ import annotations

import json

import pytest

from flows.tokenizing import tokenize
from tasks.shards import ShardsConfig
from tasks.tokenizer import TokenizerConfig

pytestmark = pytest.mark.usefixtures("prefect_server")


def test_a_pinned_tokenizer_reshards_with_its_own_split_without_refitting(session_store, corpus, tokenizer, monkeypatch):
    monkeypatch.setenv("MEDLM_STORE", str(session_store.root))
    tokenizers_before = {a.ref for a in session_store.ls("tokenizer")}
    # A split asked for here cannot apply: the pinned tokenizer was fitted on its own train split.
    shards_ref = tokenize(tokenizer=TokenizerConfig(val_fraction=0.2), shards=ShardsConfig(shard_tokens=50_000), corpus_ref=corpus.ref, tokenizer_ref=tokenizer.ref)
    shards = session_store.require(shards_ref)
    cleaned = session_store.require(shards.parents[0])  # the snapshot cleaned first (no QA data given: of no evaluation item)
    assert cleaned.kind == "hygiene" and cleaned.parents == [corpus.ref] and shards.parents[1:] == [tokenizer.ref]
    meta = json.loads(shards.file("meta.json").read_text())
    assert meta["tokenizer"]["ref"] == tokenizer.ref
    assert meta["split"] == {"val_fraction": tokenizer.params["val_fraction"], "test_fraction": tokenizer.params["test_fraction"]}
    assert {a.ref for a in session_store.ls("tokenizer")} == tokenizers_before  # nothing was fitted
