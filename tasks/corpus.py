"""Corpus snapshot: all parsed files -> the deduplicated, filtered documents, with DuckDB.

NLM's rule for the baseline plus its daily updates: files are applied in sequence order, so a
PMID's current record is the one from the highest file_seq (then the highest version, then the
later position in its file), and a PMID listed in a DeleteCitation of a file at or after that
record's file is gone. The current record then passes the filters or is dropped by the first it
fails, and of the documents with exactly the same text the lowest PMID keeps it.

Every rule is a function of one PMID's records and deletions, except the duplicate rule, which is
a function of the documents sharing one text. So the snapshot keeps, beside its documents, the
state of every PMID it has seen (``pmids.parquet``: its current record, its last deletion, the
filter that drops it, the digest and length of its text), and a snapshot of files F plus new
files N is the previous snapshot of F with N applied: only the PMIDs that N touches, and the
texts those PMIDs had or now have, are decided again. A full build is the same procedure applied
to an empty snapshot, so the two give the same documents in the same order, the same state and
the same statistics: the previous snapshot is a way to build faster, never a different
artifact, and it does not enter the key.

The documents are Parquet parts (``storage.formats``): a full build writes one; an update links
the previous parts, removes the rows of the documents it changes and adds a part with their new
rows, so a nightly file costs what it changes, not the size of the corpus. Past ``MAX_PARTS``
parts, or ``COMPACT_FRACTION`` of rows removed or outside the largest part, the update writes one
part again, the same bytes a full build writes.

Memory stays within ``memory_limit`` whatever the corpus size: DuckDB gets half of it
and spills to the work folder beyond that, and the Parquet files are written in a stream of
fixed-size row groups.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import re
import shutil
import threading
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import ClassVar, Iterable, Iterator, Sequence

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field, field_validator

from storage import Artifact, Input, Stage, config_params
from storage.access import AccessError, DataPath, readable
from storage.formats import ARTICLES_FILE, DELETIONS_FILE, CorpusPart, corpus_parts, merge_by_pmid, parquet_file, parquet_tables, rebatched, write_corpus_parts
from storage.config import config_dataclass

log = logging.getLogger("medlm.corpus")

STATE_FILE = "pmids.parquet"  # every PMID seen: current record, last deletion, filter verdict, text digest
STATS_FILE = "stats.json"
MAX_PARTS = 8  # a snapshot is compacted into one part beyond this many: readers merge them all
COMPACT_FRACTION = 0.25  # ... or when more rows than this fraction of its documents are removed or outside its largest part
ROW_GROUP_ROWS = 50_000  # fixed, so the same rows always make the same bytes (~65 MB of text per group)
_DUCKDB_SHARE = 0.5  # of memory_limit; the rest: Arrow batches on their way to the Parquet writer, Python (~1.3 GB at 3M records)
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}

DOCUMENT_SCHEMA = pa.schema(
    [
        ("pmid", pa.int64()),
        ("text", pa.string()),
        ("title", pa.string()),
        ("journal", pa.string()),
        ("pub_year", pa.int32()),
        ("languages", pa.list_(pa.string())),
        ("mesh_terms", pa.list_(pa.string())),
        ("publication_types", pa.list_(pa.string())),
        ("version", pa.int32()),
        ("date_revised", pa.date32()),
        ("source_file", pa.string()),
        ("file_seq", pa.int32()),
    ]
)
STATE_SCHEMA = pa.schema(
    [
        ("pmid", pa.int64()),
        # The current record (null: the PMID was only ever deleted): its file, version and row there.
        ("file_seq", pa.int32()),
        ("version", pa.int32()),
        ("source_file", pa.string()),
        ("file_row", pa.int64()),
        ("deleted_seq", pa.int32()),  # the latest file that deleted the PMID (null: none)
        ("filtered_by", pa.int32()),  # 1-based index of the first filter the record fails (null: none)
        ("text_md5", pa.binary()),  # md5 of the document text, for records that pass the filters
        ("text_chars", pa.int64()),  # and its length in characters
    ]
)
LOW_CARDINALITY = ["journal", "languages", "mesh_terms", "publication_types", "source_file"]


@config_dataclass
class CorpusConfig:
    """Which articles make the pretraining corpus."""

    require_abstract: bool = Field(True, description="Drop articles without an abstract.")
    min_abstract_chars: int = Field(200, ge=0, description="Drop abstracts shorter than this many characters.")
    languages: tuple[str, ...] = Field(
        (), description="Keep an article if any of its languages is listed (MEDLINE codes: the article's, not its abstract's; empty keeps all, and the hygiene stage reads the abstract's own language)."
    )
    drop_retracted: bool = Field(True, description="Drop articles of type 'Retracted Publication'.")
    drop_retraction_notices: bool = Field(False, description="Drop notices of type 'Retraction of Publication'.")
    drop_errata: bool = Field(False, description="Drop articles of type 'Published Erratum'.")
    drop_duplicate_text: bool = Field(True, description="Keep one of each exact duplicate text (the lowest PMID).")
    exclude_pmids: tuple[int, ...] = Field((), description="Drop these PMIDs, e.g. every PubMedQA test PMID, so a model pretrains clean.")
    exclude_pmids_file: DataPath | None = Field(
        None, description="Drop the PMIDs listed in this text file (one per line; blank lines and # comments skipped). Its PMIDs, not its path, decide the snapshot."
    )
    threads: int | None = Field(None, ge=1, description="DuckDB threads (unset: all cores).")
    memory_limit: str = Field("4GB", description="Memory the snapshot may use, e.g. '4GB'; beyond it DuckDB spills to the work folder.")

    RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = ("threads", "memory_limit", "exclude_pmids_file")

    @field_validator("languages")
    @classmethod
    def _sorted(cls, languages: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(sorted(set(languages)))

    @field_validator("exclude_pmids")
    @classmethod
    def _sorted_pmids(cls, pmids: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(sorted(set(pmids)))

    @field_validator("memory_limit")
    @classmethod
    def _size(cls, limit: str) -> str:
        size_in_bytes(limit)
        return limit

    def content_params(self) -> dict:
        """What the exclusion file adds to the key: its PMIDs (count and digest), never its path."""
        if self.exclude_pmids_file is None:
            return {}
        listed = self.listed_pmids
        return {"exclude_pmids_file_content": {"pmids": len(listed), "sha256": _pmids_digest(listed)}}

    @cached_property
    def listed_pmids(self) -> tuple[int, ...]:
        """The PMIDs in ``exclude_pmids_file``, sorted; read once per config, so the key and the
        build see the same list."""
        return read_pmid_list(Path(self.exclude_pmids_file)) if self.exclude_pmids_file else ()

    def excluded(self) -> tuple[int, ...]:
        """Every PMID the snapshot drops by name, sorted."""
        return tuple(sorted(set(self.exclude_pmids) | set(self.listed_pmids)))


def size_in_bytes(limit: str) -> int:
    """'4GB' -> 4_000_000_000 ('4GiB' -> 4 * 2**30); ValueError naming the expected form."""
    match = _SIZE.fullmatch(limit)
    if not match:
        raise ValueError(f"memory_limit {limit!r} is not a size: expected a number and a unit, such as '4GB' or '512MB'")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").lower()])


def read_pmid_list(path: Path) -> tuple[int, ...]:
    """The PMIDs of a text file with one per line, sorted and unique; blank lines and lines
    starting with # are skipped. Errors name the file and the line."""
    try:
        text = readable(path, "exclude_pmids_file").read_bytes().decode("utf-8", errors="replace")  # a bad byte fails its line
    except AccessError:
        raise
    except OSError as e:
        raise ValueError(f"exclude_pmids_file {path}: cannot be read ({e.strerror or e}); give a text file with one PMID per line") from None
    pmids = set()
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not (line.isascii() and line.isdigit()):
            # Never the line itself: an error message is readable by whoever reaches the API.
            raise ValueError(f"exclude_pmids_file {path}, line {number}: not a PMID; expected one PMID (ASCII digits) per line, blank lines and # comments")
        pmids.add(int(line))
    return tuple(sorted(pmids))


def _pmids_digest(pmids: Sequence[int]) -> str:
    return hashlib.sha256(",".join(map(str, pmids)).encode()).hexdigest()


@dataclass
class CorpusStats:
    records: int = 0  # article rows over all parsed files
    pmids: int = 0  # distinct PMIDs among them
    superseded: int = 0  # older records of a PMID replaced by a later file or version
    deleted: int = 0  # PMIDs removed by a DeleteCitation at or after their latest record
    dropped: list[dict] = field(default_factory=list)  # [{"filter": reason, "rows": removed}], in order
    documents: int = 0
    characters: int = 0

    def table(self) -> list[dict]:
        rows = [
            {"step": "article records in parsed files", "rows": self.records},
            {"step": "superseded by a later file or version", "rows": -self.superseded},
            {"step": "deleted by DeleteCitation", "rows": -self.deleted},
        ]
        rows += [{"step": f"filter: {d['filter']}", "rows": -d["rows"]} for d in self.dropped]
        rows.append({"step": "documents in the snapshot", "rows": self.documents})
        return rows


def _filters_in_order(filters: CorpusConfig) -> list[tuple[str, str]]:
    """(reason, SQL condition that a KEPT row satisfies), applied one after another. The
    exclusion list, if any, is the table ``excluded``."""
    steps = []
    if excluded := filters.excluded():
        steps.append((f"PMID on the exclusion list ({len(excluded)} PMIDs)", "pmid NOT IN (SELECT pmid FROM excluded)"))
    if filters.require_abstract:
        steps.append(("no abstract", "length(trim(coalesce(abstract, ''))) > 0"))
    if filters.min_abstract_chars > 0:
        steps.append(
            (f"abstract shorter than {filters.min_abstract_chars} chars",
             f"length(coalesce(abstract, '')) >= {int(filters.min_abstract_chars)}")
        )
    if filters.languages:
        wanted = ", ".join(_sql_str(lang) for lang in sorted(filters.languages))
        steps.append((f"language not in {sorted(filters.languages)}", f"list_has_any(languages, [{wanted}])"))
    dropped_types = [
        name
        for name, on in (
            ("Retracted Publication", filters.drop_retracted),
            ("Retraction of Publication", filters.drop_retraction_notices),
            ("Published Erratum", filters.drop_errata),
        )
        if on
    ]
    for pub_type in dropped_types:
        steps.append((f"publication type '{pub_type}'", f"NOT list_contains(publication_types, {_sql_str(pub_type)})"))
    return steps


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _parquet_list(paths: Sequence[Path]) -> str:
    return "[" + ", ".join(_sql_str(str(p)) for p in paths) + "]"


@dataclass(frozen=True)
class Previous:
    """A snapshot to start from (its folder), and the article files of today's list it was built from."""

    folder: Path
    applied: frozenset[Path]


def build_snapshot(
    article_files: Sequence[Path],
    deletion_files: Sequence[Path],
    out_dir: Path,
    filters: CorpusConfig = CorpusConfig(),
    *,
    previous: Previous | None = None,
    max_parts: int = MAX_PARTS,
    compact_fraction: float = COMPACT_FRACTION,
) -> dict:
    """Write the snapshot's parts and ``parts.json`` (see ``storage.formats``), ``pmids.parquet``
    and ``stats.json`` into ``out_dir``; return the stats. ``article_files[i]`` and
    ``deletion_files[i]`` come from one parsed file.

    With ``previous`` (a snapshot built with the same filters from the ``applied`` files, all of
    which are in ``article_files``) only the other files are read: the documents they change go
    into a new part, and the previous parts are linked with those documents' old rows removed.
    The documents, their order, ``pmids.parquet`` and ``stats.json`` are those a full build
    gives; so are the parts' bytes when the snapshot is compacted into one part, which happens
    when it would have more than ``max_parts`` parts or more than ``compact_fraction`` of its
    documents' worth of rows outside its largest part or removed.
    """
    if not article_files:
        raise ValueError("build_snapshot: no parsed article files given; run the parse stage first")
    if len(deletion_files) != len(article_files):
        raise ValueError(f"build_snapshot: {len(article_files)} article files but {len(deletion_files)} deletion files; give both of every parsed file")
    if previous is not None and not previous.applied <= set(map(Path, article_files)):
        raise ValueError(f"the previous snapshot {previous.folder} holds files that are not among today's; leave it out for a full build")
    new = [i for i, path in enumerate(article_files) if previous is None or Path(path) not in previous.applied]
    out_dir.mkdir(parents=True, exist_ok=True)
    if not new:  # nothing to apply: the previous snapshot already is this one
        write_corpus_parts(out_dir, [_linked(part, out_dir) for part in corpus_parts(previous.folder)])
        for name in (STATE_FILE, STATS_FILE):
            _link_file(previous.folder / name, out_dir / name)
        return json.loads((out_dir / STATS_FILE).read_text())
    tmp_dir = out_dir / ".duckdb_tmp"  # spill files, if DuckDB needs any
    config = {
        "temp_directory": str(tmp_dir),
        "preserve_insertion_order": False,
        "memory_limit": f"{int(size_in_bytes(filters.memory_limit) * _DUCKDB_SHARE) >> 20}MiB",
    }
    if filters.threads:
        config["threads"] = filters.threads
    try:
        with duckdb.connect(config=config) as con:
            stats = _Snapshot(con, filters, out_dir, previous, max_parts, compact_fraction).apply(
                [Path(article_files[i]) for i in new], [Path(deletion_files[i]) for i in new], list(map(Path, article_files))
            )
    except duckdb.OutOfMemoryException as e:
        raise MemoryError(f"corpus snapshot: DuckDB ran out of memory within memory_limit={filters.memory_limit!r} ({e}); raise memory_limit") from e
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    summary = asdict(stats)
    (out_dir / STATS_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    log.info("corpus: %d documents, %d characters (%d of %d files applied to %s)", stats.documents, stats.characters,
             len(new), len(article_files), previous.folder if previous else "an empty snapshot")
    return summary


class _Snapshot:
    """One application of parsed files to a snapshot (an empty one for a full build)."""

    def __init__(self, con: duckdb.DuckDBPyConnection, filters: CorpusConfig, out_dir: Path, previous: Previous | None,
                 max_parts: int, compact_fraction: float):
        self.con, self.filters, self.out_dir, self.previous = con, filters, out_dir, previous
        self.max_parts, self.compact_fraction = max_parts, compact_fraction
        self.steps = _filters_in_order(filters)
        con.register("excluded", pa.table({"pmid": pa.array(filters.excluded(), pa.int64())}))
        con.register("no_state", STATE_SCHEMA.empty_table())
        # The previous documents' PMIDs: every row of each previous part (to find the rows to
        # remove), and those that are documents.
        self.previous_parts = corpus_parts(previous.folder) if previous else []
        self.previous_pmids = [pq.read_table(part.path, columns=["pmid"]).column("pmid").to_numpy() for part in self.previous_parts]
        documents = [pmids[part.live()] for part, pmids in zip(self.previous_parts, self.previous_pmids)]
        con.register("previous_documents", pa.table({"pmid": pa.array(np.concatenate([np.zeros(0, np.int64), *documents]), pa.int64())}))
        old_state = f"read_parquet({_sql_str(str(previous.folder / STATE_FILE))})" if previous else "no_state"
        con.execute(f"CREATE VIEW old_state AS SELECT * FROM {old_state}")

    def apply(self, new_articles: list[Path], new_deletions: list[Path], all_articles: list[Path]) -> CorpusStats:
        con = self.con
        full = self.previous is None
        # 1. The new files' latest record and latest deletion of each PMID they name.
        con.execute(
            f"""CREATE TEMP TABLE new_latest AS
                SELECT pmid, max(struct_pack(file_seq, version, source_file, file_row := file_row_number)) AS record
                FROM read_parquet({_parquet_list(new_articles)}, file_row_number = true) GROUP BY pmid"""
        )
        added_records = con.execute(f"SELECT count(*) FROM read_parquet({_parquet_list(new_articles)})").fetchone()[0]
        con.execute(
            f"""CREATE TEMP TABLE new_deleted AS
                SELECT pmid, max(file_seq) AS deleted_seq FROM read_parquet({_parquet_list(new_deletions)}) GROUP BY pmid"""
        )

        # 2. Every PMID they touch: its state before, and its current record and last deletion now.
        record = "struct_pack(file_seq, version, source_file, file_row)"
        con.execute(
            f"""CREATE TEMP TABLE touched AS
                WITH keys AS (SELECT pmid FROM new_latest UNION SELECT pmid FROM new_deleted),
                before AS (SELECT pmid, CASE WHEN file_seq IS NOT NULL THEN {record} END AS record,
                                  deleted_seq, filtered_by, text_md5, text_chars FROM old_state)
                SELECT k.pmid, b.record AS old_record, b.filtered_by AS old_filtered_by, b.text_md5 AS old_md5, b.text_chars AS old_chars,
                       CASE WHEN n.record IS NOT NULL AND (b.record IS NULL OR n.record > b.record) THEN n.record END AS new_record,
                       greatest(b.deleted_seq, d.deleted_seq) AS deleted_seq
                FROM keys k LEFT JOIN before b USING (pmid) LEFT JOIN new_latest n USING (pmid) LEFT JOIN new_deleted d USING (pmid)"""
        )
        # 3. The new current records: which filter drops each, and the document it makes (only the
        # columns a document keeps, and its text only if it passes: this table is the big one).
        first_failure = " ".join(f"WHEN NOT ({condition}) THEN {i + 1}" for i, (_, condition) in enumerate(self.steps))
        others = ", ".join(name for name in DOCUMENT_SCHEMA.names if name not in ("pmid", "text"))
        con.execute(
            f"""CREATE TEMP TABLE fresh AS
                SELECT pmid, filtered_by, CASE WHEN filtered_by IS NULL THEN text END AS text,
                       CASE WHEN filtered_by IS NULL THEN unhex(md5(text)) END AS text_md5,
                       CASE WHEN filtered_by IS NULL THEN length(text) END AS text_chars, {others}
                FROM (SELECT *, CASE {first_failure or 'WHEN false THEN 0'} END AS filtered_by
                      FROM ({_documents(new_articles)}) a
                      SEMI JOIN (SELECT new_record.source_file AS source_file, new_record.file_row AS file_row_number
                                 FROM touched WHERE new_record IS NOT NULL) w USING (source_file, file_row_number))"""
        )
        # 4. The state of every PMID now: the untouched ones as they were, the touched ones decided again.
        con.execute(
            """CREATE TEMP TABLE touched_state AS
               SELECT t.pmid, t.record.file_seq AS file_seq, t.record.version AS version, t.record.source_file AS source_file,
                      t.record.file_row AS file_row, t.deleted_seq,
                      CASE WHEN t.new_record IS NOT NULL THEN f.filtered_by ELSE t.old_filtered_by END AS filtered_by,
                      CASE WHEN t.new_record IS NOT NULL THEN f.text_md5 ELSE t.old_md5 END AS text_md5,
                      CASE WHEN t.new_record IS NOT NULL THEN f.text_chars ELSE t.old_chars END AS text_chars
               FROM (SELECT *, coalesce(new_record, old_record) AS record FROM touched) t
               LEFT JOIN (SELECT pmid, filtered_by, text_md5, text_chars FROM fresh) f USING (pmid)"""
        )
        state_path = self.out_dir / STATE_FILE
        write_parquet(
            state_path,
            STATE_SCHEMA,
            merge_by_pmid([self._previous_state("SELECT pmid FROM touched"), self._sorted("SELECT * FROM touched_state ORDER BY pmid")]),
            dictionary=["source_file"],
        )
        con.execute(f"CREATE VIEW state AS SELECT * FROM read_parquet({_sql_str(str(state_path))})")
        con.execute(
            "CREATE VIEW candidates AS SELECT pmid, text_md5, text_chars FROM state "
            "WHERE text_md5 IS NOT NULL AND (deleted_seq IS NULL OR deleted_seq < file_seq)"
        )

        # 5. Who keeps each text that a touched PMID had or now has (all of them in a full build),
        # and whose document may change: the touched PMIDs and those sharing one of these texts.
        if not self.filters.drop_duplicate_text:
            con.execute("CREATE TEMP TABLE keep AS SELECT pmid FROM candidates SEMI JOIN touched USING (pmid)")
            con.execute("CREATE VIEW changed AS SELECT pmid FROM touched")
        else:
            scope = "" if full else (
                "WHERE text_md5 IN (SELECT old_md5 FROM touched WHERE old_md5 IS NOT NULL "
                "UNION SELECT text_md5 FROM touched_state WHERE text_md5 IS NOT NULL)"
            )
            con.execute(f"CREATE TEMP TABLE affected AS SELECT pmid, text_md5 FROM candidates {scope}")
            con.execute("CREATE TEMP TABLE keep AS SELECT min(pmid) AS pmid FROM affected GROUP BY text_md5")
            con.execute("CREATE VIEW changed AS SELECT pmid FROM touched UNION SELECT pmid FROM affected")

        # 6. Their documents. A new current record makes a new one; a keeper whose record is not
        # new keeps its row in the previous snapshot, or, if it was a duplicate until now, its row
        # is made again from its parsed file. The rows of the others that changed are removed.
        con.execute(
            "CREATE TEMP TABLE stays AS SELECT pmid FROM keep ANTI JOIN fresh USING (pmid) SEMI JOIN previous_documents USING (pmid)"
        )
        columns = ", ".join(DOCUMENT_SCHEMA.names)
        added = [f"SELECT {columns} FROM fresh SEMI JOIN keep USING (pmid)"]
        promoted = con.execute(
            "SELECT s.source_file, s.file_row FROM keep k JOIN state s USING (pmid) ANTI JOIN fresh USING (pmid) ANTI JOIN stays USING (pmid)"
        ).fetchall()
        if promoted:
            con.register("promoted", pa.table({"source_file": [n for n, _ in promoted], "file_row_number": [r for _, r in promoted]}))
            in_files = f"source_file IN ({', '.join(map(_sql_str, sorted({name for name, _ in promoted})))})"
            added.append(f"SELECT {columns} FROM ({_documents(all_articles, in_files)}) SEMI JOIN promoted USING (source_file, file_row_number)")
        gone = con.sql("SELECT pmid FROM changed ANTI JOIN stays USING (pmid) SEMI JOIN previous_documents USING (pmid)").to_arrow_table()
        parts = self._removing(gone.column("pmid").to_numpy())
        new_documents = None if full else con.execute("SELECT count(*) FROM fresh SEMI JOIN keep USING (pmid)").fetchall()[0][0] + len(promoted)
        documents = self._sorted(" UNION ALL ".join(added) + " ORDER BY pmid")
        if full or _compaction_due(parts, new_documents, self.max_parts, self.compact_fraction):
            written = self._write_part(0, merge_by_pmid([part.tables() for part in parts] + [documents]))
            parts = [written]
        else:
            parts = [_linked(part, self.out_dir) for part in parts if part.documents]
            if new_documents:
                parts.append(self._write_part(1 + max((_part_number(part) for part in parts), default=0), documents))
        stats = CorpusStats(documents=write_corpus_parts(self.out_dir, parts))
        self._count(stats, added_records)
        return stats

    def _removing(self, pmids: np.ndarray) -> list[CorpusPart]:
        """The previous snapshot's parts, with the rows of these PMIDs' documents removed too."""
        parts = []
        for part, part_pmids in zip(self.previous_parts, self.previous_pmids):
            rows = np.flatnonzero(np.isin(part_pmids, pmids) & part.live())
            parts.append(replace(part, removed=np.union1d(part.removed, rows)))
        if (removed := sum(p.documents for p in self.previous_parts) - sum(p.documents for p in parts)) != len(pmids):
            raise RuntimeError(f"{self.previous.folder}: {len(pmids)} documents to replace but {removed} found in its parts; build without the previous snapshot")
        return parts

    def _write_part(self, number: int, tables: Iterator[pa.Table]) -> CorpusPart:
        path = self.out_dir / f"part-{number:04d}.parquet"
        rows = write_parquet(path, DOCUMENT_SCHEMA, _read_ahead(tables), dictionary=LOW_CARDINALITY)
        return CorpusPart(path, rows, np.zeros(0, dtype=np.int64))

    def _count(self, stats: CorpusStats, added_records: int) -> None:
        """The statistics of the new state (the same query whichever way it was reached)."""
        previous = json.loads((self.previous.folder / STATS_FILE).read_text()) if self.previous else {}
        stats.records = previous.get("records", 0) + added_records
        live = "file_seq IS NOT NULL AND (deleted_seq IS NULL OR deleted_seq < file_seq)"
        stats.pmids, stats.deleted = self.con.execute(f"SELECT count(file_seq), count(file_seq) - count(*) FILTER ({live}) FROM state").fetchone()
        stats.superseded = stats.records - stats.pmids
        dropped = dict(self.con.execute(f"SELECT filtered_by, count(*) FROM state WHERE {live} GROUP BY filtered_by").fetchall())
        stats.dropped = [{"filter": reason, "rows": dropped.get(i + 1, 0)} for i, (reason, _) in enumerate(self.steps)]
        one_per_text = "(SELECT any_value(text_chars) AS text_chars FROM candidates GROUP BY text_md5)" if self.filters.drop_duplicate_text else "candidates"
        documents, stats.characters = self.con.execute(f"SELECT count(*), coalesce(sum(text_chars), 0) FROM {one_per_text}").fetchone()
        if documents != stats.documents:
            raise RuntimeError(f"{self.out_dir}: the parts hold {stats.documents} documents but the state says {documents}; build without the previous snapshot")
        if self.filters.drop_duplicate_text:
            stats.dropped.append({"filter": "exact duplicate text", "rows": dropped.get(None, 0) - stats.documents})

    def _sorted(self, query: str) -> Iterator[pa.Table]:
        for batch in self.con.sql(query).to_arrow_reader(ROW_GROUP_ROWS):
            yield pa.Table.from_batches([batch])

    def _previous_state(self, leaving: str) -> Iterator[pa.Table]:
        """The previous snapshot's state in order, but that of the PMIDs that the query ``leaving``
        selects (run now, before another query streams its result)."""
        if self.previous is None:
            return iter(())
        gone = self.con.sql(leaving).to_arrow_table().column(0).combine_chunks()
        tables = parquet_tables(parquet_file(self.previous.folder / STATE_FILE), ROW_GROUP_ROWS)  # not pre-buffered: holds a batch, not the file
        return (t.filter(pc.invert(pc.is_in(t.column("pmid"), value_set=gone))) for t in tables)


def _compaction_due(parts: list[CorpusPart], new_documents: int, max_parts: int, fraction: float) -> bool:
    """Whether to write the snapshot as one part rather than add one: when it would have more
    than ``max_parts`` parts, or when the rows that readers pass over (removed) or merge in (all
    but the largest part's) would be more than ``fraction`` of its documents."""
    kept = [part for part in parts if part.documents]
    documents = sum(part.documents for part in kept) + new_documents
    merged_or_skipped = documents - max((part.documents for part in kept), default=0) + sum(len(part.removed) for part in kept)
    return len(kept) + bool(new_documents) > max_parts or merged_or_skipped > fraction * documents


def _part_number(part: CorpusPart) -> int:
    return int(part.path.stem.removeprefix("part-"))


def _linked(part: CorpusPart, out_dir: Path) -> CorpusPart:
    """A previous snapshot's part in ``out_dir``, as a hard link."""
    _link_file(part.path, out_dir / part.path.name)
    return replace(part, path=out_dir / part.path.name)


def _link_file(source: Path, target: Path) -> None:
    """``target`` as a hard link to ``source``: no byte copied, and the store finds the digest it
    already knows. A copy where the file system has no links."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _documents(article_files: Sequence[Path], where: str = "") -> str:
    """SQL: the parsed rows of ``article_files`` (with their file row number) and the document
    text each makes: the title (the vernacular one if there is no English title), a blank line,
    the abstract."""
    title = "CASE WHEN trim(coalesce(title, '')) = '' THEN coalesce(vernacular_title, '') ELSE title END"
    return (
        f"SELECT *, {title} || chr(10) || chr(10) || coalesce(abstract, '') AS text "
        f"FROM read_parquet({_parquet_list(article_files)}, file_row_number = true) {'WHERE ' + where if where else ''}"
    )


def _read_ahead(tables: Iterator[pa.Table], depth: int = 2) -> Iterator[pa.Table]:
    """``tables``, produced in a thread of their own up to ``depth`` ahead of the caller: reading
    and decompressing (pyarrow, DuckDB) overlap with encoding and compressing (the Parquet
    writer), as both release the GIL. The producer stops when the caller does."""
    ready: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for table in tables:
                while not stop.is_set():
                    try:
                        ready.put(table, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            ready.put(done)
        except BaseException as error:  # handed to the caller, which raises it
            ready.put(error)

    producer = threading.Thread(target=produce, name="corpus-read-ahead", daemon=True)
    producer.start()
    try:
        while (item := ready.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        producer.join()


def write_parquet(path: Path, schema: pa.Schema, tables: Iterable[pa.Table], *, dictionary: list[str]) -> int:
    """Write a stream of tables as row groups of exactly ROW_GROUP_ROWS rows (the last one
    shorter), each one contiguous array per column (pages follow the arrays' chunks), so the
    bytes depend only on the rows; returns the number of rows."""
    written = 0
    with pq.ParquetWriter(path, schema, compression="zstd", use_dictionary=dictionary) as writer:
        for rows in rebatched((table.cast(schema) for table in tables), ROW_GROUP_ROWS):
            writer.write_table(rows.combine_chunks(), row_group_size=ROW_GROUP_ROWS)
            written += rows.num_rows
    return written


def build_corpus(inputs: dict, out_dir: Path, config: CorpusConfig) -> dict:
    """Every parsed file into a snapshot; with a previous snapshot (same version and content
    config, a subset of these files), only the files it lacks are applied to it."""
    parsed: list[Artifact] = inputs["parsed"]
    previous: Artifact | None = inputs.get("previous")
    names: dict[str, str] = {}
    for artifact in parsed:  # a record is known by its file's name and its row there
        if (name := artifact.summary.get("source_file")) in names:
            raise ValueError(f"{names[name]} and {artifact.ref} are both parsed from {name}; a snapshot takes one of each file")
        names[name] = artifact.ref
    start = None
    if previous is not None:
        if previous.manifest.get("version") != CORPUS.version or previous.params != json.loads(json.dumps(config_params(config))):
            raise ValueError(f"the previous snapshot {previous.ref} was built by another stage version or with other settings; leave it out for a full build")
        by_ref = {a.ref: a.file(ARTICLES_FILE) for a in parsed}
        if missing := sorted(set(previous.parents) - set(by_ref)):
            raise ValueError(f"the previous snapshot {previous.ref} holds files that are not among today's ({missing[:3]}); leave it out for a full build")
        start = Previous(previous.path, frozenset(by_ref[ref] for ref in previous.parents))
    stats = build_snapshot([a.file(ARTICLES_FILE) for a in parsed], [a.file(DELETIONS_FILE) for a in parsed], out_dir, config, previous=start)
    return stats | {"previous": previous.ref if previous else None, "files_applied": len(parsed) - (len(previous.parents) if previous else 0)}


CORPUS = Stage(
    name="corpus",
    version="4",
    config=CorpusConfig,
    inputs={"parsed": Input("parse", many=True), "previous": Input("corpus", optional=True, keyed=False)},
    build=build_corpus,
    report=lambda corpus: CorpusStats(**json.loads(corpus.file(STATS_FILE).read_text())).table(),
)
