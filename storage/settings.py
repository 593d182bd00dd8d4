"""The settings of a process: every MEDLM_* environment variable, read here and nowhere else.

A setting belongs to the process that runs (the `medlm` command, a worker and the runs it starts),
never to a run. ``settings()`` reads the environment when asked, since tests and our own code
change it at run time (a benchmark widens MEDLM_DATA_ROOTS, a stage passes MEDLM_PARENT_PID to
the processes it starts); a parse is kept per set of MEDLM_* values, so asking costs a lookup per
variable. A value that does not parse is one line naming the variable, the value and what is
expected. `medlm settings` prints them all, with where each came from; docs/running.md's tables
are checked against the descriptions below (tests/test_docs.py).

An empty variable counts as unset, except a list's: ``MEDLM_SOURCES=`` allows no download at all.

Not to be confused with flows/prefect_env.py: the PREFECT_* environment our Prefect processes need.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import textwrap
import typing
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, AliasGenerator, BeforeValidator, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PREFIX = "MEDLM_"
REPO = Path(__file__).resolve().parents[1]
NCBI_PUBMED = "https://ftp.ncbi.nlm.nih.gov/pubmed"
BUNDLED_DATA = REPO / "tests" / "data"


def variable(name: str) -> str:
    """The environment variable of setting ``name``."""
    return PREFIX + name.upper()


class SettingsError(ValueError):
    """A MEDLM_* variable holds a value that does not parse; the message names it and what is expected."""


def _split(separators: str):
    """A list setting's parser: its items between ``separators`` (a regex), empty ones dropped."""
    return BeforeValidator(lambda value: tuple(s for s in re.split(separators, value) if s.strip()) if isinstance(value, str) else value)


# NoDecode: pydantic-settings would read a list from the environment as JSON.
Folders = Annotated[tuple[Path, ...], NoDecode, _split(re.escape(os.pathsep))]
Words = Annotated[tuple[str, ...], NoDecode, _split(r"[\s,]+")]
Seconds = Annotated[float, Field(gt=0)]


def remote_url(url: str) -> str:
    """``url`` if it names a remote the store can use."""
    if not url.startswith(("s3://", "file://")):
        raise ValueError("expected s3://bucket/prefix or file:///path")
    return url


# A default derived from something else: its docstring is what `medlm settings` and the docs say it is.
def _store_under_home(values: dict) -> Path:
    """MEDLM_HOME/store"""
    return values["home"] / "store"


def _this_machine() -> tuple[str, ...]:
    """this machine: 127.0.0.1, localhost, its hostname"""
    return "127.0.0.1", "localhost", socket.gethostname()


def _bench_cache() -> Path:
    """~/.cache/medlm/bench"""
    return Path("~/.cache/medlm/bench").expanduser()


class Settings(BaseSettings):
    """Every MEDLM_* setting. A field's name is its variable's, without the prefix; its description
    is what `medlm settings` and docs/running.md say of it."""

    # Each field read from exactly its variable (case included): the parse is kept per their values.
    model_config = SettingsConfigDict(alias_generator=AliasGenerator(validation_alias=variable), case_sensitive=True, frozen=True, extra="ignore")

    home: Path = Field(Path(".medlm"), description="The project's folder: Prefect's home (prefect/), the served stack's credentials, logs and PostgreSQL cluster (when not root).")
    store: Path = Field(default_factory=_store_under_home, description="The artifact store's folder (on each machine: its local copies).")
    remote: Annotated[str, AfterValidator(remote_url)] | None = Field(
        None, description="The remote the stores of several machines share artifacts through, s3://bucket/prefix (AWS_* settings) or file:///shared/path (docs/cluster.md); unset: none.")
    connect_timeout: Seconds = Field(120, description="Seconds the remote and `medlm worker`'s checks retry, with back-off, before failing in one line.")
    data_roots: Folders = Field((BUNDLED_DATA,), description="Folders (:-separated) whose files a run may read: local mirrors, exclusion lists, QA data, Hugging Face models.")
    sources: Words = Field((NCBI_PUBMED,), description="URLs (space- or comma-separated) a run may download PubMed from, and below them.")
    dask_address: str | None = Field(None, description="The Dask scheduler ingest parses on; unset: worker processes on this machine.")
    rendezvous_hosts: Words = Field(default_factory=_this_machine, description="The hosts (space- or comma-separated) a multi-node training may meet at.")
    cores: int | None = Field(None, ge=1, description="The cores this process may use (torch threads, worker processes), its share of a shared machine; unset: what the affinity mask and the cgroup's CPU quota allow.")
    server_start_timeout: Seconds = Field(600, description="Seconds a Prefect server we start may take to answer while its process lives.")
    postgres_dir: Path | None = Field(None, description="The PostgreSQL cluster of `make up`; unset: MEDLM_HOME/postgres, or as root ~postgres/medlm/HASH (its owner must reach it).")
    datasets: Words = Field((), description="Dataset modules (space- or comma-separated) registered beside tasks/qa/registry.py's own: a plugin's, a test's; every process that runs medlm needs them.")
    debug: bool = Field(False, description="1: a failing command shows its traceback, as --debug does.")
    parent_pid: int | None = Field(None, description="Set by a stage for the processes it starts: the process they end with (storage/dies_with_parent.py).")
    bench_results: Path = Field(REPO / "benchmarks" / "results", description="Where benchmarks record their figures (`make bench`: a quick run's folder).")
    bench_cache: Path = Field(default_factory=_bench_cache, description="Where benchmarks keep the full-size NCBI files they download.")

    @model_validator(mode="before")
    @classmethod
    def _empty_is_unset(cls, values: dict) -> dict:
        return {name: value for name, value in values.items() if value != "" or name in _LISTS}


VARIABLES = {name: variable(name) for name in Settings.model_fields}
_LISTS = {VARIABLES[name] for name, field in Settings.model_fields.items() if typing.get_origin(field.annotation) is tuple}


def _medlm_environment() -> tuple[str | None, ...]:
    return tuple(map(os.environ.get, VARIABLES.values()))


_PARSED: dict[tuple[str | None, ...], Settings] = {}


def settings() -> Settings:
    """This process's settings, as its environment says now."""
    environment = _medlm_environment()
    if (found := _PARSED.get(environment)) is None:
        try:
            found = Settings()
        except ValidationError as error:
            raise SettingsError("; ".join(_problem(e) for e in error.errors())) from None
        if _medlm_environment() == environment:  # else another thread changed it meanwhile
            _PARSED[environment] = found
    return found


def _problem(error: dict) -> str:
    expected = error["msg"].removeprefix("Value error, ").replace("Input should be", "expected")
    return f"{error['loc'][0]}={error['input']!r}: {expected}"


def described(current: Settings) -> list[str]:
    """What `medlm settings` prints: each setting as its variable would be set, where the value came
    from, and what it sets; then the MEDLM_* variables that are no setting (misspelt?)."""
    lines = []
    for name, field in Settings.model_fields.items():
        value = shown(getattr(current, name))
        lines.append(f"{VARIABLES[name]}={shlex.quote(value) if value else ''}  ({source(current, name)})")
        lines += textwrap.wrap(field.description, width=100, initial_indent="    ", subsequent_indent="    ")
    if strangers := sorted(k for k in os.environ if k.startswith(PREFIX) and k not in VARIABLES.values()):
        lines.append(f"\nset, but not settings of medlm (misspelt?): {' '.join(strangers)}")
    return lines


def table_row(name: str) -> str:
    """Setting ``name``'s row in docs/running.md's tables: the variable, what it sets, its default
    (a derived one in words; paths inside the repository relative to it)."""
    field = Settings.model_fields[name]
    if field.default_factory:
        default = field.default_factory.__doc__
    else:
        default = "unset" if field.default in (None, ()) else f"`{shown(field.default).replace(f'{REPO}{os.sep}', '')}`"
    return f"| `{VARIABLES[name]}` | {field.description} | {default} |"


def source(current: Settings, name: str) -> str:
    """Where setting ``name``'s value came from: the environment, its default, or a default derived from something else."""
    if name in current.model_fields_set:
        return "environment"
    if getattr(current, name) is None:
        return "unset"
    factory = Settings.model_fields[name].default_factory
    return f"derived: {factory.__doc__}" if factory else "default"


def shown(value) -> str:
    """A setting's value as its variable would hold it."""
    if isinstance(value, tuple):
        return (os.pathsep if value and isinstance(value[0], Path) else " ").join(map(shown, value))
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        return f"{value:g}"
    return "" if value is None else str(value)
