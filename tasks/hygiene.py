"""Hygiene: a corpus snapshot -> the same documents without evaluation items, near-duplicates and
boilerplate, and a report of what each rule removed.

Rules, in order; a document removed by one is counted there and not judged by the next:

1. evaluation PMID: the document is the article of a QA input's item (PubMedQA's, ``Dataset.pmid``; every split:
   lm-evaluation-harness scores all of PQA-L); the user's own PMID list is the corpus's
   ``exclude_pmids`` and counted in its statistics;
2. evaluation 13-gram: it shares a 13-gram, normalised as the evaluation's contamination check
   normalises (``tasks.evaluate.contamination.ngrams``), with any QA item's question, context or
   options;
3. strips, which change a document's text without removing it: "[This corrects the article ...]"
   notices, and copyright and licence lines at the end of the abstract;
4. placeholder abstract: after stripping, the abstract is empty, the title again, a placeholder
   ("No abstract available") or shorter than ``min_abstract_words``;
5. abstract language: the abstract is in none of ``abstract_languages``. MEDLINE's language is the
   article's, not the abstract's: an article in Spanish often has an English abstract. So
   py3langid (its model ships in the package) reads the abstract of every article that MEDLINE
   does not list in English; one that MEDLINE lists in English is taken as English (py3langid
   reads 0.1% of those as Latin: abstracts full of botanical names);
6. near-duplicate: a newer document (a higher PMID: PubMed gives them out in order, so the newer
   version) has 5-word shingles with a Jaccard similarity of at least ``near_duplicate_threshold``.
   Candidates are found by MinHash LSH (rensa's MinHash, ``minhash_bands`` bands of
   ``minhash_rows`` values) and each candidate pair is then checked by its exact Jaccard, so a
   document is removed exactly when such a newer document exists among those the rules above keep.

Every rule is a function of one document and the QA items, but the last, which is a function of
the documents sharing a band with it. So the artifact keeps, beside the documents, the verdict of
every document it has seen (``documents.parquet``: the text's md5, the rule that removed it, the
words each strip took, its band keys), and a snapshot built from the previous one is judged only
where it changed: the new and changed documents are judged; of the others, only those sharing a
band with a new, changed or gone document are judged again for near-duplicates. A full build is
the same procedure from nothing, so both give the same bytes and the previous artifact does not
enter the key (``Input(..., keyed=False)``, as the corpus stage's previous snapshot).

Memory: ``join_memory`` bounds this process's, beside its libraries, whatever the size of the
corpus (a worker holds the screen and one batch). Half of it is DuckDB's, for
the joins (spilling to the work folder beyond it); the other half holds the documents: read,
judged and written ``batch_documents`` at a time, and the row group being written (50,000
documents, a constant of the format). ``_check_memory`` refuses a value too small for those.
The per-document rules run in ``processes`` worker processes, or on the Dask cluster of
``MEDLM_DASK_ADDRESS`` (the setting the ingest flow's parse uses).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Iterable, Iterator, Sequence

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field, field_validator

from storage import Artifact, Input, Stage, config_params
from storage.access import dask_address
from storage.config import config_dataclass
from storage.formats import CorpusPart, corpus_parts, corpus_tables, parquet_file, parquet_tables, read_records, rebatched, write_corpus_parts
from storage.processes import usable_cores
from tasks.corpus import DOCUMENT_SCHEMA, LOW_CARDINALITY, ROW_GROUP_ROWS, STATS_FILE, size_in_bytes, write_parquet
from tasks.corpus import STATE_FILE as CORPUS_STATE_FILE
from tasks.qa.registry import item_pmid

STATE_FILE = "documents.parquet"  # every document of the corpus: its text's md5, verdict, strips and band keys
REPORT_JSON = "hygiene.json"
REPORT_MD = "report.md"
PART_FILE = "part-0000.parquet"
EXAMPLE_CHARS = 100
MINHASH_SEED = 20_250_101  # fixed: band keys persist from one night to the next
_DUCKDB_SHARE = 0.5  # of join_memory; the rest: the row group being written, the batches read and in flight

# (name, the setting that switches it on): removal rules; a document's ``removed_by`` is its 1-based index.
REMOVALS = (
    ("evaluation PMID", "evaluation_pmids"),
    ("evaluation 13-gram", "evaluation_ngrams"),
    ("placeholder abstract", "drop_placeholders"),
    ("abstract language", "abstract_languages"),
    ("near-duplicate", "near_duplicates"),
)
EVALUATION_PMID, EVALUATION_NGRAM, PLACEHOLDER, LANGUAGE, NEAR_DUPLICATE = range(1, len(REMOVALS) + 1)
# Strips: ``stripped[i]`` is the number of words strip i took from the document.
STRIPS = (("correction notice", "strip_notices"), ("copyright line", "strip_copyright"))

_NOTICE = re.compile(r"\s*\[This (?:corrects|retracts) the article[^\]]*\]\.?", re.IGNORECASE)
# A copyright or licence statement that starts a sentence near the end of the abstract, and all after it.
_COPYRIGHT = re.compile(
    r"(?:^|(?<=[.!?)\]])\s+|\s+(?=©))(?:©|(?:copyright\s*)?\(c\)\s*(?:19|20)\d\d|copyright\s*(?:©|(?:19|20)\d\d)|all rights reserved"
    r"|this article is protected by copyright|(?:this is )?an open[- ]access article|published by (?:elsevier|springer|wiley|oxford|john wiley)|licensee\b)"
    r"[^\n]{0,300}$",
    re.IGNORECASE,
)
_PLACEHOLDER = re.compile(
    r"\W*(?:no abstract(?: is)?(?: available)?|abstract(?: is)? not available|not available|unavailable|n/?a|none|abstract|"
    r"no summary(?: available)?)\W*",
    re.IGNORECASE,
)

STATE_SCHEMA = pa.schema(
    [
        ("pmid", pa.int64()),
        ("text_md5", pa.binary()),  # md5 of the corpus's text, as the corpus's own state has it
        ("removed_by", pa.int8()),  # 1-based index into REMOVALS; null: kept
        ("duplicate_of", pa.int64()),  # near-duplicates: the lowest newer PMID it duplicates
        ("words", pa.int32()),  # whitespace-separated words of the corpus's text
        ("stripped", pa.list_(pa.int32())),  # words each strip took (STRIPS order)
        ("bands", pa.list_(pa.uint64())),  # MinHash LSH band keys of the cleaned text; null: not a near-duplicate candidate
    ]
)


@config_dataclass
class HygieneConfig:
    """What the pretraining corpus must not hold; every rule has its own switch (all off: the corpus as it is)."""

    evaluation_pmids: bool = Field(True, description="Drop the documents whose PMID is a PubMedQA item of the QA data (every split: the harness scores all of PQA-L).")
    evaluation_ngrams: bool = Field(True, description="Drop the documents sharing a 13-gram (normalised as the evaluation's contamination check) with any QA item's question, context or options.")
    strip_notices: bool = Field(True, description="Strip '[This corrects the article ...]' and '[This retracts the article ...]' notices from the text.")
    strip_copyright: bool = Field(True, description="Strip copyright and licence lines ('© 2020 Elsevier Ltd. All rights reserved.') from the end of the text.")
    drop_placeholders: bool = Field(True, description="Drop documents whose abstract, once stripped, is empty, the title again, a placeholder ('No abstract available') or shorter than min_abstract_words.")
    min_abstract_words: int = Field(20, ge=0, description="The fewest words an abstract may have (with drop_placeholders).")
    abstract_languages: tuple[str, ...] = Field(("en",), description="Keep a document if its abstract is in one of these languages (ISO 639-1 codes; empty keeps all): as py3langid reads it, or English when MEDLINE lists the article in English.")
    near_duplicates: bool = Field(True, description="Drop a document when a newer one (higher PMID) has 5-word shingles with Jaccard similarity >= near_duplicate_threshold (MinHash LSH candidates, each checked exactly).")
    near_duplicate_threshold: float = Field(0.8, gt=0, le=1, description="The Jaccard similarity from which two documents are near-duplicates.")
    shingle_words: int = Field(5, ge=1, description="Words per shingle for the near-duplicate rule.")
    minhash_bands: int = Field(20, ge=1, description="LSH bands: a pair sharing any band's values is a candidate.")
    minhash_rows: int = Field(6, ge=1, description="MinHash values per band (permutations: bands x rows).")
    examples: int = Field(5, ge=0, description="Examples per rule in the report (PMID and the first 100 characters).")
    processes: int | None = Field(None, ge=1, description="Processes for the per-document rules (unset: one per core; on the Dask cluster instead when MEDLM_DASK_ADDRESS is set).")
    batch_documents: int = Field(10_000, ge=1, description="Documents read, judged by a worker or written at once.")
    join_memory: str = Field(
        "2GB",
        description="Memory the stage may use beside its libraries, e.g. '2GB': half for DuckDB's joins (beyond it they spill to the work folder), half for the "
        "documents (the 50,000-document row group being written, batch_documents at a time read and in flight); a value too small for them is refused.",
    )

    RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = ("processes", "batch_documents", "join_memory")

    @field_validator("abstract_languages")
    @classmethod
    def _sorted(cls, languages: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(sorted(set(languages)))

    @field_validator("join_memory")
    @classmethod
    def _size(cls, limit: str) -> str:
        size_in_bytes(limit)
        return limit

    @field_validator("abstract_languages")
    @classmethod
    def _iso_639_1(cls, languages: tuple[str, ...]) -> tuple[str, ...]:
        if wrong := [code for code in languages if not re.fullmatch(r"[a-z]{2}", code)]:
            raise ValueError(f"{wrong} are not ISO 639-1 codes as py3langid gives them; expected two lower-case letters such as 'en', 'es' (not MEDLINE's 'eng')")
        return languages

    def on(self, setting: str) -> bool:
        return bool(getattr(self, setting))


# -- one document ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Screen:
    """What the per-document rules need besides the text: the settings and the evaluation items."""

    config: HygieneConfig
    pmids: frozenset[int]
    ngrams: frozenset[str]

    @classmethod
    def of(cls, records: Iterable[dict], config: HygieneConfig) -> Screen:
        records = list(records)
        pmids = {pmid for r in records if (pmid := item_pmid(r)) is not None} if config.evaluation_pmids else set()
        grams = item_ngrams(records) if config.evaluation_ngrams else {}
        return cls(config, frozenset(pmids), frozenset(grams))


def item_ngrams(records: Iterable[dict]) -> dict[str, str]:
    """Every 13-gram of the items' questions, contexts and options, normalised as the evaluation's
    contamination check normalises (``tasks.evaluate.contamination.ngrams``) -> the first item's id."""
    from tasks.evaluate.contamination import ngrams

    grams: dict[str, str] = {}
    for r in records:
        for text in (r["question"], *r["context"], *r["options"]):
            for gram in ngrams(text):
                grams.setdefault(gram, r["id"])
    return grams


def stripped(text: str, config: HygieneConfig) -> tuple[str, list[str], list[int]]:
    """The text without the boilerplate each strip that is on finds; what each took ('' if
    nothing) and how many words (the words before it minus the words after it)."""
    taken, words_taken, words = [], [], len(text.split())
    for (_, setting), pattern in zip(STRIPS, (_NOTICE, _COPYRIGHT)):
        found = "".join(m.group() for m in pattern.finditer(text)) if config.on(setting) else ""
        if found:
            text = pattern.sub("", text)
        taken.append(found)
        words_taken.append(words - (words := len(text.split())))
    return text, taken, words_taken


def is_placeholder(title: str, abstract: str, min_words: int) -> bool:
    words = abstract.split()
    return len(words) < min_words or bool(_PLACEHOLDER.fullmatch(abstract)) or _folded(abstract) == _folded(title)


def _folded(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def abstract_language(abstract: str, medline_languages: Sequence[str]) -> str:
    """English for an article MEDLINE lists in English, else what py3langid reads (ISO 639-1)."""
    if "eng" in medline_languages:
        return "en"
    import py3langid

    return py3langid.classify(abstract)[0]


def shingles(text: str, words_per_shingle: int) -> set[str]:
    """The text's shingles: every run of ``words_per_shingle`` lower-cased words (the whole text if shorter)."""
    words = text.lower().split()
    if len(words) <= words_per_shingle:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + words_per_shingle]) for i in range(len(words) - words_per_shingle + 1)}


def band_keys(grams: set[str], bands: int, rows: int) -> list[int]:
    """The document's LSH keys: for each band, a 64-bit hash of the band's index and its MinHash values."""
    from rensa import RMinHash

    minhash = RMinHash(num_perm=bands * rows, seed=MINHASH_SEED)
    minhash.update(sorted(grams))
    values = np.asarray(minhash.digest(), dtype="<u4").reshape(bands, rows)
    return [int.from_bytes(hashlib.blake2b(bytes([i % 256]) + band.tobytes(), digest_size=8).digest(), "little") for i, band in enumerate(values)]


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def judge(pmids: Sequence[int], texts: Sequence[str], languages: Sequence[list[str]], screen: Screen) -> pa.Table:
    """The per-document rules on a batch: one STATE_SCHEMA row per document (without text_md5 and duplicate_of)."""
    from tasks.evaluate.contamination import ngrams

    config = screen.config
    rows = {name: [] for name in ("pmid", "removed_by", "words", "stripped", "bands")}
    for pmid, text, medline_languages in zip(pmids, texts, languages):
        removed_by, bands = None, None
        cleaned, _, words_taken = stripped(text, config)
        if pmid in screen.pmids:
            removed_by = EVALUATION_PMID
        elif screen.ngrams and not screen.ngrams.isdisjoint(ngrams(text)):
            removed_by = EVALUATION_NGRAM
        else:
            title, _, abstract = cleaned.partition("\n\n")
            if config.drop_placeholders and is_placeholder(title, abstract, config.min_abstract_words):
                removed_by = PLACEHOLDER
            elif config.abstract_languages and abstract_language(abstract, medline_languages or ()) not in config.abstract_languages:
                removed_by = LANGUAGE
            elif config.near_duplicates:
                bands = band_keys(shingles(cleaned, config.shingle_words), config.minhash_bands, config.minhash_rows)
        rows["pmid"].append(pmid)
        rows["removed_by"].append(removed_by)
        rows["words"].append(len(text.split()))
        rows["stripped"].append(words_taken)
        rows["bands"].append(bands)
    return pa.table(rows, schema=pa.schema([STATE_SCHEMA.field(name) for name in rows]))


# -- the whole snapshot ----------------------------------------------------------------------------


def clean_snapshot(corpus_dir: Path, out_dir: Path, config: HygieneConfig, screen: Screen, *, previous: Path | None = None) -> dict:
    """Write the cleaned snapshot (one part, as the corpus stage writes one), ``documents.parquet``
    and the report into ``out_dir``; return the report's counts. With ``previous`` (an artifact
    of this stage, the same settings and QA items, built from an older snapshot), only what
    changed since is judged: the result is the same bytes."""
    _check_memory(corpus_dir, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    spill, judged = out_dir / ".duckdb_tmp", out_dir / ".judged.parquet"  # work files, removed before publishing
    con = duckdb.connect(config={"temp_directory": str(spill), "memory_limit": f"{int(size_in_bytes(config.join_memory) * _DUCKDB_SHARE) >> 20}MiB"})
    try:
        # 1. The documents now (PMID and text md5, from the corpus's own state) and, against the
        # previous verdicts, which are new or changed (judged now) and which are gone.
        now = pa.concat_tables([t.select(["pmid"]) for t in corpus_tables(corpus_dir, ["pmid"])] or [pa.table({"pmid": pa.array([], pa.int64())})])
        con.register("listed", now)
        con.execute(f"CREATE TEMP TABLE now AS SELECT pmid, text_md5 FROM listed JOIN read_parquet({_sql(corpus_dir / CORPUS_STATE_FILE)}) USING (pmid)")
        if previous is not None:
            con.execute(f"CREATE VIEW before AS SELECT * FROM read_parquet({_sql(previous / STATE_FILE)})")
        else:
            con.register("before", STATE_SCHEMA.empty_table())
        fresh = con.sql("SELECT pmid FROM now ANTI JOIN before USING (pmid, text_md5) ORDER BY pmid").to_arrow_table().column("pmid").combine_chunks()

        # 2. The per-document rules on the new and changed documents, in worker processes or on Dask.
        with pq.ParquetWriter(judged, pa.schema([STATE_SCHEMA.field(n) for n in ("pmid", "removed_by", "words", "stripped", "bands")])) as writer:
            for table in _judged(_texts(corpus_dir, fresh, config.batch_documents, ("pmid", "text", "languages")), screen, config):
                writer.write_table(table)
        con.execute(
            f"""CREATE TEMP TABLE state AS
                SELECT pmid, text_md5, removed_by, duplicate_of, words, stripped, bands FROM before SEMI JOIN now USING (pmid, text_md5)
                UNION ALL
                SELECT pmid, n.text_md5, j.removed_by, NULL::BIGINT AS duplicate_of, j.words, j.stripped, j.bands
                FROM read_parquet({_sql(judged)}) j JOIN now n USING (pmid)"""
        )

        # 3. Near-duplicates among the documents the rules above keep: those sharing a band with a
        # new, changed or gone document are decided again (all of them in a full build).
        if config.near_duplicates:
            _near_duplicates(con, corpus_dir, config, fresh)
        state = out_dir / STATE_FILE
        write_parquet(state, STATE_SCHEMA, _stream(con, "SELECT * FROM state ORDER BY pmid"), dictionary=[])

        report = _report(con, config)
    finally:
        con.close()  # before the documents are written: its memory is theirs now
        judged.unlink(missing_ok=True)
        shutil.rmtree(spill, ignore_errors=True)

    # 4. The documents that stay, stripped, in the corpus's own format; the report.
    documents, examples = _write_documents(corpus_dir, state, out_dir, config, report)
    report["examples"] = examples
    report["after"]["documents"] = documents
    _attach_corpus(report, corpus_dir)
    (out_dir / REPORT_JSON).write_text(json.dumps(report, indent=1) + "\n")
    (out_dir / REPORT_MD).write_text(render_report(report))
    return {"documents": report["after"]["documents"], "words": report["after"]["words"],
            "removed": report["before"]["documents"] - report["after"]["documents"], "judged": len(fresh)}


def _check_memory(corpus_dir: Path, config: HygieneConfig) -> None:
    """Refuse a ``join_memory`` whose share beside DuckDB's cannot hold the documents at once in
    memory: the row group being written (twice: gathered, then as one array), two batches read per
    part of the snapshot, one being stripped, and two in flight per worker. A document's size is
    the snapshot's uncompressed bytes per row, as its Parquet metadata gives them (Arrow's size)."""
    parts = corpus_parts(corpus_dir)
    rows = sum(part.rows for part in parts)
    if not rows:
        return
    metadata = [parquet_file(part.path).metadata for part in parts]
    per_document = sum(m.row_group(i).total_byte_size for m in metadata for i in range(m.num_row_groups)) / rows
    batches = 2 * len(parts) + 1 + 2 * (config.processes or usable_cores())
    needed = per_document * (2 * ROW_GROUP_ROWS + batches * config.batch_documents)
    available = size_in_bytes(config.join_memory) * (1 - _DUCKDB_SHARE)
    if needed > available:
        raise ValueError(
            f"join_memory {config.join_memory!r} leaves {available / 1e6:,.0f} MB beside DuckDB's share for the documents of {corpus_dir}, which need "
            f"{needed / 1e6:,.0f} MB ({per_document:,.0f} bytes each: a {ROW_GROUP_ROWS:,}-document row group twice and {batches} batches of "
            f"batch_documents={config.batch_documents:,}); give join_memory at least {needed / (1 - _DUCKDB_SHARE) / 1e9:.1f}GB or a smaller batch_documents"
        )


def _sql(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def _stream(con: duckdb.DuckDBPyConnection, query: str) -> Iterator[pa.Table]:
    for batch in con.sql(query).to_arrow_reader(ROW_GROUP_ROWS):
        yield pa.Table.from_batches([batch])


def _texts(corpus_dir: Path, pmids: pa.Array, batch: int, columns: Sequence[str] = ("pmid", "text")) -> Iterator[pa.Table]:
    """The snapshot's rows of these PMIDs (sorted), in PMID order, ``batch`` at a time."""
    wanted = np.asarray(pa.array(pmids, pa.int64()))

    def chosen(table: pa.Table) -> pa.Table:
        # Only the wanted PMIDs within the table's range: a value set of all of them, hashed for each table, would cost time in the corpus's size squared.
        listed = table.column("pmid")
        within = wanted[np.searchsorted(wanted, listed[0].as_py()) : np.searchsorted(wanted, listed[-1].as_py(), side="right")]
        return table.filter(pc.is_in(listed, value_set=pa.array(within, pa.int64())))

    tables = (chosen(t) for t in corpus_tables(corpus_dir, list(columns), batch) if t.num_rows)
    return rebatched((t for t in tables if t.num_rows), batch)


def _judged(batches: Iterator[pa.Table], screen: Screen, config: HygieneConfig) -> Iterator[pa.Table]:
    """``judge`` of every batch, in order: here for one batch, else in worker processes or on the
    Dask cluster, with a few batches in flight per worker (memory stays flat)."""
    first = next(batches, None)
    if first is None:
        return
    second = next(batches, None)
    if second is None or (config.processes == 1 and not dask_address()):
        for table in _chained([first, second] if second is not None else [first], batches):
            yield judge(*_columns(table), screen)
        return
    everything = _chained([first, second], batches)
    with _workers(screen, config) as (submit, width):
        pending: list[Future] = []
        for table in everything:
            pending.append(submit(*_columns(table)))
            if len(pending) >= 2 * width:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()


def _columns(table: pa.Table) -> tuple[list, list, list]:
    return table.column("pmid").to_pylist(), table.column("text").to_pylist(), table.column("languages").to_pylist()


def _chained(head: list, rest: Iterator) -> Iterator:
    yield from head
    yield from rest


@contextmanager
def _workers(screen: Screen, config: HygieneConfig) -> Iterator[tuple[Callable[..., Future], int]]:
    """(submit(pmids, texts, languages) -> a future of ``judge``'s table, how many run at once). On the
    Dask cluster of MEDLM_DASK_ADDRESS (the screen sent to every worker once), else in local
    processes that each receive the screen once when they start."""
    if address := dask_address():
        from distributed import Client

        with Client(address) as client:
            shared = client.scatter(screen, broadcast=True)
            width = sum(client.nthreads().values()) or 1
            yield (lambda *columns: client.submit(judge, *columns, shared, pure=False)), width
        return
    workers = config.processes or usable_cores()
    with ProcessPoolExecutor(workers, initializer=_keep_screen, initargs=(screen,)) as pool:
        yield (lambda *columns: pool.submit(_judge_with_kept_screen, *columns)), workers


_SCREEN: Screen | None = None  # a worker process's screen, set once when it starts


def _keep_screen(screen: Screen) -> None:
    global _SCREEN
    _SCREEN = screen


def _judge_with_kept_screen(pmids: list[int], texts: list[str], languages: list[list[str]]) -> pa.Table:
    return judge(pmids, texts, languages, _SCREEN)


def _near_duplicates(con: duckdb.DuckDBPyConnection, corpus_dir: Path, config: HygieneConfig, fresh: pa.Array) -> None:
    """Decide again, in ``state``, the near-duplicate verdict of every candidate document (one
    with band keys) that shares a band with a document new, changed or gone since ``before``."""
    con.register("fresh", pa.table({"pmid": fresh}))
    con.execute("CREATE TEMP TABLE keys AS SELECT pmid, unnest(bands) AS key FROM state WHERE bands IS NOT NULL")
    con.execute(
        """CREATE TEMP TABLE probes AS
           SELECT key FROM keys SEMI JOIN fresh USING (pmid)
           UNION SELECT unnest(bands) AS key FROM (SELECT * FROM before ANTI JOIN now USING (pmid, text_md5)) WHERE bands IS NOT NULL"""
    )
    con.execute("CREATE TEMP TABLE affected AS SELECT DISTINCT pmid FROM keys SEMI JOIN probes USING (key)")
    con.execute(
        """CREATE TEMP TABLE pairs AS
           SELECT DISTINCT a.pmid AS older, b.pmid AS newer
           FROM (SELECT * FROM keys SEMI JOIN affected USING (pmid)) a JOIN keys b USING (key) WHERE a.pmid < b.pmid"""
    )
    involved = con.sql("SELECT older AS pmid FROM pairs UNION SELECT newer FROM pairs ORDER BY pmid").to_arrow_table().column("pmid")
    grams = {
        pmid: shingles(stripped(text, config)[0], config.shingle_words)
        for table in _texts(corpus_dir, involved.combine_chunks() if involved.num_chunks else pa.array([], pa.int64()), config.batch_documents)
        for pmid, text in zip(table.column("pmid").to_pylist(), table.column("text").to_pylist())
    }
    duplicate_of: dict[int, int] = {}
    for older, newer in con.execute("SELECT older, newer FROM pairs ORDER BY older, newer").fetchall():
        if older not in duplicate_of and jaccard(grams[older], grams[newer]) >= config.near_duplicate_threshold:
            duplicate_of[older] = newer  # the lowest newer PMID: pairs come in order
    con.register("verdicts", pa.table({"pmid": pa.array(list(duplicate_of), pa.int64()), "duplicate_of": pa.array(list(duplicate_of.values()), pa.int64())}))
    con.execute(
        f"""UPDATE state SET removed_by = CASE WHEN v.duplicate_of IS NULL THEN NULL ELSE {NEAR_DUPLICATE} END, duplicate_of = v.duplicate_of
            FROM (SELECT pmid, duplicate_of FROM affected LEFT JOIN verdicts USING (pmid)) v WHERE state.pmid = v.pmid"""
    )
    con.execute("DROP TABLE keys; DROP TABLE probes; DROP TABLE affected; DROP TABLE pairs")  # ~20 rows a document: their memory goes to what follows


def _report(con: duckdb.DuckDBPyConnection, config: HygieneConfig) -> dict:
    """The counts, from the verdicts (the same query whichever way they were reached)."""
    kept = "removed_by IS NULL"
    documents, words = con.execute("SELECT count(*), coalesce(sum(words), 0) FROM state").fetchone()
    after_words = con.execute(f"SELECT coalesce(sum(words - list_sum(stripped)), 0) FROM state WHERE {kept}").fetchone()[0]
    removed = dict((i, (n, w)) for i, n, w in con.execute("SELECT removed_by, count(*), sum(words) FROM state WHERE removed_by IS NOT NULL GROUP BY removed_by").fetchall())
    rules, examples = [], {}
    for i, (name, setting) in enumerate(REMOVALS, 1):
        n, w = removed.get(i, (0, 0))
        rules.append({"rule": name, "setting": setting, "on": config.on(setting), "documents": n, "words": int(w)})
        examples[name] = con.execute(f"SELECT pmid FROM state WHERE removed_by = {i} ORDER BY pmid LIMIT {config.examples}").fetchall()
    strips = []
    for j, (name, setting) in enumerate(STRIPS, 1):
        n, w = con.execute(f"SELECT count(*), coalesce(sum(stripped[{j}]), 0) FROM state WHERE {kept} AND stripped[{j}] > 0").fetchone()
        strips.append({"rule": name, "setting": setting, "on": config.on(setting), "documents": n, "words": int(w)})
        examples[name] = con.execute(f"SELECT pmid FROM state WHERE {kept} AND stripped[{j}] > 0 ORDER BY pmid LIMIT {config.examples}").fetchall()
    duplicates = dict(con.execute(f"SELECT pmid, duplicate_of FROM state WHERE removed_by = {NEAR_DUPLICATE}").fetchall()) if examples[REMOVALS[-1][0]] else {}
    return {
        "before": {"documents": documents, "words": int(words)},
        "rules": rules,
        "strips": strips,
        "after": {"documents": None, "words": int(after_words)},
        "example_pmids": {name: [p for (p,) in rows] for name, rows in examples.items()},
        "duplicate_of": {p: duplicates[p] for (p,) in examples[REMOVALS[-1][0]]},
    }


def _write_documents(corpus_dir: Path, state: Path, out_dir: Path, config: HygieneConfig, report: dict) -> tuple[int, dict]:
    """The kept documents, stripped, as one part in the corpus's format; and the examples'
    texts. The corpus and the verdicts are both in PMID order, one row per document, read and
    stripped ``batch_documents`` at a time (``write_parquet`` gathers them into row groups)."""
    chosen = {name: set(pmids) for name, pmids in report.pop("example_pmids").items()}
    duplicate_of = report.pop("duplicate_of")
    examples: dict[str, list[dict]] = {name: [] for name in chosen}
    medline_not_english = 0

    def kept_documents() -> Iterator[pa.Table]:
        nonlocal medline_not_english
        columns, batch = ["pmid", "removed_by", "stripped"], config.batch_documents
        verdicts = rebatched(parquet_tables(parquet_file(state), batch, columns), batch)
        for documents in rebatched(corpus_tables(corpus_dir, batch_rows=batch), batch):
            verdict = next(verdicts)
            if not verdict.column("pmid").equals(documents.column("pmid")):
                raise RuntimeError(f"{state}: the verdicts are not those of {corpus_dir}'s documents; build without the previous artifact")
            texts = documents.column("text").to_pylist()
            for row, (pmid, removed_by, taken) in enumerate(zip(*(verdict.column(c).to_pylist() for c in columns))):
                if removed_by is not None:
                    if pmid in chosen[name := REMOVALS[removed_by - 1][0]]:
                        examples[name].append({"pmid": pmid, "text": texts[row][:EXAMPLE_CHARS]} | ({"duplicate_of": duplicate_of[pmid]} if pmid in duplicate_of else {}))
                elif any(taken):
                    texts[row], passages, _ = stripped(texts[row], config)
                    for (name, _), passage in zip(STRIPS, passages):
                        if pmid in chosen[name]:
                            examples[name].append({"pmid": pmid, "text": passage.strip()[:EXAMPLE_CHARS]})
            documents = documents.set_column(documents.schema.get_field_index("text"), "text", pa.array(texts, pa.string()))
            kept = documents.filter(pc.is_null(verdict.column("removed_by")))
            medline_not_english += sum(1 for languages in kept.column("languages").to_pylist() if "eng" not in (languages or []))
            yield kept

    rows = write_parquet(out_dir / PART_FILE, DOCUMENT_SCHEMA, kept_documents(), dictionary=LOW_CARDINALITY)
    documents = write_corpus_parts(out_dir, [CorpusPart(out_dir / PART_FILE, rows, np.zeros(0, dtype=np.int64))])
    report["kept_articles_not_english_in_medline"] = medline_not_english
    return documents, examples


def _attach_corpus(report: dict, corpus_dir: Path) -> None:
    """What the corpus stage's own rules removed before (its stats.json), beside the new rules."""
    stats = json.loads((corpus_dir / STATS_FILE).read_text())
    report["corpus_rules"] = [{"rule": d["filter"], "documents": d["rows"]} for d in stats.get("dropped", [])]


def render_report(report: dict) -> str:
    """report.md: the corpus before and after, and per rule what it removed, with examples."""
    before, after = report["before"], report["after"]
    lines = [
        "# What the hygiene stage removed",
        "",
        f"Corpus before: {before['documents']:,} documents, {before['words']:,} words; after: {after['documents']:,} documents, "
        f"{after['words']:,} words. Words are whitespace-separated (the tokenizer is fitted on what stays).",
        "",
        "| rule | on | documents removed | words removed |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {r['rule']} (`{r['setting']}`) | {'yes' if r['on'] else 'no'} | {r['documents']:,} | {r['words']:,} |" for r in report["rules"]]
    lines += [f"| stripped: {r['rule']} (`{r['setting']}`) | {'yes' if r['on'] else 'no'} | {r['documents']:,} changed | {r['words']:,} |" for r in report["strips"]]
    lines += [
        "",
        f"Kept although MEDLINE gives the article no English language (their abstracts read as English): "
        f"{report['kept_articles_not_english_in_medline']:,}.",
        "",
        "The corpus stage's own rules, before these (rows dropped):",
        "",
        "| corpus rule | rows |",
        "| --- | --- |",
        *[f"| {r['rule']} | {r['documents']:,} |" for r in report["corpus_rules"]],
    ]
    for name, found in report["examples"].items():
        if found:
            lines += ["", f"## {name}: examples", ""]
            lines += [
                f"- PMID {e['pmid']}" + (f" (near-duplicate of PMID {e['duplicate_of']})" if "duplicate_of" in e else "") + f": {_one_line(e['text'])}"
                for e in found
            ]
    return "\n".join(lines) + "\n"


def _one_line(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def report_rows(artifact: Artifact) -> list[dict]:
    """The report as table rows (the run page in the UI)."""
    report = json.loads(artifact.file(REPORT_JSON).read_text())
    rows = [{"rule": "documents in the corpus", "documents": report["before"]["documents"], "words": report["before"]["words"]}]
    rows += [{"rule": r["rule"], "documents": -r["documents"], "words": -r["words"]} for r in report["rules"]]
    rows += [{"rule": f"stripped: {r['rule']}", "documents": 0, "words": -r["words"]} for r in report["strips"]]
    rows.append({"rule": "documents kept", "documents": report["after"]["documents"], "words": report["after"]["words"]})
    return rows


# -- the stage -------------------------------------------------------------------------------------


def build_hygiene(inputs: dict, out_dir: Path, config: HygieneConfig) -> dict:
    """The corpus snapshot cleaned against the QA items; with a previous artifact of this stage
    (same version, settings and QA items), only what changed since it is judged."""
    corpus: Artifact = inputs["corpus"]
    qa: list[Artifact] = inputs.get("qa") or []
    previous: Artifact | None = inputs.get("previous")
    if previous is not None and not _continues(previous, qa, config):
        raise ValueError(f"the previous artifact {previous.ref} was built by another stage version, with other settings or other QA items; leave it out for a full build")
    screen = Screen.of((r for artifact in qa for r in read_records(artifact.path)), config)
    summary = clean_snapshot(corpus.path, out_dir, config, screen, previous=previous.path if previous else None)
    return summary | {"evaluation_pmids": len(screen.pmids), "evaluation_ngrams": len(screen.ngrams), "previous": previous.ref if previous else None}


def _continues(previous: Artifact, qa: list[Artifact], config: HygieneConfig) -> bool:
    """Whether ``previous`` was built by this version with these settings and QA items."""
    same_qa = sorted(p for p in previous.parents if not p.startswith("corpus/")) == sorted(a.ref for a in qa)
    as_stored = json.loads(json.dumps(config_params(config)))
    return previous.manifest.get("version") == HYGIENE.version and json.loads(json.dumps(previous.params)) == as_stored and same_qa


def previous_cleaning(store, inputs: dict, config: HygieneConfig) -> Artifact | None:
    """The newest stored artifact of this stage that a build of ``inputs`` can start from: the
    same version, settings and QA items, built from any other snapshot. None when there is none."""
    key = HYGIENE.spec(inputs, config).key
    fits = [a for a in store.ls(HYGIENE.name) if a.key != key and _continues(a, inputs.get("qa") or [], config)]
    return max(fits, key=lambda a: a.manifest.get("created", 0), default=None)


HYGIENE = Stage(
    name="hygiene",
    version="1",
    config=HygieneConfig,
    inputs={
        "corpus": Input("corpus"),
        "qa": Input("qa", many=True, optional=True),  # the evaluation items screened out: lineage parents
        "previous": Input("hygiene", optional=True, keyed=False),
    },
    build=build_hygiene,
    label=lambda inputs, config: f"of {inputs['corpus'].ref}",
    report=report_rows,
)
