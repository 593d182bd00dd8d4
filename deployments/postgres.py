"""The served stack's database: a PostgreSQL cluster of our own, started and stopped by `make up` and
`make down` like the server (SQLite stays for `make demo` and one-shot commands).

Prefect on SQLite locks under concurrent runs: 20 flows of 20 tasks at once took 81-139 s on
SQLite, with "database is locked" in the server's log, and 21 s on PostgreSQL 15 with no lock
(benchmarks/prefect_database.py, 2 cores; an earlier session saw SQLite refuse 2 of 20 runs with
503). Prefect needs PostgreSQL >= 14.9 and the pg_trgm extension, which its migration creates
(we are the cluster's superuser).

The cluster lives in MEDLM_POSTGRES_DIR: `data/` (initdb's), `port` (chosen once, so psql finds
it again), `password` (0600, random: the cluster listens on loopback only, and asks every
connection for it). PostgreSQL refuses to run as root, so when we are root initdb and pg_ctl run
as the `postgres` user, which must be able to reach the folder: a clone under /root (0700) is out
of its reach, so as root the default is a folder of the postgres user's own home, one per project
(`~postgres/medlm/HASH`, 0700, owned by postgres; `make clean` removes it); otherwise
.medlm/postgres. With PREFECT_SERVER_DATABASE_CONNECTION_URL set, `make up` uses that database
instead and starts none.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import secrets
import shutil
import subprocess
from pathlib import Path

from flows.prefect_env import project_home
from storage.processes import free_port
from storage.settings import settings

MIN_VERSION = (14, 9)
DATABASE = "prefect"
SUPERUSER = "postgres"


class PostgresError(RuntimeError):
    """The cluster could not be made or started; the message says what to do."""


def cluster_dir() -> Path:
    if setting := settings().postgres_dir:
        return setting.resolve()
    if os.geteuid() != 0:
        return project_home() / "postgres"
    project = hashlib.sha256(str(project_home()).encode()).hexdigest()[:16]
    return Path(_postgres_user().pw_dir) / "medlm" / project


def _postgres_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(SUPERUSER)
    except KeyError:
        raise PostgresError("running as root, and there is no `postgres` user to run PostgreSQL as (Debian's package creates it)") from None


def bin_dir() -> Path:
    """The newest PostgreSQL's programs: Debian's /usr/lib/postgresql/N/bin, else pg_ctl's folder on PATH."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    pg_ctl = found[-1] if found else shutil.which("pg_ctl")
    if not pg_ctl:
        raise PostgresError(
            "PostgreSQL is not installed: `apt-get install -y postgresql` (Debian), or set PREFECT_SERVER_DATABASE_CONNECTION_URL "
            "to an existing database (postgresql+asyncpg://...), or `make up DB=sqlite` for the embedded SQLite"
        )
    folder = Path(pg_ctl).parent
    version = subprocess.run([str(folder / "pg_ctl"), "--version"], capture_output=True, text=True, check=True).stdout
    numbers = tuple(int(n) for n in re.search(r"(\d+)\.(\d+)", version).groups())
    if numbers < MIN_VERSION:
        raise PostgresError(f"{version.strip()} is older than Prefect needs ({'.'.join(map(str, MIN_VERSION))}); install a newer PostgreSQL")
    return folder


def _as_owner() -> dict:
    """Popen arguments that run a PostgreSQL program as the cluster's owner: ourselves, or the
    `postgres` user when we are root (PostgreSQL will not run as root)."""
    if os.geteuid() != 0:
        return {}
    user = _postgres_user()
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, **_as_owner(), **kwargs)


def _init(folder: Path, bins: Path) -> None:
    """initdb a new cluster in folder/data, owned by whoever runs PostgreSQL, with a random password."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    password = secrets.token_urlsafe(24)
    secret = folder / "password"
    secret.write_text(password + "\n")
    secret.chmod(0o600)
    owner = _as_owner()
    pwfile = folder / "initdb-password"  # readable by the owner only, removed once initdb has read it
    pwfile.write_text(password + "\n")
    if owner:
        ours = [folder, pwfile]
        if not settings().postgres_dir:  # the default, ~postgres/medlm/HASH: its parent is private to postgres too
            folder.parent.chmod(0o700)
            ours.append(folder.parent)
        for path in ours:
            os.chown(path, owner["user"], owner["group"])
    pwfile.chmod(0o600)
    try:
        done = _run([str(bins / "initdb"), "-D", str(folder / "data"), "-U", SUPERUSER, "--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8"])
    finally:
        pwfile.unlink(missing_ok=True)
    if done.returncode != 0:
        unreachable = "Permission denied" in done.stderr and owner
        raise PostgresError(
            f"initdb in {folder / 'data'} failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}"
            + (f"; the postgres user cannot reach that folder: set MEDLM_POSTGRES_DIR to one it can (e.g. under {_postgres_user().pw_dir})" if unreachable else "")
        )
    (folder / "port").write_text(f"{free_port()}\n")


def port(folder: Path | None = None) -> int:
    """The port the cluster listens on, on 127.0.0.1 (chosen when it was made)."""
    return int(((folder or cluster_dir()) / "port").read_text())


def running(folder: Path | None = None) -> bool:
    folder = folder or cluster_dir()
    if not (folder / "data" / "PG_VERSION").is_file():
        return False
    return _run([str(bin_dir() / "pg_ctl"), "-D", str(folder / "data"), "status"]).returncode == 0


def start(folder: Path | None = None) -> str:
    """Make (once) and start the cluster, create the database; its SQLAlchemy URL for Prefect."""
    folder, bins = folder or cluster_dir(), bin_dir()
    if not (folder / "data" / "PG_VERSION").is_file():
        _init(folder, bins)
    listening = port(folder)
    if not running(folder):
        options = f"-p {listening} -k {folder / 'data'} -c listen_addresses=127.0.0.1"
        done = _run([str(bins / "pg_ctl"), "-D", str(folder / "data"), "-o", options, "-l", str(folder / "data" / "server.log"), "-w", "start"])
        if done.returncode != 0:
            log = (folder / "data" / "server.log").read_text()[-2000:] if (folder / "data" / "server.log").exists() else ""
            raise PostgresError(f"PostgreSQL did not start on 127.0.0.1:{listening}: {done.stderr.strip() or done.stdout.strip()}\n{log}")
    password = (folder / "password").read_text().strip()
    env = {**os.environ, "PGPASSWORD": password}
    psql = [str(bins / "psql"), "-h", "127.0.0.1", "-p", str(listening), "-U", SUPERUSER, "-d", "postgres", "-tAc"]
    exists = subprocess.run([*psql, f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"], env=env, capture_output=True, text=True, check=True)
    if exists.stdout.strip() != "1":
        subprocess.run([*psql, f"CREATE DATABASE {DATABASE}"], env=env, capture_output=True, text=True, check=True)
    return f"postgresql+asyncpg://{SUPERUSER}:{password}@127.0.0.1:{listening}/{DATABASE}"


def remove(folder: Path | None = None) -> bool:
    """Stop the cluster and delete its folder, the database with it; whether there was one."""
    folder = folder or cluster_dir()
    if not folder.exists():
        return False
    if (folder / "data" / "PG_VERSION").is_file():
        stop(folder)
    shutil.rmtree(folder)
    return True


def stop(folder: Path | None = None) -> bool:
    """Stop the cluster if it runs; whether it did."""
    folder = folder or cluster_dir()
    if not running(folder):
        return False
    _run([str(bin_dir() / "pg_ctl"), "-D", str(folder / "data"), "-m", "fast", "-w", "stop"], check=True)
    return True
