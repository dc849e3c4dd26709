"""An iterative Kademlia lookup as a pure state machine (rust-libp2p's ClosestPeersIter).

The driver asks `next_queries(now)` which peers to query, runs the queries, and reports each
outcome with `on_response` or `on_failure`, until `finished`. At most `alpha` queries count as in
flight; one outstanding for `slow_after` seconds stops counting, so a slow peer does not stall
the lookup (its answer is still used if it comes). Only the `k` closest peers not known to have
failed are ever queried; the lookup ends when all of them have answered.
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Iterable
from dataclasses import dataclass

from sdcn_p2p.dht.keys import Key, key_int, node_key_int
from sdcn_p2p.identity import PeerId

__all__ = ["Lookup"]


class _State(enum.Enum):
    WAITING = "waiting"
    IN_FLIGHT = "in flight"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(slots=True)
class _Candidate:
    distance: int
    depth: int
    state: _State = _State.WAITING
    started_at: float = 0.0


class Lookup:
    """Find the `k` peers closest to `target`, starting from `seeds` (closest known peers).

    `self_id` is never queried nor returned. Candidates are bounded: past `16 * k`, the
    farthest not yet queried are forgotten.
    """

    def __init__(
        self,
        target: Key,
        seeds: Iterable[PeerId],
        *,
        k: int = 20,
        alpha: int = 3,
        self_id: PeerId | None = None,
        slow_after: float = 2.0,
    ) -> None:
        if k < 1 or alpha < 1:
            raise ValueError(f"k and alpha must be at least 1, not {k} and {alpha}")
        self.target = target
        self.k = k
        self.alpha = alpha
        self.self_id = self_id
        self.slow_after = slow_after
        #: Queries started.
        self.queried = 0
        #: Queries that failed.
        self.failed = 0
        self._target = key_int(target)
        self._max_candidates = 16 * k
        self._candidates: dict[PeerId, _Candidate] = {}
        self._order: list[tuple[int, PeerId]] = []  # by distance to the target
        self._in_flight: set[PeerId] = set()
        for peer in seeds:
            self._learn(peer, 0)

    def _learn(self, peer: PeerId, depth: int) -> None:
        if peer == self.self_id:
            return
        candidate = self._candidates.get(peer)
        if candidate is not None:
            candidate.depth = min(candidate.depth, depth)
            return
        distance = node_key_int(peer) ^ self._target
        self._candidates[peer] = _Candidate(distance, depth)
        bisect.insort(self._order, (distance, peer))

    def _forget_farthest(self) -> None:
        excess = len(self._order) - self._max_candidates
        if excess <= 0:
            return
        kept: list[tuple[int, PeerId]] = []
        for item in reversed(self._order):
            if excess > 0 and self._candidates[item[1]].state is _State.WAITING:
                del self._candidates[item[1]]
                excess -= 1
            else:
                kept.append(item)
        kept.reverse()
        self._order = kept

    def next_queries(self, now: float) -> list[PeerId]:
        """Peers to query now (marked in flight); empty while `alpha` queries are pending."""
        active = sum(
            1
            for peer in self._in_flight
            if now - self._candidates[peer].started_at < self.slow_after
        )
        queries: list[PeerId] = []
        considered = 0
        for _, peer in self._order:
            if active >= self.alpha:
                break
            candidate = self._candidates[peer]
            if candidate.state is _State.FAILED:
                continue
            considered += 1
            if considered > self.k:
                break
            if candidate.state is _State.WAITING:
                candidate.state = _State.IN_FLIGHT
                candidate.started_at = now
                self._in_flight.add(peer)
                queries.append(peer)
                active += 1
        self.queried += len(queries)
        return queries

    def _finish_query(self, peer: PeerId, state: _State) -> _Candidate:
        if peer not in self._in_flight:
            raise ValueError(f"{peer} has no query in flight")
        self._in_flight.remove(peer)
        candidate = self._candidates[peer]
        candidate.state = state
        return candidate

    def on_response(self, peer: PeerId, closer: Iterable[PeerId]) -> None:
        """`peer` answered, naming `closer` peers. Raises ValueError if it was not queried."""
        candidate = self._finish_query(peer, _State.SUCCEEDED)
        for other in closer:
            self._learn(other, candidate.depth + 1)
        self._forget_farthest()

    def on_failure(self, peer: PeerId) -> None:
        """The query to `peer` failed or timed out. Raises ValueError if it was not queried."""
        self._finish_query(peer, _State.FAILED)
        self.failed += 1

    @property
    def candidates(self) -> int:
        """Peers known to the lookup (queried or not)."""
        return len(self._order)

    @property
    def in_flight(self) -> int:
        """Queries started and not yet answered nor failed, slow ones included."""
        return len(self._in_flight)

    @property
    def finished(self) -> bool:
        """Whether the `k` closest peers not known to have failed have all answered."""
        answered = 0
        for _, peer in self._order:
            state = self._candidates[peer].state
            if state is _State.FAILED:
                continue
            if state is not _State.SUCCEEDED:
                return False
            answered += 1
            if answered == self.k:
                break
        return True

    def result(self) -> list[PeerId]:
        """The `k` closest peers that answered, nearest first."""
        peers = []
        for _, peer in self._order:
            if self._candidates[peer].state is _State.SUCCEEDED:
                peers.append(peer)
                if len(peers) == self.k:
                    break
        return peers

    @property
    def hops(self) -> int:
        """Depth at which the closest peer that answered was learned: 0 if it was a seed,
        1 if a seed named it, and so on (0 while nobody has answered).
        """
        for _, peer in self._order:
            candidate = self._candidates[peer]
            if candidate.state is _State.SUCCEEDED:
                return candidate.depth
        return 0

    def __repr__(self) -> str:
        return (
            f"<Lookup {self.target.hex()[:12]}… candidates={self.candidates} "
            f"queried={self.queried} failed={self.failed}>"
        )
