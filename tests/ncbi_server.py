"""A real HTTP server on 127.0.0.1 that serves a folder in NCBI's PubMed layout, with faults on demand.

    mirror = make_mirror(tmp / "mirror", {"baseline": [xml_gz], "updatefiles": [other_xml_gz]})
    with NcbiServer(mirror) as server:
        server.faults.drop_after_bytes["/baseline/pubmed20n0014.xml.gz"] = [1000]
        ...  # fetch from server.url
        server.requests_for("/baseline/pubmed20n0014.xml.gz")  # [Request(path=..., range="bytes=1000-"), ...]

It listens on ``PORT``, chosen once per test session, so the session can allow it as a download
source (``MEDLM_SOURCES``, set in conftest) before any worker starts; servers of one session
run one at a time. Folders are answered with an Apache-style index like NCBI's; files honour ``Range: bytes=N-``
(206 + Content-Range, 416 past the end). Faults are keyed by URL path; list-valued faults are
consumed one entry per request, so ``status["/x"] = [503, 503]`` fails the first two requests.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from storage.processes import free_port

# Listing entries a hostile or broken index could contain; a client must never follow them.
HOSTILE_HREFS = (
    "../etc/passwd",
    "sub/dir/pubmed25n0001.xml.gz",
    "pubmed25n0001.xml.gz/../../x",
    "/etc/pubmed25n0001.xml.gz",
    "https://evil.example.com/pubmed25n0001.xml.gz",
    "//evil.example.com/pubmed25n0002.xml.gz",
    "PUBMED25N0003.XML.GZ",
    "pubmed25n0093.xml.gz&#10;",  # the HTML parser turns &#10; into a newline, which "$" would let through
    "pubmed٢٠n٠٠١٤.xml.gz",  # Arabic-Indic digits: \d matches them, int() reads 20 and 14
    "pubmed25n" + "9" * 100_000 + ".xml.gz",  # a name too long to log whole
)
WRONG_MD5 = "0" * 32


PORT = free_port()
URL = f"http://127.0.0.1:{PORT}"
_CHUNK = 64 * 1024
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass(frozen=True)
class Request:
    path: str
    range: str | None  # the Range header as sent, e.g. "bytes=1000-"


@dataclass
class Faults:
    """What goes wrong, keyed by URL path ("/baseline/pubmed20n0014.xml.gz", "/baseline/")."""

    status: dict[str, list[int]] = field(default_factory=dict)  # answer these codes, one per request
    drop_after_bytes: dict[str, list[int]] = field(default_factory=dict)  # full Content-Length, N bytes, close
    ignore_range: set[str] = field(default_factory=set)  # answer 200 with the whole file to a Range request
    wrong_md5: set[str] = field(default_factory=set)  # data-file paths whose .md5 is wrong, forever
    extra_listing: dict[str, list[str]] = field(default_factory=dict)  # folder path -> hrefs added to its index
    redirect: dict[str, str] = field(default_factory=dict)  # path -> URL answered with 302 Found
    trickle: set[str] = field(default_factory=set)  # data-file paths sent 1 KiB a second: a download that stays under way


class NcbiServer:
    """A threaded HTTP server for ``root``; a context manager that starts and stops it."""

    def __init__(self, root: Path, port: int = PORT):
        self.root = Path(root).resolve()
        self.faults = Faults()
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.ncbi = self  # the handler reaches its server's state through this
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="ncbi-server", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> NcbiServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def requests_for(self, path: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def _take(self, faults: dict[str, list[int]], path: str) -> int | None:
        """The next queued fault value for ``path``, consuming it; None when none is left."""
        with self._lock:
            queue = faults.get(path)
            return queue.pop(0) if queue else None


class _Handler(BaseHTTPRequestHandler):
    server_version = "NcbiTestServer/1.0"

    @property
    def ncbi(self) -> NcbiServer:
        return self.server.ncbi

    def log_message(self, format: str, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        path = unquote(urlsplit(self.path).path)
        self.ncbi._record(Request(path, self.headers.get("Range")))
        if (code := self.ncbi._take(self.ncbi.faults.status, path)) is not None:
            return self._send_bytes(f"injected {code}\n".encode(), status=code)
        if (location := self.ncbi.faults.redirect.get(path)) is not None:
            self.send_response(HTTPStatus.FOUND)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            return self.end_headers()
        target = (self.ncbi.root / path.lstrip("/")).resolve()
        if not target.is_relative_to(self.ncbi.root) or not target.exists():
            return self._send_bytes(b"not found\n", status=HTTPStatus.NOT_FOUND)
        if target.is_dir():
            return self._send_bytes(self._index(path, target).encode(), content_type="text/html")
        if path.endswith(".md5") and path.removesuffix(".md5") in self.ncbi.faults.wrong_md5:
            return self._send_bytes(f"MD5({target.name.removesuffix('.md5')})= {WRONG_MD5}\n".encode())
        self._send_file(path, target)

    def _index(self, path: str, folder: Path) -> str:
        """An Apache-style listing, the way ftp.ncbi.nlm.nih.gov answers for /pubmed/baseline/."""
        hrefs = ["../"] + sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
        hrefs += self.ncbi.faults.extra_listing.get(path, [])
        lines = [f'<a href="{href}">{href}</a>{" " * max(1, 40 - len(href))}2024-12-11 12:52  -' for href in hrefs]
        return (
            '<!DOCTYPE HTML PUBLIC "-//W3C//DTD HTML 3.2 Final//EN">\n'
            f"<html>\n <head>\n  <title>Index of /pubmed{path}</title>\n </head>\n <body>\n"
            f"<h1>Index of /pubmed{path}</h1>\n"
            '<pre>      <a href="?C=N;O=D">Name</a>                    <a href="?C=M;O=A">Last modified</a>'
            '      <a href="?C=S;O=A">Size</a><hr>'
            + "\n".join(lines)
            + "\n<hr></pre>\n</body></html>\n"
        )

    def _send_file(self, path: str, target: Path) -> None:
        size = target.stat().st_size
        start, end = 0, size - 1
        requested = _RANGE.match(self.headers.get("Range") or "")
        if requested and path not in self.ncbi.faults.ignore_range:
            start = int(requested[1])
            end = min(int(requested[2]), end) if requested[2] else end
            if start >= size:
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(HTTPStatus.PARTIAL_CONTENT)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        else:
            self.send_response(HTTPStatus.OK)
        length = end - start + 1
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        drop_after = self.ncbi._take(self.ncbi.faults.drop_after_bytes, path)
        to_send = length if drop_after is None else min(drop_after, length)
        trickle = path in self.ncbi.faults.trickle
        with open(target, "rb") as f:
            f.seek(start)
            try:
                while to_send > 0 and (chunk := f.read(min(1024 if trickle else _CHUNK, to_send))):
                    self.wfile.write(chunk)
                    self.wfile.flush()
                    to_send -= len(chunk)
                    time.sleep(1 if trickle else 0)
            except ConnectionError:  # the client went away; nothing to answer
                pass
        self.close_connection = True

    def _send_bytes(self, body: bytes, *, status: int = HTTPStatus.OK, content_type: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Listener:
    """A TCP listener on 127.0.0.1 that counts the connections it is offered and answers none: the
    place a run must never reach (an HTTP source, a Dask scheduler)."""

    def __init__(self):
        self._socket = socket.create_server(("127.0.0.1", 0))
        self._socket.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="listener", daemon=True)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._socket.accept()
            except TimeoutError:
                continue
            self.connections += 1
            connection.close()

    def __enter__(self) -> Listener:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._socket.close()


def md5_line(path: Path) -> str:
    """The content of NCBI's ``NAME.md5`` sibling for ``path``."""
    return f"MD5({path.name})= {hashlib.md5(path.read_bytes()).hexdigest()}\n"


def make_mirror(dest: Path, files: dict[str, list[Path]]) -> Path:
    """Lay ``files`` out under ``dest`` the way NCBI does: FOLDER/NAME, FOLDER/NAME.md5, README.txt."""
    for folder, paths in files.items():
        folder_dir = dest / folder
        folder_dir.mkdir(parents=True, exist_ok=True)
        (folder_dir / "README.txt").write_text(f"PubMed {folder} files (test mirror)\n")
        for path in paths:
            copy = folder_dir / path.name
            shutil.copyfile(path, copy)
            (folder_dir / f"{path.name}.md5").write_text(md5_line(copy))
            (folder_dir / f"{path.name.removesuffix('.xml.gz')}_stats.html").write_text("<html>stats</html>\n")
    return dest
