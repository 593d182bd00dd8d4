"""`medlm worker --pool gpu`: this machine joins a served stack (`make up HOST=...` on the head) as
a worker of one pool, after checking what it needs.

    PREFECT_API_URL=http://10.0.0.5:4200/api PREFECT_API_AUTH_STRING=medlm:... \\
    MEDLM_REMOTE=s3://bucket/medlm MEDLM_STORE=/local/disk/store medlm worker --pool gpu

It says what it runs and where it connects (its commit and stage versions, the API, the store and
the remote, the folders runs may read, its cores), checks that the API answers to its
credentials and that the remote answers, retrying with back-off for a bounded time, and fails in
one line naming the endpoint and the setting when one does not. Then it is Prefect's process
worker, with this interpreter first on PATH (the pools' job template runs our engine as
`python`, deployments/deploy.py), named after this host and commit so the UI shows which code
each worker runs. A flow run whose stage versions differ from the deployments' is refused by the
engine (deployments/code.py).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

from deployments import code
from deployments.deploy import POOLS
from deployments.serve import worker_env
from flows.prefect_env import apply_prefect_defaults, project_home
from storage import default_root
from storage.access import data_roots
from storage.config import ArgumentParser
from storage.processes import usable_cores
from storage.settings import settings

PREFECT = Path(sys.executable).with_name("prefect")


class Unreachable(RuntimeError):
    """An endpoint this worker needs did not answer; the message names it and its setting."""


def retrying(what: str, attempt, timeout_s: float):
    """``attempt()``'s result, trying again with back-off (1, 2, 4 ... 30 s) until ``timeout_s``;
    Unreachable naming ``what`` and the last error when it never succeeds."""
    deadline, pause = time.time() + timeout_s, 1.0
    while True:
        try:
            return attempt()
        except Exception as error:  # noqa: BLE001 - whatever the client raises, reported in one line
            if time.time() + pause > deadline:
                raise Unreachable(f"{what} did not answer within {timeout_s:.0f} s ({type(error).__name__}: {' '.join(str(error).split())[:300]})") from None
            time.sleep(pause)
            pause = min(2 * pause, 30.0)


def check_api(pool: str, timeout_s: float) -> str:
    """The API answers to this worker's credentials and has ``pool``; its URL."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    if not api:
        raise Unreachable("PREFECT_API_URL is not set: give the head's API, e.g. PREFECT_API_URL=http://10.0.0.5:4200/api (make up HOST=... prints it)")

    async def read_pool():
        async with get_client() as client:
            try:
                return await client.read_work_pool(pool)
            except ObjectNotFound:
                raise Unreachable(f"the API at {api} has no work pool {pool!r}: run `make up` on the head (it creates the pools)") from None

    def attempt():
        try:
            return asyncio.run(read_pool())
        except Exception as error:
            if "401" in str(error):
                raise Unreachable(f"the API at {api} refused this worker's credentials: set PREFECT_API_AUTH_STRING to what `make up` printed on the head") from None
            raise

    retrying(f"the Prefect API at {api} (PREFECT_API_URL)", attempt, timeout_s)
    return api


def check_remote() -> str:
    """The remote answers (a listing); its URL, or a line saying there is none."""
    from storage.remote import REMOTE_SETTING, Remote

    remote = Remote.from_env()
    if remote is None:
        return f"none ({REMOTE_SETTING} unset: this machine's store alone; the other hosts' work is not seen here)"
    remote.refs("__probe__")  # retried with back-off by the remote itself; RemoteUnreachable names it
    return remote.url


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="medlm worker", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", required=True, choices=POOLS, help="The work pool to take runs from: cpu (ingestion, tokenizing, release) or gpu (training, evaluation).")
    parser.add_argument("--limit", type=int, default=None, help="Runs at once on this machine [default: 1 for gpu, no limit for cpu].")
    args = parser.parse_args(argv)
    apply_prefect_defaults()  # PREFECT_HOME; the credentials `make up` made, when this is the head
    timeout_s = settings().connect_timeout  # as the remote's
    here = code.record()
    api = check_api(args.pool, timeout_s)
    remote = check_remote()
    name = f"{socket.gethostname()}-{here['commit'][:12]}"
    limit = args.limit or (1 if args.pool == "gpu" else None)
    for line in (
        f"worker {name} for pool {args.pool}" + (f", {limit} run(s) at once" if limit else ""),
        f"  code:   commit {here['commit']}; stage versions {', '.join(f'{k} {v}' for k, v in here['stages'].items())}",
        f"  API:    {api}",
        f"  store:  {default_root().resolve()} (MEDLM_STORE)",
        f"  remote: {remote}",
        f"  reads:  {os.pathsep.join(map(str, data_roots()))} (MEDLM_DATA_ROOTS)",
        f"  cores:  {usable_cores()} (MEDLM_CORES)",
    ):
        print(line, flush=True)
    command = [str(PREFECT), "worker", "start", "--pool", args.pool, "--type", "process", "--name", name, *(["--limit", str(limit)] if limit else [])]
    # Runs start in the repository's folder (deployments/engine.py): this folder's store and home, as absolute paths.
    env = worker_env({**os.environ, "MEDLM_STORE": str(default_root().resolve()), "MEDLM_HOME": str(project_home())})
    os.execve(command[0], command, env)
