"""Progress of long work, said the same way everywhere: N of total, the rate, the time left.

    progress = Progress("training", total=cfg.max_steps, unit="steps")
    for step in ...:
        progress.update(step + 1, f"loss {loss:.3f}")

Each update goes to the stage's logger (at most every ``every_s`` seconds, and the last one
always) and to the reporter in ``REPORTER``, which the flow layer (flows/stage.py) sets while a
stage runs as a Prefect task: a progress artifact the UI shows on the run page, with the line as
its description. Outside Prefect (a shell, torchrun) there is no reporter and only the log line.
"""

from __future__ import annotations

import logging
import re
import time
from contextvars import ContextVar
from typing import Callable

# (what, fraction done 0..1, the line) -> None; set by whoever shows progress (the Prefect task).
REPORTER: ContextVar[Callable[[str, float, str], None] | None] = ContextVar("medlm_progress_reporter", default=None)


def duration(seconds: float) -> str:
    """3h02m, 4m10s, 12s."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


_LINE = re.compile(r"^(?P<what>[a-z][a-z -]*): (?P<done>[\d,]+)/(?P<total>[\d,]+) ")  # as Progress.line writes it


def read_line(text: str) -> tuple[str, float] | None:
    """(what, fraction done) of a progress line another process printed (torchrun's rank 0); None
    for any other line."""
    if (found := _LINE.match(text)) is None:
        return None
    return found["what"], int(found["done"].replace(",", "")) / max(1, int(found["total"].replace(",", "")))


class Progress:
    def __init__(self, what: str, total: int, unit: str, log: logging.Logger | None = None, every_s: float = 10.0):
        self.what, self.total, self.unit = what, max(total, 0), unit
        self.log = log or logging.getLogger("medlm.progress")
        self.every_s = every_s
        self.started = self._last = time.monotonic()
        self._first_done: tuple[int, float] | None = None  # rate from the first update on (skips start-up)
        self._reporter = REPORTER.get()

    def line(self, done: int, detail: str = "") -> str:
        now = time.monotonic()
        parts = [f"{self.what}: {done:,}/{self.total:,} {self.unit}" + (f" ({100 * done / self.total:.0f}%)" if self.total else "")]
        if self._first_done is not None and done > self._first_done[0] and now > self._first_done[1]:
            rate = (done - self._first_done[0]) / (now - self._first_done[1])
            parts.append(f"{rate:,.3g} {self.unit}/s")
            if done < self.total:
                parts.append(f"{duration((self.total - done) / rate)} left")
        parts.append(f"{duration(now - self.started)} so far")
        return ", ".join(parts + ([detail] if detail else []))

    def update(self, done: int, detail: str = "") -> None:
        now = time.monotonic()
        if self._first_done is None:
            self._first_done = (done, now)
        if now - self._last < self.every_s and done < self.total:
            return
        self._last = now
        text = self.line(done, detail)
        self.log.info("%s", text)
        if self._reporter is not None:
            self._reporter(self.what, done / self.total if self.total else 1.0, text)
