"""`medlm demo` as a first visit sees it: on an empty store and a new Prefect home, then run again.

    python -m benchmarks.demo

Runs the installed `medlm demo` twice in a temporary folder (MEDLM_HOME, MEDLM_STORE): the first
run builds every stage and migrates a fresh Prefect database, the second finds every stage in the
store. Records each run's wall seconds, the demo's closing table (each stage's build seconds) and
the load average. The installation (`make venv`) is not timed here. Writes benchmarks/results/demo.json.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import write_result

MEDLM = Path(sys.executable).parent / "medlm"
TIME_TABLE = "Where the time went"


def run_demo(home: Path) -> dict:
    env = {**os.environ, "MEDLM_HOME": str(home), "MEDLM_STORE": str(home / "store")}
    env.pop("PREFECT_API_URL", None)  # the demo's own temporary server, as on a first visit
    started = time.perf_counter()
    done = subprocess.run([str(MEDLM), "demo"], cwd=home, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"medlm demo failed ({done.returncode}):\n{done.stderr[-3000:]}")
    table = done.stdout[done.stdout.index(TIME_TABLE):].strip().splitlines()
    return {"seconds": round(seconds, 1), "load_average_after": os.getloadavg(), "time_table": table}


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="medlm-demo-") as folder:
        load_before = os.getloadavg()
        first = run_demo(Path(folder))
        print(f"first run (empty store, new Prefect home): {first['seconds']} s", flush=True)
        again = run_demo(Path(folder))
        print(f"run again (every stage cached): {again['seconds']} s")
        print("\n".join(first["time_table"]))
    path = write_result("demo", {"cores": os.cpu_count(), "load_average_before": load_before, "first_run": first, "cached_rerun": again})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
