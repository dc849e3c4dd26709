"""The line of accepted async jobs not yet handed to the dispatcher (pure).

One line per model, each in the order jobs came (by ticket, which a job keeps for life: one
that found no provider free goes back to its place). The job service takes the next job from
whichever line may take one now (its model has room, and is not held back after finding no
provider) and whose first job came first.
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
        self._lines: dict[str, list[tuple[int, _T]]] = {}  # key -> sorted by ticket
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, key: str, ticket: int, item: _T) -> None:
        """Put `item` in `key`'s line at `ticket`'s place."""
        bisect.insort(self._lines.setdefault(key, []), (ticket, item), key=_ticket)
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
        self._forget(key)
        return True

    def position(self, key: str, ticket: int) -> int:
        """How many jobs are ahead of `ticket` in `key`'s line."""
        return bisect.bisect_left(self._lines.get(key, []), ticket, key=_ticket)

    def next(self, can_take: Callable[[str], bool]) -> _T | None:
        """Take out and return the job that came first among the lines `can_take` allows;
        None if there is none."""
        heads = [(line[0][0], key) for key, line in self._lines.items() if can_take(key)]
        if not heads:
            return None
        _, key = min(heads)
        item = self._lines[key].pop(0)[1]
        self._forget(key)
        return item

    def _forget(self, key: str) -> None:
        self._count -= 1
        if not self._lines[key]:
            del self._lines[key]


def _ticket(entry: tuple[int, object]) -> int:
    return entry[0]
