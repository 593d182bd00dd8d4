"""The file contracts between stages, in one place: names, special tokens, the PMID split, the
token-shard format and the tokenizer loader. Stages and ``model/`` import these; no stage imports
another stage. Heavy libraries (pyarrow, tokenizers) are imported only by the functions that use them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator

# -- file names ------------------------------------------------------------------------------------

ARTICLES_FILE = "articles.parquet"  # parse: one row per PubmedArticle
DELETIONS_FILE = "deletions.parquet"  # parse: one row per DeleteCitation PMID
CORPUS_FILE = "corpus.parquet"  # corpus: pmid, text, ... sorted by pmid
TOKENIZER_FILE = "tokenizer.json"
# What AutoTokenizer.from_pretrained needs; a tokenizer artifact and every checkpoint hold them.
TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json")
META_FILE = "meta.json"  # shards: dtype, vocabulary, special ids, tokenizer, split, files

# -- special tokens ---------------------------------------------------------------------------------

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")  # their ids are 0, 1, 2, 3: a contract of the shards
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(4)
SPECIAL_IDS = {"pad_id": PAD_ID, "unk_id": UNK_ID, "bos_id": BOS_ID, "eos_id": EOS_ID}

# -- the split -------------------------------------------------------------------------------------

SPLITS = ("train", "val", "test")
DEFAULT_VAL_FRACTION = DEFAULT_TEST_FRACTION = 0.005


def stable_unit(pmid: int, purpose: bytes) -> float:
    """A uniform number in [0, 1) that depends only on the PMID and ``purpose`` (<= 16 bytes).

    Different purposes (the split, the tokenizer's training sample) give independent draws.
    """
    digest = hashlib.blake2b(str(int(pmid)).encode(), digest_size=8, person=purpose).digest()
    return int.from_bytes(digest, "little") / 2**64


def split_of(pmid: int, val_fraction: float = DEFAULT_VAL_FRACTION, test_fraction: float = DEFAULT_TEST_FRACTION) -> str:
    """"train", "val" or "test" for a PMID; the same answer for that PMID in every corpus, so an
    article never moves between splits when the corpus grows nightly."""
    u = stable_unit(pmid, b"medlm-split")
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


# -- the corpus snapshot ------------------------------------------------------------------------------

CORPUS_BATCH = 1_024  # documents per batch: big enough to keep both cores busy encoding, small in memory


def iter_corpus(corpus_parquet: Path, batch_size: int = CORPUS_BATCH) -> Iterator[tuple[list[int], list[str]]]:
    """(pmids, texts) in batches, in file order, reading only those two columns."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(corpus_parquet)
    missing = {"pmid", "text"} - set(parquet.schema_arrow.names)
    if missing:
        raise ValueError(
            f"{corpus_parquet}: no column(s) {sorted(missing)} (found {parquet.schema_arrow.names}); "
            f"expected a corpus snapshot with pmid and text, as written by the corpus stage"
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


# -- the tokenizer ----------------------------------------------------------------------------------

UINT16_VOCAB_LIMIT = 65_536  # ids must fit in uint16; a vocabulary this large or larger is refused


def load_tokenizer(tokenizer_json: Path):
    """The tokenizer, checked to have the special-token ids the shards promise, set to encode
    documents: a literal "[EOS]" in an abstract is text, never the special token."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    ids = [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS]
    if ids != list(range(len(SPECIAL_TOKENS))):
        raise ValueError(
            f"{tokenizer_json}: special tokens {list(SPECIAL_TOKENS)} have ids {ids}, expected [0, 1, 2, 3]; "
            f"fit the tokenizer with the tokenizer stage"
        )
    tokenizer.encode_special_tokens = True
    return tokenizer


# -- token shards -------------------------------------------------------------------------------------

SHARD_DTYPE = "<u2"  # raw little-endian uint16, whatever the host byte order; documents end in [EOS]


def shard_file_name(split: str, index: int | None) -> str:
    """train_0000.bin, train_0001.bin, ... for the train split; val.bin and test.bin."""
    return f"{split}_{index:04d}.bin" if index is not None else f"{split}.bin"


def shard_meta(vocab_size: int, files: dict[str, dict], **extra) -> dict:
    """meta.json of a shards folder. ``files``: name -> {"split", "tokens", "documents"}."""
    return {"dtype": "uint16", "vocab_size": vocab_size, **SPECIAL_IDS, **extra, "files": files}


# -- QA records -----------------------------------------------------------------------------------------

RECORDS_FILE = "records.parquet"  # qa: the canonical records (and records.jsonl, the same rows for people)
RECORDS_JSONL = "records.jsonl"
QA_SPLITS = ("train", "validation", "test")


def qa_schema():
    """One row per item, for every source: evaluation and fine-tuning read only this."""
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),  # "{source}:{native id}", unique in an artifact
            pa.field("source", pa.string(), nullable=False),  # pubmedqa | medmcqa | medqa | instructions | a name
            pa.field("split", pa.string(), nullable=False),  # one of QA_SPLITS
            pa.field("question", pa.string(), nullable=False),
            pa.field("context", pa.list_(pa.string()), nullable=False),  # PubMedQA abstract sections; instruction input
            pa.field("options", pa.list_(pa.string()), nullable=False),  # A, B, C, ... ([] for free text)
            pa.field("answer_idx", pa.int32()),  # index into options; null when there are none
            pa.field("answer_text", pa.string(), nullable=False),
            pa.field("explanation", pa.string()),  # MedMCQA exp, PubMedQA LONG_ANSWER: never in a prompt
            pa.field("meta", pa.string(), nullable=False),  # a JSON object as text
        ]
    )


def read_records(path: Path) -> list[dict]:
    """The records of a qa artifact (``path``: its folder or its records.parquet), ``meta`` still JSON text."""
    import pyarrow.parquet as pq

    path = Path(path)
    if path.is_dir():
        path = path / RECORDS_FILE
    table = pq.read_table(path)
    if not table.schema.equals(qa_schema()):
        raise ValueError(f"{path}: not a QA records file (schema {table.schema}); expected storage.formats.qa_schema()")
    return table.to_pylist()
