from __future__ import annotations

import random

import pytest

from sdcn_p2p.dht.keys import bucket_index, distance, node_key
from sdcn_p2p.dht.routing import REPLACEMENT_CACHE_SIZE, AddStatus, RoutingTable
from sdcn_p2p.identity import PeerId
from sdcn_p2p.multiaddr import Multiaddr

ADDR = (Multiaddr.parse("/ip4/10.0.0.1/tcp/4001/ws"),)


def fake_peer(rng: random.Random) -> PeerId:
    """A peer id with an identity multihash of random bytes: cheap, and enough for routing."""
    return PeerId(bytes([0, 36]) + rng.randbytes(36))


def peers_in_bucket(own: bytes, index: int, count: int, rng: random.Random) -> list[PeerId]:
    found: list[PeerId] = []
    while len(found) < count:
        peer = fake_peer(rng)
        if bucket_index(own, node_key(peer)) == index:
            found.append(peer)
    return found


@pytest.fixture
def rng() -> random.Random:
    return random.Random(1)


def test_a_full_bucket_names_its_least_recently_seen_entry(rng: random.Random) -> None:
    table = RoutingTable(rng.randbytes(32), k=4)
    peers = peers_in_bucket(table.self_key, 0, 6, rng)
    for t, peer in enumerate(peers[:4]):
        assert table.add(peer, float(t), ADDR).status is AddStatus.ADDED
    assert table.add(peers[1], 10.0).status is AddStatus.UPDATED  # now the most recent
    assert table.get(peers[1]).addrs == ADDR  # type: ignore[union-attr]  # kept when omitted
    result = table.add(peers[4], 11.0, ADDR)
    assert (result.status, result.bucket, result.oldest) == (AddStatus.FULL, 0, peers[0])
    assert peers[4] not in table and len(table) == 4
    table.touch(peers[0], 12.0)  # the oldest answered its ping: the newcomer waits
    assert table.add(peers[5], 13.0).oldest == peers[2]
    assert [e.peer_id for e in table.bucket(0)] == [peers[2], peers[3], peers[1], peers[0]]


def test_replace_evicts_a_dead_entry_for_the_newcomer(rng: random.Random) -> None:
    table = RoutingTable(rng.randbytes(32), k=2)
    a, b, c, d = peers_in_bucket(table.self_key, 0, 4, rng)
    table.add(a, 0.0)
    table.add(b, 1.0)
    table.add(c, 2.0)
    table.add(d, 3.0)  # c and d wait in the replacement cache, d the newest
    table.replace(a, c, 5.0)  # a failed its ping: c, the newcomer pinged for, takes its place
    assert set(table) == {b, c}
    assert table.get(c).last_seen == 5.0  # type: ignore[union-attr]
    table.remove(b)  # a removed entry is replaced by the newest candidate
    assert set(table) == {c, d}
    assert not table.remove(b)
    table.replace(c, a, 6.0)  # a is no candidate any more: the table only shrinks
    assert set(table) == {d}


def test_replacement_cache_is_bounded(rng: random.Random) -> None:
    table = RoutingTable(rng.randbytes(32), k=1)
    peers = peers_in_bucket(table.self_key, 0, REPLACEMENT_CACHE_SIZE + 5, rng)
    for t, peer in enumerate(peers):
        table.add(peer, float(t))
    promoted = []
    while len(table):
        promoted.append(next(iter(table)))
        table.remove(promoted[-1])
    # The first peer, then the newest candidates only, newest first.
    assert promoted == [peers[0], *reversed(peers[-REPLACEMENT_CACHE_SIZE:])]


def test_closest_matches_a_brute_force_sort(rng: random.Random) -> None:
    table = RoutingTable(rng.randbytes(32), k=20)
    for t in range(2_000):
        table.add(fake_peer(rng), float(t))
    assert 20 * 8 < len(table) <= 20 * 256  # far buckets filled to k, near ones partly
    for _ in range(20):
        target = rng.randbytes(32)
        brute = sorted(table, key=lambda p: distance(node_key(p), target))
        assert table.closest(target, 20) == brute[:20]
    assert len(table.closest(target, 10_000)) == len(table)


def test_own_key_is_never_added(rng: random.Random) -> None:
    peer = fake_peer(rng)
    table = RoutingTable(node_key(peer))
    with pytest.raises(ValueError):
        table.add(peer, 0.0)
    assert not table.touch(peer, 0.0)
    assert not table.remove(peer)


def test_buckets_to_refresh_span_up_to_the_nearest_neighbour(rng: random.Random) -> None:
    table = RoutingTable(rng.randbytes(32))
    assert table.buckets_to_refresh(0.0, 600.0) == []
    (near,) = peers_in_bucket(table.self_key, 5, 1, rng)
    (far,) = peers_in_bucket(table.self_key, 1, 1, rng)
    table.add(near, 0.0)
    table.add(far, 0.0)
    assert table.buckets_to_refresh(0.0, 600.0) == [0, 1, 2, 3, 4, 5]
    for index in (0, 2, 3):
        key = table.random_key_in_bucket(index, rng)
        assert table.bucket_for(key) == index
        table.mark_refreshed(key, 100.0)
    assert table.buckets_to_refresh(650.0, 600.0) == [1, 4, 5]
    assert table.buckets_to_refresh(700.0, 600.0) == [0, 1, 2, 3, 4, 5]


def test_last_bucket_holds_every_nearer_key(rng: random.Random) -> None:
    table = RoutingTable(rng.randbytes(32), bucket_count=4)
    near = peers_in_bucket(table.self_key, 6, 1, rng)[0]
    table.add(near, 0.0)
    assert table.bucket_for(node_key(near)) == 3
    assert table.buckets_to_refresh(0.0, 1.0) == [0, 1, 2, 3]
    for _ in range(20):
        assert table.bucket_for(table.random_key_in_bucket(3, rng)) == 3
