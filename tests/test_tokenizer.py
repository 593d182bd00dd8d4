"""The tokenizer stage on real PubMed text: fitting, round trips, transformers loading, pinning.

The ``corpus``, ``documents`` and ``tokenizer`` fixtures (conftest) come from the real parse and
corpus stages.
"""

from __future__ import annotations

import json

import pytest

from storage import ArtifactError, sha256_file
from storage.config import ConfigError, make_config
from storage.formats import load_tokenizer, split_of
from tasks.shards import SHARDS, ShardsConfig
from tasks.tokenizer import TOKENIZER, TokenizerConfig, fit_tokenizer

MATHML_PMID = 31993508  # an abstract with <mml:math> (tests/data/pubmed/INDEX.tsv)
from conftest import TEST_VOCAB


def test_fit_summary_describes_the_tokenizer(tokenizer, documents):
    summary = tokenizer.summary
    assert summary["vocab_size"] == TEST_VOCAB
    assert (summary["pad_id"], summary["unk_id"], summary["bos_id"], summary["eos_id"]) == (0, 1, 2, 3)
    assert summary["training_documents"] == sum(split_of(pmid, 0.05, 0.05) == "train" for pmid, _ in documents)
    assert summary["validation_documents"] == sum(split_of(pmid, 0.05, 0.05) == "val" for pmid, _ in documents) > 0
    assert 1.0 < summary["fertility"] < 4.0  # a 1k vocabulary splits words into a few pieces
    assert summary["tokenizer_sha256"] == sha256_file(tokenizer.file("tokenizer.json"))
    assert tokenizer.parents[0].startswith("corpus/")


def test_every_document_round_trips(tokenizer, documents):
    texts = dict(documents)
    assert "<mml:math" not in texts[MATHML_PMID] and "\u2009" in texts[MATHML_PMID]  # MathML kept as its text
    assert any("β" in t for t in texts.values()) and any("±" in t for t in texts.values())
    encoder = load_tokenizer(tokenizer.file("tokenizer.json"))
    encodings = encoder.encode_batch_fast(list(texts.values()), add_special_tokens=False)
    mismatched = [pmid for pmid, e in zip(texts, encodings) if encoder.decode(e.ids) != texts[pmid]]
    assert mismatched == []


def test_special_token_text_in_an_abstract_stays_text(tokenizer, documents):
    text = documents[0][1] + " [EOS] and [PAD] as written"
    encoder = load_tokenizer(tokenizer.file("tokenizer.json"))
    ids = encoder.encode(text, add_special_tokens=False).ids
    assert not {0, 1, 2, 3} & set(ids)
    assert encoder.decode(ids) == text


def test_transformers_loads_it_with_the_special_tokens(tokenizer, documents):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    special = json.loads(tokenizer.file("special_tokens_map.json").read_text())
    loaded = [
        AutoTokenizer.from_pretrained(tokenizer.path),
        PreTrainedTokenizerFast(tokenizer_file=str(tokenizer.file("tokenizer.json")), **special),
    ]
    text = dict(documents)[MATHML_PMID]
    for hf in loaded:
        ids = (hf.pad_token_id, hf.unk_token_id, hf.bos_token_id, hf.eos_token_id)
        assert ids == (0, 1, 2, 3)
        assert (hf.pad_token, hf.eos_token) == ("[PAD]", "[EOS]")
        assert len(hf) == TEST_VOCAB
        encoded = hf(text, add_special_tokens=False)["input_ids"]
        assert encoded == load_tokenizer(tokenizer.file("tokenizer.json")).encode(text, add_special_tokens=False).ids
        assert hf.decode(encoded) == text


def test_max_documents_is_a_deterministic_sample(corpus, tmp_path):
    config = TokenizerConfig(vocab_size=500, max_documents=600)
    first = fit_tokenizer(corpus.path, tmp_path / "a", config)
    second = fit_tokenizer(corpus.path, tmp_path / "b", config)
    assert 450 < first["training_documents"] <= 600
    assert first == second
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()


def test_rerun_is_a_store_hit_and_a_pinned_ref_must_be_a_tokenizer(session_store, corpus, tokenizer):
    again = TOKENIZER.run(session_store, {"corpus": corpus}, TokenizerConfig(**tokenizer.params))
    assert again.ref == tokenizer.ref and again.manifest["created"] == tokenizer.manifest["created"]
    with pytest.raises(ArtifactError, match="tokenizer/0123456789abcdef0123 is not in the store"):
        session_store.require("tokenizer/0123456789abcdef0123")
    with pytest.raises(ArtifactError, match=f"input 'tokenizer' must be a tokenizer artifact, got {corpus.ref}"):
        SHARDS.run(session_store, {"corpus": corpus, "tokenizer": corpus}, ShardsConfig())  # exists, but is not a tokenizer


@pytest.mark.parametrize(
    "values, message",
    [
        ({"vocab_size": 3}, "vocab_size: Input should be greater than or equal to 260"),  # the 256 bytes + 4 specials
        ({"vocab_size": 70_000}, "vocab_size: Input should be less than or equal to 65536"),  # uint16 shards
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "val_fraction + test_fraction must be below 1"),
        ({"vocab_sise": 4096}, "unknown setting(s) ['vocab_sise']"),
    ],
)
def test_bad_settings_are_refused_where_they_enter(values, message):
    with pytest.raises(ConfigError) as refused:
        make_config(TokenizerConfig, values, where="tokenizer")
    assert message in str(refused.value) and str(refused.value).startswith("tokenizer: ")
