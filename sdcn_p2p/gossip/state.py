"""Gossip's pure state: the seen cache, the mesh policy and the push budget.

No tasks, no I/O, no clock reads: each method takes the time it needs (`now`), so a
discrete-event simulation drives these as the service does. Members of the mesh are passed
in; the service owns them.

- `SeenCache`: the (peer, seq) of adverts already forwarded, bounded, expiring with them.
- `MeshState`: whom to graft or prune, who is being grafted, who is backed off (trio seconds).
- `PushBudget`: a token bucket per peer for the adverts it pushes to us.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Collection, Iterable

from sdcn_p2p.gossip.config import GossipConfig
from sdcn_p2p.identity import PeerId

__all__ = ["MeshState", "PushBudget", "SeenCache"]


class SeenCache:
    """The (peer, seq) of adverts already forwarded, at most `max_size`, oldest dropped first.

    An entry is useless once its advert has expired (the cache refuses it then), so `expire`
    drops such entries from the oldest end.
    """

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._items: OrderedDict[tuple[PeerId, int], float] = OrderedDict()

    def add(self, key: tuple[PeerId, int], expires_at: float) -> bool:
        """Remember `key` until wall time `expires_at`; False if it was already seen."""
        if key in self._items:
            return False
        self._items[key] = expires_at
        if len(self._items) > self.max_size:
            self._items.popitem(last=False)
        return True

    def expire(self, now: float) -> int:
        dropped = 0
        while self._items and next(iter(self._items.values())) <= now:
            self._items.popitem(last=False)
            dropped += 1
        return dropped

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)


class MeshState:
    """Mesh policy: whom to graft or prune, who is being grafted, who is backed off.

    Members are passed in (the service owns them); times are trio seconds.
    """

    def __init__(self, config: GossipConfig) -> None:
        self.config = config
        self.pending: set[PeerId] = set()  # GRAFT sent, no answer yet
        self._backoff: dict[PeerId, float] = {}  # peer -> time until which we leave it alone

    def backoff(self, peer: PeerId, now: float) -> None:
        """Leave `peer` out of the mesh for `config.prune_backoff` seconds."""
        self._backoff[peer] = now + self.config.prune_backoff

    def backed_off(self, peer: PeerId, now: float) -> bool:
        until = self._backoff.get(peer)
        return until is not None and until > now

    def accepts_graft(self, peer: PeerId, members: Collection[PeerId], now: float) -> bool:
        """Whether to let `peer` join our mesh when it asks."""
        if peer in members:
            return True
        return not self.backed_off(peer, now) and len(members) < self.config.degree_high

    def wants(self, peer: PeerId, members: Collection[PeerId], now: float) -> bool:
        """Whether to graft `peer` now that it connected, the mesh being below `degree`."""
        return (
            peer not in members
            and peer not in self.pending
            and not self.backed_off(peer, now)
            and len(members) + len(self.pending) < self.config.degree
        )

    def heartbeat(
        self,
        members: Collection[PeerId],
        candidates: Iterable[PeerId],
        now: float,
        rng: random.Random,
    ) -> tuple[list[PeerId], list[PeerId]]:
        """Return (peers to graft, peers to prune) and mark the grafted ones pending.

        Below `degree_low` (counting pending grafts) the mesh is topped up to `degree` from
        `candidates`, best first; above `degree_high` it is cut down to `degree` at random.
        """
        self._backoff = {peer: t for peer, t in self._backoff.items() if t > now}
        graft: list[PeerId] = []
        size = len(members) + len(self.pending)
        if size < self.config.degree_low:
            for peer in candidates:
                if len(graft) >= self.config.degree - size:
                    break
                if peer in members or peer in self.pending or peer in self._backoff:
                    continue
                graft.append(peer)
            self.pending.update(graft)
        prune: list[PeerId] = []
        if len(members) > self.config.degree_high:
            prune = rng.sample(sorted(members), len(members) - self.config.degree)
        return graft, prune


class PushBudget:
    """How many adverts each peer may still push: a token bucket per peer (time passed in).

    Holds a bucket only for peers that pushed lately: a full bucket is forgotten.
    """

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: dict[PeerId, tuple[float, float]] = {}  # peer -> (tokens, at)

    def take(self, peer: PeerId, count: int, now: float) -> int:
        """Take up to `count` tokens of `peer`'s at time `now`; returns how many it got."""
        tokens, at = self._buckets.get(peer, (float(self.burst), now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        granted = min(count, int(tokens))
        self._buckets[peer] = (tokens - granted, now)
        if len(self._buckets) > 1024:
            self._forget_full(now)
        return granted

    def _forget_full(self, now: float) -> None:
        for peer in [
            p for p, (t, at) in self._buckets.items() if t + (now - at) * self.rate >= self.burst
        ]:
            del self._buckets[peer]
