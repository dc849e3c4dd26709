from __future__ import annotations

import datetime
import ipaddress
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    serve_websocket,
    wrap_client_stream,
    wrap_server_stream,
)

from sdcn_p2p.errors import ConfigError, DialError, LocalProtocolError
from sdcn_p2p.multiaddr import Multiaddr
from sdcn_p2p.transport import MAX_TRANSPORT_MESSAGE, RawConnection
from sdcn_p2p.transport.websocket import (
    CLOSE_TIMEOUT,
    HANDSHAKE_TIMEOUT,
    WebSocketTransport,
    open_websocket_transport,
)

LOCAL = Multiaddr.parse("/ip4/127.0.0.1/tcp/0/ws")

Handler = Callable[[RawConnection], Awaitable[None]]


@asynccontextmanager
async def serving(
    handler: Handler, addr: Multiaddr = LOCAL, **options: ssl.SSLContext | int
) -> AsyncIterator[tuple[WebSocketTransport, Multiaddr]]:
    """A transport, serving `handler` on `addr`; yields it and the bound address."""
    async with open_websocket_transport(**options) as transport, trio.open_nursery() as nursery:
        bound = await nursery.start(transport.serve, addr, handler)
        assert len(bound) == 1
        yield transport, bound[0]
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def raw_client(
    addr: Multiaddr, headers: list[tuple[bytes, bytes]] | None = None
) -> AsyncIterator[WebSocketConnection]:
    """A plain trio-websocket client (open_websocket_url leaks its socket if the server closes)."""
    stream = await trio.open_tcp_stream(addr.host, addr.port)
    async with stream, trio.open_nursery() as nursery:
        host = f"{addr.host}:{addr.port}"
        yield await wrap_client_stream(nursery, stream, host, "/", extra_headers=headers)
        nursery.cancel_scope.cancel()


async def echo(conn: RawConnection) -> None:
    while True:
        try:
            message = await conn.receive_message()
        except trio.EndOfChannel:
            return
        await conn.send_message(message)


async def receive_all(conn: RawConnection) -> list[bytes]:
    """Messages until EndOfChannel."""
    messages = []
    while True:
        try:
            messages.append(await conn.receive_message())
        except trio.EndOfChannel:
            return messages


def ipv6_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def count_tasks() -> int:
    """Every task of this trio run."""
    count, nurseries = 0, list(trio.lowlevel.current_root_task().child_nurseries)
    while nurseries:
        for task in nurseries.pop().child_tasks:
            count += 1
            nurseries.extend(task.child_nurseries)
    return count


async def test_round_trip_many_messages_both_ways() -> None:
    messages = [bytes([i % 256]) * (i * 37 % 3000) for i in range(1000)]
    async with serving(echo) as (transport, addr):
        conn = await transport.dial(addr)

        async def send_all() -> None:
            for message in messages:
                await conn.send_message(message)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_all)
            for message in messages:
                assert await conn.receive_message() == message
        await conn.aclose()


async def test_accepts_bytearray_and_memoryview() -> None:
    async with serving(echo) as (transport, addr):
        conn = await transport.dial(addr)
        await conn.send_message(bytearray(b"array"))
        await conn.send_message(memoryview(b"xxviewxx")[2:6])
        assert await conn.receive_message() == b"array"
        assert await conn.receive_message() == b"view"
        await conn.aclose()


async def test_largest_messages_both_ways() -> None:
    largest = bytes(range(256)) * (MAX_TRANSPORT_MESSAGE // 256)
    assert len(largest) == MAX_TRANSPORT_MESSAGE
    async with serving(echo) as (transport, addr):
        conn = await transport.dial(addr)
        for _ in range(5):
            await conn.send_message(largest)
            assert await conn.receive_message() == largest
        with pytest.raises(LocalProtocolError) as caught:
            await conn.send_message(largest + b"!")
        assert isinstance(caught.value, LocalProtocolError)
        await conn.send_message(b"still usable")
        assert await conn.receive_message() == b"still usable"
        await conn.aclose()


async def test_addresses_are_the_observed_ones() -> None:
    server_side: list[RawConnection] = []

    async def handler(conn: RawConnection) -> None:
        server_side.append(conn)
        await echo(conn)

    async with serving(handler) as (transport, addr):
        assert addr.host == "127.0.0.1" and addr.port != 0
        conn = await transport.dial(addr)
        await conn.send_message(b"hi")
        await conn.receive_message()
        assert conn.remote_addr == addr
        assert server_side[0].local_addr == addr
        assert conn.local_addr is not None and conn.local_addr.host == "127.0.0.1"
        assert server_side[0].remote_addr == conn.local_addr
        await conn.aclose()


async def test_server_close_is_end_of_channel_after_all_messages() -> None:
    async def handler(conn: RawConnection) -> None:
        for i in range(50):
            await conn.send_message(b"%d" % i)

    async with serving(handler) as (transport, addr):
        conn = await transport.dial(addr)
        assert await receive_all(conn) == [b"%d" % i for i in range(50)]
        with pytest.raises(trio.EndOfChannel):
            await conn.receive_message()
        with pytest.raises(trio.BrokenResourceError):
            await conn.send_message(b"too late")
        await conn.aclose()


async def test_client_close_is_end_of_channel_after_all_messages() -> None:
    received: list[list[bytes]] = []
    done = trio.Event()

    async def handler(conn: RawConnection) -> None:
        received.append(await receive_all(conn))
        with pytest.raises(trio.EndOfChannel):
            await conn.receive_message()
        done.set()

    async with serving(handler) as (transport, addr):
        conn = await transport.dial(addr)
        for i in range(50):
            await conn.send_message(b"%d" % i)
        await conn.aclose()
        await done.wait()
    assert received == [[b"%d" % i for i in range(50)]]


async def test_closed_connection_raises_closed_resource_error() -> None:
    async with serving(echo) as (transport, addr):
        conn = await transport.dial(addr)
        await conn.aclose()
        await conn.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await conn.send_message(b"x")
        with pytest.raises(trio.ClosedResourceError):
            await conn.receive_message()


async def test_close_wakes_a_blocked_receiver_and_returns_once_answered() -> None:
    # The receiving task reads the peer's answer to our close: aclose returns then, not when
    # CLOSE_TIMEOUT cuts the socket, and the receiver sees the connection closed.
    closed_normally = trio.Event()

    async def handler(conn: RawConnection) -> None:
        with pytest.raises(trio.EndOfChannel):
            await conn.receive_message()
        closed_normally.set()

    async with serving(handler) as (transport, addr):
        conn = await transport.dial(addr)
        async with trio.open_nursery() as nursery:

            async def receive() -> None:
                with pytest.raises(trio.ClosedResourceError):
                    await conn.receive_message()

            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            with trio.move_on_after(CLOSE_TIMEOUT / 2) as waited_out:
                await conn.aclose()
            assert not waited_out.cancelled_caught
            await closed_normally.wait()


async def test_abrupt_close_by_the_server_breaks_the_connection() -> None:
    async def raw_server(stream: trio.SocketStream) -> None:
        async with trio.open_nursery() as nursery:
            request = await wrap_server_stream(nursery, stream)
            ws = await request.accept()
            await ws.send_message(b"last words")
            await stream.aclose()  # no closing handshake
            nursery.cancel_scope.cancel()

    async with open_websocket_transport() as transport, trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, raw_server, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        conn = await transport.dial(Multiaddr("ip4", "127.0.0.1", port))
        assert await conn.receive_message() == b"last words"
        with pytest.raises(trio.BrokenResourceError):
            await conn.receive_message()
        with pytest.raises(trio.BrokenResourceError):
            await conn.send_message(b"x")
        await conn.aclose()
        await conn.aclose()
        nursery.cancel_scope.cancel()


async def test_leaving_the_transport_cuts_its_connections() -> None:
    outcome: list[type[BaseException]] = []
    done = trio.Event()

    async def handler(conn: RawConnection) -> None:
        try:
            await conn.receive_message()
        except trio.BrokenResourceError as exc:
            outcome.append(type(exc))
        done.set()

    async with serving(handler) as (_, addr):
        async with open_websocket_transport() as client:
            await client.dial(addr)
        await done.wait()
    assert outcome == [trio.BrokenResourceError]


async def test_text_message_breaks_only_that_connection() -> None:
    seen: list[type[BaseException]] = []

    async def handler(conn: RawConnection) -> None:
        try:
            await echo(conn)
        except trio.BrokenResourceError as exc:
            seen.append(type(exc))
            with pytest.raises(trio.BrokenResourceError):
                await conn.receive_message()
            raise

    async with serving(handler) as (transport, addr):
        async with raw_client(addr) as ws:
            await ws.send_message("text is not allowed")
            with pytest.raises(ConnectionClosed) as caught:
                await ws.get_message()
            assert caught.value.reason is not None
            assert caught.value.reason.code == 1003
        assert seen == [trio.BrokenResourceError]

        conn = await transport.dial(addr)
        await conn.send_message(b"others still served")
        assert await conn.receive_message() == b"others still served"
        await conn.aclose()


async def test_pings_are_answered_by_the_receiving_task() -> None:
    # No task runs per connection: the handler's receive answers the ping as it reads.
    async with serving(echo) as (_, addr), raw_client(addr) as ws:
        with trio.fail_after(5):
            await ws.ping(b"are you there")  # returns once the pong arrives
        await ws.send_message(b"still fine")
        assert await ws.get_message() == b"still fine"


async def test_oversize_message_breaks_the_connection() -> None:
    seen: list[type[BaseException]] = []

    async def handler(conn: RawConnection) -> None:
        try:
            await conn.receive_message()
        except trio.BrokenResourceError as exc:
            seen.append(type(exc))

    async with serving(handler) as (_, addr), raw_client(addr) as ws:
        await ws.send_message(bytes(MAX_TRANSPORT_MESSAGE + 1))
        with pytest.raises(ConnectionClosed) as caught:
            await ws.get_message()
        assert caught.value.reason is not None
        assert caught.value.reason.code == 1009
    assert seen == [trio.BrokenResourceError]


async def test_oversize_message_breaks_both_ends_of_our_connection() -> None:
    async with serving(echo, max_message=1000) as (_, addr), open_websocket_transport() as client:
        conn = await client.dial(addr)
        await conn.send_message(bytes(1000))
        assert await conn.receive_message() == bytes(1000)
        await conn.send_message(bytes(1001))
        with pytest.raises(trio.BrokenResourceError):
            await conn.receive_message()
        await conn.aclose()


async def test_no_extension_is_negotiated() -> None:
    offered: list[list[tuple[bytes, bytes]]] = []

    async def raw_handler(request: WebSocketRequest) -> None:
        offered.append(request.headers)
        await request.accept()
        await trio.sleep_forever()

    async with serving(echo) as (transport, addr):
        deflate = [(b"Sec-WebSocket-Extensions", b"permessage-deflate; client_max_window_bits")]
        async with raw_client(addr, deflate) as ws:
            names = {name.lower() for name, _ in ws.handshake_headers}
            assert b"sec-websocket-extensions" not in names
            await ws.send_message(b"plain")
            assert await ws.get_message() == b"plain"

        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_websocket, raw_handler, "127.0.0.1", 0, None)
            conn = await transport.dial(Multiaddr("ip4", "127.0.0.1", server.port))
            await conn.aclose()
            nursery.cancel_scope.cancel()
    assert all(name.lower() != b"sec-websocket-extensions" for name, _ in offered[0])


async def test_handler_errors_are_logged_and_the_listener_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = 0

    async def handler(conn: RawConnection) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("handler bug")
        await echo(conn)

    with caplog.at_level(logging.DEBUG, logger="sdcn_p2p.transport"):
        async with serving(handler) as (transport, addr):
            first = await transport.dial(addr)
            with pytest.raises(trio.EndOfChannel):
                await first.receive_message()
            await first.aclose()
            second = await transport.dial(addr)
            await second.send_message(b"ok")
            assert await second.receive_message() == b"ok"
            await second.aclose()
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failures) == 1
    assert failures[0].exc_info is not None
    assert isinstance(failures[0].exc_info[1], RuntimeError)


async def test_dial_to_a_closed_port_is_a_dial_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but not listening: connections are refused
        async with open_websocket_transport() as transport:
            with pytest.raises(DialError) as caught:
                await transport.dial(Multiaddr("ip4", "127.0.0.1", port))
    assert isinstance(caught.value.__cause__, OSError)


async def test_rejected_upgrade_is_a_dial_error_and_the_transport_goes_on() -> None:
    async def reject(request: WebSocketRequest) -> None:
        await request.reject(403, body=b"go away")

    async with serving(echo) as (transport, addr), trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, reject, "127.0.0.1", 0, None)
        with pytest.raises(DialError) as caught:
            await transport.dial(Multiaddr("ip4", "127.0.0.1", server.port))
        assert "refused the WebSocket upgrade: 403" in str(caught.value)
        conn = await transport.dial(addr)
        await conn.send_message(b"fine")
        assert await conn.receive_message() == b"fine"
        await conn.aclose()
        nursery.cancel_scope.cancel()


async def test_not_a_websocket_server_is_a_dial_error() -> None:
    async def http_server(stream: trio.SocketStream) -> None:
        await stream.receive_some()
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi")
        await trio.sleep_forever()

    async with open_websocket_transport() as transport, trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, http_server, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        with pytest.raises(DialError):
            await transport.dial(Multiaddr("ip4", "127.0.0.1", port))
        nursery.cancel_scope.cancel()


async def test_a_server_that_never_upgrades_is_left_to_the_callers_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async with open_websocket_transport() as transport, trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, silent, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        with pytest.raises(trio.TooSlowError), trio.fail_after(5):
            await transport.dial(Multiaddr("ip4", "127.0.0.1", port))
        nursery.cancel_scope.cancel()


async def test_a_client_that_never_upgrades_is_dropped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving(echo) as (_, addr):
        stream = await trio.open_tcp_stream(addr.host, addr.port)
        async with stream:
            start = trio.current_time()
            assert await stream.receive_some() == b""
            assert trio.current_time() - start >= HANDSHAKE_TIMEOUT


async def test_close_gives_up_on_a_peer_that_does_not_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def deaf_server(stream: trio.SocketStream) -> None:
        async with trio.open_nursery() as nursery:
            request = await wrap_server_stream(nursery, stream)
            await request.accept()
            nursery.cancel_scope.cancel()  # stop reading: the closing handshake goes unanswered
        await trio.sleep_forever()

    async with open_websocket_transport() as transport, trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, deaf_server, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        conn = await transport.dial(Multiaddr("ip4", "127.0.0.1", port))
        start = trio.current_time()
        await conn.aclose()
        assert trio.current_time() - start == pytest.approx(CLOSE_TIMEOUT)
        nursery.cancel_scope.cancel()


async def test_serve_on_a_port_in_use_is_a_config_error() -> None:
    async with serving(echo) as (transport, addr):
        with pytest.raises(ConfigError) as caught:
            await transport.serve(addr, echo)
        assert isinstance(caught.value.__cause__, OSError)


async def test_serve_on_a_foreign_address_is_a_config_error() -> None:
    async with open_websocket_transport() as transport:
        with pytest.raises(ConfigError):
            await transport.serve(Multiaddr.parse("/ip4/192.0.2.1/tcp/0/ws"), echo)


async def test_serve_wss_needs_a_server_context() -> None:
    async with open_websocket_transport() as transport:
        with pytest.raises(ConfigError, match="SSL"):
            await transport.serve(Multiaddr.parse("/ip4/127.0.0.1/tcp/0/wss"), echo)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context) for a self-signed certificate for 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sdcn test")])
    now = datetime.datetime.now(datetime.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    directory = tmp_path_factory.mktemp("tls")
    (directory / "cert.pem").write_bytes(cert_pem)
    (directory / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    client = ssl.create_default_context(cadata=cert_pem.decode())
    return server, client


async def test_wss_round_trip(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_context, client_context = tls
    secure = Multiaddr.parse("/ip4/127.0.0.1/tcp/0/wss")
    options = {"ssl_context_server": server_context, "ssl_context_client": client_context}
    async with serving(echo, secure, **options) as (transport, addr):
        assert addr.secure
        conn = await transport.dial(addr)
        assert conn.remote_addr == addr
        for size in (0, 1, 1000, MAX_TRANSPORT_MESSAGE):
            await conn.send_message(b"s" * size)
            assert await conn.receive_message() == b"s" * size
        await conn.aclose()


async def test_wss_with_an_untrusted_certificate_is_a_dial_error(
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    secure = Multiaddr.parse("/ip4/127.0.0.1/tcp/0/wss")
    async with serving(echo, secure, ssl_context_server=tls[0]) as (transport, addr):
        with pytest.raises(DialError, match="TLS"):
            await transport.dial(addr)  # the default context does not trust our certificate


@pytest.mark.skipif(not ipv6_available(), reason="no IPv6 loopback")
async def test_ipv6_round_trip() -> None:
    async with serving(echo, Multiaddr.parse("/ip6/::1/tcp/0/ws")) as (transport, addr):
        assert addr.family == "ip6" and addr.host == "::1"
        conn = await transport.dial(addr)
        await conn.send_message(b"six")
        assert await conn.receive_message() == b"six"
        assert conn.remote_addr == addr
        await conn.aclose()


async def test_dial_by_dns_name() -> None:
    async with serving(echo) as (transport, addr):
        conn = await transport.dial(Multiaddr("dns4", "localhost", addr.port))
        await conn.send_message(b"named")
        assert await conn.receive_message() == b"named"
        assert conn.remote_addr is not None and conn.remote_addr.family in ("ip4", "ip6")
        await conn.aclose()


async def test_no_task_is_left_behind() -> None:
    before = count_tasks()
    async with serving(echo) as (transport, addr):
        serving_only = count_tasks()
        connections = [await transport.dial(addr) for _ in range(10)]
        for conn in connections:
            await conn.send_message(b"x")
            assert await conn.receive_message() == b"x"
        for conn in connections:
            await conn.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert count_tasks() == serving_only  # no connection task outlives its connection
    assert count_tasks() == before


async def test_errors_leave_the_transport_unwrapped() -> None:
    with pytest.raises(KeyError):
        async with open_websocket_transport():
            raise KeyError("not an exception group")
