from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from sdcn_p2p.dht.keys import distance, node_key
from sdcn_p2p.dht.lookup import Lookup
from sdcn_p2p.dht.routing import RoutingTable
from sdcn_p2p.identity import PeerId

K = 20


def fake_peer(rng: random.Random) -> PeerId:
    return PeerId(bytes([0, 36]) + rng.randbytes(36))


class World:
    """Peers with Kademlia routing tables of everybody else (each bucket capped at k)."""

    def __init__(self, size: int, rng: random.Random, *, k: int = K) -> None:
        self.peers = [fake_peer(rng) for _ in range(size)]
        self.tables = {}
        for peer in self.peers:
            table = self.tables[peer] = RoutingTable(node_key(peer), k=k)
            for t, other in enumerate(rng.sample(self.peers, len(self.peers))):
                if other != peer:
                    table.add(other, float(t))
        self.k = k

    def closest(self, target: bytes, peers: list[PeerId] | None = None) -> list[PeerId]:
        return sorted(peers or self.peers, key=lambda p: distance(node_key(p), target))[: self.k]


def run(lookup: Lookup, answer: Callable[[PeerId], list[PeerId] | None]) -> int:
    """Drive `lookup` to the end, one query at a time; return the most queries in flight."""
    most = 0
    pending: list[PeerId] = []
    while not lookup.finished:
        pending += lookup.next_queries(0.0)
        most = max(most, len(pending))
        peer = pending.pop(0)
        closer = answer(peer)
        if closer is None:
            lookup.on_failure(peer)
        else:
            lookup.on_response(peer, closer)
    return most


def test_lookups_find_exactly_the_k_closest_peers() -> None:
    rng = random.Random(2)
    world = World(300, rng)
    for _ in range(20):
        target = rng.randbytes(32)
        start = rng.choice(world.peers)
        lookup = Lookup(target, world.tables[start].closest(target, K), self_id=start)
        most = run(lookup, lambda p, target=target: world.tables[p].closest(target, K))
        others = [p for p in world.peers if p != start]
        assert lookup.result() == world.closest(target, others)
        assert most <= 3
        assert lookup.queried < 60  # the 20 closest, and few detours
        assert lookup.failed == 0


def test_failed_peers_are_skipped_and_left_out() -> None:
    rng = random.Random(3)
    world = World(200, rng)
    target = rng.randbytes(32)
    dead = set(world.closest(target)[::3])  # a third of the true closest are down
    for peer in world.peers[::2]:  # half the peers have noticed and dropped them
        for gone in dead:
            world.tables[peer].remove(gone)
    start = rng.choice([p for p in world.peers[1::2] if p not in dead])  # has not noticed
    lookup = Lookup(target, world.tables[start].closest(target, K), self_id=start)
    run(lookup, lambda p: None if p in dead else world.tables[p].closest(target, K))
    alive = [p for p in world.peers if p not in dead and p != start]
    assert lookup.result() == world.closest(target, alive)
    assert lookup.failed >= len(dead)


def test_at_most_alpha_queries_in_flight_until_one_is_slow() -> None:
    rng = random.Random(4)
    seeds = [fake_peer(rng) for _ in range(10)]
    lookup = Lookup(rng.randbytes(32), seeds, k=5, alpha=3, slow_after=2.0)
    first = lookup.next_queries(0.0)
    assert len(first) == 3
    assert lookup.next_queries(1.0) == []
    lookup.on_response(first[0], [])
    assert len(lookup.next_queries(1.5)) == 1
    # Both queries sent at 0.0 are now slow: they stop counting against alpha.
    assert len(lookup.next_queries(2.0)) == 1  # only 5 (k) closest are ever queried
    assert lookup.in_flight == 4
    assert not lookup.finished
    lookup.on_response(first[1], [])  # a slow peer's answer still counts
    with pytest.raises(ValueError):
        lookup.on_response(first[1], [])  # not in flight any more


def test_finished_waits_for_every_one_of_the_k_closest() -> None:
    rng = random.Random(5)
    peers = sorted((fake_peer(rng) for _ in range(6)), key=lambda p: node_key(p))
    target = node_key(peers[0])
    by_distance = sorted(peers, key=lambda p: distance(node_key(p), target))
    lookup = Lookup(target, by_distance[1:], k=3, alpha=1)
    for expected in by_distance[1:4]:
        assert not lookup.finished
        assert lookup.next_queries(0.0) == [expected]
        lookup.on_response(expected, [])
    assert lookup.finished
    assert lookup.result() == by_distance[1:4]
    assert lookup.next_queries(0.0) == []  # the farther ones are never asked


def test_hops_count_how_the_closest_was_learned() -> None:
    rng = random.Random(6)
    target = rng.randbytes(32)
    me, seed, middle, closest = sorted(
        (fake_peer(rng) for _ in range(4)), key=lambda p: -distance(node_key(p), target)
    )
    lookup = Lookup(target, [seed], self_id=me)
    answers = {seed: [middle, me], middle: [closest, seed], closest: []}
    run(lookup, answers.__getitem__)
    assert lookup.result() == [closest, middle, seed]  # never ourselves
    assert lookup.hops == 2
    assert lookup.queried == 3
    assert Lookup(target, []).finished


def test_candidates_stay_bounded_whatever_peers_answer() -> None:
    rng = random.Random(7)
    lookup = Lookup(rng.randbytes(32), [fake_peer(rng) for _ in range(3)], k=4, alpha=2)
    for _ in range(200):
        queries = lookup.next_queries(0.0)
        if not queries:
            break
        for peer in queries:
            # Every peer names 20 fresh peers: an endless supply of candidates.
            lookup.on_response(peer, [fake_peer(rng) for _ in range(20)])
    assert lookup.candidates <= 16 * 4
    assert lookup.finished
