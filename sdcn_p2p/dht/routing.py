"""The Kademlia routing table: k-buckets of server peers, least recently seen first.

Pure: no I/O and no clock reads; times are trio seconds passed in by the caller. A full bucket
does not take a newcomer at once: `add` parks it in the bucket's small replacement cache and
names the least recently seen entry, which the caller pings; if the ping fails the caller
`replace`s that entry with the newcomer, else `touch`es it (Kademlia's preference for peers
that have stayed up longest).
"""

from __future__ import annotations

import enum
import heapq
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

from sdcn_p2p.dht.keys import KEY_BITS, Key, key_int, node_key_int, random_key_with_prefix
from sdcn_p2p.identity import PeerId
from sdcn_p2p.multiaddr import Multiaddr

__all__ = ["AddResult", "AddStatus", "RoutingEntry", "RoutingTable"]

#: Newcomers remembered per full bucket, to fill it when an entry is removed.
REPLACEMENT_CACHE_SIZE = 8


class AddStatus(enum.Enum):
    ADDED = "added"
    UPDATED = "updated"  # already in the table: addresses and last_seen refreshed
    FULL = "full"  # bucket full: the newcomer waits in the replacement cache


@dataclass(frozen=True, slots=True)
class AddResult:
    """What `RoutingTable.add` did; `oldest` (FULL only) is the entry to ping."""

    status: AddStatus
    bucket: int
    oldest: PeerId | None = None


@dataclass(slots=True)
class RoutingEntry:
    peer_id: PeerId
    key: int  # node key as an integer
    addrs: tuple[Multiaddr, ...]
    last_seen: float  # trio seconds


class RoutingTable:
    """Up to `k` peers in each of `bucket_count` buckets, bucket i holding the peers whose
    key shares exactly i leading bits with `self_key` (the last bucket: at least i bits).
    """

    def __init__(self, self_key: Key, *, k: int = 20, bucket_count: int = KEY_BITS) -> None:
        if not 1 <= bucket_count <= KEY_BITS:
            raise ValueError(f"bucket_count must be in 1..{KEY_BITS}, not {bucket_count}")
        if k < 1:
            raise ValueError(f"k must be at least 1, not {k}")
        self.self_key = self_key
        self.k = k
        self.bucket_count = bucket_count
        self._self_int = key_int(self_key)
        self._entries: dict[PeerId, RoutingEntry] = {}
        # Buckets exist once used; dict order is least recently seen first.
        self._buckets: dict[int, dict[PeerId, RoutingEntry]] = {}
        self._replacements: dict[int, dict[PeerId, RoutingEntry]] = {}
        self._refreshed_at: dict[int, float] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._entries

    def __iter__(self) -> Iterator[PeerId]:
        return iter(list(self._entries))

    def get(self, peer_id: PeerId) -> RoutingEntry | None:
        return self._entries.get(peer_id)

    def bucket_for(self, key: Key | int) -> int:
        """The bucket a key falls in. Raises ValueError for our own key."""
        d = (key if isinstance(key, int) else key_int(key)) ^ self._self_int
        if d == 0:
            raise ValueError("our own key is in no bucket")
        return min(KEY_BITS - d.bit_length(), self.bucket_count - 1)

    def bucket(self, index: int) -> list[RoutingEntry]:
        """Entries of bucket `index`, least recently seen first."""
        return list(self._buckets.get(index, {}).values())

    def add(
        self, peer_id: PeerId, now: float, addrs: tuple[Multiaddr, ...] | list[Multiaddr] = ()
    ) -> AddResult:
        """Insert or refresh a peer seen at `now`. Raises ValueError for our own peer id."""
        key = node_key_int(peer_id)
        index = self.bucket_for(key)
        bucket = self._buckets.setdefault(index, {})
        entry = bucket.pop(peer_id, None)
        if entry is not None:
            entry.last_seen = now
            if addrs:
                entry.addrs = tuple(addrs)
            bucket[peer_id] = entry
            return AddResult(AddStatus.UPDATED, index)
        entry = RoutingEntry(peer_id, key, tuple(addrs), now)
        if len(bucket) < self.k:
            bucket[peer_id] = self._entries[peer_id] = entry
            self._replacements.get(index, {}).pop(peer_id, None)
            return AddResult(AddStatus.ADDED, index)
        cache = self._replacements.setdefault(index, {})
        cache.pop(peer_id, None)
        cache[peer_id] = entry
        if len(cache) > REPLACEMENT_CACHE_SIZE:
            del cache[next(iter(cache))]
        return AddResult(AddStatus.FULL, index, next(iter(bucket)))

    def touch(self, peer_id: PeerId, now: float) -> bool:
        """Mark a peer in the table as seen at `now`; False if it is not in the table."""
        entry = self._entries.get(peer_id)
        if entry is None:
            return False
        bucket = self._buckets[self.bucket_for(entry.key)]
        del bucket[peer_id]
        bucket[peer_id] = entry
        entry.last_seen = now
        return True

    def remove(self, peer_id: PeerId) -> bool:
        """Drop a peer (from its bucket or the replacement cache); the newest replacement
        candidate takes its place in the bucket. False if the peer was unknown.
        """
        entry = self._entries.pop(peer_id, None)
        if entry is None:
            key = node_key_int(peer_id)
            cache = self._replacements.get(self.bucket_for(key)) if key != self._self_int else None
            return cache is not None and cache.pop(peer_id, None) is not None
        index = self.bucket_for(entry.key)
        del self._buckets[index][peer_id]
        cache = self._replacements.get(index)
        if cache:
            promoted = cache.pop(next(reversed(cache)))
            self._buckets[index][promoted.peer_id] = self._entries[promoted.peer_id] = promoted
        return True

    def replace(self, old: PeerId, new: PeerId, now: float) -> None:
        """Evict `old` (it failed a ping) in favour of `new`, seen at `now`.

        If `new` is no longer a replacement candidate, the newest candidate (if any) is
        promoted instead.
        """
        entry = self._entries.get(old)
        if entry is not None:
            cache = self._replacements.get(self.bucket_for(entry.key), {})
            candidate = cache.pop(new, None)
            if candidate is not None:
                cache[new] = candidate  # newest: `remove` promotes it
                candidate.last_seen = now
        self.remove(old)

    def closest(self, key: Key, count: int) -> list[PeerId]:
        """Up to `count` peers of the table closest to `key`, nearest first."""
        target = key_int(key)
        entries = heapq.nsmallest(count, self._entries.values(), key=lambda e: e.key ^ target)
        return [e.peer_id for e in entries]

    def mark_refreshed(self, key: Key, now: float) -> None:
        """Record that a lookup for `key` completed at `now`, refreshing its bucket."""
        d = key_int(key) ^ self._self_int
        index = self.bucket_count - 1 if d == 0 else self.bucket_for(key)
        self._refreshed_at[index] = now

    def buckets_to_refresh(self, now: float, interval: float) -> list[int]:
        """Buckets 0..(the nearest non-empty one) not refreshed within `interval` seconds.

        Buckets nearer than our nearest neighbour are left out: a lookup there finds nobody new.
        """
        used = [i for i, bucket in self._buckets.items() if bucket]
        if not used:
            return []
        return [
            i
            for i in range(max(used) + 1)
            if now - self._refreshed_at.get(i, -math.inf) >= interval
        ]

    def random_key_in_bucket(self, index: int, rng: random.Random) -> Key:
        """A random key that falls in bucket `index`, to refresh it with a lookup."""
        if not 0 <= index < self.bucket_count:
            raise ValueError(f"bucket index must be in 0..{self.bucket_count - 1}")
        if index == self.bucket_count - 1 and index < KEY_BITS - 1:
            # The last bucket covers every longer prefix too: pick any of them.
            prefix = rng.randrange(index, KEY_BITS)
            return random_key_with_prefix(self.self_key, prefix, rng)
        return random_key_with_prefix(self.self_key, index, rng)

    def __repr__(self) -> str:
        return f"<RoutingTable {len(self)} peers in {len(self._buckets)} buckets>"
