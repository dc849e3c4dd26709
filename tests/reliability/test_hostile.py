"""Hostile peers: a Sybil burst of fresh identities, a provider whose adverts lie, floods of
connections, streams and DHT stores from one peer, and a peer answering for another's id.
In-memory network under MockClock. (Forged, replayed, expired and oversized adverts and
records one at a time are in tests/gossip, tests/dht and tests/test_records.py.)
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from functools import partial

import pytest
import trio

from gateway.dispatch import Dispatcher
from gateway.errors import DispatchError
from gateway.node import Gateway
from sdcn_p2p.adverts import AdvertCache
from sdcn_p2p.backends import JobOutput
from sdcn_p2p.backends.testcard import TestcardBackend, TestcardConfig
from sdcn_p2p.dht import Dht, DhtConfig
from sdcn_p2p.dht.messages import KAD, PutValue, encode_request
from sdcn_p2p.errors import DialError, JobError
from sdcn_p2p.gossip import GOSSIP, AdvertBatch
from sdcn_p2p.host import Host, HostConfig, open_host
from sdcn_p2p.identity import Identity
from sdcn_p2p.jobs import JobRequest
from sdcn_p2p.multiaddr import Multiaddr
from sdcn_p2p.peer import Peer, PeerConfig
from sdcn_p2p.provider import Provider
from sdcn_p2p.records import Advert, ModelInfo, PeerRecord, model_key
from sdcn_p2p.testing import (
    all_tasks,
    mock_wall_clock,
    open_memory_hosts,
    open_memory_providers,
    small_job,
    test_identity,
)
from sdcn_p2p.transport.memory import MemoryNetwork

CARD = TestcardConfig(models=("card",), speed=2.0)


job = partial(small_job, model="card", prompt="a lighthouse")


def sybil_advert(identity: Identity, now: float, *, ttl: float = 3600.0) -> Advert:
    """A fresh identity claiming model "card" at 1000 it/s, at an address nobody answers."""
    return Advert(
        identity.peer_id,
        seq=1,
        issued_at=now,
        ttl=ttl,
        addrs=(Multiaddr.parse("/ip4/10.99.0.1/tcp/1/ws"),),
        backend="testcard",
        models=(ModelInfo("card"),),
        samplers=("Euler a",),
        slots=8,
        speed=1000.0,
    )


def sybils(count: int, seed: int = 7) -> list[Identity]:
    rng = random.Random(seed)
    return [Identity.from_seed(rng.randbytes(32)) for _ in range(count)]


@dataclass
class Net:
    network: MemoryNetwork
    gateway: Peer
    nodes: list[Peer]
    providers: list[Provider]
    dispatcher: Dispatcher


@asynccontextmanager
async def gateway_network(
    *backends: TestcardBackend, host: HostConfig = HostConfig()
) -> AsyncIterator[Net]:
    """Peer 0 is the gateway (everyone's bootstrap); a provider per backend after it."""
    before = all_tasks()
    network = MemoryNetwork(latency=0.005)
    config = PeerConfig(host=host)
    async with open_memory_providers(backends, network=network, config=config) as (
        gw,
        nodes,
        providers,
    ):
        dispatcher = Gateway(gw, rng=random.Random(3)).dispatcher
        yield Net(network, gw, nodes, providers, dispatcher)
    assert all_tasks() == before


async def gossip_flood(attacker, target: Peer, envelopes, per_message: int = 100) -> None:  # type: ignore[no-untyped-def]
    """Push `envelopes` to `target` in ADVERTS messages of `per_message`, as one peer."""
    addr = target.host.listen_addrs[0].with_peer_id(target.peer_id)
    for start in range(0, len(envelopes), per_message):
        chunk = envelopes[start : start + per_message]
        batch = AdvertBatch(tuple(e.to_bytes() for e in chunk))
        stream = await attacker.new_stream(addr, GOSSIP, max_message_size=4 * 1024 * 1024)
        async with stream:
            await stream.send_message(batch.to_wire())
            await stream.send_eof()
            with pytest.raises(trio.EndOfChannel):
                await stream.receive_message()


# --- Sybils ------------------------------------------------------------------------------------


async def test_a_sybil_burst_of_500_identities_does_not_take_work_from_proven_providers(
    autojump_clock,
) -> None:
    """500 fresh identities gossip adverts claiming 500x the honest speed, at an address
    that does not answer. Honest providers that have delivered keep getting the jobs; at
    most one attempt per request is spent on a claim, and every request succeeds.
    """
    async with (
        gateway_network(TestcardBackend(CARD), TestcardBackend(CARD)) as net,
        open_memory_hosts(1, network=net.network, seed=99) as (attacker,),
    ):
        async with trio.open_nursery() as nursery:  # both honest providers prove themselves
            for seed in range(2):
                nursery.start_soon(partial(net.dispatcher.run, job(seed=seed), deadline=30))
        assert all(net.dispatcher.directory.is_proven(node.peer_id) for node in net.nodes)
        now = mock_wall_clock()
        await gossip_flood(
            attacker, net.gateway, [sybil_advert(i, now).seal(i) for i in sybils(500)]
        )
        assert len(net.gateway.adverts) == 502  # two providers, 500 claims
        honest = {str(node.peer_id) for node in net.nodes}
        results: list[dict] = []

        async def one(seed: int) -> None:
            result = await net.dispatcher.run(job(seed=seed), deadline=30)
            results.append(result.info)

        async with trio.open_nursery() as nursery:
            for seed in range(40):
                nursery.start_soon(one, seed)
                await trio.sleep(0.1)
        assert len(results) == 40
        assert all(info["provider"] in honest for info in results)
        assert all(info["attempts"] <= 2 for info in results)
        assert sum(p.jobs_done for p in net.providers) == 42


def test_a_full_advert_cache_never_evicts_a_protected_provider_for_a_fresh_claim() -> None:
    now = 1_700_000_000.0
    cache = AdvertCache(wall_clock=lambda: now, max_adverts=50)
    honest, *crowd = sybils(301, seed=1)
    cache.add(replace(sybil_advert(honest, now, ttl=180.0), speed=2.0).seal(honest))
    cache.protected.add(honest.peer_id)
    for identity in crowd:  # each lives longer than the honest advert
        cache.add(sybil_advert(identity, now).seal(identity))
    assert len(cache) == 50
    assert cache.get(honest.peer_id) is not None
    # Its next advert is kept too, though it still expires before every claim.
    later = replace(sybil_advert(honest, now, ttl=180.0), seq=2).seal(honest)
    assert cache.add(later) is not None and len(cache) == 50


# --- a provider that lies ----------------------------------------------------------------------


class Liar(TestcardBackend):
    """Advertises a fast card; fails every job."""

    def __init__(self) -> None:
        super().__init__(TestcardConfig(models=("card",), speed=20.0))
        self.tried = 0

    async def generate(self, job: JobRequest, progress: Callable[[int, int], None]) -> JobOutput:
        self.tried += 1
        await trio.sleep(0.01)
        raise JobError("backend_failed", "CUDA error")


async def test_a_provider_that_fails_every_job_is_banned_and_stops_being_chosen(
    autojump_clock,
) -> None:
    """Over half an hour of steady requests, the liar (10x faster on paper) is tried a
    handful of times while the honest provider runs every job.
    """
    liar = Liar()
    async with gateway_network(liar, TestcardBackend(CARD)) as net:
        failed = 0
        for seed in range(180):
            try:
                await net.dispatcher.run(job(seed=seed), deadline=30)
            except DispatchError:
                failed += 1
            await trio.sleep(10)
        assert failed == 0
        assert liar.tried <= 2  # once unproven, then only if the honest one could not run it
        assert net.providers[1].jobs_done == 180
        assert not net.dispatcher.directory.is_proven(net.nodes[0].peer_id)


# --- floods from one peer ----------------------------------------------------------------------


async def test_a_connection_flood_cannot_stop_the_gateway_dialling_providers(
    autojump_clock,
) -> None:
    """40 fresh identities dial the gateway; inbound connections stop at their cap, and the
    gateway still dials a provider (after dropping its connection) and runs a job.
    """
    limits = HostConfig(max_connections=24, max_inbound_connections=16)
    async with (
        gateway_network(TestcardBackend(CARD), host=limits) as net,
        open_memory_hosts(40, network=net.network, seed=5) as flood,
    ):
        addr = net.gateway.host.listen_addrs[0].with_peer_id(net.gateway.peer_id)
        refused = 0
        for host in flood:
            try:
                await host.connect(addr)
            except DialError:
                refused += 1
        inbound = [c for conns in net.gateway.host._conns.values() for c in conns if not c.outbound]
        assert len(inbound) <= 16 and refused >= 40 - 16
        provider = net.nodes[0].peer_id
        await net.gateway.host.disconnect(provider)
        while net.gateway.host.num_connections > len(inbound) - 1:  # noqa: ASYNC110
            await trio.sleep(0.01)
        assert not net.gateway.host.is_connected(provider)
        result = await net.dispatcher.run(job(), deadline=30)
        assert result.info["provider"] == str(provider)


async def test_a_stream_flood_is_capped_and_jobs_still_run(autojump_clock) -> None:
    """One peer opens 1,000 streams at the gateway at once: at most 128 are served at a
    time, the rest reset, and the gateway's job to a provider runs meanwhile.
    """
    async with (
        gateway_network(TestcardBackend(CARD)) as net,
        open_memory_hosts(1, network=net.network, seed=6) as (attacker,),
    ):
        addr = net.gateway.host.listen_addrs[0].with_peer_id(net.gateway.peer_id)
        conn = await attacker.connect(addr)
        streams = []
        for _ in range(1000):
            streams.append(await conn.open_stream(KAD))  # each waits for a request
        result = await net.dispatcher.run(job(), deadline=30)
        assert result.images
        await trio.sleep(1)
        served = net.gateway.host.connection(attacker.peer_id)
        assert served is not None and served.num_streams <= 128
        for stream in streams:
            stream.reset()


async def test_a_dht_store_flood_from_one_peer_stays_within_the_store_bounds(
    autojump_clock,
) -> None:
    """One peer stores adverts signed by 300 identities at the gateway; the store never
    grows past its record cap, and an honest provider's advert can still be fetched.
    """
    async with (
        gateway_network(TestcardBackend(CARD)) as net,
        open_memory_hosts(1, network=net.network, seed=8) as (attacker,),
    ):
        store = net.gateway.dht.store
        store.max_records = 100
        addr = net.gateway.host.listen_addrs[0].with_peer_id(net.gateway.peer_id)
        now = mock_wall_clock()
        key = model_key("card")
        answers = {"ok": 0, "refused": 0}
        for identity in sybils(300, seed=3):
            envelope = sybil_advert(identity, now).seal(identity)
            stream = await attacker.new_stream(addr, KAD, max_message_size=4 * 1024 * 1024)
            async with stream:
                await stream.send_message(encode_request(PutValue(key, envelope.to_bytes())))
                reply = await stream.receive_message()
            answers["ok" if reply.get("ok") else "refused"] += 1
        assert len(store) <= 100
        assert answers["refused"] >= 200
        honest = net.nodes[0].peer_id
        assert net.gateway.adverts.get(honest) is not None


async def test_a_peer_with_500_identities_cannot_displace_50_honest_publishers_in_the_dht(
    autojump_clock,
) -> None:
    """50 publishers, each on its own address, store their PeerRecord and an advert at a DHT
    server; then one peer stores the same for 500 identities, over KAD, with adverts that
    outlive the honest ones. The server's store fills up, but what the flood displaces is
    its own: every honest record can still be fetched, and an honest newcomer still gets in.
    """
    network = MemoryNetwork(latency=0.005)
    config = DhtConfig(max_records=300, max_values_per_key=100)
    async with (
        open_memory_hosts(52, network=network) as (server_host, *honest),
        open_memory_hosts(1, network=network, seed=8) as (attacker,),
        trio.open_nursery() as nursery,
    ):
        server = Dht(server_host, config, wall_clock=mock_wall_clock)
        await nursery.start(server.run)
        addr = server_host.listen_addrs[0].with_peer_id(server_host.peer_id)
        key = model_key("card")

        async def put(host: Host, identity: Identity, *, ttl: float) -> list[bool]:
            now = mock_wall_clock()
            record = PeerRecord(identity.peer_id, 1, (addr.without_peer_id(),))
            advert = dataclasses.replace(sybil_advert(identity, now), ttl=ttl)
            answers = []
            for put_key, envelope in [
                (record.dht_key, record.seal(identity)),
                (key, advert.seal(identity)),
            ]:
                stream = await host.new_stream(addr, KAD, max_message_size=4 * 1024 * 1024)
                async with stream:
                    request = PutValue(put_key, envelope.to_bytes())
                    await stream.send_message(encode_request(request))
                    answers.append((await stream.receive_message())["ok"])
            return answers

        for host in honest[:50]:
            assert await put(host, host.identity, ttl=180) == [True, True]
        flood = [await put(attacker, identity, ttl=3600) for identity in sybils(500, seed=5)]
        assert sum(ok for answers in flood for ok in answers) >= 200
        store, now = server.store, mock_wall_clock()
        assert len(store) == 300 and len(store.values(key, now)) == 100
        assert store.held_by_address(attacker.transport.host) == 200
        held = {value.publisher for value in store.values(key, now)}
        for host in honest[:50]:
            assert host.peer_id in held
            assert store.get(PeerRecord(host.peer_id, 1, ()).dht_key, now)
        assert await put(honest[50], honest[50].identity, ttl=180) == [True, True]
        assert store.held_by_address(attacker.transport.host) == 198
        nursery.cancel_scope.cancel()


async def test_a_peer_answering_at_another_peers_address_is_not_taken_for_it(
    autojump_clock,
) -> None:
    """An impostor listens where a provider used to be: dialling the provider's id there
    fails the handshake, and the impostor is not recorded as the provider.
    """
    network = MemoryNetwork()
    async with open_memory_hosts(1, network=network) as (gateway,):
        async with open_memory_hosts(1, network=network, seed=1) as (provider,):
            real, addr = provider.peer_id, provider.listen_addrs[0]
        impostor = open_host(
            test_identity(0, seed=2), HostConfig(listen=(addr,)), transport=provider.transport
        )
        async with impostor:
            with pytest.raises(DialError, match="handshake"):
                await gateway.connect(addr.with_peer_id(real))
            assert not gateway.is_connected(real)
            assert gateway.connected_peers == []


async def test_one_machine_cannot_take_every_inbound_connection(autojump_clock) -> None:
    """40 identities dialling from one IP address get at most `max_inbound_per_ip`
    connections; a peer on another address still gets in.
    """
    network = MemoryNetwork()
    limits = HostConfig(max_inbound_per_ip=8)
    async with (
        open_memory_hosts(1, network=network, config=limits) as (server,),
        AsyncExitStack() as stack,
    ):
        addr = server.listen_addrs[0].with_peer_id(server.peer_id)
        machine = network.transport()  # one IP address, many identities
        refused = 0
        for index in range(40):
            host = await stack.enter_async_context(
                open_host(test_identity(index, seed=30), transport=machine)
            )
            try:
                await host.connect(addr)
            except DialError:
                refused += 1
        assert refused == 32 and server.num_connections == 8
        async with open_memory_hosts(1, network=network, seed=31) as (other,):
            await other.ping(addr)


async def test_a_gossip_flood_from_one_peer_is_cut_at_its_push_budget(autojump_clock) -> None:
    """One peer pushes 3,000 valid adverts of fresh identities at once: the gateway takes
    its burst (1,000) and drops the rest unread; an honest provider's push still lands.
    """
    async with (
        gateway_network(TestcardBackend(CARD)) as net,
        open_memory_hosts(2, network=net.network, seed=99) as (attacker, honest),
    ):
        stats = net.gateway.gossip.stats
        before = dataclasses.replace(stats)
        now = mock_wall_clock()
        flood = [sybil_advert(i, now).seal(i) for i in sybils(3000, seed=11)]
        await gossip_flood(attacker, net.gateway, flood, per_message=500)
        limited = stats.rate_limited - before.rate_limited
        # The bucket refills a little while the flood arrives (in about 50 ms).
        config = net.gateway.gossip.config
        assert 3000 - config.push_burst - 0.1 * config.push_rate <= limited
        assert limited <= 3000 - config.push_burst
        assert 0 < len(net.gateway.adverts) - 2 <= 3000 - limited
        identity = test_identity(0, seed=99 + 1)
        await gossip_flood(honest, net.gateway, [sybil_advert(identity, now).seal(identity)])
        assert identity.peer_id in net.gateway.adverts
        # The budget refills: ten seconds later the flooder may push again.
        await trio.sleep(10)
        await gossip_flood(attacker, net.gateway, flood[:100], per_message=100)
        assert stats.rate_limited - before.rate_limited == limited
