"""WebSocket transport over TCP (and TLS for ``/wss``), driving wsproto.

Each transport message is one binary WebSocket message; a text message, or one longer than
`max_message`, breaks the connection. No extension (per-message compression) is ever
negotiated: the payload is Noise ciphertext, which does not compress.

No task runs per connection. Whoever receives reads the socket itself and answers pings and
the closing handshake as it reads, so a message reaches the connection's reader without
crossing from another task (trio-websocket runs a reader task per connection, and each message
then cost a task switch on top of ours). The Host's connection reader is always receiving, so
pings and closes are answered at once.

Who owns what. An accepted connection lives, with its handler, in the nursery of
`WebSocketTransport.serve`, which closes its socket when the handler returns. A dialled
connection belongs to the caller, who closes it; the transport's nursery (given to
`WebSocketTransport`, or opened by `open_websocket_transport`) keeps an idle watcher per
dialled connection that cuts it abruptly if the nursery is cancelled first.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from functools import partial

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError as WsLocalProtocolError
from wsproto.utilities import RemoteProtocolError as WsRemoteProtocolError

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
    "WebSocketTransport",
    "open_websocket_transport",
]

#: Seconds an accepted connection has to complete the WebSocket upgrade.
HANDSHAKE_TIMEOUT = 10.0
#: Seconds `aclose` waits for the peer to answer the closing handshake before cutting the socket.
CLOSE_TIMEOUT = 5.0

_NORMAL_CLOSURE = 1000
_GOING_AWAY = 1001
_PROTOCOL_ERROR = 1002
_UNSUPPORTED_DATA = 1003
_MESSAGE_TOO_BIG = 1009

log = logging.getLogger(__name__)

_Stream = trio.SocketStream | trio.SSLStream[trio.SocketStream]


class WebSocketTransport:
    """Dials and serves ``/ws`` and ``/wss`` multiaddrs (ip4, ip6, dns4, dns6).

    Dialled connections are watched from `nursery`, which cuts those still open if it is
    cancelled first. Listening on ``/wss`` needs
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
        stream = await self._connect(addr)
        try:
            host = f"[{addr.host}]" if addr.family == "ip6" else addr.host
            ws = await _upgrade_client(stream, f"{host}:{addr.port}", addr)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        connection = _WebSocketConnection(ws, stream, self._max_message)
        self._nursery.start_soon(_cut_when_cancelled, connection)
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
        """Upgrade one accepted stream and run `handler` on it; owns the stream."""
        try:
            with trio.move_on_after(HANDSHAKE_TIMEOUT) as scope:
                ws = await _upgrade_server(stream)
            if scope.cancelled_caught or ws is None:
                log.debug("WebSocket upgrade from %s did not complete", _peer(stream))
                return
            await _run_handler(handler, _WebSocketConnection(ws, stream, self._max_message))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("WebSocket upgrade from %s failed: %r", _peer(stream), exc)
        except Exception:
            # A bug of ours or wsproto's: one connection must not stop the listener.
            log.exception("WebSocket connection from %s failed", _peer(stream))
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


async def _upgrade_client(stream: _Stream, host: str, addr: Multiaddr) -> WSConnection:
    """The client's side of the upgrade; DialError if the server refuses or is no WebSocket."""
    ws = WSConnection(ConnectionType.CLIENT)
    try:
        await stream.send_all(ws.send(Request(host=host, target="/")))
        while True:
            data = await stream.receive_some()
            if not data:
                raise DialError(f"{addr} closed the connection during the WebSocket upgrade")
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    return ws
                if isinstance(event, RejectConnection):
                    raise DialError(f"{addr} refused the WebSocket upgrade: {event.status_code}")
    except WsRemoteProtocolError as exc:
        raise DialError(f"{addr} is not a WebSocket server: {exc}") from exc
    except trio.BrokenResourceError as exc:
        raise DialError(f"WebSocket upgrade with {addr} failed: {exc}") from exc


async def _upgrade_server(stream: _Stream) -> WSConnection | None:
    """The server's side of the upgrade; None if the client left or sent no upgrade request."""
    ws = WSConnection(ConnectionType.SERVER)
    while True:
        data = await stream.receive_some()
        if not data:
            return None
        try:
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, Request):
                    await stream.send_all(ws.send(AcceptConnection()))  # no extensions
                    return ws
        except WsRemoteProtocolError as exc:
            if exc.event_hint is not None:  # an HTTP request that is no upgrade: tell it
                with suppress(WsLocalProtocolError):
                    await stream.send_all(ws.send(exc.event_hint))
            log.debug("bad WebSocket upgrade from %s: %s", _peer(stream), exc)
            return None


async def _cut_when_cancelled(connection: _WebSocketConnection) -> None:
    """Watch a dialled connection from the transport's nursery: cut it if that closes first."""
    try:
        await connection._released.wait()
    finally:
        if not connection._released.is_set():
            await trio.aclose_forcefully(connection._stream)


class _WebSocketConnection:
    """A wsproto connection over a trio stream, seen as a RawConnection: binary messages, trio
    errors. Receiving reads the socket in the caller's task (one receiver at a time)."""

    def __init__(self, ws: WSConnection, stream: _Stream, max_message: int) -> None:
        self._ws = ws
        self._stream = stream
        self._max_message = max_message
        self._send_lock = trio.StrictFIFOLock()  # our sends, and answers to pings and closes
        self._events: deque[Event] = deque(ws.events())  # what came with the upgrade
        self._parts: list[bytes] = []  # of a message being received
        self._size = 0
        self._closed = False  # we closed it (aclose)
        self._end: trio.EndOfChannel | trio.BrokenResourceError | None = None  # it ended
        self._violation: tuple[int, str] | None = None  # why the peer broke our rules
        self._receiving = False
        self._close_answered = trio.Event()  # the peer answered our close, or left
        self._released = trio.Event()  # the socket is closed
        secure = isinstance(stream, trio.SSLStream)
        socket = stream.transport_stream.socket if secure else stream.socket
        try:
            self.local_addr: Multiaddr | None = _multiaddr(socket.getsockname(), secure)
            self.remote_addr: Multiaddr | None = _multiaddr(socket.getpeername(), secure)
        except OSError:  # the peer already reset the connection
            self.local_addr = self.remote_addr = None

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("connection was closed")
        if self._end is not None:
            raise trio.BrokenResourceError(f"connection ended: {self._end}")

    async def send_message(self, data: bytes | bytearray | memoryview) -> None:
        if len(data) > self._max_message:
            raise LocalProtocolError(f"message of {len(data)} bytes exceeds {self._max_message}")
        self._check_open()
        if self._ws.state is not ConnectionState.OPEN:
            raise trio.BrokenResourceError("the peer closed the connection")
        await self._send(self._ws.send(BytesMessage(data=bytes(data))))

    async def _send(self, payload: bytes) -> None:
        try:
            if self._send_lock.locked():
                async with self._send_lock:
                    await self._stream.send_all(payload)
            else:  # as trio-websocket's lock would, but without a checkpoint of its own
                self._send_lock.acquire_nowait()
                try:
                    await self._stream.send_all(payload)
                finally:
                    self._send_lock.release()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            if self._closed:
                raise trio.ClosedResourceError("connection was closed") from exc
            self._ended(trio.BrokenResourceError(f"connection lost: {exc}"))
            raise trio.BrokenResourceError(f"connection lost: {exc}") from exc

    def _ended(self, end: trio.EndOfChannel | trio.BrokenResourceError) -> None:
        if self._end is None:
            self._end = end
        self._close_answered.set()

    async def receive_message(self) -> bytes:
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this connection")
        self._receiving = True
        try:
            while True:
                self._check_receive()
                if self._events:
                    message = await self._handle(self._events.popleft())
                    if message is not None:
                        return message
                    continue
                try:
                    data = await self._stream.receive_some()
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    if self._closed:
                        raise trio.ClosedResourceError("connection was closed") from exc
                    self._ended(trio.BrokenResourceError(f"connection lost: {exc}"))
                    continue
                if not data:
                    self._ended(
                        trio.BrokenResourceError("the peer closed without a WebSocket close")
                    )
                    continue
                try:
                    self._ws.receive_data(data)
                    self._events.extend(self._ws.events())
                except WsRemoteProtocolError as exc:
                    self._violate(_PROTOCOL_ERROR, f"broke the WebSocket protocol: {exc}")
                if self._ws.state is ConnectionState.CLOSED:
                    self._close_answered.set()  # the answer to our close, if we are closing
        finally:
            self._receiving = False
            if self._closed:
                self._close_answered.set()  # aclose reads the answer itself, if still due

    def _check_receive(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("connection was closed")
        if self._end is not None:
            raise self._end

    def _violate(self, code: int, reason: str) -> None:
        self._violation = (code, f"peer {reason}")
        self._ended(trio.BrokenResourceError(f"peer {reason}"))

    async def _handle(self, event: Event) -> bytes | None:
        """Act on one event; the message, once a whole one has arrived."""
        if isinstance(event, BytesMessage):
            self._size += len(event.data)
            if self._size > self._max_message:
                self._violate(_MESSAGE_TOO_BIG, f"sent a message over {self._max_message} bytes")
                return None
            self._parts.append(event.data)
            if not event.message_finished:
                return None
            message = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
            self._parts, self._size = [], 0
            return bytes(message)
        if isinstance(event, TextMessage):
            self._violate(
                _UNSUPPORTED_DATA, "sent a text message; only binary messages are allowed"
            )
        elif isinstance(event, Ping):
            with suppress(WsLocalProtocolError):  # we are closing: no pong
                await self._answer(self._ws.send(event.response()))
        elif isinstance(event, CloseConnection):
            if self._ws.state is ConnectionState.REMOTE_CLOSING:
                await self._answer(self._ws.send(event.response()))
            if event.code in (_NORMAL_CLOSURE, _GOING_AWAY):
                self._ended(trio.EndOfChannel())
            else:
                self._ended(
                    trio.BrokenResourceError(f"connection closed: {event.code} {event.reason}")
                )
        return None

    async def _answer(self, payload: bytes) -> None:
        """Send a pong or a close answer from the receiving task: shielded, since a frame cut
        short would corrupt what follows, for CLOSE_TIMEOUT at most.
        """
        deadline = trio.current_time() + CLOSE_TIMEOUT
        with (
            trio.CancelScope(shield=True, deadline=deadline) as scope,
            suppress(trio.BrokenResourceError, trio.ClosedResourceError),
        ):
            await self._send(payload)
        if scope.cancelled_caught:
            self._ended(trio.BrokenResourceError("the peer does not read what we send"))

    async def aclose(self) -> None:
        """Close with the WebSocket closing handshake, cutting the socket after CLOSE_TIMEOUT."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        try:
            with trio.move_on_after(CLOSE_TIMEOUT):
                can_say = self._end is None or self._violation is not None
                if self._ws.state is ConnectionState.OPEN and can_say:
                    code, reason = self._violation or (_NORMAL_CLOSURE, "")
                    with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await self._send(self._ws.send(CloseConnection(code, reason)))
                if self._ws.state is ConnectionState.LOCAL_CLOSING and self._receiving:
                    await self._close_answered.wait()  # that receiver sees the answer, or leaves
                if self._ws.state is ConnectionState.LOCAL_CLOSING:
                    await self._await_close_answer()
        finally:
            await trio.aclose_forcefully(self._stream)
            self._released.set()

    async def _await_close_answer(self) -> None:
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError, WsRemoteProtocolError):
            while self._ws.state is ConnectionState.LOCAL_CLOSING:
                data = await self._stream.receive_some()
                if not data:
                    return
                self._ws.receive_data(data)
                for _ in self._ws.events():
                    pass  # a close answer moves the state on; the rest comes too late

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
