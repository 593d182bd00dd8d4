"""Corpus snapshot: all parsed files -> one deduplicated, filtered Parquet, with DuckDB.

NLM's rule for the baseline plus its daily updates: files are applied in sequence order, so a
PMID's current record is the one from the highest file_seq (then the highest version), and a
PMID listed in a DeleteCitation of a file at or after that record's file is gone.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, Sequence

import duckdb
from pydantic import Field, field_validator
from pydantic.dataclasses import dataclass as config_dataclass

from storage import Artifact, Input, Stage
from storage.formats import ARTICLES_FILE, CORPUS_FILE, DELETIONS_FILE

log = logging.getLogger("medlm.corpus")


@config_dataclass(frozen=True)
class CorpusConfig:
    """Which articles make the pretraining corpus."""

    require_abstract: bool = Field(True, description="Drop articles without an abstract.")
    min_abstract_chars: int = Field(200, ge=0, description="Drop abstracts shorter than this many characters.")
    languages: tuple[str, ...] = Field(("eng",), description="Keep an article if any of its languages is listed (MEDLINE codes; empty keeps all).")
    drop_retracted: bool = Field(True, description="Drop articles of type 'Retracted Publication'.")
    drop_retraction_notices: bool = Field(False, description="Drop notices of type 'Retraction of Publication'.")
    drop_errata: bool = Field(False, description="Drop articles of type 'Published Erratum'.")
    drop_duplicate_text: bool = Field(True, description="Keep one of each exact duplicate text (the lowest PMID).")
    threads: int | None = Field(None, ge=1, description="DuckDB threads (unset: all cores).")
    memory_limit: str | None = Field(None, description="DuckDB memory limit, e.g. '8GB' (unset: DuckDB's default, 80% of RAM).")

    RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = ("threads", "memory_limit")

    @field_validator("languages")
    @classmethod
    def _sorted(cls, languages: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(sorted(set(languages)))


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
    """(reason, SQL condition that a KEPT row satisfies), applied one after another."""
    steps = []
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


def build_snapshot(
    article_files: Sequence[Path],
    deletion_files: Sequence[Path],
    out_dir: Path,
    filters: CorpusConfig = CorpusConfig(),
) -> dict:
    """Write ``out_dir/corpus.parquet`` (sorted by pmid) and ``out_dir/stats.json``; return the stats."""
    if not article_files:
        raise ValueError("build_snapshot: no parsed article files given; run the parse stage first")
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus_path = out_dir / CORPUS_FILE
    tmp_dir = out_dir / ".duckdb_tmp"  # spill files, if DuckDB needs any
    try:
        with duckdb.connect(config={"temp_directory": str(tmp_dir), "preserve_insertion_order": False}) as con:
            stats = _snapshot(con, article_files, deletion_files, corpus_path, filters)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    summary = asdict(stats)
    (out_dir / "stats.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("corpus: %d documents, %d characters", stats.documents, stats.characters)
    return summary


def _snapshot(
    con: duckdb.DuckDBPyConnection,
    article_files: Sequence[Path],
    deletion_files: Sequence[Path],
    corpus_path: Path,
    filters: CorpusConfig,
) -> CorpusStats:
    if filters.threads:
        con.execute(f"SET threads = {int(filters.threads)}")
    if filters.memory_limit:
        con.execute(f"SET memory_limit = {_sql_str(filters.memory_limit)}")

    def parquet_list(paths: Sequence[Path]) -> str:
        return "[" + ", ".join(_sql_str(str(p)) for p in paths) + "]"

    con.execute(
        f"CREATE VIEW articles AS SELECT * FROM read_parquet({parquet_list(article_files)}, filename = true, file_row_number = true)"
    )
    if deletion_files:
        con.execute(
            f"""CREATE TEMP TABLE last_deletion AS SELECT pmid, max(file_seq) AS file_seq
                FROM read_parquet({parquet_list(deletion_files)}) GROUP BY pmid"""
        )
    else:
        con.execute("CREATE TEMP TABLE last_deletion (pmid BIGINT, file_seq INTEGER)")

    stats = CorpusStats()
    # One pass picks each PMID's current record; a second labels it with the first rule that drops it.
    # The window runs on narrow rows; the winners' full rows are then fetched by file and row number.
    con.execute(
        """
        CREATE TEMP TABLE latest AS
        WITH winners AS (
            SELECT filename, file_row_number FROM articles
            QUALIFY row_number() OVER (PARTITION BY pmid ORDER BY file_seq DESC, version DESC, file_row_number DESC) = 1
        )
        SELECT a.* EXCLUDE (filename, file_row_number) FROM articles a SEMI JOIN winners w USING (filename, file_row_number)
        """
    )
    steps = _filters_in_order(filters)
    first_failure = " ".join(f"WHEN NOT ({condition}) THEN {i + 1}" for i, (_, condition) in enumerate(steps))
    con.execute(
        f"""
        CREATE TEMP TABLE labelled AS
        SELECT l.*, CASE WHEN d.file_seq >= l.file_seq THEN 0 {first_failure} END AS dropped_by
        FROM latest l LEFT JOIN last_deletion d USING (pmid)
        """
    )
    dropped = dict(con.execute("SELECT dropped_by, count(*) FROM labelled GROUP BY dropped_by").fetchall())
    stats.records = con.execute("SELECT count(*) FROM articles").fetchone()[0]
    stats.pmids = sum(dropped.values())
    stats.superseded = stats.records - stats.pmids
    stats.deleted = dropped.get(0, 0)
    stats.dropped = [{"filter": reason, "rows": dropped.get(i + 1, 0)} for i, (reason, _) in enumerate(steps)]
    log.info("corpus: %d records, %d distinct PMIDs in %d files", stats.records, stats.pmids, len(article_files))

    title = "CASE WHEN trim(coalesce(title, '')) = '' THEN coalesce(vernacular_title, '') ELSE title END"
    documents = f"SELECT *, {title} || chr(10) || chr(10) || coalesce(abstract, '') AS text FROM labelled WHERE dropped_by IS NULL"
    if filters.drop_duplicate_text:  # the lowest PMID keeps an exact duplicate text
        documents += " QUALIFY row_number() OVER (PARTITION BY md5(text) ORDER BY pmid) = 1"
    con.execute(
        f"""
        COPY (
            SELECT pmid, text, title, journal, pub_year, languages, mesh_terms, publication_types,
                   version, date_revised, source_file, file_seq
            FROM ({documents}) ORDER BY pmid
        ) TO {_sql_str(str(corpus_path))} (FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE 100000)
        """
    )
    stats.documents, stats.characters = con.execute(
        f"SELECT count(*), coalesce(sum(length(text)), 0) FROM read_parquet({_sql_str(str(corpus_path))})"
    ).fetchone()
    if filters.drop_duplicate_text:
        kept = dropped.get(None, 0)
        stats.dropped.append({"filter": "exact duplicate text", "rows": kept - stats.documents})
    return stats


def build_corpus(inputs: dict, out_dir: Path, config: CorpusConfig) -> dict:
    parsed = inputs["parsed"]
    return build_snapshot([a.file(ARTICLES_FILE) for a in parsed], [a.file(DELETIONS_FILE) for a in parsed], out_dir, config)


CORPUS = Stage(
    name="corpus",
    version="2",
    config=CorpusConfig,
    inputs={"parsed": Input("parse", many=True)},
    build=build_corpus,
    report=lambda corpus: CorpusStats(**corpus.summary).table(),
)
