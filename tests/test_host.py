from __future__ import annotations

import contextlib
import hashlib
import os
from contextlib import AsyncExitStack
from dataclasses import replace

import pytest
import trio
import trio.testing

from sdcn_p2p.connection import Stream
from sdcn_p2p.errors import DialError, HandshakeError, StreamReset, UnsupportedProtocol
from sdcn_p2p.host import Host, HostConfig, open_host
from sdcn_p2p.identity import Identity
from sdcn_p2p.multiaddr import Multiaddr
from sdcn_p2p.protocols import identify
from sdcn_p2p.records import PeerRecord
from sdcn_p2p.testing import all_tasks, open_memory_hosts, test_identity
from sdcn_p2p.transport.memory import MemoryNetwork
from sdcn_p2p.wire import multistream, noise

ECHO = "/test/echo/1.0.0"
SUM = "/test/sum/1.0.0"
LOOPBACK = (Multiaddr.parse("/ip4/127.0.0.1/tcp/0/ws"),)


async def echo_handler(stream: Stream) -> None:
    while data := await stream.receive_some():
        await stream.send_all(data)


async def sum_handler(stream: Stream) -> None:
    numbers = await stream.receive_message()
    await stream.send_message({"sum": sum(numbers)})


def add_test_handlers(*hosts: Host) -> None:
    for host in hosts:
        host.set_handler(ECHO, echo_handler)
        host.set_handler(SUM, sum_handler)


def dial_addr(host: Host) -> Multiaddr:
    return host.listen_addrs[0].with_peer_id(host.peer_id)


async def test_websocket_hosts_run_100_concurrent_streams_of_mixed_protocols() -> None:
    async with (
        open_host(test_identity(1), HostConfig(listen=LOOPBACK)) as a,
        open_host(test_identity(2), HostConfig(listen=LOOPBACK)) as b,
    ):
        add_test_handlers(a, b)
        a.peerstore.add_addrs(b.peer_id, b.listen_addrs)
        results: dict[int, object] = {}

        async def one(i: int) -> None:
            kind = i % 3
            if kind == 0:
                stream = await a.new_stream(b.peer_id, ECHO)
                payload = hashlib.sha256(str(i).encode()).digest() * (i + 1)
                async with stream:
                    await stream.send_all(payload)
                    await stream.send_eof()
                    received = b""
                    while chunk := await stream.receive_some():
                        received += chunk
                results[i] = received == payload
            elif kind == 1:
                stream = await a.new_stream(b.peer_id, SUM)
                async with stream:
                    await stream.send_message(list(range(i)))
                    results[i] = (await stream.receive_message())["sum"] == sum(range(i))
            else:
                results[i] = await a.ping(b.peer_id) >= 0

        async with trio.open_nursery() as nursery:
            for i in range(100):
                nursery.start_soon(one, i)
        assert results == {i: True for i in range(100)}
        assert a.num_connections == 1


async def test_large_message_does_not_hold_back_a_ping() -> None:
    """With the 10 MB receiver stalled after its first chunk, the sender is stuck on flow
    control, yet a ping on another stream of the same connection completes.
    """
    first_chunk = trio.Event()
    release = trio.Event()
    received: list[bytes] = []

    async def slow_sink(stream: Stream) -> None:
        received.append(await stream.receive_some())
        first_chunk.set()
        await release.wait()
        while chunk := await stream.receive_some():
            received.append(chunk)
        await stream.send_all(b"done")

    big = bytes(range(256)) * (10 * 1024 * 1024 // 256)
    order: list[str] = []
    async with (
        open_host(test_identity(1), HostConfig(listen=LOOPBACK)) as a,
        open_host(test_identity(2), HostConfig(listen=LOOPBACK)) as b,
    ):
        b.set_handler("/test/sink/1.0.0", slow_sink)

        async def send_big() -> None:
            stream = await a.new_stream(dial_addr(b), "/test/sink/1.0.0")
            await stream.send_all(big)
            await stream.send_eof()
            assert await stream.receive_some() == b"done"
            order.append("big")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_big)
            await first_chunk.wait()
            await a.ping(b.peer_id)
            order.append("ping")
            release.set()
        assert order == ["ping", "big"]
        assert b"".join(received) == big


async def test_dialling_the_wrong_peer_id_fails_and_the_host_keeps_serving() -> None:
    async with (
        open_host(test_identity(1), HostConfig(listen=LOOPBACK)) as a,
        open_host(test_identity(2), HostConfig(listen=LOOPBACK)) as b,
        open_host(test_identity(3), HostConfig(listen=LOOPBACK)) as c,
    ):
        impostor_addr = b.listen_addrs[0].with_peer_id(c.peer_id)
        with pytest.raises(DialError) as info:
            await a.connect(impostor_addr)
        assert "reached" in str(info.value)
        assert isinstance(info.value.__cause__, DialError | HandshakeError) or "handshake" in str(
            info.value
        )
        assert not a.is_connected(c.peer_id)
        await c.ping(dial_addr(b))
        await a.ping(dial_addr(b))


async def test_unknown_protocol_is_refused_and_the_connection_survives() -> None:
    async with open_memory_hosts(2) as (a, b):
        stream = await a.new_stream(dial_addr(b), "/no/such/1.0.0")
        with pytest.raises(UnsupportedProtocol):
            await stream.receive_some()
        await a.ping(b.peer_id)
        assert a.num_connections == 1


async def test_message_over_the_protocol_cap_resets_only_that_stream() -> None:
    async with open_memory_hosts(2) as (a, b):
        errors: list[BaseException] = []

        async def capped(stream: Stream) -> None:
            try:
                await stream.receive_message()
            except Exception as exc:
                errors.append(exc)
                raise

        b.set_handler("/test/capped/1.0.0", capped, max_message_size=1000)
        stream = await a.new_stream(dial_addr(b), "/test/capped/1.0.0", max_message_size=10_000)
        await stream.send_message(b"x" * 5000)
        with pytest.raises(StreamReset):
            await stream.receive_some()
        assert errors and "1000" in str(errors[0])
        await a.ping(b.peer_id)


async def test_simultaneous_dials_collapse_to_one_connection(autojump_clock) -> None:
    network = MemoryNetwork(latency=0.01)
    async with open_memory_hosts(2, network=network) as (a, b):
        a.peerstore.add_addrs(b.peer_id, b.listen_addrs)
        b.peerstore.add_addrs(a.peer_id, a.listen_addrs)
        both_seen = {a: trio.Event(), b: trio.Event()}
        with contextlib.ExitStack() as subscriptions:
            for host in (a, b):
                seen: list[object] = []

                def on_connected(conn: object, seen: list = seen, host: Host = host) -> None:
                    seen.append(conn)
                    if len(seen) == 2:
                        both_seen[host].set()

                subscriptions.enter_context(host.subscribe(on_connected=on_connected))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(a.connect, b.peer_id)
                nursery.start_soon(b.connect, a.peer_id)
            await both_seen[a].wait()
            await both_seen[b].wait()
            # Both sides now use the connection dialled by the smaller peer id.
            smaller = min(a, b, key=lambda h: h.peer_id)
            for host, other in ((a, b), (b, a)):
                conn = host.connection(other.peer_id)
                assert conn is not None
                assert conn.outbound == (host is smaller)
            await a.ping(b.peer_id)
            await b.ping(a.peer_id)
            # The drained duplicate closes once its identify streams are done.
            await trio.sleep(a.config.handshake_timeout)
            assert a.num_connections == b.num_connections == 1


async def test_concurrent_local_dials_share_one_attempt(autojump_clock) -> None:
    async with open_memory_hosts(2, network=MemoryNetwork(latency=0.05)) as (a, b):
        a.peerstore.add_addrs(b.peer_id, b.listen_addrs)
        conns = []

        async def dial() -> None:
            conns.append(await a.connect(b.peer_id))

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(dial)
        assert len({id(c) for c in conns}) == 1
        assert a.num_connections == 1


async def test_identify_fills_the_peerstore_with_the_signed_record(autojump_clock) -> None:
    async with open_memory_hosts(2, config=HostConfig(roles=("provider",))) as (a, b):
        identified = trio.Event()
        with a.subscribe(on_identified=lambda peer: identified.set()):
            await a.connect(dial_addr(b))
            await identified.wait()
        info = a.peerstore.get(b.peer_id)
        assert info is not None and info.record is not None
        assert info.record.peer_id == b.peer_id
        assert list(info.record.addrs) == b.listen_addrs
        assert identify.IDENTIFY in info.protocols
        assert info.roles == ("provider",)
        assert info.agent_version.startswith("sdcn-p2p/")
        assert a.observed_addrs  # b told a the address it saw


async def test_a_subscription_ends_with_its_block(autojump_clock) -> None:
    async with open_memory_hosts(3) as (a, b, c):
        events: list[tuple[str, object]] = []
        with a.subscribe(
            on_connected=lambda conn: events.append(("connected", conn.peer_id)),
            on_identified=lambda peer: events.append(("identified", peer)),
            on_disconnected=lambda peer: events.append(("disconnected", peer)),
        ) as subscription:
            await a.connect(dial_addr(b))
            await trio.testing.wait_all_tasks_blocked()
            await a.disconnect(b.peer_id)
            await trio.testing.wait_all_tasks_blocked()
        assert subscription.closed
        assert events == [
            ("connected", b.peer_id),
            ("identified", b.peer_id),
            ("disconnected", b.peer_id),
        ]
        await a.connect(dial_addr(c))
        await trio.testing.wait_all_tasks_blocked()
        await a.disconnect(c.peer_id)
        await trio.testing.wait_all_tasks_blocked()
        assert len(events) == 3  # nothing heard after the block


async def test_rtt_ewma_follows_pings(autojump_clock) -> None:
    network = MemoryNetwork(latency=0.05)
    async with open_memory_hosts(2, network=network) as (a, b):
        first = await a.ping(dial_addr(b))
        assert first == pytest.approx(0.1)
        assert a.peerstore.rtt(b.peer_id) == pytest.approx(0.1)


async def test_idle_connections_close_unless_kept_alive(autojump_clock) -> None:
    config = HostConfig(idle_timeout=30)
    async with open_memory_hosts(3, config=config) as (a, b, c):
        await a.ping(dial_addr(b))
        await a.ping(dial_addr(c))
        a.keep_alive(c.peer_id)
        await trio.sleep(29)
        assert a.is_connected(b.peer_id)
        await trio.sleep(2)
        assert not a.is_connected(b.peer_id)
        assert a.is_connected(c.peer_id)
        a.keep_alive(c.peer_id, False)
        await trio.sleep(31)
        assert not a.is_connected(c.peer_id)


async def test_connection_limit_refuses_extra_peers(autojump_clock) -> None:
    network = MemoryNetwork()
    async with (
        open_memory_hosts(1, network=network, config=HostConfig(max_connections=2)) as (server,),
        open_memory_hosts(3, network=network, seed=1) as clients,
    ):
        await clients[0].ping(dial_addr(server))
        await clients[1].ping(dial_addr(server))
        with pytest.raises(DialError):
            await clients[2].ping(dial_addr(server))
        await clients[0].ping(server.peer_id)
        assert server.num_connections == 2


async def test_stream_limit_resets_streams_beyond_it(autojump_clock) -> None:
    config = HostConfig(max_inbound_streams=4)
    async with open_memory_hosts(2, config=config) as (a, b):
        hold = trio.Event()

        async def hold_open(stream: Stream) -> None:
            await stream.send_all(b"!")
            await hold.wait()

        b.set_handler("/test/hold/1.0.0", hold_open)
        identified = trio.Event()
        with a.subscribe(on_identified=lambda peer: identified.set()):
            await a.connect(dial_addr(b))
            await identified.wait()  # a's identify stream to b is closed
        streams = [await a.new_stream(b.peer_id, "/test/hold/1.0.0") for _ in range(5)]
        for stream in streams[:4]:
            assert await stream.receive_some() == b"!"
        with pytest.raises(StreamReset):
            await streams[4].receive_some()
        hold.set()
        for stream in streams:
            await stream.aclose()
        await a.ping(b.peer_id)


async def test_200_hosts_in_a_ring_ping_each_other(autojump_clock) -> None:
    network = MemoryNetwork(latency=lambda src, dst: 0.01 + (hash((src, dst)) % 40) / 1000)
    async with open_memory_hosts(200, network=network) as hosts:
        rtts: dict[int, float] = {}

        async def ping_next(i: int) -> None:
            nxt = hosts[(i + 1) % len(hosts)]
            rtts[i] = await hosts[i].ping(dial_addr(nxt))

        async with trio.open_nursery() as nursery:
            for i in range(len(hosts)):
                nursery.start_soon(ping_next, i)
        assert len(rtts) == 200 and all(r > 0 for r in rtts.values())
        assert all(h.num_connections == 2 for h in hosts)


async def test_closing_hosts_leaves_no_task_behind(autojump_clock) -> None:
    before = all_tasks()
    async with open_memory_hosts(5) as hosts:
        add_test_handlers(*hosts)
        for h in hosts[1:]:
            await hosts[0].ping(dial_addr(h))
        stream = await hosts[1].new_stream(dial_addr(hosts[2]), ECHO)
        await stream.send_all(b"open stream left hanging")
        assert len(all_tasks()) > len(before)
    assert all_tasks() == before


async def test_host_survives_garbage_from_a_raw_client(autojump_clock) -> None:
    network = MemoryNetwork()
    async with open_memory_hosts(2, network=network) as (a, b):
        select_noise = multistream.Dialer(noise.PROTOCOL_ID).data_to_send()
        raw = await network.transport().dial(b.listen_addrs[0])
        await raw.send_message(b"\x00" * 32)  # not multistream-select
        with pytest.raises(trio.EndOfChannel):
            await raw.receive_message()  # b hung up
        await raw.aclose()
        raw = await network.transport().dial(b.listen_addrs[0])
        await raw.send_message(select_noise + noise.encode_frame(b"\x00" * 32))  # low-order key
        with pytest.raises(trio.EndOfChannel):
            while True:
                await raw.receive_message()  # b's answer to /noise, then b hung up
        await raw.aclose()
        raw = await network.transport().dial(b.listen_addrs[0])
        await raw.send_message(select_noise + noise.encode_frame(os.urandom(32)))
        await raw.receive_message()  # b's reply, whatever it is
        await raw.send_message(noise.encode_frame(b"not noise at all"))
        with pytest.raises(trio.EndOfChannel):
            await raw.receive_message()
        await raw.aclose()
        await a.ping(dial_addr(b))


def _identity_for(label: str) -> Identity:
    return Identity.from_seed(hashlib.sha256(label.encode()).digest())


async def test_host_config_listen_addresses_are_logged(caplog) -> None:
    caplog.set_level("INFO", logger="sdcn_p2p.host")
    identity = _identity_for("logged")
    async with open_host(identity, replace(HostConfig(), listen=LOOPBACK)) as host:
        expected = f"listening on {host.listen_addrs[0]}/p2p/{identity.peer_id}"
    assert expected in caplog.text


async def test_wildcard_listen_address_is_advertised_as_local_addresses() -> None:
    listen = (Multiaddr.parse("/ip4/0.0.0.0/tcp/0/ws"),)
    async with (
        open_host(test_identity(1), HostConfig(listen=listen)) as a,
        open_host(test_identity(2)) as b,
    ):
        port = a.listen_addrs[0].port
        advertised = a.advertised_addrs
        assert Multiaddr.parse(f"/ip4/127.0.0.1/tcp/{port}/ws") in advertised
        assert all(not addr.is_unspecified and addr.port == port for addr in advertised)
        assert list(PeerRecord.from_envelope(a.signed_record).addrs) == advertised
        await b.ping(Multiaddr.parse(f"/ip4/127.0.0.1/tcp/{port}/ws").with_peer_id(a.peer_id))


async def test_announce_replaces_the_listen_addresses() -> None:
    announce = (Multiaddr.parse("/dns4/boot.example.org/tcp/443/wss"),)
    config = HostConfig(listen=LOOPBACK, announce=announce)
    async with open_host(test_identity(1), config) as host:
        assert host.advertised_addrs == list(announce)


async def test_a_draining_connection_still_serves_streams_the_remote_opens(autojump_clock) -> None:
    """The remote may open a stream before it learns the connection is a retired duplicate."""
    async with open_memory_hosts(2) as (a, b):
        add_test_handlers(a, b)
        conn = await b.connect(dial_addr(a))
        a_side = a.connection(b.peer_id)
        assert a_side is not None
        a_side.drain()
        assert a.connection(b.peer_id) is None  # a opens nothing new on it
        stream = await conn.open_stream(SUM)
        async with stream:
            await stream.send_message([1, 2, 3])
            assert (await stream.receive_message())["sum"] == 6
        await trio.sleep(10)  # idle past the drain grace: a closes it
        assert a.num_connections == 0


async def test_identify_extensions_reach_the_other_side(autojump_clock) -> None:
    async with open_memory_hosts(2) as (a, b):
        state = {"value": b"v1"}
        b.set_identify_extension("test/state", lambda: state["value"])
        identified = trio.Event()
        with a.subscribe(on_identified=lambda peer: identified.set()):
            await a.connect(dial_addr(b))
            await identified.wait()
        assert a.peerstore.get(b.peer_id).extensions == {"test/state": b"v1"}
        for name in range(7):
            b.set_identify_extension(f"n{name}", lambda: b"")
        with pytest.raises(ValueError, match="at most 8"):
            b.set_identify_extension("one too many", lambda: b"")


@pytest.mark.parametrize("transport", ["memory", "websocket"])
async def test_a_new_stream_right_after_disconnect_dials_afresh(transport: str) -> None:
    """Once `disconnect` returns the old connection is closed: the next stream to the same
    peer goes over a new connection instead of failing on the dying one.
    """
    async with AsyncExitStack() as stack:
        if transport == "memory":
            a, b = await stack.enter_async_context(open_memory_hosts(2))
        else:
            a, b = [
                await stack.enter_async_context(open_host(test_identity(i), HostConfig(LOOPBACK)))
                for i in range(2)
            ]
        add_test_handlers(b)
        a.peerstore.add_addrs(b.peer_id, b.listen_addrs)
        old = await a.connect(b.peer_id)
        await a.disconnect(b.peer_id)
        assert old.closed and a.connection(b.peer_id) is None
        stream = await a.new_stream(b.peer_id, SUM)
        async with stream:
            await stream.send_message([1, 2, 3])
            assert await stream.receive_message() == {"sum": 6}
        assert a.connection(b.peer_id) not in (None, old)
