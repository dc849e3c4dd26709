"""The line of jobs waiting for a provider with room (pure: no I/O, no clock).

Jobs of one model wait in the order they came, by ticket (a counter the dispatcher hands
out at a job's first wait); a woken job leaves the line, and joins again at its old place if
it finds no room after all.
"""

from __future__ import annotations

import bisect

import trio

from gateway.backlog import Throughput

__all__ = ["WaitQueue"]


class WaitQueue:
    """The jobs of one model waiting for a provider to have room, in line by their tickets
    (the order they came)."""

    def __init__(self, now: float) -> None:
        self._line: list[tuple[int, trio.Event]] = []  # sorted by ticket
        self.throughput = Throughput(now)  # of this model's jobs, while the line stands

    def __len__(self) -> int:
        return len(self._line)

    def join(self, ticket: int) -> trio.Event:
        """Take the place `ticket` gives; the event is set when the job is woken."""
        event = trio.Event()
        bisect.insort(self._line, (ticket, event))
        return event

    def leave(self, ticket: int, event: trio.Event) -> None:
        """Give up a place `join` gave (nothing if it was woken or left already)."""
        if not event.is_set():
            self._line.remove((ticket, event))
            event.set()

    def is_first(self, ticket: int) -> bool:
        return bool(self._line) and self._line[0][0] == ticket

    def position(self, ticket: int) -> int:
        """How many jobs are ahead of `ticket` in line."""
        return bisect.bisect_left(self._line, (ticket,))

    def wake(self, count: int = 1) -> None:
        """Wake the first `count` jobs in line (they leave it)."""
        for _ in range(min(count, len(self._line))):
            self._line.pop(0)[1].set()
