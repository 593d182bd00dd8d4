"""Binarize: the corpus snapshot -> uint16 token shards for pretraining.

Every document is encoded with the pinned tokenizer, followed by [EOS], and appended to the
file of its split: ``train_0000.bin``, ``train_0001.bin``, ... (a new shard starts when the next
document would push the current one past ``shard_tokens``), ``val.bin`` and ``test.bin``.
A document never spans two shards, so every shard is whole documents and a loader that reads
windows within one shard never needs the next file. ``meta.json`` (written last) gives the
dtype, the special-token ids, the tokenizer's ref and hash, and each file's token and document
counts. The files are raw little-endian uint16, readable with ``numpy.memmap``.

The split is a pure function of the PMID (a keyed BLAKE2b hash), so an article never moves
between splits when the corpus grows nightly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
import pyarrow.parquet as pq
from prefect import task
from tokenizers import Tokenizer

from storage import Artifact, ArtifactSpec, Store, sha256_file

BINARIZE_VERSION = "1"
CORPUS_FILE = "corpus.parquet"
TOKENIZER_FILE = "tokenizer.json"
META_FILE = "meta.json"
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")  # their ids are 0, 1, 2, 3: a contract of the shards
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(4)
UINT16_VOCAB_LIMIT = 65_536  # ids must fit in uint16; a vocabulary this large or larger is refused
BATCH_DOCUMENTS = 1_024  # documents per encode call: big enough to keep both cores busy, small in memory
SPLITS = ("train", "val", "test")

log = logging.getLogger("medlm.binarize")


@dataclass(frozen=True)
class BinarizeConfig:
    shard_tokens: int = 2**28  # 512 MiB of uint16 per train shard
    val_fraction: float = 0.005
    test_fraction: float = 0.005


# -- the split ---------------------------------------------------------------------------------


def stable_unit(pmid: int, purpose: bytes) -> float:
    """A uniform number in [0, 1) that depends only on the PMID and ``purpose`` (<= 16 bytes).

    Different purposes (the split, the tokenizer's training sample) give independent draws.
    """
    digest = hashlib.blake2b(str(int(pmid)).encode(), digest_size=8, person=purpose).digest()
    return int.from_bytes(digest, "little") / 2**64


def split_of(pmid: int, val_fraction: float = 0.005, test_fraction: float = 0.005) -> str:
    """"train", "val" or "test" for a PMID; the same answer for that PMID in every corpus."""
    u = stable_unit(pmid, b"medlm-split")
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


# -- reading the corpus and the tokenizer ------------------------------------------------------------


def iter_corpus(corpus_parquet: Path, batch_size: int = BATCH_DOCUMENTS) -> Iterator[tuple[list[int], list[str]]]:
    """(pmids, texts) in batches, in file order, reading only those two columns."""
    parquet = pq.ParquetFile(corpus_parquet)
    missing = {"pmid", "text"} - set(parquet.schema_arrow.names)
    if missing:
        raise ValueError(
            f"{corpus_parquet}: no column(s) {sorted(missing)} (found {parquet.schema_arrow.names}); "
            f"expected a corpus snapshot with pmid and text, as written by tasks/corpus.py"
        )
    for batch in parquet.iter_batches(batch_size=batch_size, columns=["pmid", "text"]):
        pmids = batch.column("pmid").to_pylist()
        texts = batch.column("text").to_pylist()
        if batch.column("text").null_count or batch.column("pmid").null_count:
            row = next(i for i, (p, t) in enumerate(zip(pmids, texts)) if p is None or t is None)
            raise ValueError(
                f"{corpus_parquet}: record pmid={pmids[row]} has a null pmid or text; expected a string "
                f"(title, blank line, abstract) for every row; rebuild the corpus snapshot"
            )
        yield pmids, texts


def load_tokenizer(tokenizer_json: Path) -> Tokenizer:
    """The tokenizer, checked to have the special-token ids the shards promise, set to encode
    documents: a literal "[EOS]" in an abstract is text, never the special token."""
    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    ids = [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS]
    if ids != list(range(len(SPECIAL_TOKENS))):
        raise ValueError(
            f"{tokenizer_json}: special tokens {list(SPECIAL_TOKENS)} have ids {ids}, expected [0, 1, 2, 3]; "
            f"fit the tokenizer with tasks/tokenizer.py"
        )
    tokenizer.encode_special_tokens = True
    return tokenizer


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
        name = f"{self.split}_{len(self.done):04d}.bin" if self.shard_tokens else f"{self.split}.bin"
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


def binarize_corpus(
    corpus_parquet: Path,
    tokenizer_json: Path,
    out_dir: Path,
    config: BinarizeConfig = BinarizeConfig(),
    *,
    tokenizer_ref: str | None = None,
) -> dict:
    """Encode every document of ``corpus_parquet`` into ``out_dir``; return the summary.

    Memory stays bounded: one batch of documents is held at a time and written as it is encoded.
    """
    tokenizer = load_tokenizer(tokenizer_json)
    vocab_size = _check_vocab(tokenizer, tokenizer_json)
    out_dir.mkdir(parents=True, exist_ok=True)
    writers = {
        split: _SplitWriter(out_dir, split, config.shard_tokens if split == "train" else None) for split in SPLITS
    }
    started = last_log = time.time()
    documents = total_tokens = 0
    try:
        for pmids, texts in iter_corpus(corpus_parquet):
            # encode_batch_fast (Rust threads on every core, no offsets) rather than a process pool:
            # 583k tokens per CPU-second against 511k for one single-threaded tokenizer per core, and
            # 508k for encode_batch (medians of 3, 30k real abstracts, 32k vocab, 2 shared cores;
            # benchmarks/results/tokenize.json). The pool also has to ship every id back by pickle.
            encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
            batch = {split: ([], []) for split in SPLITS}  # split -> (token ids, document lengths)
            for pmid, encoding in zip(pmids, encodings):
                ids, lengths = batch[split_of(pmid, config.val_fraction, config.test_fraction)]
                ids.extend(encoding.ids)
                ids.append(EOS_ID)
                lengths.append(len(encoding.ids) + 1)
            for split, (ids, lengths) in batch.items():
                if lengths:
                    writers[split].add(np.array(ids, dtype="<u2"), lengths)
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
    meta = {
        "dtype": "uint16",
        "vocab_size": vocab_size,
        "pad_id": PAD_ID,
        "unk_id": UNK_ID,
        "bos_id": BOS_ID,
        "eos_id": EOS_ID,
        "tokenizer": {"ref": tokenizer_ref, "sha256": sha256_file(tokenizer_json)},
        "split": {"val_fraction": config.val_fraction, "test_fraction": config.test_fraction},
        "files": {f.name: {"split": split, "tokens": f.tokens, "documents": f.documents} for split, f in files},
    }
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    summary = {"documents": documents, "train_shards": len(writers["train"].done)}
    for split in SPLITS:
        summary[f"{split}_tokens"] = sum(f.tokens for s, f in files if s == split)
        summary[f"{split}_documents"] = sum(f.documents for s, f in files if s == split)
    log.info("binarized %d documents into %d tokens in %.1f s", documents, total_tokens, time.time() - started)
    return summary


# -- the stage through the store ------------------------------------------------------------------------


def shards_spec(corpus: Artifact, tokenizer: Artifact, config: BinarizeConfig) -> ArtifactSpec:
    return ArtifactSpec("shards", BINARIZE_VERSION, asdict(config), (corpus.ref, tokenizer.ref))


def binarize(store: Store, corpus: Artifact, tokenizer: Artifact, config: BinarizeConfig = BinarizeConfig()) -> Artifact:
    return store.get_or_build(
        shards_spec(corpus, tokenizer, config),
        lambda work: binarize_corpus(
            corpus.file(CORPUS_FILE), tokenizer.file(TOKENIZER_FILE), work, config, tokenizer_ref=tokenizer.ref
        ),
    )


@task(name="binarize")
def binarize_task(store: Store, corpus: Artifact, tokenizer: Artifact, config: BinarizeConfig = BinarizeConfig()) -> Artifact:
    return binarize(store, corpus, tokenizer, config)
