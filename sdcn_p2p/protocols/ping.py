"""``/ipfs/ping/1.0.0``, libp2p's ping: the initiator writes 32 random bytes, the responder
echoes them, as often as the initiator likes on one stream."""

from __future__ import annotations

import os

import trio

from sdcn_p2p.connection import Stream
from sdcn_p2p.errors import ProtocolError, RemoteProtocolError

__all__ = [
    "MAX_MESSAGE",
    "MAX_PINGS_PER_STREAM",
    "PAYLOAD_SIZE",
    "PING",
    "handle_ping",
    "ping_once",
]

PING = "/ipfs/ping/1.0.0"
PAYLOAD_SIZE = 32
MAX_MESSAGE = PAYLOAD_SIZE
MAX_PINGS_PER_STREAM = 1000


async def _receive_exactly(stream: Stream, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        if not chunk:
            raise RemoteProtocolError(f"ping stream ended after {len(data)} of {n} bytes")
        data += chunk
    return bytes(data)


async def handle_ping(stream: Stream) -> None:
    """Echo 32-byte payloads until the initiator closes (at most 1,000 per stream)."""
    for _ in range(MAX_PINGS_PER_STREAM):
        try:
            payload = await _receive_exactly(stream, PAYLOAD_SIZE)
        except ProtocolError:
            return  # the initiator closed between pings
        await stream.send_all(payload)


async def ping_once(stream: Stream) -> float:
    """Send one ping on an open ping stream; return the round trip in seconds (trio clock)."""
    payload = os.urandom(PAYLOAD_SIZE)
    start = trio.current_time()
    await stream.send_all(payload)
    if await _receive_exactly(stream, PAYLOAD_SIZE) != payload:
        raise RemoteProtocolError("ping answered with the wrong bytes")
    return trio.current_time() - start
