from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from sdcn_p2p.errors import ConfigError, DialError, LocalProtocolError
from sdcn_p2p.multiaddr import Multiaddr
from sdcn_p2p.transport import MAX_TRANSPORT_MESSAGE, RawConnection
from sdcn_p2p.transport.memory import MemoryNetwork, MemoryTransport

# Every test runs on trio.testing.MockClock (the autojump_clock fixture): time is exact and free.

Handler = Callable[[RawConnection], Awaitable[None]]


def listen_addr(transport: MemoryTransport, port: int = 0) -> Multiaddr:
    return Multiaddr("ip6" if ":" in transport.host else "ip4", transport.host, port)


@asynccontextmanager
async def serving(transport: MemoryTransport, handler: Handler) -> AsyncIterator[Multiaddr]:
    async with trio.open_nursery() as nursery:
        [bound] = await nursery.start(transport.serve, listen_addr(transport), handler)
        yield bound
        nursery.cancel_scope.cancel()


async def echo(conn: RawConnection) -> None:
    while True:
        try:
            message = await conn.receive_message()
        except trio.EndOfChannel:
            return
        await conn.send_message(message)


def accept_into(channel: trio.MemorySendChannel[RawConnection]) -> Handler:
    """A handler that hands each connection to the test and leaves closing it to the test."""

    async def handler(conn: RawConnection) -> None:
        await channel.send(conn)
        await trio.sleep_forever()

    return handler


def count_tasks() -> int:
    count, nurseries = 0, list(trio.lowlevel.current_root_task().child_nurseries)
    while nurseries:
        for task in nurseries.pop().child_tasks:
            count += 1
            nurseries.extend(task.child_nurseries)
    return count


@asynccontextmanager
async def connected_pair(
    network: MemoryNetwork,
) -> AsyncIterator[tuple[RawConnection, RawConnection]]:
    """(client end, server end) of one connection from a fresh host to another."""
    client, server = network.transport(), network.transport()
    send, receive = trio.open_memory_channel[RawConnection](1)
    async with serving(server, accept_into(send)) as addr:
        near = await client.dial(addr)
        far = await receive.receive()
        yield near, far
        await near.aclose()


async def test_messages_arrive_after_the_latency(autojump_clock: trio.testing.MockClock) -> None:
    network = MemoryNetwork(latency=0.05)
    client, server = network.transport(), network.transport()
    arrivals: list[tuple[bytes, float]] = []

    async def handler(conn: RawConnection) -> None:
        arrivals.append((b"accepted", trio.current_time()))
        while True:
            arrivals.append((await conn.receive_message(), trio.current_time()))

    async with serving(server, handler) as addr:
        start = trio.current_time()
        conn = await client.dial(addr)
        assert trio.current_time() - start == pytest.approx(0.1)  # one round trip
        sent_at = trio.current_time()
        await conn.send_message(b"one")
        await trio.sleep(0.02)
        await conn.send_message(b"two")
        await trio.sleep(1)
        await conn.aclose()
    assert arrivals == [
        (b"accepted", pytest.approx(start + 0.05)),
        (b"one", pytest.approx(sent_at + 0.05)),
        (b"two", pytest.approx(sent_at + 0.07)),
    ]


async def test_latency_per_pair_of_hosts(autojump_clock: trio.testing.MockClock) -> None:
    one_way = {("10.0.0.1", "10.0.0.2"): 0.01, ("10.0.0.2", "10.0.0.1"): 0.03}
    network = MemoryNetwork(latency=lambda src, dst: one_way[src, dst])
    async with connected_pair(network) as (near, far):
        start = trio.current_time()
        await near.send_message(b"ping")
        assert await far.receive_message() == b"ping"
        assert trio.current_time() - start == pytest.approx(0.01)
        await far.send_message(b"pong")
        assert await near.receive_message() == b"pong"
        assert trio.current_time() - start == pytest.approx(0.04)


async def test_loss_delays_messages_but_keeps_them_all_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork(latency=0.01, loss=0.2, seed=7, queue_limit=1000)
    async with connected_pair(network) as (near, far):
        start = trio.current_time()
        for i in range(500):
            await near.send_message(b"%d" % i)
        delays = []
        for i in range(500):
            assert await far.receive_message() == b"%d" % i
            delays.append(trio.current_time() - start)
    assert min(delays) == pytest.approx(0.01)
    late = sum(delay >= 0.01 + 0.2 for delay in delays)  # retransmitted, or behind one that was
    assert 0 < late < 500


async def test_the_same_seed_gives_the_same_delays(autojump_clock: trio.testing.MockClock) -> None:
    async def delays(seed: int) -> list[float]:
        network = MemoryNetwork(latency=0.01, loss=0.1, seed=seed, queue_limit=100)
        async with connected_pair(network) as (near, far):
            start = trio.current_time()
            for i in range(100):
                await near.send_message(b"%d" % i)
            times = []
            for _ in range(100):
                await far.receive_message()
                times.append(trio.current_time() - start)
        return times

    first, again, other = await delays(1), await delays(1), await delays(2)
    assert first == pytest.approx(again)
    assert first != pytest.approx(other)


async def test_a_full_queue_blocks_the_sender(autojump_clock: trio.testing.MockClock) -> None:
    network = MemoryNetwork(latency=0.01, queue_limit=4)
    async with connected_pair(network) as (near, far):
        sent = 0

        async def sender() -> None:
            nonlocal sent
            for i in range(10):
                await near.send_message(b"%d" % i)
                sent += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            await trio.testing.wait_all_tasks_blocked()
            assert sent == 4
            assert await far.receive_message() == b"0"
            await trio.testing.wait_all_tasks_blocked()
            assert sent == 5
            for i in range(1, 10):
                assert await far.receive_message() == b"%d" % i
        assert sent == 10


async def test_cancelled_receive_loses_nothing(autojump_clock: trio.testing.MockClock) -> None:
    network = MemoryNetwork(latency=1.0)
    async with connected_pair(network) as (near, far):
        await near.send_message(b"slow")
        with trio.move_on_after(0.5):
            await far.receive_message()
            pytest.fail("received before the latency")
        assert await far.receive_message() == b"slow"


async def test_cancelled_send_sends_nothing(autojump_clock: trio.testing.MockClock) -> None:
    network = MemoryNetwork(queue_limit=1)
    async with connected_pair(network) as (near, far):
        await near.send_message(b"fills the queue")
        with trio.move_on_after(1):
            await near.send_message(b"never sent")
        assert await far.receive_message() == b"fills the queue"
        await near.send_message(b"next")
        assert await far.receive_message() == b"next"


async def test_close_delivers_everything_then_end_of_channel(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork(latency=0.01)
    async with connected_pair(network) as (near, far):
        for i in range(3):
            await near.send_message(b"%d" % i)
        await near.aclose()
        await near.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await near.send_message(b"x")
        with pytest.raises(trio.ClosedResourceError):
            await near.receive_message()
        assert [await far.receive_message() for _ in range(3)] == [b"0", b"1", b"2"]
        for _ in range(2):
            with pytest.raises(trio.EndOfChannel):
                await far.receive_message()
        with pytest.raises(trio.BrokenResourceError):
            await far.send_message(b"nobody reads this")
        await far.aclose()


async def test_close_wakes_our_blocked_tasks(autojump_clock: trio.testing.MockClock) -> None:
    async with connected_pair(MemoryNetwork(queue_limit=1)) as (near, _):
        await near.send_message(b"fills the queue")

        async def send() -> None:
            with pytest.raises(trio.ClosedResourceError):
                await near.send_message(b"blocked")

        async def receive() -> None:
            with pytest.raises(trio.ClosedResourceError):
                await near.receive_message()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            await near.aclose()


async def test_close_wakes_the_peers_blocked_sender(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with connected_pair(MemoryNetwork(queue_limit=1)) as (near, far):
        await far.send_message(b"fills the queue")

        async def send() -> None:
            with pytest.raises(trio.BrokenResourceError):
                await far.send_message(b"blocked")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            await trio.testing.wait_all_tasks_blocked()
            await near.aclose()


async def test_the_connection_closes_when_the_handler_returns(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork(latency=0.01)
    client, server = network.transport(), network.transport()

    async def handler(conn: RawConnection) -> None:
        await conn.send_message(b"bye")

    async with serving(server, handler) as addr:
        conn = await client.dial(addr)
        assert await conn.receive_message() == b"bye"
        with pytest.raises(trio.EndOfChannel):
            await conn.receive_message()
        await conn.aclose()


async def test_handler_errors_are_logged_and_the_listener_goes_on(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    network = MemoryNetwork()
    client, server = network.transport(), network.transport()
    calls = 0

    async def handler(conn: RawConnection) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("handler bug")
        await echo(conn)

    async with serving(server, handler) as addr:
        first = await client.dial(addr)
        with pytest.raises(trio.EndOfChannel):
            await first.receive_message()
        second = await client.dial(addr)
        await second.send_message(b"ok")
        assert await second.receive_message() == b"ok"
        await first.aclose()
        await second.aclose()
    [failure] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert failure.exc_info is not None and isinstance(failure.exc_info[1], RuntimeError)


async def test_addresses(autojump_clock: trio.testing.MockClock) -> None:
    network = MemoryNetwork()
    assert network.transport().host == "10.0.0.1"
    assert network.transport("10.1.2.3").host == "10.1.2.3"
    assert network.transport().host == "10.0.0.2"
    with pytest.raises(ConfigError):
        network.transport("10.1.2.3")
    with pytest.raises(ConfigError):
        network.transport("not-an-ip")
    async with connected_pair(network) as (near, far):
        assert near.remote_addr == far.local_addr
        assert near.local_addr == far.remote_addr
        assert near.local_addr is not None and near.local_addr.host == "10.0.0.3"
        assert str(near.remote_addr) == f"/ip4/10.0.0.4/tcp/{near.remote_addr.port}/ws"


async def test_ipv6_hosts(autojump_clock: trio.testing.MockClock) -> None:
    network = MemoryNetwork()
    client, server = network.transport("fd00::1"), network.transport("fd00::2")
    async with serving(server, echo) as addr:
        assert addr.family == "ip6"
        conn = await client.dial(addr)
        await conn.send_message(b"six")
        assert await conn.receive_message() == b"six"
        await conn.aclose()


async def test_serve_errors(autojump_clock: trio.testing.MockClock) -> None:
    network = MemoryNetwork()
    transport = network.transport()
    async with serving(transport, echo) as addr:
        with pytest.raises(ConfigError, match="in use"):
            await transport.serve(addr, echo)
    for bad in (
        "/ip4/10.9.9.9/tcp/1/ws",
        "/dns4/localhost/tcp/1/ws",
        f"/ip4/{transport.host}/tcp/1/wss",
    ):
        with pytest.raises(ConfigError):
            await transport.serve(Multiaddr.parse(bad), echo)
    async with trio.open_nursery() as nursery:
        # The unspecified address listens on the host's own address.
        [bound] = await nursery.start(
            transport.serve, Multiaddr.parse("/ip4/0.0.0.0/tcp/80/ws"), echo
        )
        assert bound == Multiaddr("ip4", transport.host, 80)
        nursery.cancel_scope.cancel()


async def test_dial_errors_take_a_round_trip(autojump_clock: trio.testing.MockClock) -> None:
    network = MemoryNetwork(latency=0.25)
    client, server = network.transport(), network.transport()
    start = trio.current_time()
    with pytest.raises(DialError, match="refused"):
        await client.dial(listen_addr(server, 4001))
    assert trio.current_time() - start == pytest.approx(0.5)
    assert not client.can_dial(Multiaddr.parse("/dns4/example.com/tcp/1/ws"))
    with pytest.raises(DialError):
        await client.dial(Multiaddr.parse(f"/ip4/{server.host}/tcp/1/wss"))


async def test_oversize_send_is_refused(autojump_clock: trio.testing.MockClock) -> None:
    async with connected_pair(MemoryNetwork()) as (near, far):
        with pytest.raises(LocalProtocolError):
            await near.send_message(bytes(MAX_TRANSPORT_MESSAGE + 1))
        await near.send_message(bytes(MAX_TRANSPORT_MESSAGE))
        assert len(await far.receive_message()) == MAX_TRANSPORT_MESSAGE


async def test_messages_are_copied(autojump_clock: trio.testing.MockClock) -> None:
    async with connected_pair(MemoryNetwork()) as (near, far):
        buffer = bytearray(b"before")
        await near.send_message(buffer)
        await near.send_message(memoryview(buffer)[:3])
        buffer[:] = b"after!"
        assert await far.receive_message() == b"before"
        assert await far.receive_message() == b"bef"


async def test_partition_breaks_connections_and_dials_until_healed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork(latency=0.01)
    a, b, c = network.transport(), network.transport(), network.transport()
    async with serving(b, echo) as b_addr, serving(c, echo) as c_addr:
        a_to_b = await a.dial(b_addr)
        a_to_c = await a.dial(c_addr)
        network.partition([a.host, c.host], [b.host])
        with pytest.raises(trio.BrokenResourceError):
            await a_to_b.receive_message()
        with pytest.raises(trio.BrokenResourceError):
            await a_to_b.send_message(b"x")
        await a_to_b.aclose()
        await a_to_c.send_message(b"same side")
        assert await a_to_c.receive_message() == b"same side"
        with pytest.raises(DialError, match="partitioned"):
            await a.dial(b_addr)

        network.heal()
        a_to_b = await a.dial(b_addr)
        await a_to_b.send_message(b"healed")
        assert await a_to_b.receive_message() == b"healed"
        await a_to_b.aclose()
        await a_to_c.aclose()


async def test_partition_breaks_both_ends(autojump_clock: trio.testing.MockClock) -> None:
    network = MemoryNetwork(latency=0.01)
    async with connected_pair(network) as (near, far):
        await near.send_message(b"in flight when the network splits")
        network.partition([near.local_addr.host], [far.local_addr.host])  # type: ignore[union-attr]
        with pytest.raises(trio.BrokenResourceError):
            await far.receive_message()
        with pytest.raises(trio.BrokenResourceError):
            await near.receive_message()
        await far.aclose()


async def test_a_host_in_two_groups_is_an_error(autojump_clock: trio.testing.MockClock) -> None:
    with pytest.raises(ValueError, match="two groups"):
        MemoryNetwork().partition(["10.0.0.1"], ["10.0.0.1", "10.0.0.2"])


async def test_a_host_that_is_down_is_unreachable_until_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork(latency=0.01)
    a, b = network.transport(), network.transport()
    async with serving(b, echo) as b_addr, serving(a, echo) as a_addr:
        conn = await a.dial(b_addr)
        network.set_down(b.host)
        with pytest.raises(trio.BrokenResourceError):
            await conn.send_message(b"x")
        await conn.aclose()
        with pytest.raises(DialError, match="down"):
            await a.dial(b_addr)
        with pytest.raises(DialError, match="down"):
            await b.dial(a_addr)
        network.set_down(b.host, False)
        conn = await a.dial(b_addr)
        await conn.send_message(b"back")
        assert await conn.receive_message() == b"back"
        await conn.aclose()


async def test_cancelled_dial_breaks_the_half_open_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork(latency=0.1)
    client, server = network.transport(), network.transport()
    outcome: list[type[BaseException]] = []

    async def handler(conn: RawConnection) -> None:
        try:
            await conn.receive_message()
        except trio.BrokenResourceError as exc:
            outcome.append(type(exc))

    async with serving(server, handler) as addr:
        with trio.move_on_after(0.15):  # after the server accepted, before the dial returns
            await client.dial(addr)
        await trio.testing.wait_all_tasks_blocked()
    assert outcome == [trio.BrokenResourceError]


async def test_a_thousand_connections_over_two_hundred_hosts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    def latency(src: str, dst: str) -> float:
        return 0.001 * ((7 * int(src.split(".")[-1]) + int(dst.split(".")[-1])) % 50)

    network = MemoryNetwork(latency=latency)
    transports = [network.transport() for _ in range(200)]
    rng = random.Random(1)
    handled = 0
    all_handled = trio.Event()

    async def handler(conn: RawConnection) -> None:
        nonlocal handled
        await echo(conn)
        handled += 1
        if handled == 1000:
            all_handled.set()

    before = count_tasks()
    async with trio.open_nursery() as servers:
        addrs = [await servers.start(t.serve, listen_addr(t), handler) for t in transports]
        listening = count_tasks()

        async def ping(i: int) -> None:
            source = rng.choice(transports)
            conn = await source.dial(rng.choice(addrs)[0])
            await conn.send_message(b"%d" % i)
            assert await conn.receive_message() == b"%d" % i
            await conn.aclose()

        async with trio.open_nursery() as clients:
            for i in range(1000):
                clients.start_soon(ping, i)
        await all_handled.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert count_tasks() == listening  # every handler ended with its connection
        assert not network._links
        servers.cancel_scope.cancel()
    assert count_tasks() == before
