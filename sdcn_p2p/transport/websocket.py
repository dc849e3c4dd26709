"""WebSocket transport over TCP (and TLS for ``/wss``), on trio-websocket.

Each transport message is one binary WebSocket message; a text message, or one longer than
`max_message`, breaks the connection. No extension (per-message compression) is ever
negotiated: the payload is Noise ciphertext, which does not compress.

Who owns what. trio-websocket runs a reader task per connection. For an accepted connection it
lives, with the handler, in the nursery of `WebSocketTransport.serve`. For a dialled connection
it lives in a task of the transport's nursery (given to `WebSocketTransport`, or opened by
`open_websocket_transport`); that task owns the socket and ends soon after the connection
closes. When the transport's nursery is cancelled, dialled connections still open are closed
abruptly.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial

import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    wrap_client_stream,
    wrap_server_stream,
)

from sdcn_p2p._util import open_service_nursery
from sdcn_p2p.errors import ConfigError, DialError, LocalProtocolError
from sdcn_p2p.multiaddr import Multiaddr
from sdcn_p2p.transport import (
    MAX_TRANSPORT_MESSAGE,
    ConnectionHandler,
    RawConnection,
    _run_handler,
)

__all__ = [
    "CLOSE_TIMEOUT",
    "HANDSHAKE_TIMEOUT",
    "MESSAGE_QUEUE_SIZE",
    "WebSocketTransport",
    "open_websocket_transport",
]

#: Seconds an accepted connection has to complete the WebSocket upgrade.
HANDSHAKE_TIMEOUT = 10.0
#: Seconds `aclose` waits for the peer to answer the closing handshake before cutting the socket.
CLOSE_TIMEOUT = 5.0
#: Received messages buffered per connection before the socket stops being read (backpressure).
MESSAGE_QUEUE_SIZE = 4

_NORMAL_CLOSURE = 1000
_GOING_AWAY = 1001
_UNSUPPORTED_DATA = 1003

log = logging.getLogger(__name__)

_Stream = trio.SocketStream | trio.SSLStream[trio.SocketStream]


class WebSocketTransport:
    """Dials and serves ``/ws`` and ``/wss`` multiaddrs (ip4, ip6, dns4, dns6).

    Dialled connections run their background task in `nursery`. Listening on ``/wss`` needs
    `ssl_context_server`; dialling ``/wss`` uses `ssl_context_client`, by default
    `ssl.create_default_context()`. `max_message` caps messages both ways, in bytes.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        *,
        ssl_context_server: ssl.SSLContext | None = None,
        ssl_context_client: ssl.SSLContext | None = None,
        max_message: int = MAX_TRANSPORT_MESSAGE,
    ) -> None:
        self._nursery = nursery
        self._ssl_server = ssl_context_server
        self._ssl_client = ssl_context_client
        self._max_message = max_message

    def can_dial(self, addr: Multiaddr) -> bool:
        return addr.port != 0

    async def dial(self, addr: Multiaddr) -> RawConnection:
        """Connect to `addr` and complete the WebSocket upgrade (and TLS for ``/wss``).

        Raises DialError when the connection, the TLS handshake or the upgrade fails. A server
        that accepts TCP and then never answers the upgrade is only noticed by the caller's
        timeout.
        """
        if not self.can_dial(addr):
            raise DialError(f"cannot dial {addr}: port 0")
        connection: RawConnection = await self._nursery.start(self._run_client, addr)
        return connection

    async def serve(
        self,
        addr: Multiaddr,
        handler: ConnectionHandler,
        *,
        task_status: trio.TaskStatus[list[Multiaddr]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on `addr` and run `handler(conn)` for each connection until cancelled.

        Reports the bound addresses through `task_status` (port 0 resolved; a DNS name binds
        every address it resolves to). Raises ConfigError if `addr` cannot be bound, or is
        ``/wss`` and the transport has no server SSL context.
        """
        if addr.secure and self._ssl_server is None:
            raise ConfigError(f"cannot listen on {addr}: /wss needs a server SSL context")
        try:
            listeners = await trio.open_tcp_listeners(addr.port, host=addr.host)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {addr}: {exc.strerror or exc}") from exc
        bound = [_multiaddr(listener.socket.getsockname(), addr.secure) for listener in listeners]
        serving: Sequence[trio.abc.Listener[_Stream]] = listeners
        if self._ssl_server is not None and addr.secure:
            serving = [
                trio.SSLListener(listener, self._ssl_server, https_compatible=True)
                for listener in listeners
            ]
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    trio.serve_listeners, partial(self._serve_one, handler), serving
                )
                task_status.started(bound)
        finally:
            for listener in listeners:
                await trio.aclose_forcefully(listener)

    async def _serve_one(self, handler: ConnectionHandler, stream: _Stream) -> None:
        """Upgrade one accepted stream and run `handler` on it; owns the stream and its reader."""
        try:
            async with trio.open_nursery() as nursery:
                ws = await self._accept(nursery, stream)
                if ws is not None:
                    await _run_handler(handler, _WebSocketConnection(ws, stream, self._max_message))
                nursery.cancel_scope.cancel()  # trio-websocket's reader, if still running
        except* Exception as group:
            # trio-websocket failed; one connection must not stop the listener.
            log.error("WebSocket connection failed", exc_info=group)
        finally:
            await trio.aclose_forcefully(stream)

    async def _accept(self, nursery: trio.Nursery, stream: _Stream) -> WebSocketConnection | None:
        """Complete the server side of the upgrade; None if the client left or was too slow."""
        with trio.move_on_after(HANDSHAKE_TIMEOUT):
            try:
                request = await wrap_server_stream(nursery, stream, **self._websocket_options())
                return await request.accept()
            except ConnectionClosed:
                pass
        log.debug("WebSocket upgrade from %s did not complete", _peer(stream))
        return None

    async def _run_client(
        self, addr: Multiaddr, *, task_status: trio.TaskStatus[RawConnection]
    ) -> None:
        """Own one dialled connection: its socket and reader task. Ends when it closes."""
        stream = await self._connect(addr)
        connection: _WebSocketConnection | None = None
        try:
            async with trio.open_nursery() as nursery:
                host = f"[{addr.host}]" if addr.family == "ip6" else addr.host
                ws = await wrap_client_stream(
                    nursery, stream, f"{host}:{addr.port}", "/", **self._websocket_options()
                )
                connection = _WebSocketConnection(ws, stream, self._max_message)
                task_status.started(connection)
        except* Exception as group:
            # Errors come from trio-websocket's reader task: a rejected or garbled upgrade.
            if connection is None:
                raise DialError(f"WebSocket upgrade with {addr} failed") from group.exceptions[0]
            log.error("WebSocket connection to %s failed", addr, exc_info=group)
        finally:
            await trio.aclose_forcefully(stream)

    async def _connect(self, addr: Multiaddr) -> _Stream:
        """Open the TCP connection, and complete TLS for ``/wss``."""
        try:
            tcp = await trio.open_tcp_stream(addr.host, addr.port)
        except OSError as exc:
            raise DialError(f"cannot connect to {addr}: {exc.strerror or exc}") from exc
        if not addr.secure:
            return tcp
        if self._ssl_client is None:
            self._ssl_client = ssl.create_default_context()  # loads the system's CAs: once
        tls = trio.SSLStream(
            tcp, self._ssl_client, server_hostname=addr.host, https_compatible=True
        )
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as exc:
            await trio.aclose_forcefully(tls)
            raise DialError(f"TLS handshake with {addr} failed: {exc.__cause__}") from exc
        except BaseException:
            await trio.aclose_forcefully(tls)
            raise
        return tls

    def _websocket_options(self) -> dict[str, int | None]:
        return {
            "message_queue_size": MESSAGE_QUEUE_SIZE,
            "max_message_size": self._max_message,
            # Read what the socket has (trio's default, 64 KiB), not trio-websocket's 4 KiB.
            "receive_buffer_size": None,
        }


@asynccontextmanager
async def open_websocket_transport(
    *,
    ssl_context_server: ssl.SSLContext | None = None,
    ssl_context_client: ssl.SSLContext | None = None,
    max_message: int = MAX_TRANSPORT_MESSAGE,
) -> AsyncIterator[WebSocketTransport]:
    """Open a `WebSocketTransport` owning a nursery for its dialled connections.

    Leaving the block closes, abruptly, the dialled connections still open. Exceptions from the
    block propagate unwrapped.
    """
    async with open_service_nursery() as nursery:
        try:
            yield WebSocketTransport(
                nursery,
                ssl_context_server=ssl_context_server,
                ssl_context_client=ssl_context_client,
                max_message=max_message,
            )
        finally:
            nursery.cancel_scope.cancel()


class _WebSocketConnection:
    """A trio-websocket connection seen as a RawConnection: binary messages, trio errors."""

    __slots__ = ("_closed", "_max_message", "_violation", "_ws", "local_addr", "remote_addr")

    def __init__(self, ws: WebSocketConnection, stream: _Stream, max_message: int) -> None:
        self._ws = ws
        self._max_message = max_message
        self._closed = False
        self._violation: str | None = None  # why the peer broke our rules, if it did
        secure = isinstance(stream, trio.SSLStream)
        socket = stream.transport_stream.socket if secure else stream.socket
        try:
            self.local_addr: Multiaddr | None = _multiaddr(socket.getsockname(), secure)
            self.remote_addr: Multiaddr | None = _multiaddr(socket.getpeername(), secure)
        except OSError:  # the peer already reset the connection
            self.local_addr = self.remote_addr = None

    async def send_message(self, data: bytes | bytearray | memoryview) -> None:
        if len(data) > self._max_message:
            raise LocalProtocolError(f"message of {len(data)} bytes exceeds {self._max_message}")
        if self._closed:
            raise trio.ClosedResourceError("connection was closed")
        if self._violation is not None:
            raise trio.BrokenResourceError(self._violation)
        try:
            await self._ws.send_message(data if type(data) is bytes else bytes(data))
        except ConnectionClosed as exc:
            if self._closed:
                raise trio.ClosedResourceError("connection was closed") from exc
            raise trio.BrokenResourceError(f"connection closed: {exc.reason}") from exc

    async def receive_message(self) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("connection was closed")
        if self._violation is not None:
            raise trio.BrokenResourceError(self._violation)
        try:
            message = await self._ws.get_message()
        except ConnectionClosed as exc:
            if self._closed:
                raise trio.ClosedResourceError("connection was closed") from exc
            reason = exc.reason
            if reason is not None and reason.code in (_NORMAL_CLOSURE, _GOING_AWAY):
                raise trio.EndOfChannel from exc
            raise trio.BrokenResourceError(f"connection closed: {reason}") from exc
        if type(message) is str:
            self._violation = "peer sent a text message; only binary messages are allowed"
            raise trio.BrokenResourceError(self._violation)
        return message

    async def aclose(self) -> None:
        """Close with the WebSocket closing handshake, cutting the socket after CLOSE_TIMEOUT."""
        self._closed = True
        code = _NORMAL_CLOSURE if self._violation is None else _UNSUPPORTED_DATA
        with trio.move_on_after(CLOSE_TIMEOUT):
            await self._ws.aclose(code, self._violation)

    def __repr__(self) -> str:
        return f"<WebSocket connection {self.local_addr} -> {self.remote_addr}>"


def _multiaddr(sockaddr: tuple[str, int] | tuple[str, int, int, int], secure: bool) -> Multiaddr:
    """The multiaddr of a socket address (an IPv4-mapped IPv6 address becomes ip4)."""
    ip = ipaddress.ip_address(sockaddr[0].partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return Multiaddr("ip4" if ip.version == 4 else "ip6", str(ip), sockaddr[1], secure)


def _peer(stream: _Stream) -> object:
    socket = stream.transport_stream.socket if isinstance(stream, trio.SSLStream) else stream.socket
    try:
        return socket.getpeername()
    except OSError:
        return "a disconnected peer"
