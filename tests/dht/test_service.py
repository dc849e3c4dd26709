from __future__ import annotations

import dataclasses
import math
import random
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from sdcn_p2p.connection import Stream
from sdcn_p2p.dht import KAD, Dht, DhtConfig
from sdcn_p2p.dht.keys import distance, node_key
from sdcn_p2p.dht.messages import MAX_MESSAGE_SIZE
from sdcn_p2p.errors import RecordError, StreamReset
from sdcn_p2p.host import Host, HostConfig, open_host
from sdcn_p2p.identity import Identity, PeerId
from sdcn_p2p.multiaddr import Multiaddr
from sdcn_p2p.records import Advert, Envelope, ModelInfo, PeerRecord, model_key, peer_key
from sdcn_p2p.testing import mock_wall_clock, open_memory_hosts, test_identity
from sdcn_p2p.transport.memory import MemoryNetwork

K = 20
CONFIG = DhtConfig(k=K)
#: The 64-peer network: a store bound small enough for the floods to reach it.
BOUNDED = DhtConfig(k=K, max_records=400)


def latency(a: str, b: str) -> float:
    """One-way latency of 10-100 ms (RTT 20-200 ms), fixed per pair of hosts."""
    return 0.01 + zlib.crc32(f"{min(a, b)} {max(a, b)}".encode()) % 90 / 1000


def address(host: Host) -> Multiaddr:
    return host.listen_addrs[0].with_peer_id(host.peer_id)


def true_closest(key: bytes, peers: list[PeerId], *, exclude: PeerId | None = None) -> list[PeerId]:
    candidates = [p for p in peers if p != exclude]
    return sorted(candidates, key=lambda p: distance(node_key(p), key))[:K]


def sealed_advert(
    identity: Identity, seq: int = 1, *, models: tuple[str, ...] = ("sd-1.5",), **fields: Any
) -> Envelope:
    fields.setdefault("issued_at", mock_wall_clock())
    fields.setdefault("ttl", 180.0)
    models_info = tuple(ModelInfo(name) for name in models)
    return Advert(identity.peer_id, seq, models=models_info, **fields).seal(identity)


def sealed_record(identity: Identity, seq: int) -> Envelope:
    addrs = (Multiaddr.parse("/ip4/10.9.9.9/tcp/4001/ws"),)
    return PeerRecord(identity.peer_id, seq, addrs).seal(identity)


async def kad_request(host: Host, peer: PeerId | Multiaddr, message: object) -> Any:
    """One raw request, as any peer (hostile or not) can send it."""
    stream = await host.new_stream(peer, KAD, max_message_size=MAX_MESSAGE_SIZE)
    async with stream:
        await stream.send_message(message)
        return await stream.receive_message()


def put_message(key: bytes, envelope: Envelope) -> dict[str, Any]:
    return {"type": "PUT_VALUE", "key": key, "value": envelope.to_bytes()}


@asynccontextmanager
async def open_dht_network(
    count: int,
    *,
    config: DhtConfig = CONFIG,
    network: MemoryNetwork | None = None,
) -> AsyncIterator[list[Dht]]:
    """`count` server-mode Dhts on one network, every one but the first bootstrapped from it."""
    network = network or MemoryNetwork(latency=latency, seed=count)
    async with open_memory_hosts(count, network=network) as hosts, trio.open_nursery() as nursery:
        dhts = [Dht(host, config, wall_clock=mock_wall_clock) for host in hosts]
        for dht in dhts:
            await nursery.start(dht.run)
        joined = []

        async def join(dht: Dht) -> None:
            joined.append(await dht.bootstrap([address(hosts[0])]))

        async with trio.open_nursery() as joins:
            for dht in dhts[1:]:
                joins.start_soon(join, dht)
        assert all(joined)
        yield dhts
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_client(
    network: MemoryNetwork, index: int, *, config: DhtConfig = CONFIG
) -> AsyncIterator[Dht]:
    """A client-mode Dht: its host listens nowhere."""
    identity = test_identity(index, seed=99)
    async with (
        open_host(
            identity, HostConfig(), transport=network.transport(), wall_clock=mock_wall_clock
        ) as host,
        trio.open_nursery() as nursery,
    ):
        dht = Dht(host, config, wall_clock=mock_wall_clock)
        await nursery.start(dht.run)
        yield dht
        nursery.cancel_scope.cancel()


async def test_64_peers_find_the_true_closest_and_share_records(autojump_clock) -> None:
    network = MemoryNetwork(latency=latency, seed=64)
    async with open_dht_network(64, network=network, config=BOUNDED) as dhts:
        rng = random.Random(64)
        servers = [dht.host.peer_id for dht in dhts]
        assert all(dht.server for dht in dhts)

        # Lookups from several peers return exactly the k closest of all 64 peers.
        for _ in range(12):
            key, dht = rng.randbytes(32), rng.choice(dhts)
            result = await dht.lookup(key)
            assert result.closest == true_closest(key, servers, exclude=dht.host.peer_id)
            assert result.failed == 0
            assert result.hops <= 3

        # Every peer puts its signed PeerRecord: it lands on the k closest peers of its key
        # (and in the publisher's own store).
        async def put_own(dht: Dht) -> None:
            assert await dht.put(dht.host.signed_record) == K + 1

        async with trio.open_nursery() as nursery:
            for dht in dhts:
                nursery.start_soon(put_own, dht)
        by_id = {dht.host.peer_id: dht for dht in dhts}
        now = mock_wall_clock()
        for dht in dhts:
            key = peer_key(dht.host.peer_id)
            holders = {p for p, other in by_id.items() if other.store.get(key, now)}
            assert holders == {
                *true_closest(key, servers, exclude=dht.host.peer_id),
                dht.host.peer_id,
            }

        # Peer 1's record is read by every other peer.
        async def get_record(dht: Dht, owner: Dht) -> None:
            assert await dht.get(peer_key(owner.host.peer_id)) == [owner.host.signed_record]

        async with trio.open_nursery() as nursery:
            for dht in dhts[:1] + dhts[2:]:
                nursery.start_soon(get_record, dht, dhts[1])
        dhts[5].routing_table.remove(servers[40])
        assert await dhts[5].find_peer(servers[40]) == dhts[40].host.advertised_addrs

        # A client-mode peer looks up and puts, and never enters a routing table.
        async with open_client(network, 0, config=BOUNDED) as client:
            assert not client.server
            assert await client.bootstrap([address(dhts[0].host)])
            key = rng.randbytes(32)
            assert await client.find_closest(key) == true_closest(key, servers)
            advert = sealed_advert(test_identity(0, seed=99), models=("SDXL 1.0",))
            assert await client.put(advert) == K  # not in its own store: it serves nothing
            assert len(client.store) == 0
            assert await dhts[33].get(model_key("sdxl 1.0")) == [advert]

            # Whatever a hostile peer sends, the store keeps only valid, newer records, within
            # its bounds.
            await check_rejections(client.host, dhts, servers)
            assert not any(client.host.peer_id in dht.routing_table for dht in dhts)


async def check_rejections(hostile: Host, dhts: list[Dht], servers: list[PeerId]) -> None:
    mallory = test_identity(1, seed=99)
    key = peer_key(mallory.peer_id)
    target = next(d for d in dhts if d.host.peer_id == true_closest(key, servers)[0])
    peer = target.host.peer_id

    async def put(key: bytes, envelope: Envelope) -> dict[str, Any]:
        return await kad_request(hostile, peer, put_message(key, envelope))

    assert await put(key, sealed_record(mallory, 5)) == {"ok": True}
    alice = dhts[3].host.identity
    theirs = sealed_record(alice, 7)
    forged = dataclasses.replace(theirs, signature=sealed_record(mallory, 7).signature)
    tampered = dataclasses.replace(theirs, payload=theirs.payload.replace(b"10.9.9.9", b"6.6.6.6"))
    refusals = [
        (peer_key(alice.peer_id), forged, "signature"),
        (peer_key(alice.peer_id), tampered, "signature"),
        (key, sealed_record(mallory, 4), "stale"),
        (model_key("sd-1.5"), sealed_record(mallory, 6), "not stored under this key"),
        (key, sealed_record(alice, 8), "not stored under this key"),
        (model_key("sd-1.5"), sealed_advert(mallory, issued_at=mock_wall_clock() - 200), "expired"),
    ]
    for refused_key, envelope, reason in refusals:
        answer = await put(refused_key, envelope)
        assert answer["ok"] is False and reason in answer["error"]
    assert {e.to_bytes() for e in await dhts[9].get(key)} == {sealed_record(mallory, 5).to_bytes()}
    held = target.store.get(peer_key(alice.peer_id), mock_wall_clock())
    assert held in ([], [dhts[3].host.signed_record])  # what Alice put herself, if anything

    # One publisher flooding 300 records keeps its quota of 256; 280 publishers on one key
    # fill its 256 slots; the store stays within its 400 records.
    flood_models = [f"flood {i}" for i in range(300)]
    answers = [
        await put(model_key(name), sealed_advert(mallory, i, models=(name,)))
        for i, name in enumerate(flood_models)
    ]
    assert sum(a["ok"] for a in answers) == 255  # and its PeerRecord
    assert all("already has 256 records" in a["error"] for a in answers if not a["ok"])
    for i in range(280):
        publisher = test_identity(1000 + i, seed=99)
        assert (await put(model_key("popular"), sealed_advert(publisher, models=("popular",))))[
            "ok"
        ]
    assert len(target.store.values(model_key("popular"), mock_wall_clock())) == 256
    assert len(target.store) == 400
    assert len(target.store.get(key, mock_wall_clock())) == 1  # records outliving adverts stay

    # A malformed request resets the stream; the peer carries on.
    for garbage in ({"type": "FIND_NODE", "key": b"short"}, {"type": "DELETE"}, [1, 2]):
        with pytest.raises(StreamReset):
            await kad_request(hostile, peer, garbage)
    assert len((await kad_request(hostile, peer, {"type": "FIND_NODE", "key": key}))["closer"]) == K


async def connect_identified(host: Host, target: Host) -> None:
    """Connect and wait until `host` has identified `target` (and its Dht has seen it)."""
    identified = trio.Event()
    with host.subscribe(on_identified=lambda peer: peer == target.peer_id and identified.set()):
        await host.connect(address(target))
        await identified.wait()


async def test_a_full_bucket_evicts_its_oldest_entry_only_if_it_is_down(autojump_clock) -> None:
    network = MemoryNetwork(latency=0.02)
    config = DhtConfig(k=2)
    async with open_memory_hosts(16, network=network) as hosts, trio.open_nursery() as nursery:
        dhts = [Dht(host, config, wall_clock=mock_wall_clock) for host in hosts]
        for dht in dhts:
            await nursery.start(dht.run)
        table = dhts[0].routing_table
        b1, b2, b3, b4 = [h for h in hosts[1:] if table.bucket_for(node_key(h.peer_id)) == 0][:4]
        await connect_identified(hosts[0], b1)
        await connect_identified(hosts[0], b2)
        assert [e.peer_id for e in table.bucket(0)] == [b1.peer_id, b2.peer_id]

        network.set_down(b1.transport.host)  # type: ignore[attr-defined]
        await connect_identified(hosts[0], b3)  # bucket full: b1, the oldest, is pinged
        await trio.sleep(config.rpc_timeout)
        assert [e.peer_id for e in table.bucket(0)] == [b2.peer_id, b3.peer_id]

        await connect_identified(hosts[0], b4)  # b2 answers the ping and stays
        await trio.sleep(config.rpc_timeout)
        assert [e.peer_id for e in table.bucket(0)] == [b3.peer_id, b2.peer_id]
        table.remove(b3.peer_id)  # b4 waited in the replacement cache
        assert [e.peer_id for e in table.bucket(0)] == [b2.peer_id, b4.peer_id]
        nursery.cancel_scope.cancel()


async def test_bootstrap_meets_a_peer_in_every_bucket_and_skips_dead_seeds(
    autojump_clock,
) -> None:
    network = MemoryNetwork(latency=latency, seed=32)
    config = DhtConfig(k=4)
    async with open_dht_network(32, network=network, config=config) as dhts:
        seeds = [address(dhts[0].host)]
        async with open_memory_hosts(1, network=network, seed=1) as (host,):
            dht = Dht(host, config, wall_clock=mock_wall_clock)
            async with trio.open_nursery() as nursery:
                await nursery.start(dht.run)
                dead = Multiaddr.parse("/ip4/10.99.0.1/tcp/4001/ws")
                assert not await dht.bootstrap([dead])
                assert not await dht.bootstrap([address(host)])  # ourselves: skipped
                assert await dht.bootstrap([dead, *seeds])
                table = dht.routing_table
                occupied = {table.bucket_for(node_key(d.host.peer_id)) for d in dhts}
                assert {table.bucket_for(node_key(p)) for p in table} == occupied
                nursery.cancel_scope.cancel()


async def test_buckets_refresh_and_records_expire_periodically(autojump_clock) -> None:
    config = DhtConfig(k=K, refresh_interval=300.0)
    async with open_dht_network(8, config=config) as dhts:
        in_range = [set(d.routing_table.buckets_to_refresh(math.inf, 0.0)) for d in dhts]
        advert = sealed_advert(test_identity(0, seed=5), ttl=100.0)
        assert await dhts[1].put(advert) == 8
        await trio.sleep(2 * config.refresh_interval)
        now = trio.current_time()
        for dht, buckets in zip(dhts, in_range, strict=True):
            assert len(dht.store) == 0  # swept, not just hidden
            # Every bucket was refreshed again once the first interval had gone by.
            not_since = dht.routing_table.buckets_to_refresh(now, now - config.refresh_interval)
            assert buckets and not buckets & set(not_since)


async def test_peers_that_fail_leave_the_routing_table(autojump_clock) -> None:
    network = MemoryNetwork(latency=latency, seed=12)
    async with open_dht_network(12, network=network) as dhts:
        gone = dhts[7]
        network.set_down(gone.host.listen_addrs[0].host)
        key = node_key(gone.host.peer_id)
        result = await dhts[3].lookup(key)
        assert result.failed >= 1
        assert gone.host.peer_id not in result.closest
        assert gone.host.peer_id not in dhts[3].routing_table
        assert len(result.closest) == 10


async def test_an_unresponsive_peer_costs_one_timeout(autojump_clock) -> None:
    config = DhtConfig(k=4, rpc_timeout=5.0, slow_after=1.0)
    async with open_dht_network(10, config=config) as dhts:
        hung = dhts[4]

        async def never_answer(stream: Stream) -> None:
            await trio.sleep_forever()

        hung.host.set_handler(KAD, never_answer)
        start = trio.current_time()
        result = await dhts[2].lookup(node_key(hung.host.peer_id))
        assert hung.host.peer_id not in result.closest
        assert len(result.closest) == 4
        assert result.failed == 1
        assert config.rpc_timeout <= trio.current_time() - start < config.rpc_timeout + 2


async def test_get_validates_what_peers_answer_and_corrects_stale_holders(
    autojump_clock,
) -> None:
    network = MemoryNetwork(latency=latency, seed=9)
    async with (
        open_dht_network(8, network=network) as dhts,
        open_memory_hosts(1, network=network, seed=2) as (liar,),
    ):
        publisher = dhts[1].host.identity
        key = peer_key(publisher.peer_id)
        assert await dhts[1].put(sealed_record(publisher, 1)) == 8
        newest = sealed_record(publisher, 2)
        holder = dhts[5].host
        assert await kad_request(dhts[1].host, holder.peer_id, put_message(key, newest)) == {
            "ok": True
        }

        # A liar serving KAD answers every request with old, forged, mis-keyed or expired
        # records, and garbage.
        mallory = liar.identity
        lies = [
            sealed_record(publisher, 1),
            dataclasses.replace(newest, payload=newest.payload.replace(b"10.9.9.9", b"6.6.6.6")),
            dataclasses.replace(sealed_record(publisher, 9), signature=b"\0" * 64),
            sealed_record(mallory, 3),
            sealed_advert(mallory, issued_at=mock_wall_clock() - 1000),
        ]
        answer = {"values": [e.to_bytes() for e in lies] + [b"junk"], "closer": [], "ok": True}

        async def lie(stream: Stream) -> None:
            await stream.receive_message()
            await stream.send_message(answer)

        liar.set_handler(KAD, lie)
        getter = dhts[3]
        await connect_identified(getter.host, liar)
        assert liar.peer_id in getter.routing_table

        assert await getter.get(key) == [newest]
        assert await getter.get(model_key("sd-1.5")) == []
        await trio.sleep(CONFIG.rpc_timeout)  # corrections run in the background
        for dht in dhts:
            assert dht.store.get(key, mock_wall_clock()) == [newest]


async def test_put_refuses_invalid_records_locally(autojump_clock) -> None:
    async with open_dht_network(3) as dhts:
        identity = dhts[0].host.identity
        with pytest.raises(RecordError, match="expired"):
            await dhts[0].put(sealed_advert(identity, issued_at=mock_wall_clock() - 1000))
        with pytest.raises(RecordError, match="not stored"):
            await dhts[0].put(Envelope.seal(identity, "x", b"/x/1", b""))
        assert await dhts[0].put(sealed_advert(identity, models=())) == 0


async def test_stopping_a_dht_unregisters_it(autojump_clock) -> None:
    async with open_memory_hosts(2) as (a, b):
        dht = Dht(a, CONFIG, wall_clock=mock_wall_clock)
        async with trio.open_nursery() as nursery:
            await nursery.start(dht.run)
            assert KAD in a.protocols
            with pytest.raises(RuntimeError):
                await dht.run()
            nursery.cancel_scope.cancel()
        assert KAD not in a.protocols
        b.set_handler(KAD, lambda stream: stream.aclose())
        await connect_identified(a, b)  # the stopped Dht ignores it
        assert len(dht.routing_table) == 0


async def test_oversized_and_stalled_requests_are_reset(autojump_clock) -> None:
    async with open_dht_network(2) as (server, other):
        hostile = other.host
        peer = server.host.peer_id
        stream = await hostile.new_stream(peer, KAD, max_message_size=2 * MAX_MESSAGE_SIZE)
        async with stream:
            with pytest.raises(StreamReset):
                await stream.send_message(
                    {"type": "PUT_VALUE", "key": b"k" * 32, "value": b"x" * (MAX_MESSAGE_SIZE + 1)}
                )
                await stream.receive_message()
        stalled = await hostile.new_stream(peer, KAD)
        async with stalled:
            start = trio.current_time()
            with pytest.raises(StreamReset):
                await stalled.receive_message()
            assert trio.current_time() - start == pytest.approx(CONFIG.rpc_timeout, abs=0.1)
        answer = await kad_request(hostile, peer, {"type": "FIND_NODE", "key": b"k" * 32})
        assert [c[0] for c in answer["closer"]] == []  # the only other peer is the asker


async def test_a_peer_that_stops_serving_kad_leaves_the_table(autojump_clock) -> None:
    async with open_dht_network(2) as (a, b):
        await a.host.disconnect(b.host.peer_id)
        await connect_identified(a.host, b.host)
        assert b.host.peer_id in a.routing_table
        await a.host.disconnect(b.host.peer_id)
        b.host.remove_handler(KAD)  # b restarted as a client, say
        await connect_identified(a.host, b.host)
        assert b.host.peer_id not in a.routing_table
