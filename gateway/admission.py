"""The line of accepted async jobs not yet handed to the dispatcher (pure).

One line per model. Within a model's line each client has its own queue, in the order its
jobs came (by ticket, which a job keeps for life: one that found no provider free goes back
to its place), and the clients are served in turn by weighted deficit round robin: each
turn a client's credit grows by `weight` x the quantum (the dearest job the line has held,
in megapixel-steps), and it is served while its next job costs no more than its credit. A
client with 1,000 jobs waiting so takes turns with one that has a single job, and one of
weight 4 gets about four times the work of one of weight 1 while both wait.

As in FQ-CoDel, a client that had nothing waiting comes in as a *new* client, served before
the others while its first turn's credit lasts (new clients by weight, then in order of
coming): someone sending a job now and then waits for a free slot, not for a turn among
the clients that keep the line full. A client whose `may_serve` says no (over its jobs in
flight) is passed over without gaining credit.

The service takes the next job from whichever model's line may take one now (its model has
room, and is not held back after finding no provider) and whose oldest job came first.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["AdmissionLine"]

_T = TypeVar("_T")


@dataclass(slots=True)
class _Flow(Generic[_T]):
    """One client's jobs in one model's line, by ticket: (ticket, cost, item)."""

    weight: float
    jobs: list[tuple[int, float, _T]] = field(default_factory=list)
    credit: float = 0.0


@dataclass(slots=True)
class _ModelLine(Generic[_T]):
    flows: dict[str, _Flow[_T]] = field(default_factory=dict)
    fresh: list[str] = field(default_factory=list)  # new clients, in their first turn
    turns: deque[str] = field(default_factory=deque)  # the others; the first is served
    quantum: float = 0.0  # the dearest job seen: one turn of weight 1 affords any job

    def oldest(self) -> int:
        return min(flow.jobs[0][0] for flow in self.flows.values())


class AdmissionLine(Generic[_T]):
    """Jobs (any objects) waiting their turn, per model key, fairly among clients."""

    def __init__(self) -> None:
        self._lines: dict[str, _ModelLine[_T]] = {}
        self._where: dict[tuple[str, int], str] = {}  # (key, ticket) -> client
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(
        self,
        key: str,
        ticket: int,
        item: _T,
        *,
        client: str = "",
        weight: float = 1.0,
        cost: float = 1.0,
        returned: bool = False,
    ) -> None:
        """Put `item` (a job of `client`, costing `cost`) in `key`'s line at `ticket`'s place
        among that client's jobs. `weight` (> 0) is the client's share now. `returned`: the
        job was taken out before and comes back unserved, so its cost is credited back."""
        line = self._lines.setdefault(key, _ModelLine())
        line.quantum = max(line.quantum, cost)
        flow = line.flows.get(client)
        if flow is None:
            flow = line.flows[client] = _Flow(weight, credit=weight * line.quantum)
            place = next(
                (i for i, c in enumerate(line.fresh) if line.flows[c].weight < weight),
                len(line.fresh),
            )
            line.fresh.insert(place, client)
        flow.weight = weight
        if returned:
            flow.credit += cost
        bisect.insort(flow.jobs, (ticket, cost, item), key=_ticket)
        self._where[key, ticket] = client
        self._count += 1

    def remove(self, key: str, ticket: int) -> bool:
        """Take `ticket` out of `key`'s line; False if it is not there."""
        client = self._where.pop((key, ticket), None)
        if client is None:
            return False
        flow = self._lines[key].flows[client]
        index = bisect.bisect_left(flow.jobs, ticket, key=_ticket)
        del flow.jobs[index]
        self._taken(key, client)
        return True

    def position(self, key: str, ticket: int) -> int:
        """About how many jobs of `key`'s line will go before `ticket`: those of its own
        client ahead of it, and the share of each other client's while they wait."""
        client = self._where.get((key, ticket))
        if client is None:
            return 0
        line = self._lines[key]
        flow = line.flows[client]
        index = bisect.bisect_left(flow.jobs, ticket, key=_ticket)
        ahead = index
        for other, theirs in line.flows.items():
            if other != client:
                share = math.floor((index + 1) * theirs.weight / flow.weight)
                ahead += min(len(theirs.jobs), share)
        return ahead

    def next(
        self, can_take: Callable[[str], bool], may_serve: Callable[[str], bool] | None = None
    ) -> _T | None:
        """Take out and return the next job of the line whose oldest job came first among
        those `can_take` allows (by key) and that has a client `may_serve` allows; None if
        there is none."""
        keys = sorted((line.oldest(), key) for key, line in self._lines.items() if can_take(key))
        for _, key in keys:
            item = self._serve(key, may_serve)
            if item is not None:
                return item
        return None

    def _serve(self, key: str, may_serve: Callable[[str], bool] | None) -> _T | None:
        line = self._lines[key]
        for client in list(line.fresh):
            if may_serve is not None and not may_serve(client):
                continue
            flow = line.flows[client]
            if flow.credit >= flow.jobs[0][1]:
                return self._pop(key, client)
            line.fresh.remove(client)  # its first turn is over: one of the others now
            line.turns.append(client)
        turns = line.turns
        allowed = {c for c in turns if may_serve is None or may_serve(c)}
        if not allowed:
            return None
        while True:
            client = turns[0]
            flow = line.flows[client]
            if client in allowed and flow.credit >= flow.jobs[0][1]:
                return self._pop(key, client)
            turns.rotate(-1)
            if turns[0] in allowed:
                nxt = line.flows[turns[0]]
                nxt.credit += nxt.weight * line.quantum

    def _pop(self, key: str, client: str) -> _T:
        flow = self._lines[key].flows[client]
        ticket, cost, item = flow.jobs.pop(0)
        flow.credit -= cost
        del self._where[key, ticket]
        self._taken(key, client)
        return item

    def _taken(self, key: str, client: str) -> None:
        self._count -= 1
        line = self._lines[key]
        if not line.flows[client].jobs:  # an idle client keeps no credit (DRR)
            del line.flows[client]
            if client in line.turns:
                line.turns.remove(client)
            else:
                line.fresh.remove(client)
            if not line.flows:
                del self._lines[key]


def _ticket(entry: tuple[int, float, object]) -> int:
    return entry[0]
