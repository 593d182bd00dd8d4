"""Environment every Prefect process of ours needs (server, worker, flow run, test).

Measured on our machines (see the team's NOTES-prefect.md): telemetry lookups fail offline and
have locked SQLite; a fresh database's migrations take ~25 s, over the 20 s default start-up
timeout of the ephemeral server; each project wants its own PREFECT_HOME so two servers never
share one SQLite file, and that folder must exist before a server starts (Prefect does not
create it, and then fails with "unable to open database file"). Stage code logs to "medlm.*"
loggers, which Prefect then shows per run.
"""

from __future__ import annotations

import os
from pathlib import Path


def project_home() -> Path:
    return Path(os.environ.get("MEDLM_HOME", ".medlm")).resolve()


def prefect_env(home: Path | None = None) -> dict[str, str]:
    return {
        "PREFECT_HOME": str((home or project_home() / "prefect").resolve()),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "PREFECT_LOGGING_EXTRA_LOGGERS": "medlm",
        # Stage code also runs outside flows (CLI, torchrun, tests): its logs then go to the console only.
        "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    }


def apply_prefect_defaults() -> None:
    """Set the defaults above where the environment does not say otherwise, and create
    PREFECT_HOME; call it before importing prefect."""
    for name, value in prefect_env().items():
        os.environ.setdefault(name, value)
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
