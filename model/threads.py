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
- otherwise a CPU training loop, and a model's forward passes when it scores or generates
  (model/scoring.py), keep to the faster of their counts while the load changes (``ThreadTuner``):
  beside a one-thread spinner, the demo's chat answer took 33 s on two threads against 5.4 s on
  one (3 s quiet).
"""

from __future__ import annotations

import logging
import os
import statistics
from collections import deque

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


class ThreadTuner:
    """Keeps a CPU loop (training steps, or a model's forward passes) on the faster of ``threads``
    and one thread as the load changes.

    It starts on ``threads`` (on one with ``start_on_one``: forward passes of a small model, where
    more threads gain little quiet and lose 100x beside a busy core). The first probe comes after
    the warm-up and three steps (a neighbour may be there from the start), then one every
    ``interval`` steps, or at once when two steps in a row on several threads take 1.5x the recent
    median (a neighbour has arrived; one slow step may be a blip): the next ``probe`` steps run on
    the other count (or fewer: one 3x slower is enough), and the faster count stays. A probe that
    changes nothing doubles the interval (up to ``max_interval``) and is not repeated before 10x
    its own cost has passed, so a quiet machine, or a busy one on one thread, pays for few probes;
    a switch starts the interval again. Steps are compared per unit of ``work`` (tokens, for
    passes of different sizes). The count in use before it is restored by ``close``. Inactive
    with one thread.
    """

    def __init__(self, threads: int, what: str = "training", interval: int = 16, max_interval: int = 256, probe: int = 2, warmup: int = 2,
                 start_on_one: bool = False):
        self.counts = (threads, 1)
        self.home, self.what = (1 if start_on_one else threads), what
        self.base_interval, self.max_interval, self.probe_steps = interval, max_interval, probe
        self.interval, self.since_probe, self.warmup = interval, interval - 3, warmup
        self.recent: deque[float] = deque(maxlen=5)  # seconds per unit of work on the home count since it was chosen
        self.probing: list[float] | None = None
        self.probe_cost = self.since_probe_s = 0.0  # the last probe's seconds; seconds of steps since it
        self.slow_steps = 0  # steps in a row that took 1.5x the recent median
        self.active = threads > 1
        self.before = torch.get_num_threads()
        torch.set_num_threads(self.home)

    def close(self) -> None:
        """Back to the count in use before the loop."""
        torch.set_num_threads(self.before)

    @classmethod
    def for_device(cls, device: torch.device, what: str = "training", count: int | None = None, start_on_one: bool = False) -> "ThreadTuner":
        """On ``count`` threads, or the default count; active on the CPU unless a count is given
        or OMP_NUM_THREADS pins it."""
        active = count is None and device.type == "cpu" and pinned_threads() is None
        tuner = cls(count or default_threads(), what, start_on_one=start_on_one and active)
        tuner.active = tuner.active and active
        return tuner

    @property
    def other(self) -> int:
        return self.counts[1] if self.home == self.counts[0] else self.counts[0]

    def after_step(self, seconds: float, step: int, work: float = 1) -> None:
        if not self.active:
            return
        if self.warmup > 0:  # the first steps allocate and warm caches
            self.warmup -= 1
            return
        rate = seconds / work
        if self.probing is not None:
            self.probing.append(rate)
            self.probe_cost += seconds
            # Beside a busy core, a forward pass of a tiny model took 100x longer on two threads than on one.
            if len(self.probing) == self.probe_steps or rate > 3 * statistics.median(self.recent):
                self._decide(step)
            return
        self.since_probe += 1
        self.since_probe_s += seconds
        # Slower steps on one thread are a neighbour taking a core: more threads would not help.
        slower = self.home > 1 and len(self.recent) >= 3 and rate > 1.5 * statistics.median(self.recent)
        self.slow_steps = self.slow_steps + 1 if slower else 0
        self.recent.append(rate)
        if self.slow_steps == 2:  # not a blip: judge the home count by these steps alone
            self.recent = deque(list(self.recent)[-2:], maxlen=self.recent.maxlen)
        due = self.since_probe >= self.interval and self.since_probe_s >= 10 * self.probe_cost and len(self.recent) >= 3
        if due or self.slow_steps == 2:
            self.probing, self.probe_cost, self.slow_steps = [], 0.0, 0
            torch.set_num_threads(self.other)

    def _decide(self, step: int) -> None:
        probed, home = statistics.median(self.probing), statistics.median(self.recent)
        if probed < 0.9 * home:
            _log.info("%s: %d thread(s) from step %d (%.3g s a step, against %.3g s on %d)", self.what, self.other, step, probed, home, self.home)
            self.home, self.interval, self.probe_cost = self.other, self.base_interval, 0.0
            self.recent = deque(self.probing, maxlen=self.recent.maxlen)
        else:
            self.interval = min(2 * self.interval, self.max_interval)
        self.probing, self.since_probe, self.since_probe_s = None, 0, 0.0
        torch.set_num_threads(self.home)
