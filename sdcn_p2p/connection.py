"""A secured, multiplexed connection to one peer, upgraded as libp2p upgrades a byte stream.

The transport's messages are read as one byte stream. `secure_outbound` / `secure_inbound`
agree on ``/noise`` with multistream-select (the dialer lazily: header, protocol and the
first Noise message go together) and run the Noise XX handshake (`wire.noise`), each message
behind its 2-byte length. The muxer is ``/yamux/1.0.0``: agreed inside the handshake when
both sides offer it in their payloads, else selected by multistream-select inside the secure
channel (again lazily by the dialer, so its first yamux frames follow at once). `Connection`
drives a `wire.yamux.YamuxSession` over the resulting `SecureChannel` and hands out `Stream`
objects, which are trio half-closeable byte streams with a length-prefixed msgpack message API
on top.

Protocol selection on a stream is multistream-select too. The initiator writes the header and
its protocol as the stream's first bytes and reads the answer lazily, in front of the
responder's first data, so a stream still costs no round trip of its own. The responder sends
its answer with its first data or its FIN, or as soon as it would wait to read (an initiator
that is not lazy waits for the answer before it writes).
"""

from __future__ import annotations

import contextlib
import logging
import operator
from collections.abc import Awaitable, Callable, Container
from typing import Any

import trio

from sdcn_p2p.errors import (
    HandshakeError,
    ProtocolError,
    RemoteProtocolError,
    ResourceLimitExceeded,
    StreamReset,
    UnsupportedProtocol,
)
from sdcn_p2p.identity import Identity, PeerId
from sdcn_p2p.multiaddr import Multiaddr
from sdcn_p2p.transport import RawConnection
from sdcn_p2p.wire import multistream, noise, yamux
from sdcn_p2p.wire.messages import MessageDecoder, encode_message
from sdcn_p2p.wire.noise import (
    MAX_PLAINTEXT,
    FrameDecoder,
    NoiseCredentials,
    NoiseHandshake,
    NoiseTransport,
    encode_frame,
)

__all__ = [
    "MAX_PROTOCOL_ID",
    "YAMUX",
    "Connection",
    "SecureChannel",
    "Stream",
    "noise_credentials",
    "secure_inbound",
    "secure_outbound",
]

log = logging.getLogger(__name__)

#: The muxer we speak: offered in the Noise handshake, else selected by multistream-select.
YAMUX = "/yamux/1.0.0"
#: Longest protocol id a stream may name, in bytes.
MAX_PROTOCOL_ID = multistream.MAX_TOKEN
DEFAULT_MAX_MESSAGE = 1024 * 1024
# Outgoing bytes we queue before stream writers wait for the connection writer to catch up.
_HIGH_WATER = 512 * 1024
# Control frames (pongs, window updates, resets) queued while the remote does not read:
# past this the remote is misbehaving and the connection ends.
_CONTROL_LIMIT = 4 * 1024 * 1024
#: Seconds a draining connection stays open without streams, for streams already in flight.
DRAIN_GRACE = 5.0
#: Seconds a closing connection gives what its streams wrote to go out, and the handlers of
#: streams a peer sent whole before it closed the connection to read them.
CLOSING_GRACE = 1.0


class SecureChannel:
    """Noise over the byte stream of a RawConnection: each Noise message behind its length,
    one per transport message (as go-libp2p writes them; the receiver reads a byte stream).

    Made by `secure_outbound` / `secure_inbound`, with the bytes they received past the
    handshake. Until the answer of a lazy muxer selection (`expect_answer`) has arrived and
    been checked, `receive_some` strips it from what it returns.
    """

    def __init__(
        self,
        raw: RawConnection,
        noise_transport: NoiseTransport,
        frames: FrameDecoder | None = None,
    ) -> None:
        """`frames`: holds what was received past the handshake, if anything."""
        self.raw = raw
        self._noise = noise_transport
        self._frames = frames or FrameDecoder()
        self._unread = b""  # plaintext received during the upgrade, for the muxer
        self._answer: multistream.Dialer | None = None

    def unread(self, data: bytes) -> None:
        """Return `data` from the next `receive_some` (what the upgrade read too far)."""
        self._unread = data + self._unread

    def seal(self, data: bytes | bytearray | memoryview) -> bytes:
        """Encrypt `data` into framed Noise messages (for the caller to send)."""
        view = memoryview(data).cast("B")
        return b"".join(
            encode_frame(self._noise.encrypt(view[start : start + MAX_PLAINTEXT]))
            for start in range(0, len(view), MAX_PLAINTEXT)
        )

    def expect_answer(self, select: multistream.Dialer) -> None:
        """Check the listener's answer to `select` in front of the bytes that follow it."""
        self._answer = select

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), MAX_PLAINTEXT):
            frame = encode_frame(self._noise.encrypt(view[start : start + MAX_PLAINTEXT]))
            await self.raw.send_message(frame)

    async def receive_some(self) -> bytes:
        """Next decrypted bytes (never empty). Raises ProtocolError on a bad ciphertext or a
        refused muxer; trio errors when the connection ends or breaks.
        """
        while True:
            if self._unread:
                data, self._unread = self._unread, b""
            else:
                data = self._decrypt(self._frames.split(b""))
                while not data:
                    data = self._decrypt(self._frames.split(await self.raw.receive_message()))
            if self._answer is not None:
                data = self._strip_answer(data)
            if data:
                return data

    def _decrypt(self, frames: list[bytes | memoryview]) -> bytes:
        if len(frames) == 1:
            return self._noise.decrypt(frames[0])
        return b"".join([self._noise.decrypt(frame) for frame in frames])

    def _strip_answer(self, data: bytes) -> bytes:
        select = self._answer
        assert select is not None
        select.receive_data(data)
        event = select.next_event()
        if event is None:
            return b""
        self._answer = None
        if isinstance(event, multistream.ProtocolRefused):
            raise RemoteProtocolError(f"the peer does not speak {event.protocol}")
        return select.unused()

    async def aclose(self) -> None:
        await self.raw.aclose()


def noise_credentials(identity: Identity) -> NoiseCredentials:
    """A Host's Noise credentials: a fresh static key, signed, offering yamux in the handshake."""
    return NoiseCredentials(identity, stream_muxers=(YAMUX,))


class _Upgrade:
    """The raw byte stream while a connection is upgraded.

    What we queue in `outbox` goes out with our next message, or before we wait for the peer,
    so a peer that waits for every answer (not lazy, as we are) is never kept waiting.
    """

    def __init__(self, raw: RawConnection) -> None:
        self.raw = raw
        self.frames = FrameDecoder()
        self.outbox = bytearray()

    async def flush(self) -> None:
        if self.outbox:
            data, self.outbox = bytes(self.outbox), bytearray()
            await self.raw.send_message(data)

    async def _receive(self) -> bytes:
        await self.flush()
        try:
            data = await self.raw.receive_message()
        except trio.EndOfChannel:
            raise HandshakeError("connection closed during the handshake") from None
        return data

    async def select(
        self, machine: multistream.Dialer | multistream.Listener
    ) -> multistream.ProtocolAccepted | multistream.ProtocolRefused | multistream.ProtocolSelected:
        """Run a multistream-select negotiation on the raw bytes."""
        try:
            while (event := machine.next_event()) is None:
                self.outbox += machine.data_to_send()
                machine.receive_data(await self._receive())
        except RemoteProtocolError as exc:
            raise HandshakeError(f"protocol negotiation failed: {exc}") from None
        self.outbox += machine.data_to_send()
        self.frames.feed(machine.unused())
        return event

    async def read_noise(self, handshake: NoiseHandshake) -> None:
        while (frame := self.frames.next_frame()) is None:
            self.frames.feed(await self._receive())
        handshake.read_message(frame)

    def write_noise(self, handshake: NoiseHandshake) -> None:
        self.outbox += encode_frame(handshake.write_message())

    def channel(self, handshake: NoiseHandshake) -> SecureChannel:
        return SecureChannel(self.raw, handshake.to_transport(), self.frames)


async def secure_outbound(
    raw: RawConnection, credentials: NoiseCredentials, expected_peer: PeerId | None
) -> tuple[SecureChannel, PeerId]:
    """Upgrade a dialled connection: select ``/noise``, run Noise XX as initiator, agree on
    yamux. Costs one round trip after the transport's. Raises HandshakeError; the caller sets
    a timeout.
    """
    upgrade = _Upgrade(raw)
    select = multistream.Dialer(noise.PROTOCOL_ID)
    handshake = NoiseHandshake(credentials, initiator=True, expected_peer=expected_peer)
    upgrade.outbox += select.data_to_send()
    upgrade.write_noise(handshake)  # lazily, behind our proposal
    if isinstance(await upgrade.select(select), multistream.ProtocolRefused):
        raise HandshakeError(f"the peer does not speak {noise.PROTOCOL_ID}")
    await upgrade.read_noise(handshake)
    upgrade.write_noise(handshake)
    assert handshake.complete and handshake.remote_peer_id is not None
    channel = upgrade.channel(handshake)
    if handshake.agreed_muxer is None:
        # Not agreed in the handshake: propose yamux in the channel; our first frames follow
        # without waiting, and the answer is checked in front of the peer's first frames.
        select_muxer = multistream.Dialer(YAMUX)
        upgrade.outbox += channel.seal(select_muxer.data_to_send())
        channel.expect_answer(select_muxer)
    await upgrade.flush()
    return channel, handshake.remote_peer_id


async def secure_inbound(
    raw: RawConnection, credentials: NoiseCredentials
) -> tuple[SecureChannel, PeerId]:
    """Upgrade an accepted connection: the listener's side of `secure_outbound`. Raises
    HandshakeError; the caller sets a timeout.
    """
    upgrade = _Upgrade(raw)
    await upgrade.select(multistream.Listener({noise.PROTOCOL_ID}))
    handshake = NoiseHandshake(credentials, initiator=False)
    await upgrade.read_noise(handshake)
    upgrade.write_noise(handshake)  # behind our answer to /noise
    await upgrade.read_noise(handshake)
    assert handshake.complete and handshake.remote_peer_id is not None
    channel = upgrade.channel(handshake)
    if handshake.agreed_muxer is None:
        await _select_muxer_inbound(channel)
    return channel, handshake.remote_peer_id


async def _select_muxer_inbound(channel: SecureChannel) -> None:
    select = multistream.Listener({YAMUX})
    try:
        while select.next_event() is None:
            if out := select.data_to_send():
                await channel.send_all(out)
            select.receive_data(await channel.receive_some())
    except RemoteProtocolError as exc:
        raise HandshakeError(f"muxer negotiation failed: {exc}") from None
    except trio.EndOfChannel:
        raise HandshakeError("connection closed during the muxer negotiation") from None
    await channel.send_all(select.data_to_send())
    channel.unread(select.unused())


class Stream(trio.abc.HalfCloseableStream):
    """One yamux stream: a trio half-closeable byte stream plus a message API.

    `send_message`/`receive_message` carry length-prefixed msgpack capped at
    `max_message_size`; a message over the cap resets the stream. `aclose()` sends FIN and
    stops reading; `reset()` aborts both directions. Not safe for two concurrent senders or
    two concurrent receivers (trio.BusyResourceError).
    """

    def __init__(
        self,
        connection: Connection,
        stream_id: int,
        protocol: str | None,
        *,
        outbound: bool,
        max_message_size: int = DEFAULT_MAX_MESSAGE,
    ) -> None:
        self.connection = connection
        self.stream_id = stream_id
        self.protocol = protocol
        self.outbound = outbound
        self.max_message_size = max_message_size
        self._buf = bytearray()
        self._remote_eof = False
        self._reset = False
        self._reset_by_remote = False
        self._local_eof = False
        self._closed = False
        # Outbound: our lazy proposal, until the answer in front of the responder's data.
        self._select: multistream.Dialer | None = None
        self._prefix = b""  # inbound: our answer, sent with our first data or our FIN
        self._decoder: MessageDecoder | None = None
        self._lot = trio.lowlevel.ParkingLot()
        self._sending = False
        self._receiving = False

    @property
    def peer_id(self) -> PeerId:
        return self.connection.peer_id

    # --- events from the connection's reader task -------------------------------------------

    def _on_data(self, data: bytes) -> None:
        if self._closed:
            if self._select is not None and self._take_late_answer(data):
                return
            # Nobody will read it: refuse more, as TCP does for a closed socket.
            self._abort()
            return
        self._buf += data
        self._lot.unpark_all()

    def _take_late_answer(self, data: bytes) -> bool:
        """Take the answer to our proposal on a stream we closed without reading (a push):
        it belongs to the negotiation, not to anyone's data. False if more than it came.
        """
        select = self._select
        assert select is not None
        try:
            select.receive_data(data)
            event = select.next_event()
        except RemoteProtocolError:
            return False
        if event is None:
            self._consume(len(data))
            return True
        self._select = None
        rest = select.unused()
        self._consume(len(data) - len(rest))
        return not rest

    def _on_eof(self) -> None:
        self._remote_eof = True
        self._lot.unpark_all()

    def _on_reset(self) -> None:
        self._reset = True
        self._reset_by_remote = True
        self.connection._forget(self)
        self._lot.unpark_all()

    def _on_window(self) -> None:
        self._lot.unpark_all()

    # --- byte stream API ---------------------------------------------------------------------

    def _check_send(self) -> None:
        if self._closed or self._local_eof:
            raise trio.ClosedResourceError("stream closed for sending")
        if self._reset:
            raise StreamReset(self._reset_message())
        self.connection._check_alive()

    def _reset_message(self) -> str:
        who = "remote peer" if self._reset_by_remote else "local side"
        return f"stream {self.protocol or self.stream_id} reset by the {who}"

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        waited = False
        try:
            view = memoryview(data).cast("B")
            conn = self.connection
            self._send_prefix()
            while True:
                self._check_send()
                sent = conn._session.send(self.stream_id, view) if view else 0
                if sent:
                    view = view[sent:]
                    conn._pump()
                    waited |= await conn._wait_writable()
                if not view:
                    break
                if not sent:
                    await self._lot.park()
                    waited = True
        finally:
            self._sending = False
        if not waited:
            # Trio's stream contract: every call is a checkpoint, even one that did not block.
            await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        waited = False
        try:
            while True:
                self._check_send()
                if self.connection._session.send_window(self.stream_id) > 0:
                    waited |= await self.connection._wait_writable()
                    break
                await self._lot.park()
                waited = True
        finally:
            self._sending = False
        if not waited:
            await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        if self._local_eof or self._reset:
            return
        self._send_prefix()
        self._local_eof = True
        self.connection._session.close_stream(self.stream_id)
        self.connection._pump()
        self.connection._forget_if_done(self)

    def _send_prefix(self) -> None:
        """Queue our pending answer ahead of whatever we send next (same frame batch)."""
        if self._prefix and not self._reset and not self._local_eof:
            self.connection._check_alive()
            self.connection._session.send(self.stream_id, self._prefix)  # the window is fresh
            self._prefix = b""
            self.connection._pump()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None and operator.index(max_bytes) < 1:
            raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        self._receiving = True
        try:
            if self._select is not None:
                await self._read_answer(self._select)
            waited = False
            while not self._buf:
                if self._closed:
                    raise trio.ClosedResourceError("stream closed")
                if self._remote_eof:
                    break
                if self._reset:
                    raise StreamReset(self._reset_message())
                self.connection._check_alive()
                self._send_prefix()  # an initiator that is not lazy waits for our answer
                await self._lot.park()
                waited = True
            n = len(self._buf) if max_bytes is None else min(max_bytes, len(self._buf))
            data = bytes(self._buf[:n])
            del self._buf[:n]
            self._consume(n)
        finally:
            self._receiving = False
        if not waited:
            await trio.lowlevel.checkpoint()
        return data

    def _consume(self, n: int) -> None:
        if not self._reset:
            self.connection._session.consume(self.stream_id, n)
            self.connection._pump()

    async def _read_answer(self, select: multistream.Dialer) -> None:
        """Read the responder's answer to our proposal from the front of what it sent."""
        fed = 0
        while True:
            if self._buf:
                fed += self._feed(select)
                try:
                    event = select.next_event()
                except RemoteProtocolError:
                    self._abort()
                    raise
                if event is not None:
                    break
            if self._closed:
                raise trio.ClosedResourceError("stream closed")
            if self._remote_eof or self._reset:
                raise StreamReset(f"stream {self.protocol} closed before the protocol was accepted")
            self.connection._check_alive()
            await self._lot.park()
        self._select = None
        self._settle(select, fed)
        if isinstance(event, multistream.ProtocolRefused):
            self._abort()
            raise UnsupportedProtocol(f"{self.peer_id} does not support {self.protocol}")

    def _abort(self) -> None:
        if not self._reset:
            self._reset = True
            self.connection._session.reset_stream(self.stream_id)
            self.connection._pump()
            self.connection._forget(self)
        self._lot.unpark_all()

    def reset(self) -> None:
        """Abort both directions at once; the remote sees StreamReset."""
        self._abort()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            if not self._reset and not self.connection.closed:
                if self._buf:
                    self._consume(len(self._buf))
                    self._buf.clear()
                if not self._local_eof:
                    self._send_prefix()
                    self._local_eof = True
                    self.connection._session.close_stream(self.stream_id)
                    self.connection._pump()
                self.connection._forget_if_done(self)
            self._lot.unpark_all()
        await trio.lowlevel.checkpoint()

    # --- message API -------------------------------------------------------------------------

    async def send_message(self, obj: Any) -> None:
        """Send one length-prefixed msgpack message; MessageTooLarge if over the cap."""
        await self.send_all(encode_message(obj, max_size=self.max_message_size))

    async def receive_message(self) -> Any:
        """Receive one message. Raises trio.EndOfChannel at a clean end of stream,
        ProtocolError (and resets the stream) on a malformed or oversized message.
        """
        if self._decoder is None:
            self._decoder = MessageDecoder(self.max_message_size)
        decoder = self._decoder
        while True:
            try:
                message = decoder.next_message()
            except ProtocolError:
                self._abort()
                raise
            if message is not None:
                return message
            data = await self.receive_some(256 * 1024)
            if not data:
                if decoder.buffered:
                    raise RemoteProtocolError("stream ended in the middle of a message")
                raise trio.EndOfChannel
            decoder.feed(data)

    # --- used when accepting ---------------------------------------------------------------------

    async def _negotiate(self, supported: Container[str]) -> str:
        """Answer the initiator's proposals; return the first protocol in `supported`.

        Our answer is held back to go with our first data or FIN (`_accept` keeps it), or
        until we would wait to receive. Raises RemoteProtocolError when the initiator breaks
        multistream-select or ends the stream first; the caller sets a timeout.
        """
        select = multistream.Listener(supported)
        fed = 0
        while True:
            fed += self._feed(select)
            try:
                event = select.next_event()
            finally:
                # Our header or refusals, even when what follows them breaks the protocol: a
                # lazy initiator's data after a proposal we refused is no proposal.
                if not select.done and (out := select.data_to_send()):
                    self.connection._check_alive()
                    self.connection._session.send(self.stream_id, out)
                    self.connection._pump()
            if event is not None:
                break
            if self._remote_eof or self._reset:
                raise RemoteProtocolError("stream ended before naming a protocol we speak")
            self.connection._check_alive()
            await self._lot.park()
        self._settle(select, fed)
        self._prefix = select.data_to_send()
        return event.protocol

    def _feed(self, select: multistream.Dialer | multistream.Listener) -> int:
        """Hand what we received to a negotiation; how much (credited once it is settled)."""
        fed = len(self._buf)
        select.receive_data(self._buf)
        self._buf.clear()
        return fed

    def _settle(self, select: multistream.Dialer | multistream.Listener, fed: int) -> None:
        """Put back what came past the negotiation, and credit the window for what it used."""
        rest = select.unused()
        self._buf[:0] = rest
        self._consume(fed - len(rest))

    def _accept(self, protocol: str, max_message_size: int) -> None:
        self.protocol = protocol
        self.max_message_size = max_message_size

    def __repr__(self) -> str:
        direction = "out" if self.outbound else "in"
        return f"<Stream {self.protocol} {direction} #{self.stream_id} {self.peer_id.short()}>"


class Connection:
    """A secured yamux session with one peer; owned and closed by the Host.

    `run` (started by the Host with `nursery.start`) reads frames and dispatches them, and
    writes queued output from a single writer task so that a reader never waits on a writer.
    Handlers for inbound streams run in this connection's nursery and are cancelled with it.
    """

    def __init__(
        self,
        channel: SecureChannel,
        peer_id: PeerId,
        *,
        outbound: bool,
        max_inbound_streams: int,
        on_stream: Callable[[Stream], Awaitable[None]],
    ) -> None:
        self.peer_id = peer_id
        self.outbound = outbound
        self.remote_addr: Multiaddr | None = channel.raw.remote_addr
        self.local_addr: Multiaddr | None = channel.raw.local_addr
        self.opened_at = trio.current_time()
        self.closed = False
        self.close_reason: str | None = None
        self.draining = False
        self._channel = channel
        self._session = yamux.YamuxSession(
            is_client=outbound, max_inbound_streams=max_inbound_streams
        )
        self._streams: dict[int, Stream] = {}
        self._on_stream = on_stream
        self._outbuf = bytearray()
        self._writer_lot = trio.lowlevel.ParkingLot()  # the writer waits here for output
        self._writing = False  # the writer is sending what it took from `_outbuf`
        self._writer_alive = False
        self._flushed_lot = trio.lowlevel.ParkingLot()  # a write ended
        self._forgotten_lot = trio.lowlevel.ParkingLot()  # a stream was forgotten
        self._reader_done = trio.Event()
        self._space_lot = trio.lowlevel.ParkingLot()  # senders wait here for buffer space
        self._idle_lot = trio.lowlevel.ParkingLot()  # stream-count changes
        self._nursery: trio.Nursery | None = None
        self._idle_interrupted = False
        self.last_active = trio.current_time()

    @property
    def direction(self) -> str:
        return "outbound" if self.outbound else "inbound"

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    def _check_alive(self) -> None:
        if self.closed:
            raise trio.BrokenResourceError(
                f"connection to {self.peer_id} closed: {self.close_reason}"
            )

    async def open_stream(
        self, protocol: str, *, max_message_size: int = DEFAULT_MAX_MESSAGE
    ) -> Stream:
        """Open a stream that speaks `protocol`. Data can be sent at once (no round trip).

        Raises UnsupportedProtocol on the first receive if the remote has no such handler,
        ResourceLimitExceeded if the connection is draining or out of stream ids.
        """
        self._check_alive()
        if self.draining or self._session.went_away:
            raise ResourceLimitExceeded(f"connection to {self.peer_id} is closing")
        encoded = protocol.encode("utf-8")
        if not encoded or len(encoded) > MAX_PROTOCOL_ID or "\n" in protocol:
            raise ValueError(f"bad protocol id {protocol!r}")
        select = multistream.Dialer(protocol)
        stream_id = self._session.open_stream()
        stream = Stream(self, stream_id, protocol, outbound=True, max_message_size=max_message_size)
        stream._select = select
        self._streams[stream_id] = stream
        self._touch()
        try:
            await stream.send_all(select.data_to_send())
        except BaseException:
            # Cancelled (or failed) before the caller got the stream: nobody else can close
            # it, and a stream left open here would stay in `_streams` for good.
            stream.reset()
            raise
        return stream

    # --- the reader ------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the connection until it closes; returns (never raises) when it is over."""
        reason = "closed"
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._writer)
                task_status.started()
                try:
                    try:
                        await self._reader()
                    finally:
                        self._reader_done.set()
                except trio.EndOfChannel:
                    reason = "closed by the remote peer"
                    await self._let_finished_streams_be_read()
                except ProtocolError as exc:
                    reason = f"protocol error: {exc}"
                    log.info("connection to %s: %s", self.peer_id.short(), exc)
                    await self._flush_before_close()
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    reason = f"connection lost: {exc or type(exc).__name__}"
                nursery.cancel_scope.cancel()
        finally:
            await self._teardown(reason)

    async def _reader(self) -> None:
        while True:
            data = await self._channel.receive_some()
            for event in self._session.receive_data(data):
                self._dispatch(event)
            self._pump()
            if len(self._outbuf) > _CONTROL_LIMIT + _HIGH_WATER:
                raise RemoteProtocolError("remote peer does not read what it asks for")

    def _dispatch(self, event: yamux.Event) -> None:
        if isinstance(event, yamux.DataReceived):
            stream = self._streams.get(event.stream_id)
            if stream is None:
                # A stream we have already forgotten: keep the window honest.
                self._session.consume(event.stream_id, len(event.data))
            else:
                stream._on_data(event.data)
        elif isinstance(event, yamux.StreamOpened):
            self._accept_stream(event.stream_id)
        elif isinstance(event, yamux.StreamEnded):
            if (stream := self._streams.get(event.stream_id)) is not None:
                stream._on_eof()
                self._forget_if_done(stream)
        elif isinstance(event, yamux.StreamResetReceived):
            if (stream := self._streams.get(event.stream_id)) is not None:
                stream._on_reset()
        elif isinstance(event, yamux.WindowUpdated):
            if (stream := self._streams.get(event.stream_id)) is not None:
                stream._on_window()
        elif isinstance(event, yamux.GoAwayReceived):
            self.draining = True
            self._idle_lot.unpark_all()

    def _accept_stream(self, stream_id: int) -> None:
        if self._nursery is None:
            self._session.reset_stream(stream_id)
            return
        stream = Stream(self, stream_id, None, outbound=False)
        self._streams[stream_id] = stream
        self._touch()
        self._nursery.start_soon(self._on_stream, stream)

    # --- the writer ------------------------------------------------------------------------------

    def _pump(self) -> None:
        """Move the session's queued output to our buffer and wake the writer."""
        data = self._session.data_to_send()
        if data:
            self._outbuf += data
            self._writer_lot.unpark_all()

    async def _wait_writable(self) -> bool:
        """Wait while the output buffer is over its high-water mark; True if we waited."""
        waited = False
        while len(self._outbuf) > _HIGH_WATER:
            self._check_alive()
            await self._space_lot.park()
            waited = True
        return waited

    async def _writer(self) -> None:
        self._writer_alive = True
        try:
            while True:
                while not self._outbuf:
                    await self._writer_lot.park()
                data, self._outbuf = self._outbuf, bytearray()
                self._space_lot.unpark_all()
                self._writing = True
                try:
                    await self._channel.send_all(data)
                finally:
                    self._writing = False
                    self._flushed_lot.unpark_all()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("connection to %s: write failed: %r", self.peer_id.short(), exc)
        finally:
            self._writer_alive = False
            self._flushed_lot.unpark_all()
        # Only a failed write gets here. The reader sees the end too, after what the peer sent
        # before it left (a last advert): let it read that, then make sure it stops waiting.
        with trio.move_on_after(CLOSING_GRACE):
            await self._reader_done.wait()
        await self._channel.aclose()

    async def _flush_before_close(self) -> None:
        self._pump()
        if self._outbuf:
            with trio.move_on_after(1):
                data, self._outbuf = self._outbuf, bytearray()
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self._channel.send_all(data)

    async def _wait_flushed(self) -> None:
        """Wait until the writer has sent everything queued so far (or has stopped)."""
        self._pump()
        while self._writer_alive and (self._outbuf or self._writing):
            await self._flushed_lot.park()

    # --- bookkeeping -----------------------------------------------------------------------------

    def _touch(self) -> None:
        self.last_active = trio.current_time()
        if not self._streams:
            # Idle again: the watcher parked on "streams exist" starts its timer. While it is
            # timing, a stream opening needs no wake-up: the timer re-checks when it fires.
            self._idle_lot.unpark_all()

    def _forget(self, stream: Stream) -> None:
        if self._streams.get(stream.stream_id) is stream:
            del self._streams[stream.stream_id]
            self._touch()
            self._forgotten_lot.unpark_all()

    async def _let_finished_streams_be_read(self) -> None:
        """The peer closed the connection after sending some streams whole (data and FIN, a
        last advert say): give their handlers, maybe not yet started, until they are done with
        them, or CLOSING_GRACE, before everything is cancelled."""
        with trio.move_on_after(CLOSING_GRACE):
            while any(s._remote_eof and not s._reset for s in self._streams.values()):
                await self._forgotten_lot.park()

    def _forget_if_done(self, stream: Stream) -> None:
        # Once both sides sent FIN no more events come for the stream; the application may
        # still read what is buffered through its own reference.
        if stream._local_eof and stream._remote_eof:
            self._forget(stream)

    async def wait_idle(self, idle_timeout: float) -> bool:
        """Wait until the connection has had no streams for `idle_timeout` seconds, or
        DRAIN_GRACE if it is draining (True), or `interrupt_idle_wait` is called (False).
        """
        self._idle_interrupted = False
        while not self._idle_interrupted:
            if self._streams:
                await self._idle_lot.park()
                continue
            timeout = min(idle_timeout, DRAIN_GRACE) if self.draining else idle_timeout
            deadline = self.last_active + timeout
            if trio.current_time() >= deadline:
                return True
            with trio.move_on_at(deadline):
                await self._idle_lot.park()
        return False

    def interrupt_idle_wait(self) -> None:
        """Make a pending `wait_idle` return False (the idle policy changed)."""
        self._idle_interrupted = True
        self._idle_lot.unpark_all()

    def drain(self) -> None:
        """Open no more streams here; the Host closes the connection once it has had no
        streams for DRAIN_GRACE seconds.

        Streams the remote opens meanwhile are still served: it may not know yet that this
        connection is being retired (a duplicate of a simultaneous dial), and resetting its
        streams would fail requests that did nothing wrong.
        """
        if not self.draining and not self.closed:
            self.draining = True
            self._idle_lot.unpark_all()

    async def aclose(self, reason: str = "closed locally") -> None:
        """Close at once: the connection counts as closed from the first moment (no new
        stream goes over it), and pending streams see BrokenResourceError. Idempotent.
        """
        if self.close_reason is None:
            self.close_reason = reason
        self.closed = True
        try:
            # What streams already sent (a last advert, a FIN) goes out first, while the peer
            # reads it. The reader keeps draining meanwhile, so the transport's closing
            # handshake can complete instead of waiting behind unread messages.
            with trio.move_on_after(CLOSING_GRACE):
                await self._wait_flushed()
            await self._channel.aclose()
        finally:
            if self._nursery is not None:
                self._nursery.cancel_scope.cancel()

    async def _teardown(self, reason: str) -> None:
        if self.close_reason is None:
            self.close_reason = reason
        self.closed = True
        for stream in list(self._streams.values()):
            stream._lot.unpark_all()
        self._streams.clear()
        self._space_lot.unpark_all()
        self._idle_lot.unpark_all()
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await self._channel.aclose()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("draining" if self.draining else "open")
        return f"<Connection {self.direction} {self.peer_id} {state} streams={len(self._streams)}>"
