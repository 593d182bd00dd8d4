"""Aggregate parse throughput in 1, 2, 4, ... worker processes, the way the ingest flow parses.

    python -m benchmarks.parse_scaling [--copies 4] [--max-workers N]

Copies of the two full NCBI files (30,000 and 20,788 articles, see benchmarks/common.py), under
new names and sequence numbers, are downloaded into a temporary store from a local mirror; then,
for each N up to the cores this process may use, every file is parsed through the store exactly
as the flow's parse tasks do it: N threads each run ``PARSE.run(..., build_in=pool)``, the build
in one of N worker processes forked from a server that imported the parse stage once
(``flows.stage.builds_in_processes``). N=1 is measured both in one worker process (the base of
the efficiency figure, 0.85 x N x that rate being the target) and in the calling process (what
``workers=1`` does). The wall clock includes starting the processes, hashing the outputs and
writing the manifests. Prefect's own bookkeeping per task (a thread here) is not included.

It also records what a worker process holds: its peak RSS after parsing, the packages it has
imported, the cost of its cold start and of one round trip to it.

Keep this module's top-level imports to the standard library: a worker process runs it again
as its main module (``multiprocessing``'s rule), and would otherwise import more than it parses with.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.common import allow_reading, full_pubmed_files, write_result

HEAVY = ("prefect", "duckdb", "distributed", "dask", "torch", "tokenizers", "transformers", "flows")


def worker_probe() -> dict:
    """Run in a worker process: what it holds."""
    import sys

    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    packages = {name.split(".")[0] for name in sys.modules}
    return {
        "pid": os.getpid(),
        "peak_rss_mb": round(int(status["VmHWM"].split()[0]) / 1024, 1),
        "rss_mb": round(int(status["VmRSS"].split()[0]) / 1024, 1),
        "imports_heavy_packages": sorted(packages & set(HEAVY)),
        "imports_parse_stack": sorted(packages & {"tasks", "storage", "lxml", "pyarrow", "numpy", "isal", "pydantic"}),
    }


def mirror_of_copies(folder: Path, copies: int) -> None:
    """An NCBI-style mirror (baseline/ + .md5) holding ``copies`` of each full file, renamed."""
    import hashlib

    baseline = folder / "baseline"
    baseline.mkdir(parents=True)
    seq = 1
    for original in full_pubmed_files():
        md5 = hashlib.md5(original.read_bytes()).hexdigest()
        for _ in range(copies):
            name = f"pubmed25n{seq:04d}.xml.gz"
            os.link(original, baseline / name)
            (baseline / f"{name}.md5").write_text(f"MD5({name})= {md5}\n")
            seq += 1


def parse_all(store, downloads: list, workers: int, in_process: bool = False) -> dict:
    """Parse every download through the store with ``workers`` worker processes (or in this
    process); the wall clock and this process's CPU time."""
    from contextlib import nullcontext

    from flows.stage import _build_processes, builds_in_processes
    from storage import remove_tree
    from tasks.parse import PARSE, ParseConfig

    for folder in (store.root / "parse", store.root / ".verified" / "parse"):
        if folder.exists():
            remove_tree(folder)
    load_before = os.getloadavg()[0]
    cpu0, t0 = time.process_time(), time.perf_counter()
    with nullcontext() if in_process else builds_in_processes(workers, PARSE):
        pool = _build_processes()
        with ThreadPoolExecutor(workers) as threads:
            parsed = list(threads.map(lambda d: PARSE.run(store, {"download": d}, ParseConfig(), build_in=pool), downloads))
        wall = time.perf_counter() - t0
        probe = pool.submit(worker_probe).result() if pool else None
        # The workers' own CPU time (a benchmark may look at the pool's private process table).
        worker_cpu = sum(_cpu_seconds(pid) for pid in pool._processes) if pool else time.process_time() - cpu0
    articles = sum(p.summary["articles"] for p in parsed)
    return {
        "workers": workers,
        "where": "the calling process" if in_process else f"{workers} worker process(es)",
        "files": len(parsed),
        "articles": articles,
        "wall_s": round(wall, 2),
        "articles_per_s": round(articles / wall),
        "calling_process_cpu_s": round(time.process_time() - cpu0, 2),
        "parse_cpu_s": round(worker_cpu, 2),
        # How many cores the parse got on average: under N when other work shares the machine.
        "cores_obtained": round(worker_cpu / wall, 2),
        "articles_per_cpu_s": round(articles / worker_cpu),
        "load_average_1min_before": round(load_before, 2),
        "worker": probe,
    }


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_up() -> dict:
    """A worker's cold start (forkserver + the parse stage's imports, once per process) and one
    round trip to a warm worker (what each further file costs beside its parse)."""
    from flows.stage import _build_processes, builds_in_processes
    from tasks.parse import PARSE

    t0 = time.perf_counter()
    with builds_in_processes(1, PARSE):
        pool = _build_processes()
        pool.submit(os.getpid).result()
        cold = time.perf_counter() - t0
        t1 = time.perf_counter()
        for _ in range(200):
            pool.submit(os.getpid).result()
        warm = (time.perf_counter() - t1) / 200
    return {"cold_start_s": round(cold, 3), "round_trip_ms": round(warm * 1000, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=4, help="copies of each full file (2 x COPIES files in all)")
    parser.add_argument("--max-workers", type=int, default=len(os.sched_getaffinity(0)), help="up to this many processes (default: the cores this process may use)")
    args = parser.parse_args()
    if len(full_pubmed_files()) < 2:
        raise SystemExit("the full NCBI files could not be fetched (see benchmarks/common.py); no scaling figures without them")
    from storage import Store
    from tasks.download import DOWNLOAD, SourceConfig, select_files

    counts = [1]
    while counts[-1] * 2 <= args.max_workers:
        counts.append(counts[-1] * 2)
    if counts[-1] != args.max_workers:
        counts.append(args.max_workers)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        tmp = Path(tmp)
        allow_reading(tmp)
        mirror_of_copies(tmp / "mirror", args.copies)
        store = Store(tmp / "store")
        downloads = [DOWNLOAD.run(store, {}, remote) for remote in select_files(SourceConfig(source=str(tmp / "mirror"), folders=("baseline",)))]
        startup = start_up()
        print(f"worker start-up: {startup['cold_start_s']} s cold (once per process), {startup['round_trip_ms']} ms a round trip")
        runs = [parse_all(store, downloads, 1, in_process=True)]
        for workers in counts:
            runs.append(parse_all(store, downloads, workers))
        shutil.rmtree(tmp / "store", ignore_errors=True)
    base = next(r for r in runs if r["workers"] == 1 and r["worker"])["articles_per_s"]
    for run in runs:
        run["efficiency_vs_n_times_one_process"] = round(run["articles_per_s"] / (run["workers"] * base), 3)
        print(
            f"{run['where']:>24}: {run['articles']:,} articles in {run['files']} files, {run['wall_s']} s, "
            f"{run['articles_per_s']:,} articles/s, efficiency {run['efficiency_vs_n_times_one_process']}; "
            f"{run['articles_per_cpu_s']:,} articles per CPU-s on {run['cores_obtained']} cores obtained "
            f"(load before {run['load_average_1min_before']})"
        )
    result = {
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "copies_of_each_full_file": args.copies,
        "target": "articles_per_s(N) >= 0.85 x N x articles_per_s(1 worker process)",
        "start_up": startup,
        "runs": runs,
        "note": "the machine is shared: load_average_1min_before is the load other work put on it",
    }
    print(f"wrote {write_result('parse_scaling', result)}")


if __name__ == "__main__":
    main()
