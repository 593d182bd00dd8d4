"""Download stage: PubMed baseline and update files from NCBI (or a mirror), md5-verified and resumable.

    files = select_files(SourceConfig(folders=("updatefiles",), updates_after=1274))
    artifacts = [DOWNLOAD.run(Store(), {}, f) for f in files]

A file is fetched into ``NAME.part``; a dropped connection or a killed run continues it with
``Range: bytes=N-``; only bytes whose md5 matches NCBI's ``NAME.md5`` are renamed to ``NAME``.
One artifact per file, keyed by name and md5 (not by URL: the same bytes from a mirror are the
same artifact). The base may also be a local folder or ``file://`` URL laid out like NCBI's.
Where a run may download from is the worker's setting (``storage.access``: NCBI by default, a
local mirror only inside ``MEDLM_DATA_ROOTS``), checked before the first request and on every
redirect.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from html.parser import HTMLParser
from http.client import HTTPException
from pathlib import Path
from typing import BinaryIO, ClassVar, Iterator, Literal
from urllib.parse import urlsplit
from urllib.request import url2pathname

from pydantic import Field

from storage import Stage, file_digest
from storage.access import NCBI_PUBMED, AccessError, SourceLocation, check_source, local_folder, readable
from storage.config import config_dataclass

log = logging.getLogger("medlm.download")

FOLDERS = ("baseline", "updatefiles")
MD5_FETCHERS = 8
# Matched whole (fullmatch: "$" would accept a trailing newline) and in ASCII (\d would accept "٢٠").
FILE_NAME = re.compile(r"pubmed([0-9]{2})n([0-9]{4})\.xml\.gz")
_LOGGED_NAME_CHARS = 200  # a hostile listing may hold a 100 KB name
_MD5_LINE = re.compile(r"^MD5\((?P<name>[^()]+)\)= ?(?P<digest>[0-9a-fA-F]{32})$")
_CHUNK = 1 << 20
_PROGRESS_EVERY_S = 10.0
_RETRY_HTTP_CODES = {408, 429}  # 4xx that mean "try again later"; every 5xx is retried too


class DownloadError(RuntimeError):
    """A listing, md5 or file could not be fetched, or the bytes never matched their md5."""


class _TransferFailed(Exception):
    """A transfer went wrong in a way that another attempt may fix (short body, 5xx, ...)."""


_RETRYABLE = (_TransferFailed, urllib.error.URLError, HTTPException, ConnectionError, TimeoutError)


@config_dataclass
class SourceConfig:
    """Which PubMed files to bring in, and from where."""

    source: SourceLocation = Field(
        NCBI_PUBMED,  # checked when listed, not here: a process that may not reach NCBI still imports the flow
        description="NCBI's PubMed URL, another allowed source (MEDLM_SOURCES), or a local mirror folder with NCBI's layout (baseline/, updatefiles/) inside MEDLM_DATA_ROOTS.",
    )
    folders: tuple[Literal["baseline", "updatefiles"], ...] = Field(FOLDERS, description="Remote folders to read.")
    baseline_limit: int | None = Field(None, ge=0, description="Only the first N baseline files (unset: all).")
    updates_after: int | None = Field(None, ge=0, description="Only update files numbered above this (unset: all).")
    names: tuple[str, ...] = Field((), description="Only these file names, e.g. pubmed25n0001.xml.gz (empty: all).")
    new_files_only: bool = Field(False, description="Once a snapshot in the store holds baseline files: list only the update files newer than its newest, and build on its files (the nightly run).")
    attempts: int = Field(5, ge=1, description="Tries per file before it counts as failed (a dropped transfer resumes where it stopped).")
    backoff_s: float = Field(2.0, ge=0, description="Seconds before the second try, doubled before each further one.")


@config_dataclass
class RemoteFile:
    """One PubMed XML file at its source (the download stage's config); ``seq`` is NCBI's file
    number (NNNN), the order updates apply in. The artifact is what the bytes are (name, md5),
    never where they came from or how they were fetched."""

    name: str
    folder: str
    url: str
    md5: str
    seq: int
    attempts: int = Field(5, ge=1)
    backoff_s: float = Field(2.0, ge=0)  # doubled after each failed attempt
    timeout_s: float = Field(60, gt=0)

    RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = ("url", "attempts", "backoff_s", "timeout_s")


# -- listing ---------------------------------------------------------------------------------


def select_files(config: SourceConfig, *, timeout_s: float = 60) -> list[RemoteFile]:
    """The files to download, sorted by seq, with their md5s fetched.

    ``baseline_limit`` keeps the first N baseline files; ``updates_after`` keeps update files
    numbered above it (the nightly flow: ``folders=("updatefiles",), updates_after=<last seq>``);
    ``names`` keeps exactly these files, each of which must be listed.
    """
    base, folders = config.source, config.folders
    wanted = set(config.names) or None
    for name in wanted or ():
        if not FILE_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a PubMed file name: expected pubmedYYnNNNN.xml.gz, e.g. pubmed25n0001.xml.gz")

    chosen: list[tuple[str, str]] = []
    for folder in folders:
        listed = list_folder(base, folder, timeout_s=timeout_s)
        if wanted is not None:
            listed = [name for name in listed if name in wanted]
        if folder == "baseline" and config.baseline_limit is not None:
            listed = listed[: config.baseline_limit]
        if folder == "updatefiles" and config.updates_after is not None:
            listed = [name for name in listed if file_seq(name) > config.updates_after]
        chosen += [(folder, name) for name in listed]

    missing = (wanted or set()) - {name for _, name in chosen}
    if missing:
        raise DownloadError(
            f"{sorted(missing)} not found in {list(folders)} at {base}; check the names against the listing"
        )
    log.info("selected %d files from %s", len(chosen), base)
    # One small GET per .md5; the whole baseline is ~1,300 of them, so a few at a time.
    with ThreadPoolExecutor(MD5_FETCHERS) as pool:
        remotes = list(pool.map(lambda entry: _remote_file(base, *entry, timeout_s, config.attempts, config.backoff_s), chosen))
    return sorted(remotes, key=lambda f: (f.seq, f.name))


def list_folder(base: str | os.PathLike, folder: str, *, timeout_s: float = 60) -> list[str]:
    """The valid PubMed file names in one folder of ``base``, sorted by seq."""
    check_source(str(base))
    root = local_folder(base)
    if root is None:
        where = _folder_url(base, folder)
        entries = _hrefs(_read_text(where, timeout_s))
    else:
        where = str(root / folder)
        if not readable(root, "source").joinpath(folder).is_dir():
            raise DownloadError(f"{where} is not a folder: a local mirror needs NCBI's layout (baseline/, updatefiles/)")
        readable(root / folder, "source folder")  # the folder itself may be a link out of the data roots
        entries = [p.name + ("/" if p.is_dir() else "") for p in (root / folder).iterdir()]
    names = {entry for entry in set(entries) if _is_file_name(entry, where)}
    return sorted(names, key=lambda name: (file_seq(name), name))


def file_seq(name: str) -> int:
    """NCBI's file number, the order updates apply in: 1298 for pubmed21n1298.xml.gz."""
    match = FILE_NAME.fullmatch(name)
    if match is None:
        raise ValueError(f"{name!r} is not an NCBI PubMed file name: expected pubmedYYnNNNN.xml.gz (e.g. pubmed25n1275.xml.gz)")
    return int(match[2])


def parse_md5(text: str, name: str, url: str) -> str:
    """The digest in NCBI's ``MD5(NAME)= HEX`` line, checked to name ``name``."""
    match = _MD5_LINE.match(text.strip())
    if not match or match["name"] != name:
        raise DownloadError(f"{url}: expected one line 'MD5({name})= <32 hex digits>', got {len(text.encode()):,} bytes of something else")
    return match["digest"].lower()


def _is_file_name(entry: str, where: str) -> bool:
    if FILE_NAME.fullmatch(entry):
        return True
    shown = repr(entry[:_LOGGED_NAME_CHARS]) + (f"... ({len(entry):,} characters)" if len(entry) > _LOGGED_NAME_CHARS else "")
    if _is_index_chrome(entry):
        log.debug("skipping listing entry %s in %s", shown, where)
    else:
        log.warning("rejected listing entry %s in %s: not a plain PubMed file name like pubmed25n0001.xml.gz", shown, where)
    return False


def _is_index_chrome(entry: str) -> bool:
    """Links every index has that are not data: directories, sort links, README.txt, .md5, stats pages."""
    if entry.endswith("/") or entry.startswith("?"):
        return True
    plain = not any(c in entry for c in "/\\:")
    return plain and (entry.endswith(".md5") or ".xml" not in entry.lower())


class _HrefParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.hrefs += [value for key, value in attrs if key == "href" and value]


def _hrefs(html: str) -> list[str]:
    parser = _HrefParser()
    parser.feed(html)
    parser.close()
    return parser.hrefs


def _folder_url(base: str | os.PathLike, folder: str) -> str:
    return f"{str(base).rstrip('/')}/{folder}/"


def _remote_file(base: str | os.PathLike, folder: str, name: str, timeout_s: float, attempts: int, backoff_s: float) -> RemoteFile:
    root = local_folder(base)
    url = (root / folder / name).absolute().as_uri() if root is not None else _folder_url(base, folder) + name
    md5 = parse_md5(_read_text(f"{url}.md5", timeout_s), name, f"{url}.md5")
    return RemoteFile(name=name, folder=folder, url=url, md5=md5, seq=file_seq(name), attempts=attempts, backoff_s=backoff_s)


def _read_text(url: str, timeout_s: float) -> str:
    """A small document (listing, .md5). Not retried here: the list-remote task has Prefect retries."""
    try:
        with _urlopen(url, timeout_s) as response:
            return response.read().decode("utf-8", errors="replace")
    except AccessError:
        raise  # not a network problem: waiting will not heal it
    except urllib.error.HTTPError as e:
        raise DownloadError(f"GET {url} failed: HTTP {e.code} {e.reason}") from e
    except (HTTPException, OSError) as e:
        raise DownloadError(f"GET {url} failed: {e}; check the base URL and the network") from e


# -- downloading -----------------------------------------------------------------------------


def download_file(remote: RemoteFile, dest_dir: Path) -> Path:
    """Fetch ``remote`` into ``dest_dir/NAME``, resuming ``NAME.part``; NAME exists only once its md5 matches."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    final, part = dest_dir / remote.name, dest_dir / f"{remote.name}.part"
    if final.exists():  # verified and renamed by a run killed before its manifest was written
        if file_digest(final, "md5").hexdigest() == remote.md5:
            return final
        final.unlink()
    attempts = remote.attempts
    for attempt in range(1, attempts + 1):
        failure = None
        try:
            actual = _fetch_into(remote, part, remote.timeout_s)
        except _RETRYABLE as e:
            failure, problem = e, f"transfer failed: {e}"
        else:
            if actual == remote.md5:
                os.replace(part, final)
                return final
            part.unlink()  # bad bytes are not worth resuming
            problem = f"md5 mismatch: expected {remote.md5}, actual {actual}"
        if attempt < attempts:
            delay = remote.backoff_s * 2 ** (attempt - 1)
            log.warning("%s: attempt %d/%d: %s; retrying in %.1f s", remote.name, attempt, attempts, problem, delay)
            time.sleep(delay)
    raise DownloadError(
        f"{remote.name}: {problem} (from {remote.url}, {attempts} attempts); "
        f"the source may be corrupt or down: retry later or use another mirror"
    ) from failure  # a transfer failure as the cause: is_transient() lets the task retry later


def _fetch_into(remote: RemoteFile, part: Path, timeout_s: float) -> str:
    """Append the rest of ``remote`` to ``part`` (or rewrite it); the md5 of the whole ``part``."""
    offset = part.stat().st_size if part.exists() else 0
    with _open(remote, offset, timeout_s) as (body, start, length):
        if start:
            log.info("%s: resuming at byte %d", remote.name, start)
            digest = file_digest(part, "md5")
        else:
            if offset:
                log.info("%s: source ignored the range request; starting again from byte 0", remote.name)
            digest = hashlib.md5()
        with open(part, "ab" if start else "wb") as out:
            received = _copy(body, out, digest, remote.name, start, length)
            out.flush()
            os.fsync(out.fileno())
    if length is not None and received < length:
        raise _TransferFailed(f"connection closed after {received} of {length} bytes")
    return digest.hexdigest()


@contextmanager
def _open(remote: RemoteFile, offset: int, timeout_s: float) -> Iterator[tuple[BinaryIO, int, int | None]]:
    """(body, the byte offset it starts at, its expected length or None) for ``remote`` from ``offset``."""
    if remote.url.startswith("file:"):
        source = Path(url2pathname(urlsplit(remote.url).path))
        if not source.is_file():
            raise DownloadError(f"{remote.name}: {source} does not exist; check the mirror folder")
        readable(source, remote.name)  # a link in the mirror may point anywhere
        with open(source, "rb") as body:
            size = source.stat().st_size
            body.seek(min(offset, size))  # past the end: an empty body, and the md5 check decides
            yield body, offset, max(size - offset, 0)
        return
    request = urllib.request.Request(remote.url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = _urlopen(request, timeout_s)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code >= 500 or e.code in _RETRY_HTTP_CODES:
            raise _TransferFailed(f"HTTP {e.code} {e.reason}") from e
        if e.code != 416:
            raise DownloadError(f"{remote.name}: HTTP {e.code} {e.reason} for {remote.url}; check the base URL and file name") from e
        response = None
    if response is None:  # 416, nothing after offset: the .part is complete or bad, the md5 check decides
        yield io.BytesIO(), offset, 0
        return
    with response:
        start = _content_range_start(response.headers.get("Content-Range")) if response.status == 206 else 0
        if start not in (0, offset):
            raise _TransferFailed(f"asked for bytes={offset}-, got Content-Range {response.headers['Content-Range']!r}")
        length = response.headers.get("Content-Length")
        yield response, start, int(length) if length is not None else None


class _AllowedRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to where a run may download from (``storage.access``)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        check_source(newurl, f"a redirect from {req.full_url} to")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_AllowedRedirects)


def _urlopen(request: str | urllib.request.Request, timeout_s: float):
    """GET ``request`` once its URL is checked against the allowed sources (and so is any redirect)."""
    check_source(request if isinstance(request, str) else request.full_url)
    return _OPENER.open(request, timeout=timeout_s)


def _content_range_start(header: str | None) -> int:
    match = re.match(r"^bytes (\d+)-\d+/(\d+|\*)$", header or "")
    if not match:
        raise _TransferFailed(f"206 response with a malformed Content-Range {header!r}")
    return int(match[1])


def _copy(body: BinaryIO, out: BinaryIO, digest, name: str, start: int, length: int | None) -> int:
    """Stream ``body`` into ``out`` and ``digest`` in 1 MiB chunks, logging progress; bytes copied."""
    total = f"{(start + length) / 1e6:.1f}" if length is not None else "?"
    began = last_log = time.monotonic()
    received = 0
    while chunk := body.read(_CHUNK):
        out.write(chunk)
        digest.update(chunk)
        received += len(chunk)
        if (now := time.monotonic()) - last_log >= _PROGRESS_EVERY_S:
            last_log = now
            log.info("%s: %.1f/%s MB, %.1f MB/s", name, (start + received) / 1e6, total, received / 1e6 / (now - began))
    elapsed = max(time.monotonic() - began, 1e-9)
    log.info("%s: got %.1f MB in %.1f s (%.1f MB/s)", name, received / 1e6, elapsed, received / 1e6 / elapsed)
    return received


# -- the stage -------------------------------------------------------------------------------


def build_download(inputs: dict, out_dir: Path, remote: RemoteFile) -> dict:
    return {"bytes": download_file(remote, out_dir).stat().st_size}


DOWNLOAD = Stage(
    name="download",
    version="1",
    config=RemoteFile,
    inputs={},
    build=build_download,
    resume=True,  # a killed run's .part is continued with a Range request
    label=lambda inputs, remote: f"{remote.name} md5={remote.md5}",
    retry_if=lambda error: is_transient(error),  # NCBI down for longer than the attempts above: try again later
)


def is_transient(error: BaseException) -> bool:
    """Whether a listing or download failure may heal by waiting (network, 408/429/5xx), unlike a
    wrong name or URL, or bytes that never match their md5."""
    if not isinstance(error, DownloadError):
        return False
    cause = error.__cause__
    if isinstance(cause, _TransferFailed):
        return True
    if isinstance(cause, urllib.error.HTTPError):
        return cause.code >= 500 or cause.code in _RETRY_HTTP_CODES
    if isinstance(cause, urllib.error.URLError) and isinstance(cause.reason, FileNotFoundError):
        return False  # a file missing from a local mirror does not appear by waiting
    return isinstance(cause, (HTTPException, OSError))
