"""Rows/s of the corpus snapshot (DuckDB) over many parsed files.

    python -m benchmarks.corpus [--copies 200]

Parses the two sample files once, then writes COPIES shifted copies of their rows (PMIDs offset
and titles marked so every copy is a distinct set of articles, file_seq increasing, deletions
shifted with them),
and times `build_snapshot` over all of them. Records JSON in benchmarks/results/corpus.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from benchmarks.common import REPO, peak_rss_mib, write_result
from tasks.corpus import CorpusConfig, build_snapshot
from tasks.parse import parse_xml_file

SAMPLES = [
    (REPO / "tests/data/pubmed/mirror/baseline/pubmed20n0014.xml.gz", 14),
    (REPO / "tests/data/pubmed/mirror/updatefiles/pubmed21n1298.xml.gz", 1298),
]


def shifted(table: pa.Table, copy: int, file_seq: int) -> pa.Table:
    """The rows as other articles: PMIDs offset, titles marked (or every copy is an exact duplicate)."""
    def replace(t: pa.Table, name: str, values) -> pa.Table:
        return t.set_column(t.schema.get_field_index(name), name, values)

    table = replace(table, "pmid", pc.add(table["pmid"], copy * 100_000_000))
    table = replace(table, "file_seq", pa.array([file_seq] * len(table), type=table.schema.field("file_seq").type))
    if "title" in table.column_names:
        table = replace(table, "title", pc.binary_join_element_wise(f"[{copy}]", table["title"], " "))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=200, help="shifted copies of each sample file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        originals = []
        for xml, seq in SAMPLES:
            parse_xml_file(xml, tmp / f"orig-{seq}", source_file=xml.name, file_seq=seq)
            originals.append((pq.read_table(tmp / f"orig-{seq}/articles.parquet"), pq.read_table(tmp / f"orig-{seq}/deletions.parquet")))
        article_files, deletion_files = [], []
        for copy in range(args.copies):
            for i, (articles, deletions) in enumerate(originals):
                seq = copy * len(originals) + i + 1
                article_files.append(tmp / f"a{seq:05d}.parquet")
                deletion_files.append(tmp / f"d{seq:05d}.parquet")
                pq.write_table(shifted(articles, copy, seq), article_files[-1], compression="zstd")
                pq.write_table(shifted(deletions, copy, seq), deletion_files[-1], compression="zstd")
        records = sum(len(a) for a, _ in originals) * args.copies

        start = time.perf_counter()
        stats = build_snapshot(article_files, deletion_files, tmp / "out", CorpusConfig())
        seconds = time.perf_counter() - start

    result = {
        "files": len(article_files),
        "input_records": records,
        "documents": stats["documents"],
        "seconds": round(seconds, 3),
        "records_per_s": round(records / seconds),
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }
    print(
        f"snapshot of {records:,} records in {len(article_files)} files -> {stats['documents']:,} documents: "
        f"{seconds:.2f} s, {result['records_per_s']:,} records/s, peak RSS {result['peak_rss_mib']:.0f} MiB"
    )
    print(f"wrote {write_result('corpus', {'results': result})}")


if __name__ == "__main__":
    main()
