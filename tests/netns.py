"""Hosts that share no loopback, on one machine: Linux network namespaces on a bridge of their own.

    with Network({"head": 1, "cpu": 2, "gpu": 3}) as net:
        net.address("head")                         # 198.18.N.1
        net.start("cpu", [python, "-m", ...], env=..., log=path)   # a process on that host
        net.cut("cpu"); net.mend("cpu")             # its link, down and up again

Addresses come from 198.18.0.0/15, the range set aside for network tests (RFC 2544), never a
private range. The bridge lives in a namespace of its own, so the machine's own namespace has no
interface on that network: nothing started on these hosts is reachable from outside them, and
they have no route out (no default route). Everything is torn down on exit, the processes of
every namespace first, even when the block failed. Needs root (CAP_NET_ADMIN) and iproute2.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

PREFIX = "medlm-"


def ip(*args: str, namespace: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    command = ["ip", *(["netns", "exec", namespace, "ip"] if namespace else []), *args]
    return subprocess.run(command, capture_output=True, text=True, check=check)


def leftovers() -> list[str]:
    """Namespaces an earlier run left behind (a test that did not tear down what it made)."""
    return [line.split()[0] for line in ip("netns", "list").stdout.splitlines() if line.startswith(PREFIX)]


class Network:
    def __init__(self, hosts: dict[str, int]):
        self.tag = f"{os.getpid() % 100_000}"
        self.subnet = 18 * 256 + os.getpid() % 256  # 198.18.N: a /24 of 198.18.0.0/15 per test process
        self.hosts = hosts
        self.switch = f"{PREFIX}{self.tag}-sw"

    def namespace(self, host: str) -> str:
        return f"{PREFIX}{self.tag}-{host}"

    def address(self, host: str) -> str:
        return f"198.{self.subnet // 256}.{self.subnet % 256}.{self.hosts[host]}"

    def _links(self, host: str) -> tuple[str, str]:
        return f"m{self.tag}{host[:3]}", f"m{self.tag}{host[:3]}s"  # the host's end, the switch's end (<= 15 characters)

    def __enter__(self) -> Network:
        try:
            ip("netns", "add", self.switch)
            ip("link", "add", "br0", "type", "bridge", namespace=self.switch)
            ip("link", "set", "br0", "up", namespace=self.switch)
            for host in self.hosts:
                namespace, (inside, outside) = self.namespace(host), self._links(host)
                ip("netns", "add", namespace)
                ip("link", "add", inside, "type", "veth", "peer", "name", outside)
                ip("link", "set", inside, "netns", namespace)
                ip("link", "set", outside, "netns", self.switch)
                ip("link", "set", outside, "master", "br0", "up", namespace=self.switch)
                ip("addr", "add", f"{self.address(host)}/24", "dev", inside, namespace=namespace)
                ip("link", "set", inside, "up", namespace=namespace)
                ip("link", "set", "lo", "up", namespace=namespace)
        except BaseException:
            self.__exit__()
            raise
        return self

    def start(self, host: str, command: list[str], *, env: dict[str, str], log: Path, cwd: Path | None = None) -> subprocess.Popen:
        """``command`` on ``host``, its output to ``log``."""
        return subprocess.Popen(["ip", "netns", "exec", self.namespace(host), *command], env=env, cwd=cwd,
                                stdout=open(log, "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def run(self, host: str, command: list[str], *, env: dict[str, str], timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.namespace(host), *command], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)

    def cut(self, host: str) -> None:
        """The host's cable pulled, at the switch: its packets go nowhere (nobody is told)."""
        ip("link", "set", self._links(host)[1], "down", namespace=self.switch)

    def mend(self, host: str) -> None:
        ip("link", "set", self._links(host)[1], "up", namespace=self.switch)

    def routes(self, host: str) -> str:
        return ip("route", "show", namespace=self.namespace(host)).stdout

    def __exit__(self, *exc) -> None:
        namespaces = [self.namespace(host) for host in self.hosts] + [self.switch]
        for namespace in namespaces:
            for pid in ip("netns", "pids", namespace, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        time.sleep(0.2)
        for namespace in namespaces:
            ip("netns", "delete", namespace, check=False)
