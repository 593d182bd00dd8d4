"""Shards: the corpus snapshot -> uint16 token shards for pretraining.

Every document is encoded with the pinned tokenizer, followed by [EOS], and appended to the
file of its split: ``train_0000.bin``, ``train_0001.bin``, ... (a new shard starts when the next
document would push the current one past ``shard_tokens``), ``val.bin`` and ``test.bin``.
A document never spans two shards, so every shard is whole documents and a loader that reads
windows within one shard never needs the next file. ``meta.json`` (written last) gives the
dtype, the special-token ids, the tokenizer's ref and hash, and each file's token and document
counts. The files are raw little-endian uint16, readable with ``numpy.memmap``.

The split is a pure function of the PMID (``storage.formats.split_of``), with the fractions the
tokenizer was fitted with, so the tokenizer never saw val or test text and an article never
moves between splits when the corpus grows nightly.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
from pydantic import Field

from storage import Input, Stage, sha256_file
from storage.config import config_dataclass
from storage.formats import (
    CORPUS_KINDS,
    EOS_ID,
    META_FILE,
    SHARD_DTYPE,
    SPLITS,
    TOKENIZER_FILE,
    UINT16_VOCAB_LIMIT,
    iter_corpus,
    load_tokenizer,
    shard_file_name,
    shard_meta,
    split_of,
)

if TYPE_CHECKING:
    from tokenizers import Tokenizer

log = logging.getLogger("medlm.shards")


@config_dataclass
class ShardsConfig:
    """How the token streams are cut into files (the split comes from the tokenizer)."""

    shard_tokens: int = Field(2**28, ge=1, description="Tokens per train shard (2**28 = 512 MiB of uint16).")


# -- writing ------------------------------------------------------------------------------------------


@dataclass
class _OpenFile:
    name: str
    handle: BinaryIO
    tokens: int = 0
    documents: int = 0


class _SplitWriter:
    """Appends one split's documents to its file(s); train rolls over to a new shard when full."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int | None):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.done: list[_OpenFile] = []
        self.file = self._open()

    def _open(self) -> _OpenFile:
        name = shard_file_name(self.split, len(self.done) if self.shard_tokens else None)
        return _OpenFile(name, open(self.out_dir / name, "wb"))

    def _close(self) -> None:
        self.file.handle.close()
        self.done.append(self.file)

    def add(self, tokens: np.ndarray, lengths: list[int]) -> None:
        """Write documents whose tokens (each ending in [EOS]) are concatenated in ``tokens``."""
        ends = np.cumsum(lengths)
        first = 0  # the first document not yet written
        while first < len(lengths):
            start = int(ends[first - 1]) if first else 0
            if self.shard_tokens is None:
                last = len(lengths)
            else:
                room = max(self.shard_tokens - self.file.tokens, 0)  # < 0 after an oversized document
                last = int(np.searchsorted(ends, start + room, side="right"))  # documents [first, last) fit
                if last == first:
                    if self.file.tokens:
                        self._close()
                        self.file = self._open()
                        continue
                    last = first + 1  # a document longer than a whole shard gets a shard of its own
            end = int(ends[last - 1])
            tokens[start:end].tofile(self.file.handle)
            self.file.tokens += end - start
            self.file.documents += last - first
            first = last

    def finish(self) -> list[_OpenFile]:
        self._close()
        return self.done


def _check_vocab(tokenizer: Tokenizer, tokenizer_json: Path) -> int:
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab_size >= UINT16_VOCAB_LIMIT:
        raise ValueError(
            f"{tokenizer_json}: vocabulary of {vocab_size} tokens does not fit uint16 shards "
            f"(limit: fewer than {UINT16_VOCAB_LIMIT}); fit a tokenizer with a smaller vocab_size"
        )
    return vocab_size


def encode_corpus(
    corpus_dir: Path,
    tokenizer_json: Path,
    out_dir: Path,
    *,
    shard_tokens: int = ShardsConfig().shard_tokens,
    val_fraction: float,
    test_fraction: float,
    tokenizer_ref: str | None = None,
) -> dict:
    """Encode every document of ``corpus_dir`` into ``out_dir``; return the summary.

    Memory stays bounded: one batch of documents is held at a time and written as it is encoded.
    """
    tokenizer = load_tokenizer(tokenizer_json)
    vocab_size = _check_vocab(tokenizer, tokenizer_json)
    out_dir.mkdir(parents=True, exist_ok=True)
    writers = {
        split: _SplitWriter(out_dir, split, shard_tokens if split == "train" else None) for split in SPLITS
    }
    started = last_log = time.time()
    documents = total_tokens = 0
    try:
        for pmids, texts in iter_corpus(corpus_dir):
            # encode_batch_fast (Rust threads on every core, no offsets) rather than a process pool:
            # 583k tokens per CPU-second against 511k for one single-threaded tokenizer per core, and
            # 508k for encode_batch (medians of 3, 30k real abstracts, 32k vocab, 2 shared cores;
            # benchmarks/results/tokenize.json). The pool also has to ship every id back by pickle.
            encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
            batch = {split: ([], []) for split in SPLITS}  # split -> (token ids, document lengths)
            for pmid, encoding in zip(pmids, encodings):
                ids, lengths = batch[split_of(pmid, val_fraction, test_fraction)]
                ids.extend(encoding.ids)
                ids.append(EOS_ID)
                lengths.append(len(encoding.ids) + 1)
            for split, (ids, lengths) in batch.items():
                if lengths:
                    writers[split].add(np.array(ids, dtype=SHARD_DTYPE), lengths)
                    total_tokens += len(ids)
            documents += len(pmids)
            if time.time() - last_log > 30:
                last_log = time.time()
                log.info("%d documents, %d tokens, %.0f tokens/s", documents, total_tokens, total_tokens / (time.time() - started))
    except BaseException:  # close the open shard files; the store discards the work folder
        for writer in writers.values():
            writer.file.handle.close()
        raise

    files = [(split, f) for split in SPLITS for f in writers[split].finish()]
    meta = shard_meta(
        vocab_size,
        {f.name: {"split": split, "tokens": f.tokens, "documents": f.documents} for split, f in files},
        tokenizer={"ref": tokenizer_ref, "sha256": sha256_file(tokenizer_json)},
        split={"val_fraction": val_fraction, "test_fraction": test_fraction},
    )
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    summary = {"documents": documents, "train_shards": len(writers["train"].done)}
    for split in SPLITS:
        summary[f"{split}_tokens"] = sum(f.tokens for s, f in files if s == split)
        summary[f"{split}_documents"] = sum(f.documents for s, f in files if s == split)
    log.info("encode_corpusd %d documents into %d tokens in %.1f s", documents, total_tokens, time.time() - started)
    return summary


# -- the stage ---------------------------------------------------------------------------------------------


def build_shards(inputs: dict, out_dir: Path, config: ShardsConfig) -> dict:
    corpus, tokenizer = inputs["corpus"], inputs["tokenizer"]
    return encode_corpus(
        corpus.path, tokenizer.file(TOKENIZER_FILE), out_dir, shard_tokens=config.shard_tokens,
        val_fraction=tokenizer.params["val_fraction"], test_fraction=tokenizer.params["test_fraction"], tokenizer_ref=tokenizer.ref,
    )


SHARDS = Stage(
    name="shards",
    version="2",
    config=ShardsConfig,
    inputs={"corpus": Input(CORPUS_KINDS), "tokenizer": Input("tokenizer")},
    build=build_shards,
)
