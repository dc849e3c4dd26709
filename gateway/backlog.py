"""How long a job joining the gateway's line would wait to start (pure: time passed in).

While every provider that could run a job is full, the job waits in its model's line
(`gateway.dispatch`). It starts once the jobs before it have, so it waits about::

    start_in = (ahead + queued + 1) / throughput

`ahead`: jobs in the line before it; `queued`: jobs in the capable providers' own queues
beyond their slots; `throughput`: jobs per second those providers finish, as this gateway
measured them while the line stood (`Throughput`), or, before MIN_SAMPLES of them, as their
measured speeds say (`ProviderDirectory.capacity`). A job whose `start_in` is more than it
may wait is answered 503 at once, with that estimate as Retry-After, rather than after
waiting in vain.
"""

from __future__ import annotations

import math
from collections import deque

__all__ = ["MIN_SAMPLES", "WINDOW", "Throughput", "start_in"]

#: Jobs finished before a line's measured throughput replaces the one speeds give.
MIN_SAMPLES = 8
#: The most recent jobs finished that the measured throughput is taken over.
WINDOW = 64


class Throughput:
    """Jobs finished per second since `since` (trio seconds), over the last WINDOW of them."""

    def __init__(self, since: float) -> None:
        self._since = since
        self._finished: deque[float] = deque(maxlen=WINDOW)

    def record(self, now: float) -> None:
        """A job finished at `now`."""
        if len(self._finished) == WINDOW:
            self._since = self._finished[0]  # the window moves past it
        self._finished.append(now)

    def rate(self, now: float) -> float | None:
        """Jobs per second, or None before MIN_SAMPLES. The time since the last job counts,
        so a stall lowers the rate.
        """
        if len(self._finished) < MIN_SAMPLES:
            return None
        return len(self._finished) / max(now - self._since, 1e-6)


def start_in(ahead: int, queued: int, throughput: float) -> float:
    """Seconds until a job with `ahead` jobs before it in line, and `queued` in the
    providers' queues, starts at `throughput` jobs per second (inf at none).
    """
    if throughput <= 0:
        return math.inf
    return (ahead + queued + 1) / throughput
