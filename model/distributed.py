"""Training under torchrun: several processes on this machine, or one node of several.

    train_stage(out_dir, PRETRAINING, config, {"shards": path}, published, log)  # a stage's build
    join("job-42")  # each other node: `medlm join job-42`

One machine (``devices`` > 1, ``nodes`` 1): ``torchrun --standalone``. Several (``nodes`` > 1):
every node runs the same torchrun command, meeting at the c10d rendezvous ``rdzv_endpoint`` under
the name ``rdzv_id``. The stage's launcher writes its command to STORE/.rendezvous/RDZV_ID.json
before it starts; ``join`` on another node waits for that file and runs the same command. Which
node holds which ranks is torchrun's choice (by arrival; GROUP_RANK), never assumed, so every
node must see the store at the same path (a shared folder): any of them may hold rank 0, which
writes the run's checkpoints and metrics, and every rank reads the newest checkpoint on resume.
A node that dies takes the job down (the others' collectives fail; torchrun stops them); run the
stage and the joins again and training resumes from the newest complete checkpoint. A node cut off
from the rendezvous host stops too: its workers' collectives time out (RunConfig.timeout_s), and
its launcher, which would wait on the dead connection until TCP gives up (about 15 minutes), is
stopped once its workers have ended and the host has not answered for CUT_OFF_S.
"""

from __future__ import annotations

import collections
import fcntl
import ipaddress
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from storage import default_root, write_text_atomic
from storage.access import check_rendezvous
from model.threads import pinned_threads
from storage.processes import die_with_parent, usable_cores
from storage.progress import REPORTER, read_line

if TYPE_CHECKING:
    from model.training_stages import TrainingStage

REPO = Path(__file__).resolve().parents[1]
RENDEZVOUS = ".rendezvous"


@dataclass(frozen=True)
class Launch:
    """One torchrun launch: ``python -m MODULE ARGS`` in ``devices`` processes on each of ``nodes`` machines;
    MODULE a declared training stage's (model/training_stages.py), a join's too."""

    module: str
    args: tuple[str, ...]
    devices: int
    nodes: int = 1
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None

    def command(self) -> list[str]:
        from model.training_stages import training_stage  # torch and the stages' modules: what the launch runs anyway

        training_stage(self.module)  # refuses any other module
        where = (["--standalone"] if self.nodes == 1 else
                 [f"--nnodes={self.nodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={self.rdzv_endpoint}", f"--rdzv-id={self.rdzv_id}",
                  *([] if (host := hosts_here(self.rdzv_endpoint)) is None else [f"--rdzv-conf=is_host={int(host)}"]),
                  # The address the other nodes reach this one by (rank 0's is their MASTER_ADDR), not its host name's.
                  *([f"--local-addr={local}"] if (local := address_towards(self.rdzv_endpoint.rsplit(":", 1)[0].strip("[]"))) else [])])
        return [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc-per-node={self.devices}", "-m", self.module, *self.args]


def hosts_here(endpoint: str) -> bool | None:
    """Whether this machine's launcher serves the c10d store of the rendezvous ``endpoint``
    (HOST:PORT): whether HOST is one of its addresses. Said explicitly, since torchrun guesses from
    the host name, which every network namespace of a machine shares, and then no launcher would
    serve it. None for a loopback address: several launchers on one machine, and torchrun's guess
    (the first to bind serves, the others connect) is right."""
    host = endpoint.rsplit(":", 1)[0].strip("[]")
    try:
        family, _, _, _, address = socket.getaddrinfo(host, 0, proto=socket.IPPROTO_TCP)[0]
    except OSError:
        return False
    if ipaddress.ip_address(address[0]).is_loopback:
        return None
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind(address[:2])  # only an address of this machine (of its network namespace) binds
        return True
    except OSError:
        return False


def train_distributed(stage: "TrainingStage", config, folders: dict, run: Path, log: Callable[[str], None]) -> dict:
    """A training stage under torchrun: ``python -m MODULE`` with the stage's arguments for ``config``
    on ``folders`` (the config written to the run folder), launched on its run config's devices
    and nodes; the run's summary.json."""
    where = config.run
    launch(Launch(stage.module, stage.arguments(config, run, folders), where.devices, where.nodes, where.rdzv_endpoint, where.rdzv_id), log)
    return json.loads((run / "summary.json").read_text())


def train_stage(
    out_dir: Path, stage: "TrainingStage", config, folders: dict, published: Callable[[Path, dict], list[Path]], log: Callable[[str], None],
) -> dict:
    """A training stage's build: its run in ``out_dir/RUN_DIR`` (resumed from its checkpoints),
    trained on ``folders`` in this process (``stage.train``) or under torchrun (``train_distributed``),
    as ``config.run`` says, then the files ``published(run, summary)`` names published into
    ``out_dir``; returns the summary. A build killed after publishing only finishes the clean-up."""
    from model.checkpoint import RUN_DIR, finished_summary, publish_checkpoint

    if (summary := finished_summary(out_dir)) is not None:
        return summary
    run = out_dir / RUN_DIR
    if config.run.devices == 1 and config.run.nodes == 1:
        summary = stage.train(config, run, **folders)
    else:  # torchrun, on this machine or as one of config.run.nodes
        summary = train_distributed(stage, config, folders, run, log)
    return publish_checkpoint(run, out_dir, published(run, summary))


def rendezvous_file(rdzv_id: str, root: Path | None = None) -> Path:
    return (root or default_root()) / RENDEZVOUS / f"{rdzv_id}.json"


def launch(job: Launch, log: Callable[[str], None]) -> None:
    """Run ``job`` here, its output lines to ``log``; RuntimeError naming the last lines if it fails.
    With several nodes, the others find the command under the store's .rendezvous/ while it runs."""
    shared = rendezvous_file(job.rdzv_id) if job.nodes > 1 else None
    if shared is not None:
        shared.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(shared, json.dumps(asdict(job) | {"created": time.time()}, indent=1))
        log(f"waiting for {job.nodes - 1} more node(s) at {job.rdzv_endpoint}: on each, run `medlm join {job.rdzv_id}` (same MEDLM_STORE)")
    try:
        _run(job, log)
    finally:
        if shared is not None:
            shared.unlink(missing_ok=True)


def announce_ended(rdzv_id: str, ref: str) -> None:
    """Tell the other nodes' ``join`` that the training ``rdzv_id`` names has ended, or had nothing
    to do (its artifact was in the store already): there is nothing to join."""
    shared = rendezvous_file(rdzv_id)
    shared.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(shared, json.dumps({"ended": ref, "created": time.time()}))


STALE_S = 600  # an end announced this long before a join started is an older job's


def join(rdzv_id: str, timeout_s: float = 600, log: Callable[[str], None] = print) -> None:
    """Run, on this node, the launch that another node's stage announced as ``rdzv_id``; return at
    once if that stage has announced that its training ended (or was cached: nothing to join)."""
    shared, started = rendezvous_file(rdzv_id), time.time()
    deadline = started + timeout_s
    while (fields := _announcement(shared, started)) is None:
        if time.time() > deadline:
            raise TimeoutError(f"no launch named {rdzv_id} appeared in {shared.parent} within {timeout_s:.0f} s; start the stage "
                               f"with the same rdzv_id (and this node's MEDLM_STORE must be the store it uses)")
        time.sleep(1)
    if "ended" in fields:
        log(f"nothing to join: {rdzv_id} has ended ({fields['ended']})")
        return
    job = Launch(fields["module"], tuple(fields["args"]), fields["devices"], fields["nodes"], check_rendezvous(fields["rdzv_endpoint"]), rdzv_id)
    log(f"joining {rdzv_id}: {job.nodes} nodes at {job.rdzv_endpoint}, {job.devices} process(es) here")
    _run(job, log)


def launch_env(job: Launch) -> dict[str, str]:
    """torchrun's environment: ours, the repository importable, each of the job's processes on its
    share of the cores (torchrun would give each one thread; model/threads.py), and with several
    nodes the network interface the collectives use: the one this machine reaches the rendezvous
    host through (gloo and NCCL would take the interface of the machine's host name, often loopback
    or another network), unless GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME say otherwise."""
    threads = pinned_threads() or max(1, usable_cores() // job.devices)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if job.nodes > 1 and (interface := interface_towards(job.rdzv_endpoint.rsplit(":", 1)[0].strip("[]"))):
        env = {"GLOO_SOCKET_IFNAME": interface, "NCCL_SOCKET_IFNAME": interface} | env
    return env


def address_towards(host: str) -> str | None:
    """This machine's IPv4 address that it reaches ``host`` from (its route's source), or None."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((socket.gethostbyname(host), 9))  # nothing is sent: this only picks the route
            return probe.getsockname()[0]
    except OSError:
        return None


def interface_towards(host: str) -> str | None:
    """The name of this machine's network interface whose address it reaches ``host`` from."""
    if (local := address_towards(host)) is None:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            try:
                if socket.inet_ntoa(fcntl.ioctl(probe.fileno(), SIOCGIFADDR, struct.pack("256s", name[:15].encode()))[20:24]) == local:
                    return name
            except OSError:  # an interface without an IPv4 address
                continue
    return None


SIOCGIFADDR = 0x8915  # Linux: an interface's IPv4 address


def _announcement(shared: Path, join_started: float) -> dict | None:
    try:
        fields = json.loads(shared.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    # A launch's announcement goes when the launch ends; an end stays, so an older job's is skipped.
    return None if "ended" in fields and fields["created"] < join_started - STALE_S else fields


def _run(job: Launch, log: Callable[[str], None]) -> None:
    """Run ``job``, its lines to ``log``; rank 0's progress lines (storage/progress.py) also to the
    progress reporter, as if the training ran in this process."""
    env = launch_env(job)
    tail: collections.deque[str] = collections.deque(maxlen=20)
    reporter = REPORTER.get()
    logging.getLogger("medlm.distributed").info("launching %s", " ".join(job.command()))
    with subprocess.Popen(job.command(), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          preexec_fn=die_with_parent) as proc:
        if job.nodes > 1 and not hosts_here(job.rdzv_endpoint):
            threading.Thread(target=_stop_when_cut_off, args=(proc, job.rdzv_endpoint, log), daemon=True, name="medlm-cut-off").start()
        for line in proc.stdout:
            tail.append(line.rstrip())
            log(tail[-1])
            if reporter is not None and (step := read_line(tail[-1])):
                reporter(*step, tail[-1])
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun exited with status {proc.returncode}; last lines:\n" + "\n".join(tail))


CUT_OFF_S = 60  # how long a launcher whose workers have ended may go without reaching the rendezvous host


def _stop_when_cut_off(proc: subprocess.Popen, endpoint: str, log: Callable[[str], None]) -> None:
    """Stop the launcher ``proc`` once its workers have ended and the rendezvous host ``endpoint``
    has not taken a connection for CUT_OFF_S. Not before its workers end: a slow rank 0 (saving the
    model) keeps the others' launchers waiting, rightly, at torchrun's exit barrier."""
    host, port = endpoint.rsplit(":", 1)
    had_workers, unreachable_since = False, None
    while proc.poll() is None:
        workers = _children(proc.pid)
        had_workers |= bool(workers)
        if had_workers and not workers:
            try:
                socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
                unreachable_since = None
            except OSError:
                unreachable_since = unreachable_since or time.time()
                if time.time() - unreachable_since > CUT_OFF_S:
                    log(f"stopping torchrun: its workers have ended and the rendezvous host {endpoint} has not answered for {CUT_OFF_S} s")
                    proc.terminate()
                    try:
                        proc.wait(timeout=10)
                    except subprocess.TimeoutExpired:  # blocked in the store's receive, which retries on EINTR
                        proc.kill()
                    return
        time.sleep(1)


def _children(pid: int) -> list[int]:
    """``pid``'s child processes still running: not those that have ended and wait to be reaped
    (the launcher reaps its workers only between its calls to the store)."""
    try:
        children = [int(child) for task in Path(f"/proc/{pid}/task").iterdir() for child in (task / "children").read_text().split()]
    except OSError:
        return []
    return [child for child in children if _state(child) not in ("Z", "X", None)]


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
