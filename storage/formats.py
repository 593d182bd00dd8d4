"""The file contracts between stages, in one place: names, special tokens, the PMID split, the
token-shard format and the tokenizer loader. Stages and ``model/`` import these; no stage imports
another stage. Heavy libraries (pyarrow, tokenizers) are imported only by the functions that use them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

# -- file names ------------------------------------------------------------------------------------

ARTICLES_FILE = "articles.parquet"  # parse: one row per PubmedArticle
DELETIONS_FILE = "deletions.parquet"  # parse: one row per DeleteCitation PMID
MODEL_KINDS = ("pretrain", "finetune", "dpo", "hf_model")  # the artifacts that hold a model: fine-tuning, evaluation and release read them
CORPUS_KINDS = ("hygiene", "corpus")  # the artifacts that hold a corpus snapshot (parts.json and its parts), the cleaned one first
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
# A snapshot's documents are the rows of one or more Parquet parts, but the rows each part lists as
# removed, in PMID order across the parts (every part is sorted by PMID, and a PMID has at most one
# document). A nightly update adds a part with the documents it changes and removes their old rows,
# so the parts it does not touch are shared with the snapshot before it (hard links) and never
# rewritten. A full build, and a compaction, write one part with nothing removed.

CORPUS_PARTS = "parts.json"  # corpus: {"documents": N, "parts": [{"file", "rows", "removed"}]}
CORPUS_BATCH = 1_024  # documents per batch: big enough to keep both cores busy encoding, small in memory


@dataclass(frozen=True)
class CorpusPart:
    """One Parquet file of a snapshot and the sorted numbers of its rows that are no longer documents."""

    path: Path
    rows: int
    removed: np.ndarray

    @property
    def documents(self) -> int:
        return self.rows - len(self.removed)

    def live(self) -> np.ndarray:
        """A mask of its rows: True where the row is a document."""
        import numpy as np

        live = np.ones(self.rows, dtype=bool)
        live[self.removed] = False
        return live

    def tables(self, columns: Sequence[str] | None = None, batch_rows: int = 65_536) -> Iterator[pa.Table]:
        """Its documents in file order, as tables of at most ``batch_rows`` rows."""
        parquet = parquet_file(self.path)
        if missing := set(columns or ()) - set(parquet.schema_arrow.names):
            raise ValueError(
                f"{self.path}: no column(s) {sorted(missing)} (found {parquet.schema_arrow.names}); "
                f"expected a corpus snapshot part with pmid and text, as written by the corpus stage"
            )
        if parquet.metadata.num_rows != self.rows:
            raise ValueError(f"{self.path}: {parquet.metadata.num_rows} rows, {CORPUS_PARTS} says {self.rows}; rebuild the corpus snapshot")
        live = self.live()
        start = 0
        for table in parquet_tables(parquet, batch_rows, columns):
            keep = live[start : start + table.num_rows]
            start += table.num_rows
            yield table if keep.all() else table.filter(keep)


def parquet_file(path: Path) -> pq.ParquetFile:
    """A Parquet file to read in batches, holding no more than the batch it reads: with pre-buffering
    on, the reader keeps every row group's compressed bytes it read until it is closed, a whole
    file's worth at the end (apache/arrow#39808; 210 MB held after reading a 227 MB part)."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(path, pre_buffer=False)


def parquet_tables(parquet: pq.ParquetFile, batch_rows: int, columns: Sequence[str] | None = None) -> Iterator[pa.Table]:
    """The rows of ``parquet`` (from ``parquet_file``) in file order, as tables of at most ``batch_rows`` rows."""
    import pyarrow as pa

    for batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
        yield pa.Table.from_batches([batch])


def corpus_parts(folder: Path) -> list[CorpusPart]:
    """The parts of the snapshot in ``folder``, as its parts.json lists them."""
    import numpy as np

    try:
        listing = json.loads((Path(folder) / CORPUS_PARTS).read_text())
        if strays := [n for p in listing["parts"] for n in (p["file"], p["removed"]) if n and Path(n).name != n]:
            raise ValueError(f"names outside the folder: {strays[:3]}")
        parts = [
            CorpusPart(
                Path(folder) / part["file"],
                part["rows"],
                np.load(Path(folder) / part["removed"], allow_pickle=False) if part["removed"] else np.zeros(0, dtype=np.int64),
            )
            for part in listing["parts"]
        ]
    except (OSError, ValueError, KeyError, TypeError) as e:
        why = f"{e.strerror}: {e.filename}" if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
        raise ValueError(f"{folder}: not a corpus snapshot ({why}); expected a folder with {CORPUS_PARTS} and its parts, as the corpus stage writes them") from None
    return parts


def write_corpus_parts(folder: Path, parts: Sequence[CorpusPart]) -> int:
    """Write parts.json (and each part's removed rows) for parts already in ``folder``; returns the documents."""
    import numpy as np

    listing = []
    for part in parts:
        removed = None
        if len(part.removed):
            removed = f"{part.path.stem}.removed.npy"
            np.save(Path(folder) / removed, np.asarray(part.removed, dtype=np.int64), allow_pickle=False)
        listing.append({"file": part.path.name, "rows": part.rows, "removed": removed})
    documents = sum(part.documents for part in parts)
    (Path(folder) / CORPUS_PARTS).write_text(json.dumps({"documents": documents, "parts": listing}, indent=2) + "\n")
    return documents


def corpus_documents(folder: Path) -> int:
    return sum(part.documents for part in corpus_parts(folder))


def corpus_tables(folder: Path, columns: Sequence[str] | None = None, batch_rows: int = 65_536) -> Iterator[pa.Table]:
    """The snapshot's documents in PMID order, as tables (``columns``: only these) of at most
    ``batch_rows`` rows; two such tables per part are held at once (the one given, the next)."""
    if columns is not None and "pmid" not in columns:
        columns = ["pmid", *columns]
    return merge_by_pmid([part.tables(columns, batch_rows) for part in corpus_parts(folder)])


def read_corpus(folder: Path, columns: Sequence[str] | None = None) -> pa.Table:
    """The snapshot's documents as one table, in PMID order (small snapshots: tests, evaluation)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = list(corpus_tables(folder, columns))
    table = pa.concat_tables(tables) if tables else pq.read_schema(corpus_parts(folder)[0].path).empty_table()
    return table.select(columns) if columns else table


def iter_corpus(folder: Path, batch_size: int = CORPUS_BATCH) -> Iterator[tuple[list[int], list[str]]]:
    """(pmids, texts) of the snapshot in ``folder``, in PMID order, in batches of ``batch_size``
    documents (the last one shorter) whatever the parts."""
    for table in rebatched(corpus_tables(folder, ["pmid", "text"]), batch_size):
        pmids, texts = table.column("pmid").to_pylist(), table.column("text").to_pylist()
        if table.column("text").null_count or table.column("pmid").null_count:
            row = next(i for i, (p, t) in enumerate(zip(pmids, texts)) if p is None or t is None)
            raise ValueError(
                f"{folder}: record pmid={pmids[row]} has a null pmid or text; expected a string "
                f"(title, blank line, abstract) for every row; rebuild the corpus snapshot"
            )
        yield pmids, texts


def rebatched(tables: Iterable[pa.Table], rows: int) -> Iterator[pa.Table]:
    """The same rows as tables of exactly ``rows`` rows (the last one shorter)."""
    import pyarrow as pa

    pending, buffered = [], 0
    for table in tables:
        pending.append(table)
        buffered += table.num_rows
        while buffered >= rows:
            joined = pa.concat_tables(pending)
            yield joined.slice(0, rows)
            pending, buffered = [joined.slice(rows)], buffered - rows
    if buffered:
        yield pa.concat_tables(pending)


def merge_by_pmid(streams: Sequence[Iterator[pa.Table]]) -> Iterator[pa.Table]:
    """Streams of tables, each sorted by pmid, no PMID in two of them, as one stream sorted by pmid.

    Each step takes from every stream the rows up to the smallest last PMID among their current
    tables, so a row is copied at most once, and a table that needs no merging is passed on as it is.
    """
    import numpy as np
    import pyarrow as pa

    streams = [iter(s) for s in streams]
    heads = [(table, stream) for stream in streams if (table := _next_rows(stream)) is not None]
    while heads:
        bound = min(table["pmid"][-1].as_py() for table, _ in heads)
        pieces, rest = [], []
        for table, stream in heads:
            n = int(np.searchsorted(table["pmid"].to_numpy(), bound, side="right"))
            if n:
                pieces.append(table.slice(0, n))
            following = table.slice(n) if n < table.num_rows else _next_rows(stream)
            if following is not None:
                rest.append((following, stream))
        heads = rest
        yield pieces[0] if len(pieces) == 1 else pa.concat_tables(pieces).sort_by("pmid")


def _next_rows(tables: Iterator[pa.Table]) -> pa.Table | None:
    return next((t for t in tables if t.num_rows), None)


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
