"""The line of accepted async jobs not yet handed to the dispatcher (pure: time passed in).

One line per model, each in the order jobs came (by ticket, which a job keeps for life). The
job service takes the next job from whichever line may take one (its model has room) and
whose first job came first. A job that found every provider busy goes back to its place with
a time before which it is not taken again (a back-off), so it keeps its turn without spinning.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["AdmissionLine"]

_T = TypeVar("_T")


class AdmissionLine(Generic[_T]):
    """Jobs (any objects) waiting their turn, per model key, in ticket order."""

    def __init__(self) -> None:
        # key -> [(ticket, not_before, item)], sorted by ticket
        self._lines: dict[str, list[tuple[int, float, _T]]] = {}
        self._held: dict[int, float] = {}  # ticket -> not_before, for those backing off
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, key: str, ticket: int, item: _T, *, not_before: float = 0.0) -> None:
        """Put `item` in `key`'s line at `ticket`'s place; it is not taken before
        `not_before` (trio time)."""
        bisect.insort(self._lines.setdefault(key, []), (ticket, not_before, item), key=_ticket)
        if not_before > 0.0:
            self._held[ticket] = not_before
        self._count += 1

    def remove(self, key: str, ticket: int) -> bool:
        """Take `ticket` out of `key`'s line; False if it is not there."""
        line = self._lines.get(key)
        if not line:
            return False
        index = bisect.bisect_left(line, ticket, key=_ticket)
        if index == len(line) or line[index][0] != ticket:
            return False
        del line[index]
        self._forget(key, ticket)
        return True

    def position(self, key: str, ticket: int) -> int:
        """How many jobs are ahead of `ticket` in `key`'s line."""
        return bisect.bisect_left(self._lines.get(key, []), ticket, key=_ticket)

    def next(self, now: float, can_take: Callable[[str], bool]) -> _T | None:
        """Take out and return the job that came first among the lines `can_take` allows,
        skipping those backing off until after `now`; None if there is none."""
        best: tuple[int, str, int] | None = None  # (ticket, key, index)
        for key, line in self._lines.items():
            if not can_take(key):
                continue
            for index, (ticket, not_before, _) in enumerate(line):
                if best is not None and ticket > best[0]:
                    break
                if not_before <= now:
                    best = (ticket, key, index)
                    break
        if best is None:
            return None
        ticket, key, index = best
        item = self._lines[key].pop(index)[2]
        self._forget(key, ticket)
        return item

    def wake_at(self, now: float) -> float | None:
        """The earliest time after `now` a job backing off may be taken, or None."""
        later = [t for t in self._held.values() if t > now]
        return min(later, default=None)

    def _forget(self, key: str, ticket: int) -> None:
        self._held.pop(ticket, None)
        self._count -= 1
        if not self._lines[key]:
            del self._lines[key]


def _ticket(entry: tuple[int, float, object]) -> int:
    return entry[0]
