"""What every benchmark records beside its figures: the machine, the commit and the command."""

from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


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
