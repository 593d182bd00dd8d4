"""What a run may read or reach: settings of the process that runs it, never run parameters.

Anyone who can reach the Prefect API can start a run with parameters of their choosing. A run's
parameters may still name data (a mirror folder, an exclusion list, a QA dataset, a Hugging Face
model) and a download source, but only within what the worker that runs it allows, as the store's
place is the worker's setting (``MEDLM_STORE``): ``MEDLM_DATA_ROOTS`` (by default the bundled
sample data, so the demo runs anywhere), ``MEDLM_SOURCES``, ``MEDLM_DASK_ADDRESS`` (Dask exchanges
pickles, so which scheduler a worker talks to is never a run parameter) and
``MEDLM_RENDEZVOUS_HOSTS`` (for ``train.rdzv_endpoint``), described in storage/settings.py.

A path is allowed when, with its symbolic links resolved, it lies in a data root: a link inside a
root that points out of it is refused. A URL is allowed when its scheme, host and port equal an
allowed source's and its path continues that source's path at a ``/``; user info and ``..``
segments are refused, and so is a redirect to a URL that is not allowed. Everything is checked
before anything is fetched or read: config fields typed ``DataPath`` or ``SourceLocation`` are
checked where the value enters (command line, run configuration, a flow run's parameters), and
the readers check again each file they open. A refusal is one line naming the setting to change;
no message quotes what a file holds.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

from pydantic import AfterValidator

from storage.settings import NCBI_PUBMED, settings, variable

DATA_ROOTS_SETTING = variable("data_roots")
SOURCES_SETTING = variable("sources")
DASK_SETTING = variable("dask_address")
RENDEZVOUS_SETTING = variable("rendezvous_hosts")


class AccessError(PermissionError):
    """A run asked to read or reach what this process's settings do not allow."""


def data_roots() -> tuple[Path, ...]:
    """The folders runs in this process may read data from, resolved."""
    return tuple(Path(os.path.realpath(root)) for root in settings().data_roots)


def dask_address() -> str | None:
    """The Dask scheduler this worker parses on, if any."""
    return settings().dask_address


def check_rendezvous(endpoint: str) -> str:
    """``endpoint`` (HOST:PORT) if a training run may join a rendezvous there."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{endpoint!r} is not HOST:PORT, e.g. node01:29500")
    allowed = settings().rendezvous_hosts
    if host not in allowed:
        raise AccessError(
            f"{endpoint} is not a rendezvous this process may join ({RENDEZVOUS_SETTING}={' '.join(allowed)}); to allow it, "
            f"add {host} to {RENDEZVOUS_SETTING} where the flow runs (a deployment's: the worker's environment)"
        )
    return endpoint


def readable(path: str | os.PathLike, what: str = "") -> Path:
    """``path`` made absolute, once it is known to exist inside a data root (links resolved);
    ``what`` names it in an error."""
    absolute = Path(os.path.abspath(path))
    real = Path(os.path.realpath(absolute))
    roots = data_roots()
    subject = f"{what} {absolute}".strip()
    if not any(real.is_relative_to(root) for root in roots):
        shown = os.pathsep.join(map(str, roots)) or "(none)"
        via = " (a link leading out of them)" if real != absolute else ""  # never where it leads: run states are readable by anyone with the API
        raise AccessError(
            f"{subject}{via} is outside the folders this process may read ({DATA_ROOTS_SETTING}={shown}); "
            f"to allow it, add a folder holding it to {DATA_ROOTS_SETTING} where the flow runs (a deployment's: the worker's environment)"
        )
    if not real.exists():
        raise FileNotFoundError(f"{subject} does not exist")
    return absolute


def readable_files(folder: str | os.PathLike, what: str = "") -> list[Path]:
    """Every file under ``folder`` (sorted), each checked by ``readable``: a folder inside a root
    may hold links to files outside it. The paths are under the resolved folder, links kept as
    links (a Hugging Face cache snapshot is links into its blobs), so each one's path relative to
    the folder is its name in it."""
    root = readable(folder, what)
    files = sorted(f for f in root.rglob("*") if f.is_file())
    for f in files:
        readable(f, what)
    return files


def local_folder(location: str | os.PathLike) -> Path | None:
    """The folder a source location names when it is local (a path or a file:// URL); None for http(s)."""
    if isinstance(location, os.PathLike):
        return Path(location)
    scheme = urlsplit(location).scheme
    if scheme == "file":
        return Path(url2pathname(urlsplit(location).path))
    if scheme == "":
        return Path(location)
    return None


def check_source(location: str, what: str = "") -> str:
    """``location`` if a run may download from it: a local folder in a data root, or a URL under
    an allowed source. Raises AccessError, or ValueError for a scheme that is neither."""
    folder = local_folder(location)
    if folder is not None:
        return str(readable(folder, what))
    parts = urlsplit(location)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{what} {location!r}".strip() + f": expected an http(s) URL like {NCBI_PUBMED}, a file:// URL or a folder")
    allowed = settings().sources
    if not any(_under(parts, urlsplit(source)) for source in allowed):
        raise AccessError(
            f"{what} {location}".strip() + f" is not among the sources this process may download from ({SOURCES_SETTING}="
            f"{' '.join(allowed) or '(none)'}); to allow it, add it to {SOURCES_SETTING} where the flow runs "
            f"(a deployment's: the worker's environment)"
        )
    return location


def _under(url, source) -> bool:
    """Whether ``url`` is ``source`` or below it: same scheme, host and port; the path continues at a "/"."""
    if url.username is not None or url.password is not None or ".." in unquote(url.path).split("/"):
        return False
    try:
        same_place = (url.scheme, url.hostname, url.port or _default_port(url.scheme)) == (
            source.scheme, source.hostname, source.port or _default_port(source.scheme))
    except ValueError:  # a port that is not a number
        return False
    base = source.path.rstrip("/")
    return same_place and (url.path.rstrip("/") == base or url.path.startswith(base + "/"))


def _default_port(scheme: str) -> int:
    return {"http": 80, "https": 443}[scheme]


def _as_value_error(check):
    """A check as a pydantic validator: pydantic reports a ValueError with the field's name, and
    lets any other exception escape unexplained."""

    def validate(value: str) -> str:
        try:
            return str(check(value))
        except OSError as e:
            raise ValueError(str(e)) from None

    return AfterValidator(validate)


# Config field types: checked wherever a value enters (CLI, run configuration, flow parameters).
DataPath = Annotated[str, _as_value_error(readable)]
SourceLocation = Annotated[str, _as_value_error(check_source)]
RendezvousEndpoint = Annotated[str, _as_value_error(check_rendezvous)]
