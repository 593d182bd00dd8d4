"""Environment every Prefect process of ours needs (server, worker, flow run, test): the PREFECT_*
variables, and the temporary server a command runs its flows on. Our own MEDLM_* settings are
storage/settings.py's.

Measured on our machines (see the team's NOTES-prefect.md): telemetry lookups fail offline and
have locked SQLite; a fresh database's migrations take ~25 s, over the 20 s default start-up
timeout of the ephemeral server; each project wants its own PREFECT_HOME so two servers never
share one SQLite file, and that folder must exist before a server starts (Prefect does not
create it, and then fails with "unable to open database file"). Stage code logs to "medlm.*"
loggers, which Prefect then shows per run.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import subprocess
import sys
import time
import urllib.request
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, Iterator

from storage.processes import die_with_parent, free_port, process_start_time, stop
from storage.settings import settings, variable


def project_home() -> Path:
    return settings().home.resolve()


def prefect_env(home: Path | None = None) -> dict[str, str]:
    return {
        "PREFECT_HOME": str((home or project_home() / "prefect").resolve()),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "600",  # Prefect's own temporary server, should one start (ours: wait_healthy)
        "PREFECT_LOGGING_EXTRA_LOGGERS": "medlm",
        # Stage code also runs outside flows (CLI, torchrun, tests): its logs then go to the console only.
        "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    }


def auth_file() -> Path:
    """The served API's credentials, "user:password", made by `make up` (deployments/serve.py)."""
    return project_home() / "api-auth"


def apply_prefect_defaults() -> None:
    """Set the defaults above where the environment does not say otherwise, and create
    PREFECT_HOME; call it before importing prefect. A command that talks to a served API
    (PREFECT_API_URL) sends the credentials `make up` made here, unless told others."""
    for name, value in prefect_env().items():
        os.environ.setdefault(name, value)
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    if os.environ.get("PREFECT_API_URL") and not os.environ.get("PREFECT_API_AUTH_STRING") and auth_file().is_file():
        os.environ["PREFECT_API_AUTH_STRING"] = auth_file().read_text().strip()


def wait_healthy(api: str, server: subprocess.Popen, log: Path) -> None:
    """Poll the API until it answers, for as long as the server process lives: on a loaded machine
    a fresh database's migration alone took over 90 s. A limit (MEDLM_SERVER_START_TIMEOUT, 600 s)
    only catches a server that hangs; the error says which setting to raise."""
    limit = settings().server_start_timeout
    deadline = time.time() + limit
    while True:
        try:
            urllib.request.urlopen(f"{api}/health", timeout=2)
            return
        except OSError:
            tail = log.read_text()[-3000:].strip() if log.is_file() else ""
            if server.poll() is not None:
                raise RuntimeError(f"the Prefect server ended (status {server.returncode}) before it answered; {log}:\n{tail or '(empty)'}") from None
            if time.time() > deadline:
                raise RuntimeError(
                    f"the Prefect server was still starting after {limit:.0f} s (a loaded machine? raise {variable('server_start_timeout')}); "
                    f"{log}:\n{tail or '(empty: nothing logged yet, no error)'}"
                ) from None
            time.sleep(0.2)


def send_prefect_backlog(timeout_s: float = 30) -> None:
    """Wait for Prefect's background workers to send the events and run logs they still hold:
    then a server about to stop has everything, and a command's last line is its own (they
    otherwise log "Still processing items" on the way out, after it)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (EventsWorker, APILogWorker):
        worker.drain_all(timeout=timeout_s)


def server_command(host: str, port: int, log_level: str) -> list[str]:
    """The command that serves ``server_app`` (our temporary servers' and `make up`'s)."""
    return [sys.executable, "-m", "uvicorn", "--factory", "flows.prefect_env:server_app", "--host", host, "--port", str(port),
            "--log-level", log_level, "--lifespan", "on"]


def server_app():
    """Prefect's server app, answering 503 (try again) where no database connection came free in
    time. Prefect answers that with a 500, which its clients do not retry: a flow run's engine then
    exits, and its worker marks the run Crashed (1 of 20 runs at once, at load average 20-38 on 2
    cores). Its clients retry a 503 with backoff, as for the busy-database errors Prefect already
    answers with one."""
    import sqlalchemy
    from prefect.server.api.server import create_app
    from starlette.responses import JSONResponse, PlainTextResponse

    def answer_503_when_no_connection_is_free(app) -> None:
        otherwise = app.exception_handlers.get(Exception)

        async def internal_error(request, exc: Exception):
            if isinstance(exc, sqlalchemy.exc.TimeoutError):
                return JSONResponse({"exception_message": "Service Unavailable: no database connection came free in time"}, status_code=503)
            return await otherwise(request, exc) if otherwise else PlainTextResponse("Internal Server Error", status_code=500)

        app.add_exception_handler(Exception, internal_error)

    app = create_app()
    answer_503_when_no_connection_is_free(app)  # its CSRF middleware reads the database
    answer_503_when_no_connection_is_free(app.api_app)  # the routes
    return app


@contextmanager
def temporary_server() -> Iterator[Callable[[], None]]:
    """A Prefect server for this command's flow runs, on PREFECT_HOME's database, when
    PREFECT_API_URL names none. Yields ``ready``, which waits until it answers: it starts at once,
    before Prefect is imported here, so the command's imports and checks run while it starts (on 2
    cores, 4.4 s of start-up beside 2-3 s of imports), and a command refused before ``ready``
    stops it unused.

    Prefect would start one itself (in a thread, logging on its way out); this one is started
    from the calling thread with the parent-death signal, so it dies with the command, SIGKILL
    included, and one command at a time starts a server on one home (a file lock): two first
    starts would race on the SQLite migration. Its log: PREFECT_HOME/temporary-server.log.
    """
    if os.environ.get("PREFECT_API_URL"):
        yield lambda: None
        return
    auth = f"medlm:{secrets.token_urlsafe(24)}"  # nobody else on the machine reaches it either
    home = Path(os.environ["PREFECT_HOME"])
    log_path = home / "temporary-server.log"
    global _temporary_api
    with ExitStack() as starting:
        lock, log = starting.enter_context(open(home / "server-start.lock", "w")), starting.enter_context(open(log_path, "ab"))
        fcntl.flock(lock, fcntl.LOCK_EX)
        port = free_port()
        ephemeral = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}  # as Prefect's own
        server = subprocess.Popen(
            server_command("127.0.0.1", port, "error"),
            env={**os.environ, **ephemeral, "PREFECT_SERVER_API_AUTH_STRING": auth}, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent,
        )
        api = f"http://127.0.0.1:{port}/api"
        from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings  # imports Prefect, beside the start

        if PREFECT_API_URL.value():  # a Prefect profile names a server: that one
            stop(server)
            starting.close()
            yield lambda: None
            return

        def ready() -> None:
            wait_healthy(api, server, log_path)
            starting.close()  # the lock: the next command's server may start

        try:
            _temporary_api = api
            with temporary_settings({PREFECT_API_URL: api, PREFECT_API_AUTH_STRING: auth}):
                yield ready
        finally:
            _temporary_api = None
            stop(server)


_temporary_api: str | None = None  # the API of this process's temporary server, while it runs


def _leases() -> Path:
    return Path(os.environ["PREFECT_HOME"]) / "command-runs"


def _server() -> str:
    """Which server a run is on: a temporary server's database is PREFECT_HOME's, whatever port it
    listened on; another server is its URL."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    return "PREFECT_HOME" if url == _temporary_api else url


def leased(flow):
    """``flow``, whose runs note while they run which process runs them (PREFECT_HOME/command-runs/
    RUN_ID.json): a command killed by SIGKILL or the out-of-memory killer cannot say its run
    crashed, so the next command does (``crash_orphaned_runs``)."""
    def note(flow, flow_run, state) -> None:
        _leases().mkdir(parents=True, exist_ok=True)
        lease = {"pid": os.getpid(), "start_time": process_start_time(os.getpid()), "server": _server()}
        (_leases() / f"{flow_run.id}.json").write_text(json.dumps(lease))

    return flow.with_options(on_running=[note])


def settle_leases(message: str) -> list[str]:
    """Once this process's flow calls have returned or raised: mark Crashed, with ``message``,
    those of its runs that are not final (a run Prefect could not end on the way out: SIGTERM
    during training, say), and drop its notes; the ids marked."""
    return _crash([lease for lease in _leases().glob("*.json") if json.loads(lease.read_text())["pid"] == os.getpid()], message)


def crash_orphaned_runs() -> list[str]:
    """Mark Crashed the runs of this server that a command on this machine left Running when it was
    killed (its process is gone); their ids."""
    orphans = []
    for lease in _leases().glob("*.json"):
        note = json.loads(lease.read_text())
        if note["server"] == _server() and process_start_time(note["pid"]) != note["start_time"]:
            orphans.append(lease)
    return _crash(orphans, "the medlm command running it ended without a word (killed by SIGKILL or the out-of-memory killer?)")


def _crash(leases: list[Path], message: str) -> list[str]:
    """Mark Crashed the flow runs of these notes that are not in a final state, and remove the notes; their ids."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    crashed = []

    async def crash() -> None:
        async with get_client() as client:
            for lease in leases:
                run = await client.read_flow_run(lease.stem)
                if run.state is not None and not run.state.is_final():
                    await client.set_flow_run_state(run.id, Crashed(message=message), force=True)
                    crashed.append(lease.stem)

    if leases:
        asyncio.run(crash())
        for lease in leases:
            lease.unlink(missing_ok=True)
    return crashed
