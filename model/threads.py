"""How many CPU threads torch runs in a process of ours, and when a training loop should use fewer.

OpenMP's threads spin while they wait for each other. When another process wants one of the cores
(the flow's own Prefect server, a worker, a second run, pytest-xdist's other worker, a neighbour
on a shared node), the thread a step waits for is descheduled while its peer spins: the demo's
step went from 0.2 s to 0.6 s beside a one-thread spinner on 2 cores, where one thread alone
takes 0.35 s (``python -m benchmarks.threads``). So:

- a process starts with one thread per core it may really use (``usable_cores``: affinity, cgroup
  quota, MEDLM_CORES), shared among torchrun's processes on the machine;
- OMP_NUM_THREADS, when set, pins the count. A different count sums in another order, so only a
  pinned count gives the same losses to the bit from run to run whatever the machine's load;
- otherwise a CPU training loop keeps to the faster of its counts while the load changes
  (``ThreadTuner``).
"""

from __future__ import annotations

import logging
import os
import statistics
from collections import deque
from contextlib import contextmanager
from typing import Iterator

import torch

from storage.processes import usable_cores

_log = logging.getLogger("medlm.threads")


def pinned_threads() -> int | None:
    """OMP_NUM_THREADS, when the environment sets it (a user, a test, or our torchrun launcher)."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"OMP_NUM_THREADS={value!r}: expected a whole number of threads >= 1")
    return int(value)


def default_threads() -> int:
    """The pinned count, or this process's share of the usable cores (torchrun's LOCAL_WORLD_SIZE
    processes share them)."""
    return pinned_threads() or max(1, usable_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def use_default_threads() -> None:
    torch.set_num_threads(default_threads())


@contextmanager
def threads(count: int | None) -> Iterator[None]:
    """torch on ``count`` threads (None: the default) inside the block, as before it after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count or default_threads())
    try:
        yield
    finally:
        torch.set_num_threads(before)


class ThreadTuner:
    """Keeps a CPU training loop on the faster of ``threads`` and one thread as the load changes.

    The first probe comes after the warm-up and three steps (a neighbour may be there from the
    start), then one every ``interval`` steps, or at once when two steps in a row take 1.5x the
    recent median (a neighbour has arrived; one slow step may be a blip): the next ``probe`` steps run on the other count, and the faster
    count stays. A probe that changes nothing doubles the interval (up to ``max_interval``), so a
    quiet machine pays for few probes; a switch starts it again at ``interval``. The count in use
    before it is restored by ``close``. Inactive with one thread.
    """

    def __init__(self, threads: int, what: str = "training", interval: int = 16, max_interval: int = 256, probe: int = 2, warmup: int = 2):
        self.counts = (threads, 1)
        self.home, self.what = threads, what
        self.base_interval, self.max_interval, self.probe_steps = interval, max_interval, probe
        self.interval, self.since_probe, self.warmup = interval, interval - 3, warmup
        self.recent: deque[float] = deque(maxlen=5)  # step seconds on the home count since it was chosen
        self.probing: list[float] | None = None
        self.slow_steps = 0  # steps in a row that took 1.5x the recent median
        self.active = threads > 1
        self.before = torch.get_num_threads()
        torch.set_num_threads(threads)

    def close(self) -> None:
        """Back to the count in use before the loop."""
        torch.set_num_threads(self.before)

    @classmethod
    def for_device(cls, device: torch.device, what: str = "training") -> "ThreadTuner":
        """Active on the CPU unless OMP_NUM_THREADS pins the count."""
        tuner = cls(default_threads(), what)
        tuner.active = tuner.active and device.type == "cpu" and pinned_threads() is None
        return tuner

    @property
    def other(self) -> int:
        return self.counts[1] if self.home == self.counts[0] else self.counts[0]

    def after_step(self, seconds: float, step: int) -> None:
        if not self.active:
            return
        if self.warmup > 0:  # the first steps allocate and warm caches
            self.warmup -= 1
            return
        if self.probing is not None:
            self.probing.append(seconds)
            if len(self.probing) == self.probe_steps:
                self._decide(step)
            return
        self.since_probe += 1
        slower = len(self.recent) >= 3 and seconds > 1.5 * statistics.median(self.recent)
        self.slow_steps = self.slow_steps + 1 if slower else 0
        self.recent.append(seconds)
        if self.slow_steps == 2:  # not a blip: judge the home count by these steps alone
            self.recent = deque(list(self.recent)[-2:], maxlen=self.recent.maxlen)
        if (self.since_probe >= self.interval and len(self.recent) >= 3) or self.slow_steps == 2:
            self.probing, self.slow_steps = [], 0
            torch.set_num_threads(self.other)

    def _decide(self, step: int) -> None:
        probed, home = statistics.median(self.probing), statistics.median(self.recent)
        if probed < 0.9 * home:
            _log.info("%s: %d thread(s) from step %d (%.3g s a step, against %.3g s on %d)", self.what, self.other, step, probed, home, self.home)
            self.home, self.interval = self.other, self.base_interval
            self.recent = deque(self.probing, maxlen=self.recent.maxlen)
        else:
            self.interval = min(2 * self.interval, self.max_interval)
        self.probing, self.since_probe = None, 0
        torch.set_num_threads(self.home)
