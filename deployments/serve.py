"""`make up` / `make down`: a Prefect server on loopback, on PostgreSQL, medlm's deployments, a worker per pool.

    python -m deployments.serve up [--port 4200] [--database postgres|sqlite] [options of deployments.deploy: --config RUN_CONFIG, ...]
    python -m deployments.serve down
    python -m deployments.serve clean   # down, and delete the PostgreSQL cluster up made

The server's database is a PostgreSQL cluster of our own (deployments/postgres.py: SQLite locks
under concurrent runs), or the database PREFECT_SERVER_DATABASE_CONNECTION_URL names, or with
`--database sqlite` the embedded SQLite file in PREFECT_HOME.

Nobody without the credentials reaches the API: Prefect's basic authentication is on, with a
random secret made once and kept in .medlm/api-auth (0600), or the operator's own
PREFECT_SERVER_API_AUTH_STRING ("user:password"); the workers `up` starts, the registration and
every `medlm` command of this project send it (PREFECT_API_AUTH_STRING), and the UI asks for it
once. A web page in the user's browser cannot use the API either: it has no credentials (nor
does a page that rebinds its own name to 127.0.0.1), CORS answers only the UI's origin, and every
write needs a CSRF token. The workers' pools fix what a worker runs (deployments/deploy.py,
deployments/engine.py). Where the store lives is the workers' environment (MEDLM_STORE, default
./.medlm/store), never a run parameter.

Each started process is recorded in .medlm/run/NAME.json with its PID and its start time (from
/proc), and `down` signals a PID only while it is still that process: a stale file left after a
reboot never kills an unrelated process that now has the same PID.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from deployments import postgres
from flows.prefect_env import apply_prefect_defaults, auth_file, project_home, server_command, wait_healthy
from storage import default_root
from storage.config import ArgumentParser
from storage.processes import process_start_time
from storage.settings import settings

PREFECT = Path(sys.executable).with_name("prefect")
POOLS = ("cpu", "gpu")


def run_dir() -> Path:
    return project_home() / "run"


def worker_env(env: dict[str, str]) -> dict[str, str]:
    """A worker's environment: ``env`` with this interpreter first on PATH, since the pools' job
    template runs `python -m deployments.engine` (deployments/deploy.py)."""
    return env | {"PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])}


def api_auth() -> str:
    """The API's credentials, "user:password": the operator's PREFECT_SERVER_API_AUTH_STRING, or
    a random one made on the first `up` and kept in .medlm/api-auth (0600)."""
    if own := os.environ.get("PREFECT_SERVER_API_AUTH_STRING"):
        return own
    path = auth_file()
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as secret:
            secret.write(f"medlm:{secrets.token_urlsafe(24)}\n")
    return path.read_text().strip()


def server_env(host: str, port: int) -> dict[str, str]:
    """The server's settings: this address and port, the UI's own origin only, CSRF tokens required."""
    origins = ",".join(dict.fromkeys([f"http://{host}:{port}", f"http://127.0.0.1:{port}", f"http://localhost:{port}"]))
    return {
        "PREFECT_SERVER_API_HOST": host,
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_UI_API_URL": f"http://{host}:{port}/api",  # what a browser on another machine calls
        "PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS": origins,
        "PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED": "true",
    }


def check_host(host: str) -> str:
    """The address to serve on: one this machine has, that browsers and workers can use as is."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise SystemExit(f"HOST={host}: give an IP address of this machine (e.g. 10.0.0.5), the one other hosts reach it by") from None
    if address.is_unspecified:
        raise SystemExit(f"HOST={host}: give the address other hosts reach this machine by, not {host}: the UI calls the API there too")
    return host


# -- processes we started -------------------------------------------------------------------------


def record(name: str, process: subprocess.Popen) -> None:
    run_dir().mkdir(parents=True, exist_ok=True)
    entry = {"pid": process.pid, "start_time": process_start_time(process.pid), "command": process.args}
    (run_dir() / f"{name}.json").write_text(json.dumps(entry, indent=2) + "\n")


def ours(entry: dict) -> bool:
    """Whether the recorded process is still running and is the one we started."""
    return entry.get("start_time") is not None and process_start_time(entry["pid"]) == entry["start_time"]


def start(name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen:
    log = open(run_dir() / f"{name}.log", "ab")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    record(name, process)
    return process


def stop_all(grace_s: float = 15) -> list[str]:
    """Stop every recorded process that is still ours: SIGINT, then SIGTERM to those still running
    after ``grace_s`` (a worker needs the second signal). A stale record is dropped unsignalled."""
    entries = {path: json.loads(path.read_text()) for path in sorted(run_dir().glob("*.json"))}
    report, running = [], {}
    for path, entry in entries.items():
        if ours(entry):
            running[path] = entry
        else:
            report.append(f"{path.stem}: PID {entry['pid']} is no longer the process `make up` started; not signalled")
            path.unlink()
    for sig in (signal.SIGINT, signal.SIGTERM):
        for entry in running.values():
            if ours(entry):
                os.kill(entry["pid"], sig)
        deadline = time.time() + grace_s
        while time.time() < deadline and any(ours(e) for e in running.values()):
            time.sleep(0.2)
    for path, entry in running.items():
        report.append(f"stopped {path.stem} (PID {entry['pid']})" if not ours(entry) else f"{path.stem}: PID {entry['pid']} did not stop")
        path.unlink()
    return report


# -- up and down ----------------------------------------------------------------------------------------


def up(host: str, port: int, database: str, deploy_args: list[str], workers: bool = True) -> None:
    apply_prefect_defaults()
    run_dir().mkdir(parents=True, exist_ok=True)
    auth, api = api_auth(), f"http://{check_host(host)}:{port}/api"
    client_env = worker_env({**os.environ, "PREFECT_API_URL": api, "PREFECT_API_AUTH_STRING": auth, "MEDLM_STORE": str(default_root().resolve())})
    client_env.pop("PREFECT_SERVER_API_AUTH_STRING", None)
    register = [sys.executable, "-m", "deployments.deploy", *deploy_args]
    if (run_dir() / "server.json").exists() and ours(json.loads((run_dir() / "server.json").read_text())):
        print("already up: registering the deployments again (what was changed in the UI is kept; `make down` stops the stack)", flush=True)
        subprocess.run(register, env=client_env, check=True)
        return
    env = {**os.environ, **server_env(host, port), "PREFECT_SERVER_API_AUTH_STRING": auth}
    if os.environ.get("PREFECT_SERVER_DATABASE_CONNECTION_URL"):
        print("database: PREFECT_SERVER_DATABASE_CONNECTION_URL's", flush=True)
    elif database == "postgres":
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = postgres.start()
        print(f"database: PostgreSQL in {postgres.cluster_dir()}, on 127.0.0.1:{postgres.port()} (loopback: the server is its only client)", flush=True)
    else:
        print(f"database: SQLite in {os.environ['PREFECT_HOME']}", flush=True)
    server = start("server", server_command(host, port, "warning"), env)
    print(f"waiting for the Prefect server on {host}:{port} ...", flush=True)
    wait_healthy(api, server, run_dir() / "server.log")
    subprocess.run(register, env=client_env, check=True)
    for pool in POOLS if workers else ():
        start(f"worker-{pool}", [str(PREFECT), "worker", "start", "--pool", pool, "--type", "process"], client_env)
    where = "PREFECT_SERVER_API_AUTH_STRING" if os.environ.get("PREFECT_SERVER_API_AUTH_STRING") else auth_file()
    print(f"API and UI: http://{host}:{port} (the server listens on {host}:{port}; store {client_env['MEDLM_STORE']}; logs and PIDs in {run_dir()})")
    print(f"The UI asks for a password once: {auth}  (kept in {where}; `medlm` commands here send it themselves)")
    if not ipaddress.ip_address(host).is_loopback:
        print(f"On another machine: PREFECT_API_URL={api} PREFECT_API_AUTH_STRING=... medlm worker --pool gpu (docs/cluster.md)")


def down(grace_s: float) -> None:
    for line in stop_all(grace_s):
        print(line)
    if postgres.stop():
        print(f"stopped PostgreSQL ({postgres.cluster_dir()})")


def clean(grace_s: float) -> None:
    """`make down`, then the PostgreSQL cluster's folder deleted when it is ours (not MEDLM_POSTGRES_DIR's)."""
    down(grace_s)
    if not settings().postgres_dir and postgres.remove():
        print(f"removed PostgreSQL's folder {postgres.cluster_dir()}")


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    start_parser = sub.add_parser("up", help="Start the server, register the deployments, start the workers.")
    start_parser.add_argument("--port", type=int, default=4200)
    start_parser.add_argument("--workers", action=argparse.BooleanOptionalAction, default=True,
                              help="Start a worker per pool here too (--no-workers: this machine only serves; workers join with `medlm worker`).")
    start_parser.add_argument("--host", default="127.0.0.1", help="The address to serve the API and UI on: this machine's, as other hosts reach it [default: 127.0.0.1, this machine only].")
    start_parser.add_argument("--database", choices=("postgres", "sqlite"), default="postgres",
                              help="The server's database (PREFECT_SERVER_DATABASE_CONNECTION_URL, if set, wins) [default: postgres].")
    for action, text in (("down", "Stop exactly the processes `up` started."), ("clean", "`down`, and delete the PostgreSQL cluster `up` made.")):
        sub.add_parser(action, help=text).add_argument("--grace", type=float, default=15, help="Seconds between SIGINT and SIGTERM.")
    args, deploy_args = parser.parse_known_args(argv)  # the rest goes to deployments.deploy (--config, --gpu-slots, ...)
    if args.action == "up":
        up(args.host, args.port, args.database, deploy_args, args.workers)
    else:
        {"down": down, "clean": clean}[args.action](args.grace)


if __name__ == "__main__":
    main()
