"""Training under torchrun: several processes on this machine, or one node of several.

    train_distributed("model.train", config_dict, args, train_config, run_dir, log)  # a stage's launcher
    join("job-42")  # each other node: `medlm join job-42`

One machine (``devices`` > 1, ``nodes`` 1): ``torchrun --standalone``. Several (``nodes`` > 1):
every node runs the same torchrun command, meeting at the c10d rendezvous ``rdzv_endpoint`` under
the name ``rdzv_id``. The stage's launcher writes its command to STORE/.rendezvous/RDZV_ID.json
before it starts; ``join`` on another node waits for that file and runs the same command. Which
node holds which ranks is torchrun's choice (by arrival; GROUP_RANK), never assumed, so every
node must see the store at the same path (a shared folder): any of them may hold rank 0, which
writes the run's checkpoints and metrics, and every rank reads the newest checkpoint on resume.
A node that dies takes the job down (the others' collectives fail; torchrun stops them); run the
stage and the joins again and training resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import subprocess
import sys
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
    from model.train import RunConfig

REPO = Path(__file__).resolve().parents[1]
MODULES = ("model.train", "model.finetune", "model.dpo")  # what a launch may run: a join runs nothing else
RENDEZVOUS = ".rendezvous"


@dataclass(frozen=True)
class Launch:
    """One torchrun launch: ``python -m MODULE ARGS`` in ``devices`` processes on each of ``nodes`` machines."""

    module: str
    args: tuple[str, ...]
    devices: int
    nodes: int = 1
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None

    def command(self) -> list[str]:
        if self.module not in MODULES:
            raise ValueError(f"a launch runs one of {MODULES}, not {self.module!r}")
        where = (["--standalone"] if self.nodes == 1 else
                 [f"--nnodes={self.nodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={self.rdzv_endpoint}", f"--rdzv-id={self.rdzv_id}"])
        return [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc-per-node={self.devices}", "-m", self.module, *self.args]


def train_distributed(module: str, config: dict, args: tuple[str, ...], where: "RunConfig", run: Path, log: Callable[[str], None]) -> dict:
    """A stage's training under torchrun: ``config`` (what the module's --config reads) written to
    the run folder, ``python -m MODULE --config FILE ARGS --out RUN`` launched on ``where``'s
    devices and nodes; the run's summary.json."""
    run.mkdir(parents=True, exist_ok=True)
    config_file = run / "launch_config.json"
    config_file.write_text(json.dumps(config, indent=2))
    launch(Launch(module, ("--config", str(config_file), *args, "--out", str(run)), where.devices, where.nodes, where.rdzv_endpoint, where.rdzv_id), log)
    return json.loads((run / "summary.json").read_text())


def train_stage(
    out_dir: Path, where: "RunConfig", train_here: Callable[[Path], dict], module: str, config: dict, args: tuple[str, ...],
    published: Callable[[Path, dict], list[Path]], log: Callable[[str], None],
) -> dict:
    """A training stage's build: its run in ``out_dir/RUN_DIR`` (resumed from its checkpoints),
    trained in this process (``train_here(run)``) or under torchrun (``train_distributed``), then
    the files ``published(run, summary)`` names published into ``out_dir``; returns the summary.
    A build killed after publishing only finishes the clean-up."""
    from model.checkpoint import RUN_DIR, finished_summary, publish_checkpoint

    if (summary := finished_summary(out_dir)) is not None:
        return summary
    run = out_dir / RUN_DIR
    if where.devices == 1 and where.nodes == 1:
        summary = train_here(run)
    else:  # torchrun, on this machine or as one of where.nodes
        summary = train_distributed(module, config, args, where, run, log)
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


def launch_env(devices: int) -> dict[str, str]:
    """torchrun's environment: ours, the repository importable, and each of the ``devices``
    processes on its share of the cores (torchrun would give each one thread; model/threads.py)."""
    threads = pinned_threads() or max(1, usable_cores() // devices)
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


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
    env = launch_env(job.devices)
    tail: collections.deque[str] = collections.deque(maxlen=20)
    reporter = REPORTER.get()
    logging.getLogger("medlm.distributed").info("launching %s", " ".join(job.command()))
    with subprocess.Popen(job.command(), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          preexec_fn=die_with_parent) as proc:
        for line in proc.stdout:
            tail.append(line.rstrip())
            log(tail[-1])
            if reporter is not None and (step := read_line(tail[-1])):
                reporter(*step, tail[-1])
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun exited with status {proc.returncode}; last lines:\n" + "\n".join(tail))
