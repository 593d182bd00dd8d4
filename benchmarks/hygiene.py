"""Records/s and peak memory of the hygiene stage as the corpus grows, against rensa (its MinHash
library) used bare on the same documents; one night's cleaning from the previous one against a
cleaning from scratch; and what each rule removes from the two full-size NCBI files.

    python -m benchmarks.hygiene [--records 150000 300000] [--memory-limit 2GB] [--workers 2] [--real] [--skip night ...]

Synthetic corpora are shifted copies of the two sample files, as benchmarks/corpus.py makes
them, but with every fourth word of each abstract marked with the copy's number, so that copies
are not near-duplicates of each other (the title mark alone would make every copy one). Each
size's snapshot is built first (not timed); then, in child processes under /usr/bin/time -v
(peak RSS), one after the other for each size (``--skip`` leaves runs out, for the largest sizes):

- ``stage``: the hygiene stage, every rule, from scratch (``workers`` processes);
- ``stage_near_duplicates_only``: the stage with only the near-duplicate rule on, in one process;
- ``bare``: rensa bare, in one process: the same shingles, ``RMinHash`` and ``RMinHashLSH``
  (the same bands and rows), every document inserted and queried, all in memory.

Then one more night (a file of 30,000 new records: 20 more copies of the baseline sample, the
size of a real update file) is applied to the largest snapshot, and the stage cleans it from the previous cleaning and from scratch; the
two must be byte-equal. With ``--real``, the two full NCBI files (``full_pubmed_files()``) are
parsed, snapshot (default corpus settings) and cleaned against the bundled QA data, and each
rule's counts are recorded. JSON in benchmarks/results/hygiene.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from benchmarks.common import REPO, full_pubmed_files, write_result
from benchmarks.corpus import SAMPLE_RECORDS, write_copies
from storage.formats import iter_corpus, read_records
from tasks.corpus import CorpusConfig, build_snapshot
from tasks.hygiene import HygieneConfig, Screen, clean_snapshot, shingles, stripped
from tasks.parse import parse_xml_file
from tasks.qa import QAConfig
from tasks.qa.stage import convert_qa

QA_SOURCES = ["tests/data/pubmedqa", "tests/data/medqa", "tests/data/medmcqa/medmcqa_val.json"]
NEAR_DUPLICATES_ONLY = dict(evaluation_pmids=False, evaluation_ngrams=False, strip_notices=False, strip_copyright=False, drop_placeholders=False, abstract_languages=())


def distinct(files: list[tuple[Path, Path]]) -> None:
    """Mark every fourth word of each abstract with its copy's number (read from the PMID's offset)."""
    for articles, _ in files:
        table = pq.read_table(articles)
        copies = pc.divide(table["pmid"], 100_000_000).to_pylist()
        abstracts = [
            None if text is None else " ".join(w + str(copy) if i % 4 == 3 else w for i, w in enumerate(text.split(" ")))
            for text, copy in zip(table["abstract"].to_pylist(), copies)
        ]
        table = table.set_column(table.schema.get_field_index("abstract"), "abstract", pa.array(abstracts, pa.string()))
        pq.write_table(table, articles, compression="zstd")


def screen_records(tmp: Path) -> list[dict]:
    records = []
    for i, source in enumerate(QA_SOURCES):
        out = tmp / f"qa-{i}"
        if not out.exists():
            out.mkdir(parents=True)
            convert_qa(QAConfig(source=str(REPO / source)), out)
        records += read_records(out)
    return records


def run_child(action: str, spec: dict) -> dict:
    """One action in a child process under /usr/bin/time -v: its result and peak RSS."""
    path = Path(spec["out"]).with_suffix(".json")
    path.write_text(json.dumps(spec | {"action": action}))
    load = os.getloadavg()[0]
    done = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "benchmarks.hygiene", "--child", str(path)], capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"{action} failed:\n{done.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    return json.loads(done.stdout.strip().splitlines()[-1]) | {"peak_rss_mb": round(rss_kb / 1024), "load_average_1min_before": round(load, 2)}


def child(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    corpus, out = Path(spec["corpus"]), Path(spec["out"])
    start = time.perf_counter()
    if spec["action"] == "bare":
        result = bare_rensa(corpus, HygieneConfig())
    else:
        settings = NEAR_DUPLICATES_ONLY if spec["action"] == "stage_near_duplicates_only" else {}
        workers = 1 if settings else spec["workers"]
        config = HygieneConfig(join_memory=spec["memory_limit"], processes=workers, **settings)
        records = screen_records(Path(spec["qa"])) if not settings else []
        previous = Path(spec["previous"]) if spec.get("previous") else None
        result = clean_snapshot(corpus, out, config, Screen.of(records, config), previous=previous)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": round(seconds, 2), **result}))


def bare_rensa(corpus: Path, config: HygieneConfig) -> dict:
    """rensa alone on the same documents: shingles, a MinHash each, one in-memory LSH index."""
    from rensa import RMinHash, RMinHashLSH

    lsh = RMinHashLSH(threshold=config.near_duplicate_threshold, num_perm=config.minhash_bands * config.minhash_rows, num_bands=config.minhash_bands)
    documents = candidates = 0
    for pmids, texts in iter_corpus(corpus):
        for pmid, text in zip(pmids, texts):
            minhash = RMinHash(num_perm=config.minhash_bands * config.minhash_rows, seed=1)
            minhash.update(sorted(shingles(stripped(text, config)[0], config.shingle_words)))
            candidates += len(lsh.query(minhash))
            lsh.insert(pmid, minhash)
            documents += 1
    return {"documents": documents, "candidates": candidates}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, nargs="+", default=[150_000, 300_000], help="corpus sizes (input records), whole copies of the samples")
    parser.add_argument("--memory-limit", default=HygieneConfig().join_memory, help="the stage's join_memory")
    parser.add_argument("--workers", type=int, default=2, help="the stage's worker processes")
    parser.add_argument("--real", action="store_true", help="also count each rule's removals on the two full NCBI files")
    parser.add_argument("--skip", nargs="+", default=[], choices=["stage_near_duplicates_only", "bare", "night"], help="leave these runs out (long at large sizes)")
    parser.add_argument("--result", default="hygiene", help="name of the JSON under benchmarks/results/")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)

    results: dict = {"memory_limit": args.memory_limit, "workers": args.workers}
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        tmp = Path(tmp)
        screen_records(tmp)  # converted once, read by every child
        copies = max(args.records) // SAMPLE_RECORDS + 20  # the last 20: the extra night's file
        files = write_copies(tmp / "parsed", copies, 20)
        distinct(files)
        sizes = []
        for records in sorted(args.records):
            chosen = files[: 2 * -(-records // SAMPLE_RECORDS // 20)]
            corpus = tmp / f"corpus-{records}"
            build_snapshot([a for a, _ in chosen], [d for _, d in chosen], corpus, CorpusConfig())
            spec = {"corpus": str(corpus), "qa": str(tmp), "memory_limit": args.memory_limit, "workers": args.workers}
            runs = {action: run_child(action, spec | {"out": str(tmp / f"{action}-{records}")})
                    for action in ("stage", "stage_near_duplicates_only", "bare") if action not in args.skip}
            for run in runs.values():
                run["documents_per_s"] = round(run["documents"] / run["seconds"])
            sizes.append({"records": records, "files": len(chosen), **runs})
            print(f"{records:,} records: " + "; ".join(f"{name} {r['seconds']} s ({r['documents_per_s']:,} documents/s, peak RSS {r['peak_rss_mb']:,} MB)" for name, r in runs.items()))
        results["sizes"] = sizes
        if "night" not in args.skip:
            results["night"] = night(tmp, files, max(args.records), args)
        if args.real:
            results["real"] = real_files(tmp, args)
    print(f"wrote {write_result(args.result, {'results': results})}")


def night(tmp: Path, files: list, records: int, args) -> dict:
    """One more file applied to the largest snapshot; cleaned from the previous cleaning and from scratch."""
    chosen = files[: 2 * -(-records // SAMPLE_RECORDS // 20)]
    tonight = chosen + files[len(chosen) : len(chosen) + 1]
    corpus = tmp / "corpus-tonight"
    build_snapshot([a for a, _ in tonight], [d for _, d in tonight], corpus, CorpusConfig())
    spec = {"corpus": str(corpus), "qa": str(tmp), "memory_limit": args.memory_limit, "workers": args.workers}
    incremental = run_child("stage", spec | {"out": str(tmp / "incremental"), "previous": str(tmp / f"stage-{records}")})
    full = run_child("stage", spec | {"out": str(tmp / "full")})
    same = all((tmp / "incremental" / p.name).read_bytes() == p.read_bytes() for p in (tmp / "full").iterdir())
    result = {"records_added": pq.ParquetFile(tonight[-1][0]).metadata.num_rows, "incremental": incremental, "full": full,
              "incremental_over_full": round(incremental["seconds"] / full["seconds"], 3), "byte_equal": same, "target": "<= 0.1"}
    print(f"one night of {result['records_added']:,} records: from the previous cleaning {incremental['seconds']} s, from scratch {full['seconds']} s: "
          f"{result['incremental_over_full']} (byte-equal: {same})")
    if not same:
        raise SystemExit("the cleaning from the previous one differs from the one from scratch")
    return result


def real_files(tmp: Path, args) -> list[dict]:
    """Each full NCBI file alone: parsed, snapshot with the default settings, cleaned."""
    found = []
    for seq, xml in enumerate(full_pubmed_files(), 1):
        parse_xml_file(xml, tmp / f"real-{seq}", source_file=xml.name, file_seq=seq)
        corpus = tmp / f"real-corpus-{seq}"
        build_snapshot([tmp / f"real-{seq}/articles.parquet"], [tmp / f"real-{seq}/deletions.parquet"], corpus, CorpusConfig())
        run = run_child("stage", {"corpus": str(corpus), "qa": str(tmp), "memory_limit": args.memory_limit, "workers": args.workers, "out": str(tmp / f"real-{seq}-clean")})
        report = json.loads((tmp / f"real-{seq}-clean" / "hygiene.json").read_text())
        found.append({"file": xml.name, "run": run, "report": report})
        print(f"{xml.name}: " + ", ".join(f"{r['rule']} {r['documents']}" for r in report["rules"] + report["strips"])
              + f"; kept with MEDLINE's other language: {report['kept_articles_not_english_in_medline']}")
    return found


if __name__ == "__main__":
    main()
