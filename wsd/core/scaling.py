"""How many worker processes: the ``--workers`` / ``workers.count`` value, and the autoscale decision (pure).

``count`` is a whole number (that many workers), ``"auto"`` (one per CPU) or ``"auto:MIN-MAX"`` (between MIN and
MAX, scaled on CPU). The decision is a state machine fed with the busiest worker's CPU share (0..1 of one core)
and the time from an injected clock: a worker is added once the busiest stays above ``up_cpu`` for ``up_after_s``,
one is retired once every worker stays below ``down_cpu`` for ``down_after_s``; after a change the clocks start
over (a new worker needs time before the load it takes shows).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_RANGE = re.compile(r"auto:(\d+)-(\d+)")


@dataclass(frozen=True)
class WorkerCount:
    """``low`` .. ``high`` workers; ``auto`` when the count moves with the load (``low < high``)."""

    low: int
    high: int

    @property
    def scaling(self) -> bool:
        return self.high > self.low


class WorkerCountError(ValueError):
    pass


#: the most workers one host runs (a typo such as 1000 is refused rather than forking a thousand daemons)
MAX_WORKERS = 256


def parse_workers(value: int | str, cpus: int) -> WorkerCount:
    """``3``, ``"3"``, ``"auto"`` (``cpus``) or ``"auto:MIN-MAX"``; WorkerCountError says what is wrong."""
    if isinstance(value, bool):
        raise WorkerCountError(f"a number of workers, \"auto\" or \"auto:MIN-MAX\", got {value!r}")
    text = str(value).strip()
    if text == "auto":
        n = max(1, cpus)
        return WorkerCount(n, n)
    m = _RANGE.fullmatch(text)
    if m:
        low, high = int(m.group(1)), int(m.group(2))
        if low < 1 or high < low:
            raise WorkerCountError(f"auto:MIN-MAX needs 1 <= MIN <= MAX, got {text!r}")
        if high > MAX_WORKERS:
            raise WorkerCountError(f"at most {MAX_WORKERS} workers, got {text!r}")
        return WorkerCount(low, high)
    if text.isdigit():
        n = int(text)
        if not 1 <= n <= MAX_WORKERS:
            raise WorkerCountError(f"between 1 and {MAX_WORKERS} workers, got {n}")
        return WorkerCount(n, n)
    raise WorkerCountError(f"a number of workers, \"auto\" (one per CPU) or \"auto:MIN-MAX\", got {text!r}")


class Scaler:
    """Decides +1, -1 or 0 workers from samples of the busiest worker's CPU; no clock, no I/O of its own."""

    def __init__(self, low: int, high: int, *, up_cpu: float, down_cpu: float, up_after_s: float,
                 down_after_s: float) -> None:
        self.low, self.high = low, high
        self.up_cpu, self.down_cpu = up_cpu, down_cpu
        self.up_after_s, self.down_after_s = up_after_s, down_after_s
        self._hot_since: float | None = None
        self._cool_since: float | None = None

    def reconfigure(self, *, up_cpu: float, down_cpu: float, up_after_s: float, down_after_s: float) -> None:
        self.up_cpu, self.down_cpu = up_cpu, down_cpu
        self.up_after_s, self.down_after_s = up_after_s, down_after_s

    def decide(self, now: float, busiest_cpu: float, workers: int) -> int:
        """+1 (add a worker), -1 (retire one) or 0, for a sample taken at ``now`` with ``workers`` running."""
        if busiest_cpu >= self.up_cpu and workers < self.high:
            self._cool_since = None
            if self._hot_since is None:
                self._hot_since = now
            if now - self._hot_since >= self.up_after_s:
                self._hot_since = None
                return 1
            return 0
        self._hot_since = None
        if busiest_cpu <= self.down_cpu and workers > self.low:
            if self._cool_since is None:
                self._cool_since = now
            if now - self._cool_since >= self.down_after_s:
                self._cool_since = None
                return -1
            return 0
        self._cool_since = None
        return 0

    def changed(self) -> None:
        """The worker count changed for another reason (a crash, a restart): the clocks start over."""
        self._hot_since = self._cool_since = None
