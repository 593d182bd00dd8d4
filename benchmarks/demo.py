"""`medlm demo` as a first visit sees it: on an empty store and a new Prefect home, then run again.

    python -m benchmarks.demo

Runs the installed `medlm demo` twice in a temporary folder (MEDLM_HOME, MEDLM_STORE): the first
run builds every stage and migrates a fresh Prefect database, the second finds every stage in the
store. Records each run's wall seconds, each stage's build seconds in the first, the artifacts the
second built (none), whether it printed the same evaluation table, the first run's table (the
rows README.md shows) and the load average. The installation (`make venv`) is not timed here.
Writes benchmarks/results/demo.json.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import write_result
from storage import Store

MEDLM = Path(sys.executable).parent / "medlm"


def run_demo(home: Path) -> dict:
    """One `medlm demo` in ``home``: its wall seconds, the load average after it, and the
    evaluation table it printed (README.md shows its rows)."""
    env = {**os.environ, "MEDLM_HOME": str(home), "MEDLM_STORE": str(home / "store")}
    env.pop("PREFECT_API_URL", None)  # the demo's own temporary server, as on a first visit
    started = time.perf_counter()
    done = subprocess.run([str(MEDLM), "demo"], cwd=home, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"medlm demo failed ({done.returncode}):\n{done.stderr[-3000:]}")
    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    return {"seconds": round(seconds, 1), "load_average_after": os.getloadavg(), "evaluation_table": table}


def stage_seconds(store: Store) -> dict[str, float]:
    """Each stage's build seconds, added over its artifacts, in the order the stages first built."""
    seconds: dict[str, float] = {}
    for artifact in sorted(store.ls(), key=lambda a: a.manifest["created"]):
        seconds[artifact.kind] = round(seconds.get(artifact.kind, 0.0) + artifact.manifest["build_seconds"], 1)
    return seconds


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="medlm-demo-") as folder:
        home = Path(folder)
        load_before = os.getloadavg()
        first = run_demo(home)
        store = Store(home / "store")
        built = len(store.ls())
        first["stage_seconds"] = stage_seconds(store)
        print(f"first run (empty store, new Prefect home): {first['seconds']} s, {built} artifacts built", flush=True)
        again = run_demo(home)
        again["artifacts_built"] = len(store.ls()) - built
        again["same_evaluation_table"] = again.pop("evaluation_table") == first["evaluation_table"]
        print(f"run again: {again['seconds']} s, {again['artifacts_built']} artifacts built")
    print("\n".join(f"  {stage:<10} {seconds:7.1f} s" for stage, seconds in first["stage_seconds"].items()))
    path = write_result("demo", {"cores": os.cpu_count(), "load_average_before": load_before, "first_run": first, "cached_rerun": again})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
