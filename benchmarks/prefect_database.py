"""Prefect's server under concurrent flow runs: the embedded SQLite against PostgreSQL (the served
stack's own cluster, deployments/postgres.py).

    python -m benchmarks.prefect_database [--flows 20] [--tasks 20] [--repeats 2]

For each database, a fresh `prefect server start` on loopback (its migrations done before the
clock starts); then --flows Python processes at once, each running one flow of --tasks tasks
against it (a task sleeps 0.1 s: what is measured is the server's bookkeeping). The databases
alternate (sqlite, postgres, sqlite, ...), so both see the machine in the same state. Recorded per
run: wall seconds until every process ended, flow runs that completed, runs that failed or were
refused (a process that exited non-zero, with the HTTP status it names), and the server log's
"database is locked" lines.

Writes benchmarks/results/prefect_database.json.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import write_result
from deployments import postgres
from flows.prefect_env import prefect_env, wait_healthy
from storage.processes import free_port, stop

FLOW = """
import sys, time
from prefect import flow, task

@task
def step(i: int) -> int:
    time.sleep(0.1)
    return i

@flow
def load(n: int) -> int:
    return sum(f.result() for f in [step.submit(i) for i in range(n)])

load(int(sys.argv[1]))
"""


def one_run(database: str, flows: int, tasks: int, work: Path) -> dict:
    home = work / "prefect"
    home.mkdir(parents=True)
    port = free_port()
    env = {**os.environ, **prefect_env(home), "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port)}
    env.pop("PREFECT_API_URL", None)
    cluster = None
    if database == "postgres":
        cluster = work / "postgres"
        if os.geteuid() == 0:
            work.chmod(0o755)
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = postgres.start(cluster)
    log_path = work / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        api = f"http://127.0.0.1:{port}/api"
        wait_healthy(api, server, log_path)
        script = work / "load.py"
        script.write_text(FLOW)
        client_env = {**env, "PREFECT_API_URL": api}
        start = time.perf_counter()
        processes = [subprocess.Popen([sys.executable, str(script), str(tasks)], env=client_env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True) for _ in range(flows)]
        errors = [p.communicate()[1] for p in processes]
        seconds = time.perf_counter() - start
    finally:
        stop(server)
        if cluster is not None:
            postgres.stop(cluster)
    failed = [e for p, e in zip(processes, errors) if p.returncode != 0]
    statuses = sorted({int(code) for e in failed for code in re.findall(r"'(\d{3}) [A-Z][a-z]", e)})
    return {
        "database": database,
        "seconds": round(seconds, 1),
        "completed": flows - len(failed),
        "failed": len(failed),
        "http_statuses_of_failures": statuses,
        "database_is_locked_lines": log_path.read_text().count("database is locked"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flows", type=int, default=20)
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    runs = []
    for repeat in range(args.repeats):
        for database in ("sqlite", "postgres"):
            with tempfile.TemporaryDirectory(prefix="medlm-bench-db-") as tmp:
                runs.append(one_run(database, args.flows, args.tasks, Path(tmp)) | {"repeat": repeat})
                print(runs[-1], flush=True)
    summary = {}
    for database in ("sqlite", "postgres"):
        mine = [r for r in runs if r["database"] == database]
        seconds = [r["seconds"] for r in mine]
        summary[database] = {
            "seconds_median": statistics.median(seconds), "seconds_min": min(seconds), "seconds_max": max(seconds),
            "completed": sum(r["completed"] for r in mine), "of": args.flows * len(mine),
            "database_is_locked_lines": sum(r["database_is_locked_lines"] for r in mine),
        }
    print(summary)
    write_result("prefect_database", {"flows": args.flows, "tasks_per_flow": args.tasks, "load_average": os.getloadavg(),
                                      "summary": summary, "runs": runs})


if __name__ == "__main__":
    main()
