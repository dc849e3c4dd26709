"""Advert gossip: swarms of in-memory hosts running the Gossip service.

Swarms run under MockClock (`autojump_clock`) with one-way latencies of 10 to 100 ms; the hosts
are connected by hand, as there is no DHT here.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import msgpack
import pytest
import trio

from sdcn_p2p.adverts import AdvertCache
from sdcn_p2p.connection import Stream
from sdcn_p2p.errors import RecordError, StreamReset
from sdcn_p2p.gossip import (
    GOSSIP,
    AdvertBatch,
    Digest,
    Gossip,
    GossipConfig,
    Graft,
    Prune,
    max_entries,
    parse_message,
)
from sdcn_p2p.host import Host, HostConfig, open_host
from sdcn_p2p.identity import Identity, PeerId
from sdcn_p2p.multiaddr import Multiaddr
from sdcn_p2p.records import Advert, Envelope, LoraInfo, ModelInfo
from sdcn_p2p.testing import mock_wall_clock, open_memory_hosts, test_identity
from sdcn_p2p.transport import RawConnection, Transport
from sdcn_p2p.transport.memory import MemoryNetwork
from sdcn_p2p.wire.varint import encode_varint

ENTRIES = max_entries(4 * 1024 * 1024)
CONFIG = GossipConfig()


def random_latency(seed: int) -> Callable[[str, str], float]:
    """One-way latency of 10 to 100 ms, the same both ways and fixed per pair of hosts."""
    rng = random.Random(seed)
    chosen: dict[frozenset[str], float] = {}

    def latency(src: str, dst: str) -> float:
        return chosen.setdefault(frozenset((src, dst)), rng.uniform(0.010, 0.100))

    return latency


def advert_envelope(identity: Identity, seq: int = 1, *, lora_bytes: int = 0, **fields) -> Envelope:
    fields.setdefault("issued_at", mock_wall_clock())
    fields.setdefault("ttl", 180.0)
    fields.setdefault("models", (ModelInfo("SDXL Base"),))
    if lora_bytes:
        fields["loras"] = tuple(LoraInfo(f"{i:04}" + "x" * 196) for i in range(lora_bytes // 200))
    return Advert(identity.peer_id, seq, **fields).seal(identity)


def holds(cache: AdvertCache, peer: PeerId, seq: int) -> bool:
    advert = cache.get(peer)
    return advert is not None and advert.seq >= seq


@dataclass
class Swarm:
    network: MemoryNetwork
    hosts: list[Host]
    caches: list[AdvertCache]
    gossips: list[Gossip]
    changed: trio.lowlevel.ParkingLot  # unparked whenever any cache keeps an advert
    rng: random.Random

    async def connect(self, i: int, j: int) -> None:
        target = self.hosts[j]
        await self.hosts[i].connect(target.listen_addrs[0].with_peer_id(target.peer_id))

    async def connect_all(self, edges: Sequence[tuple[int, int]]) -> None:
        async with trio.open_nursery() as nursery:
            for i, j in edges:
                nursery.start_soon(self.connect, i, j)

    async def connect_random_graph(self, links: int, indices: Sequence[int] | None = None) -> None:
        """A ring (so the graph is connected) plus `links` - 1 random dials per host."""
        nodes = list(range(len(self.hosts))) if indices is None else list(indices)
        edges = {(a, b) for a, b in zip(nodes, nodes[1:] + nodes[:1], strict=True)}
        for a in nodes:
            for b in self.rng.sample(nodes, links - 1):
                if a != b and (b, a) not in edges:
                    edges.add((a, b))
        await self.connect_all(sorted(edges))

    def settled(self) -> bool:
        """Whether the meshes are done forming: every digest exchange of a connection is over,
        no graft is pending, meshes are symmetric and within bounds, or below `degree_low`
        with every connected gossip peer already in the mesh or backed off.
        """
        now = trio.current_time()
        ours = {host.peer_id: gossip for host, gossip in zip(self.hosts, self.gossips, strict=True)}
        links = sum(p in ours for host in self.hosts for p in host.connected_peers)
        # Both ends count an exchange; a skipped one (caches already equal) counts for both.
        if sum(g.stats.syncs + 2 * g.stats.syncs_skipped for g in self.gossips) < links:
            return False
        for host, gossip in zip(self.hosts, self.gossips, strict=True):
            mesh = gossip.mesh
            if gossip._mesh.pending or len(mesh) > CONFIG.degree_high:
                return False
            if any(host.peer_id not in ours[peer].mesh for peer in mesh if peer in ours):
                return False
            if len(mesh) < CONFIG.degree_low and any(
                peer not in mesh and not gossip._mesh.backed_off(peer, now)
                for peer in host.connected_peers
                if peer in ours
            ):
                return False
        return True

    async def wait_settled(self) -> None:
        """Wait until `settled` (checked once a heartbeat)."""
        with trio.fail_after(60):
            # Prunes and top-ups happen at heartbeats: looking once a heartbeat is enough.
            while not self.settled():  # noqa: ASYNC110
                await trio.sleep(CONFIG.heartbeat)

    async def wait_held(
        self, peer: PeerId, seq: int = 1, indices: Sequence[int] | None = None
    ) -> float:
        """Wait until the caches in `indices` (all by default) hold `peer`'s advert `seq`;
        return how long it took.
        """
        caches = self.caches if indices is None else [self.caches[i] for i in indices]
        start = trio.current_time()
        with trio.fail_after(120):
            while not all(holds(cache, peer, seq) for cache in caches):
                await self.changed.park()
        return trio.current_time() - start


def stall_transport(inner: Transport, stalled: set[str]) -> Transport:
    """Wrap `inner`: connections it dials stop sending once their remote host is in `stalled`."""

    class Stalling:
        def can_dial(self, addr: Multiaddr) -> bool:
            return inner.can_dial(addr)

        async def dial(self, addr: Multiaddr) -> RawConnection:
            return StallingConnection(await inner.dial(addr), addr.host)

        async def serve(self, addr, handler, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
            await inner.serve(addr, handler, task_status=task_status)

    class StallingConnection:
        def __init__(self, raw: RawConnection, remote: str) -> None:
            self.raw, self.remote = raw, remote
            self.local_addr, self.remote_addr = raw.local_addr, raw.remote_addr

        async def send_message(self, data) -> None:
            if self.remote in stalled:
                await trio.sleep_forever()
            await self.raw.send_message(data)

        async def receive_message(self) -> bytes:
            return await self.raw.receive_message()

        async def aclose(self) -> None:
            await self.raw.aclose()

    return Stalling()  # type: ignore[return-value]


@asynccontextmanager
async def open_swarm(
    count: int,
    *,
    config: GossipConfig = CONFIG,
    seed: int = 0,
    wrap: Callable[[int, Transport], Transport] = lambda index, transport: transport,
) -> AsyncIterator[Swarm]:
    """`count` hosts on one network, each with an AdvertCache and a running Gossip."""
    network = MemoryNetwork(latency=random_latency(seed), seed=seed)
    async with AsyncExitStack() as stack:
        hosts = []
        for index in range(count):
            transport = network.transport()
            listen = (Multiaddr.parse(f"/ip4/{transport.host}/tcp/4001/ws"),)
            host = await stack.enter_async_context(
                open_host(
                    test_identity(index, seed=seed),
                    HostConfig(listen=listen),
                    transport=wrap(index, transport),
                    wall_clock=mock_wall_clock,
                )
            )
            hosts.append(host)
        nursery = await stack.enter_async_context(trio.open_nursery())
        changed = trio.lowlevel.ParkingLot()
        caches, gossips = [], []
        for index, host in enumerate(hosts):
            cache = AdvertCache(wall_clock=mock_wall_clock)
            stack.enter_context(cache.subscribe(lambda advert: changed.unpark_all()))
            gossip = Gossip(
                host, cache, config, wall_clock=mock_wall_clock, rng=random.Random(index)
            )
            await nursery.start(gossip.run)
            caches.append(cache)
            gossips.append(gossip)
        yield Swarm(network, hosts, caches, gossips, changed, random.Random(seed))
        nursery.cancel_scope.cancel()


async def test_a_publish_reaches_every_peer_fast_and_each_forwards_it_once(
    autojump_clock,
) -> None:
    async with open_swarm(30) as swarm:
        await swarm.connect_random_graph(links=4)
        await swarm.wait_settled()
        publisher = swarm.hosts[7]
        advert = await swarm.gossips[7].publish(advert_envelope(publisher.identity))
        assert advert.peer_id == publisher.peer_id
        elapsed = await swarm.wait_held(publisher.peer_id)
        assert elapsed < 1.0
        await trio.sleep(5)  # let any late copy arrive
        pushes = 0
        for index, gossip in enumerate(swarm.gossips):
            assert gossip.stats.forwarded == 1
            # Never back to the mesh peer it came from.
            assert gossip.stats.pushes <= len(gossip.mesh) - (0 if index == 7 else 1)
            assert gossip.stats.adverts_accepted == (0 if index == 7 else 1)
            assert gossip.stats.rejected == gossip.stats.dropped == 0
            pushes += gossip.stats.pushes
        received = sum(g.stats.adverts_received for g in swarm.gossips)
        assert received == pushes
        assert pushes / len(swarm.hosts) <= 5


async def test_publishing_a_stale_advert_is_refused(autojump_clock) -> None:
    async with open_swarm(2) as swarm:
        identity = swarm.hosts[0].identity
        await swarm.gossips[0].publish(advert_envelope(identity, 2))
        with pytest.raises(RecordError, match="not kept"):
            await swarm.gossips[0].publish(advert_envelope(identity, 2))
        with pytest.raises(RecordError, match="not kept"):
            await swarm.gossips[0].publish(advert_envelope(identity, 1))
        with pytest.raises(RecordError, match="expired"):
            await swarm.gossips[0].publish(
                advert_envelope(identity, 3, issued_at=mock_wall_clock() - 200)
            )
        assert swarm.gossips[0].stats.forwarded == 1


async def test_a_peer_without_a_mesh_still_publishes_to_connected_peers(autojump_clock) -> None:
    async with (
        open_swarm(1) as swarm,
        open_memory_hosts(2, network=swarm.network, seed=99) as others,
    ):
        received: list[object] = []
        refusals = trio.Semaphore(0)

        async def refuse_grafts(stream: Stream) -> None:
            message = await stream.receive_message()
            if message == Graft().to_wire():
                await stream.send_message(Prune().to_wire())
                refusals.release()
            else:
                received.append(message)

        for other in others:
            other.set_handler(GOSSIP, refuse_grafts)
            await other.connect(swarm.hosts[0].listen_addrs[0].with_peer_id(swarm.hosts[0].peer_id))
        for _ in others:
            await refusals.acquire()
        assert swarm.gossips[0].mesh == frozenset()
        envelope = advert_envelope(swarm.hosts[0].identity)
        await swarm.gossips[0].publish(envelope)
        await trio.sleep(1)
        assert received == [AdvertBatch((envelope.to_bytes(),)).to_wire()] * 2


async def test_mesh_is_bounded_symmetric_and_kept_alive(autojump_clock) -> None:
    quiet = dataclasses.replace(CONFIG, anti_entropy_interval=10_000)  # no traffic at all
    async with open_swarm(30, seed=1, config=quiet) as swarm:
        await swarm.connect_random_graph(links=8)
        await swarm.wait_settled()
        meshes = [gossip.mesh for gossip in swarm.gossips]
        for host, gossip in zip(swarm.hosts, swarm.gossips, strict=True):
            assert CONFIG.degree_low <= len(gossip.mesh) <= CONFIG.degree_high
            for peer in gossip.mesh:
                assert host.peer_id in swarm.gossips[index_of(swarm, peer)].mesh
        # Idle connections close, but not those of the mesh.
        await trio.sleep(3 * swarm.hosts[0].config.idle_timeout)
        assert [gossip.mesh for gossip in swarm.gossips] == meshes
        for host, gossip in zip(swarm.hosts, swarm.gossips, strict=True):
            assert set(host.connected_peers) == gossip.mesh


def index_of(swarm: Swarm, peer: PeerId) -> int:
    return next(i for i, host in enumerate(swarm.hosts) if host.peer_id == peer)


async def push(attacker: Host, victim: Host, message: object, *, raw: bool = False) -> Stream:
    """Send one gossip message (or raw bytes) to `victim` on a new stream; return the stream."""
    addr = victim.listen_addrs[0].with_peer_id(victim.peer_id)
    stream = await attacker.new_stream(addr, GOSSIP, max_message_size=4 * 1024 * 1024)
    if raw:
        assert isinstance(message, bytes)
        await stream.send_all(encode_varint(len(message)) + message)
    else:
        await stream.send_message(message)
    await stream.send_eof()
    return stream


async def test_bad_adverts_from_a_hostile_peer_are_dropped_and_never_forwarded(
    autojump_clock,
) -> None:
    async with (
        open_swarm(6) as swarm,
        open_memory_hosts(1, network=swarm.network, seed=99) as (attacker,),
    ):
        await swarm.connect_all([(i, j) for i in range(6) for j in range(i + 1, 6)])
        await swarm.wait_settled()
        provider = swarm.hosts[1].identity
        old = advert_envelope(provider, 1)
        await swarm.gossips[1].publish(old)
        current = advert_envelope(provider, 2)
        await swarm.gossips[1].publish(current)
        await swarm.wait_held(provider.peer_id, 2)
        await trio.sleep(5)
        before = [dataclasses.replace(g.stats) for g in swarm.gossips]

        bad = attacker.identity
        claims_provider = msgpack.unpackb(advert_envelope(provider, 3).payload)
        forged = Envelope.seal(
            bad, Advert.DOMAIN, Advert.PAYLOAD_TYPE, msgpack.packb(claims_provider)
        )
        tampered = dataclasses.replace(current, payload=advert_envelope(provider, 3).payload)
        expired = advert_envelope(bad, 1, issued_at=mock_wall_clock() - 181)
        future = advert_envelope(bad, 1, issued_at=mock_wall_clock() + 3600)
        oversized = advert_envelope(bad, 1, lora_bytes=80_000)
        assert len(oversized.to_bytes()) > 64 * 1024
        rejected = [forged, tampered, expired, future, oversized]
        replayed = [current, old]
        victim = swarm.hosts[0]
        for envelope in [*rejected, *replayed]:
            await push(attacker, victim, AdvertBatch((envelope.to_bytes(),)).to_wire())
        await push(attacker, victim, {"type": "ADVERTS", "adverts": [b"\x93garbage"]})
        await trio.sleep(5)

        stats = swarm.gossips[0].stats
        assert stats.rejected - before[0].rejected == len(rejected) + 1
        assert stats.duplicates - before[0].duplicates == len(replayed)
        assert stats.forwarded == before[0].forwarded
        assert stats.pushes == before[0].pushes
        for cache in swarm.caches:
            assert cache.get(provider.peer_id).seq == 2
            assert bad.peer_id not in cache
        for gossip, was in zip(swarm.gossips[1:], before[1:], strict=True):
            assert gossip.stats.adverts_received == was.adverts_received


async def test_a_message_full_of_bad_adverts_is_cut_short(autojump_clock) -> None:
    async with (
        open_swarm(2) as swarm,
        open_memory_hosts(1, network=swarm.network, seed=99) as (attacker,),
    ):
        victim = swarm.hosts[0]
        good = advert_envelope(attacker.identity).to_bytes()
        stream = await push(attacker, victim, AdvertBatch((b"junk",) * 8 + (good,)).to_wire())
        with pytest.raises(StreamReset):
            await stream.receive_some()
        assert swarm.gossips[0].stats.rejected == 8
        assert attacker.peer_id not in swarm.caches[0]  # never even looked at
        stream = await push(attacker, victim, AdvertBatch((good,)).to_wire())
        assert await stream.receive_some() == b""
        assert attacker.peer_id in swarm.caches[0]


async def test_hostile_protocol_messages_reset_only_their_stream(autojump_clock) -> None:
    config = GossipConfig(max_message_size=128 * 1024)
    limit = max_entries(config.max_message_size)
    async with (
        open_swarm(3, config=config) as swarm,
        open_memory_hosts(1, network=swarm.network, seed=99) as (attacker,),
    ):
        await swarm.connect_all([(0, 1), (0, 2), (1, 2)])
        await swarm.wait_settled()
        victim = swarm.hosts[0]
        too_many = [[test_identity(i, seed=5).peer_id.bytes, 1] for i in range(limit + 1)]
        hostile: list[tuple[object, bool]] = [
            (b"\xc1", True),  # not msgpack
            (b"\xd4\x05\x00", True),  # an ext type
            ([1, 2, 3], False),
            ({"type": "HELLO"}, False),
            ({"type": "ADVERTS", "adverts": "everything"}, False),
            ({"type": "ADVERTS", "adverts": [], "want": [victim.peer_id.bytes]}, False),
            ({"type": "DIGEST", "digest": [[b"nobody", 1]]}, False),
            ({"type": "DIGEST", "digest": too_many}, False),
            ({"type": "ADVERTS", "adverts": [b"x" * (129 * 1024)]}, False),  # over the cap
        ]
        for message, raw in hostile:
            stream = await push(attacker, victim, message, raw=raw)
            with pytest.raises(StreamReset):
                await stream.receive_some()
        # The victim carries on: its adverts still spread.
        await swarm.gossips[0].publish(advert_envelope(victim.identity))
        assert await swarm.wait_held(victim.peer_id) < 1.0
        assert victim.is_connected(attacker.peer_id)


async def test_digest_exchange_on_the_wire(autojump_clock) -> None:
    async with (
        open_swarm(1) as swarm,
        open_memory_hosts(1, network=swarm.network, seed=99) as (asker,),
    ):
        holder = swarm.hosts[0]
        envelopes = [advert_envelope(test_identity(i, seed=8)) for i in range(3)]
        for envelope in envelopes:
            swarm.caches[0].add(envelope)
        known = test_identity(0, seed=8).peer_id
        newer_elsewhere = test_identity(1, seed=8).peer_id
        unknown = test_identity(5, seed=8)
        digest = Digest({known: 1, newer_elsewhere: 7, unknown.peer_id: 1})
        addr = holder.listen_addrs[0].with_peer_id(holder.peer_id)
        stream = await asker.new_stream(addr, GOSSIP, max_message_size=4 * 1024 * 1024)
        await stream.send_message(digest.to_wire())
        answer = parse_message(await stream.receive_message(), max_entries=ENTRIES)
        assert answer == AdvertBatch(
            (envelopes[2].to_bytes(),), want=(newer_elsewhere, unknown.peer_id)
        )
        wanted = advert_envelope(unknown)
        await stream.send_message(AdvertBatch((wanted.to_bytes(),)).to_wire())
        await stream.send_eof()
        assert await stream.receive_some() == b""
        assert swarm.caches[0].envelope(unknown.peer_id) == wanted


async def test_graft_and_prune_on_the_wire(autojump_clock) -> None:
    async with (
        open_swarm(1) as swarm,
        open_memory_hosts(1, network=swarm.network, seed=99) as (peer,),
    ):
        host, gossip = swarm.hosts[0], swarm.gossips[0]

        async def ask(message: object) -> object:
            stream = await push(peer, host, message)
            answer = await stream.receive_message()
            await stream.aclose()
            return answer

        assert await ask({"type": "GRAFT"}) == {"type": "GRAFT"}
        assert gossip.mesh == {peer.peer_id}
        stream = await push(peer, host, {"type": "PRUNE"})
        assert await stream.receive_some() == b""
        assert gossip.mesh == frozenset()
        # Having left, the peer may not come straight back.
        assert await ask({"type": "GRAFT"}) == {"type": "PRUNE"}
        await trio.sleep(CONFIG.prune_backoff)
        assert await ask({"type": "GRAFT"}) == {"type": "GRAFT"}


async def test_a_full_mesh_refuses_grafts(autojump_clock) -> None:
    async with (
        open_swarm(1) as swarm,
        open_memory_hosts(CONFIG.degree_high + 1, network=swarm.network, seed=99) as peers,
    ):
        answers = []
        for peer in peers:
            stream = await push(peer, swarm.hosts[0], Graft().to_wire())
            answers.append(await stream.receive_message())
        assert answers == [{"type": "GRAFT"}] * CONFIG.degree_high + [{"type": "PRUNE"}]
        assert len(swarm.gossips[0].mesh) == CONFIG.degree_high


async def test_a_newcomer_gets_everything_by_digest_exchange(autojump_clock) -> None:
    async with open_swarm(11) as swarm:
        old = range(10)
        await swarm.connect_random_graph(links=3, indices=old)
        await swarm.wait_settled()
        for index in old:
            await swarm.gossips[index].publish(advert_envelope(swarm.hosts[index].identity))
        for index in old:
            await swarm.wait_held(swarm.hosts[index].peer_id, indices=old)
        newcomer = swarm.hosts[10]
        await swarm.gossips[10].publish(advert_envelope(newcomer.identity))  # nobody to tell
        assert len(swarm.caches[10]) == 1
        start = trio.current_time()
        await swarm.connect(10, 3)
        for index in range(11):
            await swarm.wait_held(swarm.hosts[index].peer_id)
        assert trio.current_time() - start < 1.0
        assert len(swarm.caches[10]) == 11
        assert swarm.gossips[10].stats.syncs == 1
        assert swarm.gossips[10].stats.adverts_accepted == 10


async def test_peers_whose_caches_match_skip_the_digest_exchange(autojump_clock) -> None:
    async with open_swarm(4) as swarm:
        await swarm.connect_all([(0, 1), (1, 2)])
        await swarm.wait_settled()
        await swarm.gossips[0].publish(advert_envelope(swarm.hosts[0].identity))
        await swarm.wait_held(swarm.hosts[0].peer_id, indices=[0, 1, 2])
        syncs_before = swarm.gossips[2].stats.syncs
        await swarm.connect(2, 0)  # same caches: identify says so, no exchange
        await swarm.wait_settled()
        assert swarm.gossips[2].stats.syncs_skipped == 1
        assert swarm.gossips[2].stats.syncs == syncs_before
        await swarm.connect(3, 0)  # the newcomer's cache differs: it syncs
        await swarm.wait_held(swarm.hosts[0].peer_id)
        await swarm.wait_settled()
        assert swarm.gossips[3].stats.syncs == 1


async def test_a_partition_heals_once_a_link_across_returns(autojump_clock) -> None:
    async with open_swarm(20, seed=2) as swarm:
        await swarm.connect_random_graph(links=4, indices=range(10))
        await swarm.connect_random_graph(links=4, indices=range(10, 20))
        await swarm.connect_all([(0, 10), (5, 15)])
        await swarm.wait_settled()
        left, right = range(10), range(10, 20)
        swarm.network.partition(
            [swarm.hosts[i].transport.host for i in left],
            [swarm.hosts[i].transport.host for i in right],
        )
        a, b = swarm.hosts[0], swarm.hosts[19]
        await swarm.gossips[0].publish(advert_envelope(a.identity))
        await swarm.gossips[19].publish(advert_envelope(b.identity))
        await swarm.wait_held(a.peer_id, indices=left)
        await swarm.wait_held(b.peer_id, indices=right)
        await trio.sleep(60)
        assert not any(b.peer_id in swarm.caches[i] for i in left)
        assert not any(a.peer_id in swarm.caches[i] for i in right)
        swarm.network.heal()
        await swarm.connect(4, 12)
        await swarm.wait_held(a.peer_id)
        await swarm.wait_held(b.peer_id)


async def test_anti_entropy_repairs_a_missed_push(autojump_clock) -> None:
    async with open_swarm(10) as swarm:
        await swarm.connect_random_graph(links=3)
        await swarm.wait_settled()
        # Host 3's advert reaches its own cache but no push goes out, as if every push failed.
        swarm.caches[3].add(advert_envelope(swarm.hosts[3].identity))
        elapsed = await swarm.wait_held(swarm.hosts[3].peer_id)
        assert elapsed <= CONFIG.anti_entropy_interval + 1.0


async def test_a_stalled_mesh_peer_does_not_hold_back_the_others(autojump_clock) -> None:
    stalled: set[str] = set()

    def wrap(index: int, transport: Transport) -> Transport:
        return stall_transport(transport, stalled) if index == 0 else transport

    async with open_swarm(6, wrap=wrap) as swarm:
        await swarm.connect_all([(0, j) for j in range(1, 6)] + [(1, 2), (2, 3), (3, 4), (4, 5)])
        hub = swarm.gossips[0]
        await swarm.wait_settled()
        assert len(hub.mesh) == 5
        slow = swarm.hosts[5]
        stalled.add(slow.transport.host)
        identity = swarm.hosts[0].identity
        start = trio.current_time()
        # 1.6 MB for the stalled link: more than the connection buffers before senders wait.
        for seq in range(1, 41):
            await hub.publish(advert_envelope(identity, seq, lora_bytes=40_000))
        await swarm.wait_held(identity.peer_id, 40)  # the slow peer too, through the others
        assert trio.current_time() - start < 1.0
        await trio.sleep(CONFIG.rpc_timeout + CONFIG.heartbeat)
        assert slow.peer_id not in hub.mesh
        assert hub.stats.dropped > 0


async def test_a_peer_that_goes_down_leaves_the_mesh_at_once(autojump_clock) -> None:
    async with open_swarm(10) as swarm:
        await swarm.connect_random_graph(links=4)
        await swarm.wait_settled()
        gone = swarm.hosts[4]
        swarm.network.set_down(gone.transport.host)
        await trio.sleep(0.001)
        assert not any(gone.peer_id in g.mesh for g in swarm.gossips)
        await swarm.gossips[0].publish(advert_envelope(swarm.hosts[0].identity))
        alive = [i for i in range(10) if i != 4]
        assert await swarm.wait_held(swarm.hosts[0].peer_id, indices=alive) < 1.0


async def test_stopping_gossip_releases_the_mesh_and_the_protocol(autojump_clock) -> None:
    async with open_memory_hosts(2, network=MemoryNetwork(latency=0.01)) as (a, b):
        gossips = [
            Gossip(host, AdvertCache(wall_clock=mock_wall_clock), wall_clock=mock_wall_clock)
            for host in (a, b)
        ]
        async with trio.open_nursery() as nursery:
            for gossip in gossips:
                await nursery.start(gossip.run)
            await a.connect(b.listen_addrs[0].with_peer_id(b.peer_id))
            await gossips[0].wait_mesh(1)
            with pytest.raises(RuntimeError, match="already running"):
                await gossips[0].run()
            nursery.cancel_scope.cancel()
        assert GOSSIP not in a.protocols
        assert gossips[0].mesh == gossips[1].mesh == frozenset()
        # It can run again, and picks up the peers already connected.
        async with trio.open_nursery() as nursery:
            for gossip in gossips:
                await nursery.start(gossip.run)
            await gossips[0].wait_mesh(1)
            nursery.cancel_scope.cancel()
