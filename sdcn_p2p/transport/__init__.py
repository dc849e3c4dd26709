"""Transports: message-oriented connections between hosts, below the secure channel.

- `websocket` — WebSocket over TCP (trio-websocket), the real network: `open_websocket_transport`.
- `memory` — an in-process network with latency, loss, partitions and hosts going down, for
  tests and simulations under `trio.testing.MockClock`: `MemoryNetwork`.

A transport carries messages, reliably and in order: each `send_message` is one message (one
binary WebSocket message) of at most `MAX_TRANSPORT_MESSAGE` bytes. As in libp2p, what runs over
it reads the messages as one byte stream: where one message ends says nothing. Connections keep
trio's stream contract: `trio.ClosedResourceError` once we
closed, `trio.BrokenResourceError` when the peer or the network broke the connection, and
`trio.EndOfChannel` from `receive_message` after the peer closed cleanly and every message it sent
was delivered.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from sdcn_p2p.errors import NETWORK_ERRORS
from sdcn_p2p.multiaddr import Multiaddr

__all__ = ["MAX_TRANSPORT_MESSAGE", "ConnectionHandler", "RawConnection", "Transport"]

#: Largest message a transport carries, in bytes (trio-websocket's default cap). We send one
#: framed Noise message (at most 65,537 bytes) per message; sending more raises
#: LocalProtocolError, receiving more breaks the connection.
MAX_TRANSPORT_MESSAGE = 1024 * 1024

log = logging.getLogger(__name__)


class RawConnection(Protocol):
    """A reliable, ordered, message-oriented connection to another host."""

    #: Our end as the network sees it; None when unknown.
    local_addr: Multiaddr | None
    #: The other end as we observe it (for an inbound connection, the peer's ephemeral port).
    remote_addr: Multiaddr | None

    async def send_message(self, data: bytes | bytearray | memoryview) -> None:
        """Send `data` as one message.

        Raises LocalProtocolError past `MAX_TRANSPORT_MESSAGE`,
        trio.BrokenResourceError if the connection broke or the peer closed it, and
        trio.ClosedResourceError if we closed it. Cancelling a send may leave the connection
        unusable; close it then.
        """
        ...

    async def receive_message(self) -> bytes:
        """Return the next message; cancelling loses no message.

        Raises trio.EndOfChannel once the peer closed cleanly and all its messages were
        received, trio.BrokenResourceError if the connection broke (including when the peer broke
        the transport's rules), trio.ClosedResourceError if we closed it.
        """
        ...

    async def aclose(self) -> None:
        """Close the connection; idempotent, and quiet on an already broken connection."""
        ...


ConnectionHandler = Callable[[RawConnection], Awaitable[None]]


class Transport(Protocol):
    """Dials and listens on multiaddrs of one kind."""

    def can_dial(self, addr: Multiaddr) -> bool:
        """Whether `dial(addr)` can be attempted with this transport."""
        ...

    async def dial(self, addr: Multiaddr) -> RawConnection:
        """Open a connection to `addr`; the caller closes it.

        Raises DialError, with the cause chained. There is no timeout here: callers wrap dials
        in `trio.fail_after`.
        """
        ...

    async def serve(
        self,
        addr: Multiaddr,
        handler: ConnectionHandler,
        *,
        task_status: trio.TaskStatus[list[Multiaddr]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on `addr` and run `handler(conn)` for each connection until cancelled.

        Use as ``bound = await nursery.start(transport.serve, addr, handler)``: `bound` lists the
        addresses actually listened on (port 0 resolved). Each handler runs in a nursery that
        `serve` owns; the connection is closed when the handler returns or raises, and an
        exception in a handler is logged, never stopping the listener. Raises ConfigError if
        `addr` cannot be bound.
        """
        ...


async def _run_handler(handler: ConnectionHandler, conn: RawConnection) -> None:
    """Run `handler` on an accepted connection, log what it raises, then close the connection.

    For transport implementations: their `serve` calls it once per accepted connection.
    """
    try:
        await handler(conn)
    except Exception as exc:
        if isinstance(exc, BaseExceptionGroup):
            expected = exc.split(NETWORK_ERRORS)[1] is None
        else:
            expected = isinstance(exc, NETWORK_ERRORS)
        if expected:
            log.debug("connection from %s ended: %r", conn.remote_addr, exc)
        else:
            log.exception("connection handler failed for %s", conn.remote_addr)
    finally:
        await conn.aclose()
