"""Tokenizer: a byte-level BPE vocabulary fitted from scratch on the corpus snapshot.

Byte-level BPE (HF ``tokenizers``) with no normalizer: every string maps to bytes and back, so
``decode(encode(doc)) == doc`` for any text, whatever its Unicode form. (NFC would rewrite
decomposed accents in the few abstracts that have them, and decode would then differ.)
It is fitted on the train split only, streamed from Parquet in batches, so the validation
fertility it reports is measured on text it never saw. The folder loads in transformers with
``AutoTokenizer.from_pretrained(folder)``; special tokens [PAD]=0, [UNK]=1, [BOS]=2, [EOS]=3.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pydantic import Field, model_validator
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from storage import Input, Stage, sha256_file
from storage.config import config_dataclass
from storage.formats import (
    CORPUS_KINDS,
    DEFAULT_TEST_FRACTION,
    DEFAULT_VAL_FRACTION,
    SPECIAL_TOKENS,
    TOKENIZER_FILE,
    UINT16_VOCAB_LIMIT,
    corpus_documents,
    iter_corpus,
    load_tokenizer,
    split_of,
    stable_unit,
)

log = logging.getLogger("medlm.tokenizer")
BYTE_ALPHABET = 256


@config_dataclass
class TokenizerConfig:
    """The byte-level BPE vocabulary, and the train/val/test split of the corpus (by PMID)."""

    vocab_size: int = Field(
        32_000, ge=BYTE_ALPHABET + len(SPECIAL_TOKENS), le=UINT16_VOCAB_LIMIT,
        description="Vocabulary size, the 256 byte tokens and 4 special tokens included (at most 65,536: shards are uint16).",
    )
    min_frequency: int = Field(2, ge=1, description="A pair seen fewer times is never merged.")
    max_documents: int | None = Field(None, ge=1, description="Fit on a deterministic sample of this many train documents (unset: all).")
    # The one split setting: the tokenizer is fitted on the train split only, and the shards
    # encoded with it are cut with the same fractions (so it never saw val or test text).
    val_fraction: float = Field(DEFAULT_VAL_FRACTION, ge=0, lt=1, description="Share of PMIDs in the validation split.")
    test_fraction: float = Field(DEFAULT_TEST_FRACTION, ge=0, lt=1, description="Share of PMIDs in the test split.")

    @model_validator(mode="after")
    def _train_split_left(self):
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"val_fraction + test_fraction must be below 1, got {self.val_fraction} + {self.test_fraction}")
        return self


@dataclass
class _TrainSample:
    """Batches of train-split texts, sampled by PMID hash down to about ``max_documents``;
    ``documents`` counts what has been handed out."""

    corpus_dir: Path
    config: TokenizerConfig
    documents: int = 0

    def __iter__(self) -> Iterator[list[str]]:
        config, cap = self.config, self.config.max_documents
        keep_rate = 1.0
        if cap is not None:
            rows = corpus_documents(self.corpus_dir)
            keep_rate = cap / max(rows * (1 - config.val_fraction - config.test_fraction), 1)
        for pmids, texts in iter_corpus(self.corpus_dir):
            batch = [
                text
                for pmid, text in zip(pmids, texts)
                if split_of(pmid, config.val_fraction, config.test_fraction) == "train"
                and (keep_rate >= 1 or stable_unit(pmid, b"medlm-tok-sample") < keep_rate)
            ]
            if cap is not None:
                batch = batch[: cap - self.documents]
            if batch:
                self.documents += len(batch)
                yield batch
            if cap is not None and self.documents >= cap:
                return


def _fertility(tokenizer_json: Path, corpus_dir: Path, config: TokenizerConfig) -> tuple[float | None, int]:
    """Tokens per whitespace-separated word over the validation split, and its document count."""
    tokenizer = load_tokenizer(tokenizer_json)
    tokens = words = documents = 0
    for pmids, texts in iter_corpus(corpus_dir):
        val = [t for p, t in zip(pmids, texts) if split_of(p, config.val_fraction, config.test_fraction) == "val"]
        tokens += sum(len(e) for e in tokenizer.encode_batch_fast(val, add_special_tokens=False))
        words += sum(len(t.split()) for t in val)
        documents += len(val)
    return (round(tokens / words, 4) if words else None), documents


def _write_transformers_files(out_dir: Path) -> None:
    """The two small files that make ``AutoTokenizer.from_pretrained(out_dir)`` set the special tokens."""
    roles = dict(zip(("pad_token", "unk_token", "bos_token", "eos_token"), SPECIAL_TOKENS))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        # transformers would otherwise rewrite " ." to "." when decoding and break the round trip.
        "clean_up_tokenization_spaces": False,
        **roles,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(roles, indent=2) + "\n")


def fit_tokenizer(corpus_dir: Path, out_dir: Path, config: TokenizerConfig = TokenizerConfig()) -> dict:
    """Fit the BPE on ``corpus_dir`` and write it to ``out_dir``; return the summary."""
    started = time.time()
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    sample = _TrainSample(corpus_dir, config)
    tokenizer.train_from_iterator(sample, trainer)
    ids = [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS]
    assert ids == [0, 1, 2, 3], f"special tokens got ids {ids}"
    log.info("fitted %d tokens on %d documents in %.1f s", tokenizer.get_vocab_size(), sample.documents, time.time() - started)

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / TOKENIZER_FILE))
    _write_transformers_files(out_dir)
    fertility, val_documents = _fertility(out_dir / TOKENIZER_FILE, corpus_dir, config)
    log.info("validation fertility %s tokens/word over %d documents", fertility, val_documents)
    return {
        "vocab_size": tokenizer.get_vocab_size(),
        **{f"{token.strip('[]').lower()}_id": i for i, token in enumerate(SPECIAL_TOKENS)},
        "training_documents": sample.documents,
        "validation_documents": val_documents,
        "fertility": fertility,
        "tokenizer_sha256": sha256_file(out_dir / TOKENIZER_FILE),
    }


def build_tokenizer(inputs: dict, out_dir: Path, config: TokenizerConfig) -> dict:
    return fit_tokenizer(inputs["corpus"].path, out_dir, config)


TOKENIZER = Stage(
    name="tokenizer",
    version="2",
    config=TokenizerConfig,
    inputs={"corpus": Input(CORPUS_KINDS)},
    build=build_tokenizer,
)
