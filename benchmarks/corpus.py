"""Records/s and peak memory of the corpus snapshot (DuckDB) as the corpus grows, and the cost of
one nightly update file applied to a snapshot against a full rebuild.

    python -m benchmarks.corpus [--records 300000 3000000] [--memory-limit 4GB] [--update]

Parses the two sample files once, then writes synthetic parsed files made of shifted copies of
their rows (PMIDs offset and titles marked so every copy is a distinct set of articles, file_seq
increasing, deletions shifted with them), ``--copies-per-file`` copies to a file (20: 30,000
records, the size of a real NCBI file). Each size is the first files of one set, and each build
runs in a child process under ``/usr/bin/time -v``, whose peak RSS is the figure recorded.

With ``--update``, the whole 2021 update file (20,788 records, 20 deletions; about 1,500 of its
PMIDs revise records of the first copy) is then applied to the largest snapshot three ways:
incrementally (a new part, the old one linked), incrementally with a compaction into one part
(what every MAX_PARTS-th night costs), and by a full rebuild. The results are checked to hold the
same documents in the same order, the same state and statistics (and the compacted part the
full rebuild's bytes). Each time includes hashing the files the store would hash when it
publishes the snapshot (all but the linked ones), and a pass of ``iter_corpus`` over the
incremental and the full snapshot shows what readers pay for the parts.
Records JSON in benchmarks/results/corpus.json (``--result NAME``: NAME.json).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from benchmarks.common import REPO, full_pubmed_files, write_result
from storage import sha256_file
from storage.formats import corpus_tables, iter_corpus, rebatched
from tasks.corpus import MAX_PARTS, CorpusConfig, Previous, build_snapshot
from tasks.parse import parse_xml_file

SAMPLES = [
    (REPO / "tests/data/pubmed/mirror/baseline/pubmed20n0014.xml.gz", 14),
    (REPO / "tests/data/pubmed/mirror/updatefiles/pubmed21n1298.xml.gz", 1298),
]
SAMPLE_RECORDS = 3_000  # both samples, one copy


def shifted(table: pa.Table, copy: int, file_seq: int) -> pa.Table:
    """The rows as other articles: PMIDs offset, titles marked (or every copy is an exact duplicate)."""
    def replace(t: pa.Table, name: str, values) -> pa.Table:
        return t.set_column(t.schema.get_field_index(name), name, values)

    table = replace(table, "pmid", pc.add(table["pmid"], copy * 100_000_000))
    table = replace(table, "file_seq", pa.array([file_seq] * len(table), type=table.schema.field("file_seq").type))
    if "title" in table.column_names:
        table = replace(table, "title", pc.binary_join_element_wise(f"[{copy}]", table["title"], " "))
    return table


def write_copies(folder: Path, copies: int, per_file: int) -> list[tuple[Path, Path]]:
    """Parsed (articles, deletions) files holding ``copies`` shifted copies of each sample, in
    files of ``per_file`` copies of one sample, file_seq increasing."""
    originals = []
    for xml, seq in SAMPLES:
        parse_xml_file(xml, folder / f"orig-{seq}", source_file=xml.name, file_seq=seq)
        originals.append((pq.read_table(folder / f"orig-{seq}/articles.parquet"), pq.read_table(folder / f"orig-{seq}/deletions.parquet")))
    files = []
    for first in range(0, copies, per_file):
        for i, (articles, deletions) in enumerate(originals):
            seq = len(files) + 1
            group = range(first, min(first + per_file, copies))
            name = f"pubmed99n{seq:04d}.xml.gz"
            pair = (folder / f"a{seq:05d}.parquet", folder / f"d{seq:05d}.parquet")
            for path, table in zip(pair, (articles, deletions)):
                rows = pa.concat_tables([shifted(table, copy, seq) for copy in group])
                pq.write_table(rows.set_column(rows.schema.get_field_index("source_file"), "source_file", pa.array([name] * len(rows))), path, compression="zstd")
            files.append(pair)
    return files


def run_child(files: list[tuple[Path, Path]], out: Path, memory_limit: str, previous: Path | None = None, applied: int = 0, compact: bool = False) -> dict:
    """One snapshot build in a child process under /usr/bin/time -v: its wall time and peak RSS."""
    spec = out.with_suffix(".json")
    spec.write_text(json.dumps({"files": [[str(a), str(d)] for a, d in files], "out": str(out), "memory_limit": memory_limit,
                                "previous": str(previous) if previous else None, "applied": applied, "compact": compact}))
    command = ["/usr/bin/time", "-v", sys.executable, "-m", "benchmarks.corpus", "--child", str(spec)]
    load = os.getloadavg()[0]  # the machine is shared: what other work put on it
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    child = json.loads(done.stdout.strip().splitlines()[-1])
    return {**child, "peak_rss_mb": round(rss_kb / 1024), "load_average_1min_before": round(load, 2)}


def child(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    files = [(Path(a), Path(d)) for a, d in spec["files"]]
    previous = Previous(Path(spec["previous"]), frozenset(a for a, _ in files[: spec["applied"]])) if spec["previous"] else None
    out = Path(spec["out"])
    start = time.perf_counter()
    compaction = {"compact_fraction": 0.0} if spec["compact"] else {}
    stats = build_snapshot([a for a, _ in files], [d for _, d in files], out, CorpusConfig(memory_limit=spec["memory_limit"]), previous=previous, **compaction)
    built = time.perf_counter()
    for path in out.iterdir():  # what the store hashes when it publishes: every file but those linked from the previous snapshot
        if path.stat().st_nlink == 1:
            sha256_file(path)
    done = time.perf_counter()
    print(json.dumps({"seconds": round(done - start, 2), "build_seconds": round(built - start, 2), "hash_seconds": round(done - built, 2),
                      "documents": stats["documents"], "records": stats["records"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, nargs="+", default=[300_000, 3_000_000], help="corpus sizes (input records), each rounded to whole copies of the samples")
    parser.add_argument("--copies-per-file", type=int, default=20, help="sample copies in one synthetic parsed file (20: 30,000 records, a real file's size)")
    parser.add_argument("--memory-limit", default=CorpusConfig().memory_limit, help="the snapshot's memory_limit")
    parser.add_argument("--update", action="store_true", help="also apply the full 2021 update file to the largest snapshot, incrementally and by a full rebuild")
    parser.add_argument("--result", default="corpus", help="name of the JSON under benchmarks/results/")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)

    per_file = args.copies_per_file
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        files = write_copies(tmp / "parsed", max(args.records) // SAMPLE_RECORDS, per_file)
        print(f"wrote {len(files)} parsed files in {time.perf_counter() - t0:.0f} s")
        sizes = []
        for records in sorted(args.records):
            chosen = files[: 2 * -(-records // SAMPLE_RECORDS // per_file)]
            run = run_child(chosen, tmp / f"snapshot-{records}", args.memory_limit)
            run.update(files=len(chosen), records_per_s=round(run["records"] / run["seconds"]))
            sizes.append(run)
            print(f"{run['records']:>12,} records in {run['files']} files: {run['seconds']} s, {run['records_per_s']:,} records/s, peak RSS {run['peak_rss_mb']:,} MB")
            if records != max(args.records):
                shutil.rmtree(tmp / f"snapshot-{records}")
        result = {"memory_limit": args.memory_limit, "sizes": sizes}
        if args.update:
            result["update"] = apply_update(tmp, files, args.memory_limit, tmp / f"snapshot-{max(args.records)}")
    print(f"wrote {write_result(args.result, {'results': result})}")


def apply_update(tmp: Path, files: list[tuple[Path, Path]], memory_limit: str, snapshot: Path) -> dict:
    """The whole 2021 update file, applied to ``snapshot`` (adding a part, then compacting) and
    rebuilt with it from nothing."""
    full_update = next(p for p in full_pubmed_files() if p.name.startswith("pubmed21"))
    parse_xml_file(full_update, tmp / "update", source_file=full_update.name, file_seq=len(files) + 1)
    with_update = files + [(tmp / "update/articles.parquet", tmp / "update/deletions.parquet")]
    runs = {
        "incremental": run_child(with_update, tmp / "incremental", memory_limit, previous=snapshot, applied=len(files)),
        "compacting": run_child(with_update, tmp / "compacting", memory_limit, previous=snapshot, applied=len(files), compact=True),
        "full_rebuild": run_child(with_update, tmp / "full", memory_limit),
    }
    same = {name: same_snapshot(tmp / name, tmp / "full") for name in ("incremental", "compacting")}
    same["compacting"] = same["compacting"] and (tmp / "compacting/part-0000.parquet").read_bytes() == (tmp / "full/part-0000.parquet").read_bytes()
    reads = {name: time_reading(tmp / name) for name in ("incremental", "full")}
    full, incremental, compacting = (runs[n]["seconds"] for n in ("full_rebuild", "incremental", "compacting"))
    # Parts accumulate one a night; the MAX_PARTS-th night compacts (with updates this size, the
    # removed-rows fraction stays under COMPACT_FRACTION for longer than that).
    per_night = ((MAX_PARTS - 1) * incremental + compacting) / MAX_PARTS
    update = {
        "snapshot_records": runs["full_rebuild"]["records"] - pq.ParquetFile(tmp / "update/articles.parquet").metadata.num_rows,
        "update_records": pq.ParquetFile(tmp / "update/articles.parquet").metadata.num_rows,
        **runs,
        "incremental_over_full": round(incremental / full, 3),
        "compacting_over_full": round(compacting / full, 3),
        "mean_night_over_full": round(per_night / full, 3),
        "mean_night": f"{MAX_PARTS - 1} nights adding a part, 1 compacting",
        "iter_corpus_seconds": reads,
        "same_documents_state_and_stats": same,
        "target": "incremental <= 0.1 x full rebuild",
    }
    print(
        f"one update file ({update['update_records']:,} records) on {update['snapshot_records']:,}: incremental {incremental} s "
        f"(peak RSS {runs['incremental']['peak_rss_mb']:,} MB), compacting {compacting} s, full rebuild {full} s "
        f"(peak RSS {runs['full_rebuild']['peak_rss_mb']:,} MB): {update['incremental_over_full']:.3f} of a full rebuild, "
        f"{update['mean_night_over_full']:.3f} a night on average; iter_corpus {reads['incremental']} s vs {reads['full']} s; same: {same}"
    )
    if not all(same.values()):
        raise SystemExit("an incremental snapshot differs from the full rebuild")
    return update


def same_snapshot(snapshot: Path, full: Path) -> bool:
    """The same documents in the same order (compared 50,000 at a time), state and statistics."""
    pairs = itertools.zip_longest(*(rebatched(corpus_tables(folder), 50_000) for folder in (snapshot, full)))
    documents = all(a is not None and a.equals(b) for a, b in pairs)
    return documents and all((snapshot / n).read_bytes() == (full / n).read_bytes() for n in ("pmids.parquet", "stats.json"))


def time_reading(snapshot: Path) -> float:
    start = time.perf_counter()
    for _ in iter_corpus(snapshot):
        pass
    return round(time.perf_counter() - start, 2)


if __name__ == "__main__":
    main()
