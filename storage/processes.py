"""Child processes that end with their parent, and ports to give them: helpers for every layer
(the CLI's temporary Prefect server, torchrun launchers, test servers)."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
from pathlib import Path

from storage.settings import settings


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def die_with_parent() -> None:
    """In a child process (``preexec_fn``): get SIGTERM when the thread that started it ends, even
    by SIGKILL (Linux's parent-death signal), so no server outlives the command that needed it."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def stop(process: subprocess.Popen, grace_s: float = 20) -> None:
    """SIGTERM, and SIGKILL after ``grace_s`` seconds if it is still running."""
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22); None if gone.
    With the PID it names one process, even after the PID is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # fields after "(comm)"; the 22nd overall


def process_age() -> float:
    """Seconds since this process started (its start time and the machine's uptime, from /proc):
    the interpreter's start and every import included."""
    started = process_start_time(os.getpid()) / os.sysconf("SC_CLK_TCK")
    return float(Path("/proc/uptime").read_text().split()[0]) - started


def usable_cores() -> int:
    """The cores this process may really use: its CPU affinity, capped by its cgroup's CPU quota (a
    container's --cpus, v2 or v1) and by MEDLM_CORES (a worker's share of a machine it shares)."""
    cores = len(os.sched_getaffinity(0))
    for quota_file, period_file in (("cpu.max", None), ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us")):
        try:
            quota, *period = Path("/sys/fs/cgroup", quota_file).read_text().split()
            period = period or Path("/sys/fs/cgroup", period_file).read_text().split()
            if quota not in ("max", "-1"):
                cores = min(cores, max(1, int(quota) // int(period[0])))
        except (OSError, ValueError, IndexError):
            pass
    if share := settings().cores:
        cores = min(cores, share)
    return cores
