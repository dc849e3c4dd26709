"""Stream throughput and small-message RTT: libp2p's stack (WebSocket byte stream,
multistream-select, Noise, yamux) against plain trio-websocket; and the round trips of a new
connection.

Both run in one process on loopback, one after the other, with the same payloads:

- throughput: the client sends SIZE MiB (in 64 KiB writes) and waits for a 1-byte ack;
- rtt: the client sends 32 bytes and waits for the echo, COUNT times in a row; median reported;
- round trips: on the in-memory network with a fixed latency (trio's MockClock), the time from
  dialling a peer to the answer of the first stream's first message, in round trips, with the
  muxer agreed in the Noise handshake and with it selected after (as with py-libp2p). The
  transport's own connect counts as one (over WebSockets it is two: TCP, then the upgrade).

Usage: python benchmarks/transport.py [--size-mb 64] [--count 2000] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

import trio
import trio.testing
from trio_websocket import open_websocket_url, serve_websocket

from sdcn_p2p.connection import Stream
from sdcn_p2p.host import HostConfig, open_host
from sdcn_p2p.identity import Identity
from sdcn_p2p.multiaddr import Multiaddr
from sdcn_p2p.protocols.ping import PING, ping_once
from sdcn_p2p.testing import open_memory_hosts
from sdcn_p2p.transport.memory import MemoryNetwork
from sdcn_p2p.wire.noise import NoiseCredentials

CHUNK = 64 * 1024
# The plain side reads what the socket has (64 KiB), as our transport does, not trio-websocket's
# 4 KiB, so the ratio measures our layers.
PLAIN_OPTIONS = {
    "receive_buffer_size": None,
    "message_queue_size": 4,
    "max_message_size": 2 * CHUNK,
}
BULK = "/bench/bulk/1.0.0"


async def _plain(size: int, count: int) -> tuple[float, list[float]]:
    """trio-websocket alone: (seconds for `size` bytes, RTT samples)."""

    async def handler(request) -> None:  # type: ignore[no-untyped-def]
        ws = await request.accept()
        mode = await ws.get_message()
        if mode == "bulk":
            received = 0
            while received < size:
                received += len(await ws.get_message())
            await ws.send_message(b"!")
        else:
            for _ in range(count):
                await ws.send_message(await ws.get_message())

    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
        url = f"ws://127.0.0.1:{server.port}/"
        chunk = b"x" * CHUNK
        async with open_websocket_url(url, **PLAIN_OPTIONS) as ws:
            await ws.send_message("bulk")
            start = time.perf_counter()
            for _ in range(size // CHUNK):
                await ws.send_message(chunk)
            await ws.get_message()
            elapsed = time.perf_counter() - start
        samples = []
        async with open_websocket_url(url, **PLAIN_OPTIONS) as ws:
            await ws.send_message("rtt")
            payload = b"p" * 32
            for _ in range(count):
                t0 = time.perf_counter()
                await ws.send_message(payload)
                await ws.get_message()
                samples.append(time.perf_counter() - t0)
        nursery.cancel_scope.cancel()
    return elapsed, samples


async def _ours(size: int, count: int) -> tuple[float, list[float]]:
    """Our stack: Host to Host over WebSocket + Noise + yamux."""

    async def bulk(stream: Stream) -> None:
        received = 0
        while received < size:
            data = await stream.receive_some()
            if not data:
                return
            received += len(data)
        await stream.send_all(b"!")

    listen = (Multiaddr.parse("/ip4/127.0.0.1/tcp/0/ws"),)
    async with (
        open_host(Identity.generate(), HostConfig(listen=listen)) as server,
        open_host(Identity.generate()) as client,
    ):
        server.set_handler(BULK, bulk)
        target = server.listen_addrs[0].with_peer_id(server.peer_id)
        await client.connect(target)
        chunk = b"x" * CHUNK
        stream = await client.new_stream(server.peer_id, BULK)
        start = time.perf_counter()
        for _ in range(size // CHUNK):
            await stream.send_all(chunk)
        await stream.receive_some()
        elapsed = time.perf_counter() - start
        await stream.aclose()
        samples = []
        stream = await client.new_stream(server.peer_id, PING)
        async with stream:
            await ping_once(stream)  # the first one also reads the multistream-select answer
            for _ in range(min(count, 999)):
                t0 = time.perf_counter()
                await ping_once(stream)
                samples.append(time.perf_counter() - t0)
    return elapsed, samples


async def _best(
    run: Callable[[int, int], Awaitable[tuple[float, list[float]]]],
    size: int,
    count: int,
    repeat: int,
) -> tuple[float, float]:
    """Best throughput (MB/s) and best median RTT (ms) over `repeat` runs."""
    throughputs, rtts = [], []
    for _ in range(repeat):
        elapsed, samples = await run(size, count)
        throughputs.append(size / elapsed / 1e6)
        rtts.append(statistics.median(samples) * 1000)
    return max(throughputs), min(rtts)


async def _round_trips(muxer_in_handshake: bool) -> float:
    """Round trips from dialling to the first stream's answer (MockClock: exact)."""
    latency = 0.01
    async with open_memory_hosts(2, network=MemoryNetwork(latency=latency)) as (a, b):
        if not muxer_in_handshake:  # b offers no muxer in its handshake, as py-libp2p
            b._noise = NoiseCredentials(b.identity)
        start = trio.current_time()
        stream = await a.new_stream(b.listen_addrs[0].with_peer_id(b.peer_id), PING)
        await ping_once(stream)
        elapsed = trio.current_time() - start
        await stream.aclose()
    return elapsed / (2 * latency)


def round_trips() -> dict[str, float]:
    clock = trio.testing.MockClock(autojump_threshold=0)
    return {
        "new_connection_round_trips": round(trio.run(_round_trips, True, clock=clock), 3),
        "new_connection_round_trips_muxer_selected": round(
            trio.run(_round_trips, False, clock=trio.testing.MockClock(autojump_threshold=0)), 3
        ),
    }


async def main_async(args: argparse.Namespace) -> dict[str, float]:
    size = args.size_mb * 1024 * 1024
    plain_tp, plain_rtt = await _best(_plain, size, args.count, args.repeat)
    ours_tp, ours_rtt = await _best(_ours, size, args.count, args.repeat)
    return {
        "plain_throughput_mb_s": round(plain_tp, 1),
        "ours_throughput_mb_s": round(ours_tp, 1),
        "throughput_ratio": round(ours_tp / plain_tp, 3),
        "plain_rtt_ms": round(plain_rtt, 4),
        "ours_rtt_ms": round(ours_rtt, 4),
        "rtt_ratio": round(ours_rtt / plain_rtt, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=64)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    result = {**trio.run(main_async, args), **round_trips()}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{'':24}{'plain ws':>12}{'ours':>12}{'ratio':>10}")
    print(
        f"{'throughput (MB/s)':24}{result['plain_throughput_mb_s']:>12}"
        f"{result['ours_throughput_mb_s']:>12}{result['throughput_ratio']:>10}"
    )
    print(
        f"{'rtt median (ms)':24}{result['plain_rtt_ms']:>12}"
        f"{result['ours_rtt_ms']:>12}{result['rtt_ratio']:>10}"
    )
    print(
        f"{'new connection, dial to first answer':40}"
        f"{result['new_connection_round_trips']:g} round trips "
        f"({result['new_connection_round_trips_muxer_selected']:g} when the muxer is selected "
        "after the handshake)"
    )
    python = sys.version.split()[0]
    print(
        "aim: throughput ratio >= 0.6, rtt ratio <= 1.5, round trips <= 3 as before "
        f"({sys.platform}, python {python})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
