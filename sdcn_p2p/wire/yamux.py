"""yamux stream multiplexing as a sans-IO state machine.

Frame format and semantics follow hashicorp/yamux ``spec.md`` (as libp2p uses it): a 12-byte
big-endian header (version, type, flags, stream id, length), SYN/ACK/FIN/RST flags, per-stream
flow control with a 256 KiB initial window, ping and go away on stream 0.

`YamuxSession` does no I/O and reads no clock: feed it the bytes the peer sent with
`receive_data` (events come back), give it commands (`open_stream`, `send`, ...), and write
whatever `data_to_send` returns to the peer.

Every stream goes through the states of `_TRANSITIONS`. SYN and ACK go out at once, in a
window update, when we open or accept a stream, so a stream enters the table as SYN_SENT (ours)
or ESTABLISHED (theirs). A stream's state is freed once both sides sent FIN, or after RST either
way; frames for ids we no longer know are ignored.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import TypeAlias

from sdcn_p2p.errors import (
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    ResourceLimitExceeded,
    StreamReset,
)

__all__ = [
    "DEFAULT_WINDOW",
    "GO_AWAY_INTERNAL_ERROR",
    "GO_AWAY_NORMAL",
    "GO_AWAY_PROTOCOL_ERROR",
    "MAX_FRAME_PAYLOAD",
    "DataReceived",
    "Event",
    "GoAwayReceived",
    "PingReceived",
    "PongReceived",
    "StreamAccepted",
    "StreamEnded",
    "StreamOpened",
    "StreamResetReceived",
    "WindowUpdated",
    "YamuxSession",
]

#: The window every stream starts with, in each direction (spec).
DEFAULT_WINDOW = 256 * 1024
#: Largest payload of a Data frame we send; bigger writes are split.
MAX_FRAME_PAYLOAD = 64 * 1024

GO_AWAY_NORMAL = 0
GO_AWAY_PROTOCOL_ERROR = 1
GO_AWAY_INTERNAL_ERROR = 2

_HEADER = struct.Struct(">BBHII")
_HEADER_LEN = _HEADER.size
_VERSION = 0
_MAX_U32 = 0xFFFFFFFF

# Frame types.
_DATA = 0
_WINDOW_UPDATE = 1
_PING = 2
_GO_AWAY = 3

# Flags. Unknown flag bits are ignored, as go-yamux and rust-yamux do.
_SYN = 1
_ACK = 2
_FIN = 4
_RST = 8


# --- events ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """The remote opened a stream; we have already acknowledged it."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamAccepted:
    """The remote acknowledged a stream we opened (only while we had not sent FIN yet)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Payload for a stream; pass its length to `YamuxSession.consume` once the app read it."""

    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The remote half-closed the stream (FIN): no more data will come."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamResetReceived:
    """The remote reset the stream (RST); the session has forgotten it."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class WindowUpdated:
    """The send window of a stream grew: writers blocked on it may go on."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class PingReceived:
    """The remote pinged us; the pong is already queued."""

    opaque: int


@dataclass(frozen=True, slots=True)
class PongReceived:
    """The remote answered one of our pings."""

    opaque: int


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    """The remote will accept no new streams; `code` is one of the GO_AWAY_* codes."""

    code: int


Event: TypeAlias = (
    StreamOpened
    | StreamAccepted
    | DataReceived
    | StreamEnded
    | StreamResetReceived
    | WindowUpdated
    | PingReceived
    | PongReceived
    | GoAwayReceived
)


# --- stream states --------------------------------------------------------------------------


class _State(enum.Enum):
    SYN_SENT = "syn-sent"  # we opened it, the remote has not acknowledged it yet
    ESTABLISHED = "established"
    LOCAL_CLOSED = "local-closed"  # we sent FIN
    REMOTE_CLOSED = "remote-closed"  # the remote sent FIN
    CLOSED = "closed"  # both sent FIN: forgotten
    RESET = "reset"  # RST, either way: forgotten


class _Input(enum.Enum):
    RECV_ACK = "ACK received"
    SEND_FIN = "FIN sent"
    RECV_FIN = "FIN received"
    SEND_RST = "RST sent"
    RECV_RST = "RST received"


_RESETS = {_Input.SEND_RST: _State.RESET, _Input.RECV_RST: _State.RESET}

#: Every legal transition; anything else is a protocol error by whoever caused the input.
_TRANSITIONS: dict[_State, dict[_Input, _State]] = {
    _State.SYN_SENT: {
        _Input.RECV_ACK: _State.ESTABLISHED,
        _Input.SEND_FIN: _State.LOCAL_CLOSED,
        _Input.RECV_FIN: _State.REMOTE_CLOSED,
        **_RESETS,
    },
    _State.ESTABLISHED: {
        _Input.SEND_FIN: _State.LOCAL_CLOSED,
        _Input.RECV_FIN: _State.REMOTE_CLOSED,
        **_RESETS,
    },
    _State.LOCAL_CLOSED: {_Input.RECV_FIN: _State.CLOSED, **_RESETS},
    _State.REMOTE_CLOSED: {_Input.SEND_FIN: _State.CLOSED, **_RESETS},
    _State.CLOSED: {},
    _State.RESET: {},
}

_WE_MAY_SEND = frozenset({_State.SYN_SENT, _State.ESTABLISHED, _State.REMOTE_CLOSED})
_REMOTE_MAY_SEND = frozenset({_State.SYN_SENT, _State.ESTABLISHED, _State.LOCAL_CLOSED})
_FORGOTTEN = frozenset({_State.CLOSED, _State.RESET})


class _Stream:
    __slots__ = ("credit", "inbound", "recv_window", "send_window", "state", "unconsumed")

    def __init__(self, state: _State, *, inbound: bool, recv_window: int) -> None:
        self.state = state
        self.inbound = inbound
        self.send_window = DEFAULT_WINDOW  # bytes we may still send
        self.recv_window = recv_window  # bytes the remote may still send
        self.unconsumed = 0  # received, not yet consumed by the application
        self.credit = 0  # consumed, not yet announced in a window update


# --- the session ----------------------------------------------------------------------------


class YamuxSession:
    """One side of a yamux session: bytes in, events out; commands in, bytes out.

    `is_client` is True on the dialling side (it opens odd stream ids). `window` is the receive
    window of each stream (at least `DEFAULT_WINDOW`; the excess is announced with SYN/ACK);
    `max_window` caps the send window the remote may grant us: by default the field's whole
    range, as go-yamux and py-libp2p grow windows to 16 MiB by auto-tuning, and their
    accounting can grant a little more.
    """

    def __init__(
        self,
        *,
        is_client: bool,
        window: int = DEFAULT_WINDOW,
        max_inbound_streams: int = 256,
        max_window: int = _MAX_U32,
    ) -> None:
        if not DEFAULT_WINDOW <= window <= max_window <= _MAX_U32:
            raise ValueError("need DEFAULT_WINDOW <= window <= max_window < 2**32")
        if max_inbound_streams < 0:
            raise ValueError("max_inbound_streams must be >= 0")
        self._is_client = is_client
        self._window = window
        self._max_window = max_window
        self._max_inbound = max_inbound_streams
        self._next_id = 1 if is_client else 2
        self._streams: dict[int, _Stream] = {}
        self._num_inbound = 0
        self._in = bytearray()  # an incomplete frame, at most
        self._out: list[bytes | memoryview] = []
        self._closed = False
        self._went_away = False  # the remote sent GoAway
        self._going_away = False  # we sent GoAway

    # --- properties ---

    @property
    def is_client(self) -> bool:
        return self._is_client

    @property
    def is_closed(self) -> bool:
        """True once the remote broke the protocol: the session is dead."""
        return self._closed

    @property
    def went_away(self) -> bool:
        """True once the remote sent GoAway: it accepts no new streams."""
        return self._went_away

    @property
    def num_streams(self) -> int:
        """Streams not yet forgotten, both directions."""
        return len(self._streams)

    @property
    def stream_ids(self) -> list[int]:
        """Ids of the streams not yet forgotten (a snapshot)."""
        return list(self._streams)

    # --- input ---

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Process bytes from the remote; return the events of every complete frame.

        Raises ProtocolError when the remote broke the protocol; the session is then dead
        (`is_closed`), forgets its streams and has queued a GoAway(protocol error). A dead
        session ignores further input.
        """
        if self._closed:
            return []
        events: list[Event] = []
        try:
            if self._in:
                self._in += data
                with memoryview(self._in) as view:
                    used = self._parse(view, events)
                del self._in[:used]
            else:
                # Fast path: parse straight from the caller's buffer, keep only the tail.
                with memoryview(data).cast("B") as view:
                    used = self._parse(view, events)
                    if used < len(view):
                        self._in += view[used:]
        except ProtocolError:
            self._fail()
            raise
        return events

    def _parse(self, view: memoryview, events: list[Event]) -> int:
        """Handle every complete frame in `view`; return the number of bytes used."""
        offset = 0
        end = len(view)
        unpack_header = _HEADER.unpack_from
        while end - offset >= _HEADER_LEN:
            version, ftype, flags, stream_id, length = unpack_header(view, offset)
            if version != _VERSION:
                raise RemoteProtocolError(f"unsupported yamux version {version}")
            if ftype == _DATA:
                # No stream ever has a larger receive window: refuse before buffering the body.
                if length > self._window:
                    raise RemoteProtocolError(f"data frame of {length} bytes exceeds the window")
                start = offset + _HEADER_LEN
                if end - start < length:
                    break
                offset = start + length
                self._on_data(stream_id, flags, view[start:offset], events)
                continue
            offset += _HEADER_LEN
            if ftype == _WINDOW_UPDATE:
                self._on_window_update(stream_id, flags, length, events)
            elif ftype == _PING:
                self._on_ping(stream_id, flags, length, events)
            elif ftype == _GO_AWAY:
                if stream_id != 0:
                    raise RemoteProtocolError("go away on a stream other than 0")
                self._went_away = True
                events.append(GoAwayReceived(length))
            else:
                raise RemoteProtocolError(f"unknown yamux frame type {ftype}")
        return offset

    def _on_data(
        self, stream_id: int, flags: int, payload: memoryview, events: list[Event]
    ) -> None:
        if stream_id == 0:
            raise RemoteProtocolError("data frame on stream 0")
        stream = self._on_open_flags(stream_id, flags, events)
        if stream is None:
            return
        size = len(payload)
        if size:
            if stream.state not in _REMOTE_MAY_SEND:
                raise RemoteProtocolError(f"data on stream {stream_id} after FIN")
            if size > stream.recv_window:
                raise RemoteProtocolError(f"data on stream {stream_id} exceeds its receive window")
            stream.recv_window -= size
            stream.unconsumed += size
            events.append(DataReceived(stream_id, bytes(payload)))
        self._on_close_flags(stream_id, stream, flags, events)

    def _on_window_update(
        self, stream_id: int, flags: int, delta: int, events: list[Event]
    ) -> None:
        if stream_id == 0:
            raise RemoteProtocolError("window update on stream 0")
        stream = self._on_open_flags(stream_id, flags, events)
        if stream is None:
            return
        if delta:
            stream.send_window += delta
            if stream.send_window > self._max_window:
                raise RemoteProtocolError(
                    f"send window of stream {stream_id} grew past the maximum"
                )
            # Nobody can be waiting on a stream that this very frame opened.
            if stream.state in _WE_MAY_SEND and not flags & _SYN:
                events.append(WindowUpdated(stream_id))
        self._on_close_flags(stream_id, stream, flags, events)

    def _on_ping(self, stream_id: int, flags: int, opaque: int, events: list[Event]) -> None:
        if stream_id != 0:
            raise RemoteProtocolError("ping on a stream other than 0")
        if flags & _SYN:
            self._out.append(_HEADER.pack(_VERSION, _PING, _ACK, 0, opaque))
            events.append(PingReceived(opaque))
        elif flags & _ACK:
            events.append(PongReceived(opaque))
        else:
            raise RemoteProtocolError("ping with neither SYN nor ACK")

    def _on_open_flags(self, stream_id: int, flags: int, events: list[Event]) -> _Stream | None:
        """Apply SYN/ACK; return the stream the frame is for, or None to ignore the frame."""
        if flags & _SYN:
            return self._accept(stream_id, events)
        stream = self._streams.get(stream_id)
        if stream is not None and flags & _ACK and stream.state is _State.SYN_SENT:
            self._transition(stream_id, stream, _Input.RECV_ACK)
            events.append(StreamAccepted(stream_id))
        return stream

    def _accept(self, stream_id: int, events: list[Event]) -> _Stream | None:
        if (stream_id & 1 == 1) == self._is_client:
            raise RemoteProtocolError(f"remote opened stream {stream_id}, an id of our parity")
        if stream_id in self._streams:
            raise RemoteProtocolError(f"SYN for stream {stream_id}, which is in use")
        if self._going_away or self._num_inbound >= self._max_inbound:
            # Refusing a stream is not an error: reset it and ignore what follows.
            self._out.append(_HEADER.pack(_VERSION, _WINDOW_UPDATE, _RST, stream_id, 0))
            return None
        stream = _Stream(_State.ESTABLISHED, inbound=True, recv_window=self._window)
        self._streams[stream_id] = stream
        self._num_inbound += 1
        self._out.append(
            _HEADER.pack(_VERSION, _WINDOW_UPDATE, _ACK, stream_id, self._window - DEFAULT_WINDOW)
        )
        events.append(StreamOpened(stream_id))
        return stream

    def _on_close_flags(
        self, stream_id: int, stream: _Stream, flags: int, events: list[Event]
    ) -> None:
        if flags & _RST:
            self._transition(stream_id, stream, _Input.RECV_RST)
            events.append(StreamResetReceived(stream_id))
        elif flags & _FIN:
            self._transition(stream_id, stream, _Input.RECV_FIN)
            events.append(StreamEnded(stream_id))

    def _transition(self, stream_id: int, stream: _Stream, event: _Input) -> None:
        new_state = _TRANSITIONS[stream.state].get(event)
        if new_state is None:
            received = event in (_Input.RECV_ACK, _Input.RECV_FIN, _Input.RECV_RST)
            error = RemoteProtocolError if received else LocalProtocolError
            raise error(f"{event.value} on stream {stream_id} in state {stream.state.value}")
        stream.state = new_state
        if new_state in _FORGOTTEN:
            del self._streams[stream_id]
            if stream.inbound:
                self._num_inbound -= 1

    def _fail(self) -> None:
        self._closed = True
        self._streams.clear()
        self._num_inbound = 0
        self._in = bytearray()  # not clear(): a traceback may still hold a view of it
        self._out.append(_HEADER.pack(_VERSION, _GO_AWAY, 0, 0, GO_AWAY_PROTOCOL_ERROR))

    # --- output ---

    def data_to_send(self) -> bytes:
        """Return every byte queued for the remote (b"" if none) and clear the queue."""
        if not self._out:
            return b""
        data = b"".join(self._out)
        self._out.clear()
        return data

    # --- commands ---

    def open_stream(self) -> int:
        """Open an outbound stream and return its id; the SYN is queued at once.

        Raises LocalProtocolError once either side sent GoAway or the session is
        closed, and ResourceLimitExceeded when stream ids are exhausted.
        """
        if self._closed or self._going_away or self._went_away:
            raise LocalProtocolError("the session is closed or going away")
        stream_id = self._next_id
        if stream_id > _MAX_U32:
            raise ResourceLimitExceeded("yamux stream ids exhausted")
        self._next_id += 2
        self._streams[stream_id] = _Stream(_State.SYN_SENT, inbound=False, recv_window=self._window)
        self._out.append(
            _HEADER.pack(_VERSION, _WINDOW_UPDATE, _SYN, stream_id, self._window - DEFAULT_WINDOW)
        )
        return stream_id

    def send_window(self, stream_id: int) -> int:
        """Return how many bytes `send` would accept now on the stream (0 if none or unknown)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.state not in _WE_MAY_SEND:
            return 0
        return stream.send_window

    def send(self, stream_id: int, data: bytes | bytearray | memoryview) -> int:
        """Queue as much of `data` as the send window allows; return how many bytes that was.

        0 for non-empty `data` means the window is shut: wait for a WindowUpdated event.
        Raises StreamReset if the stream was reset (or is unknown), LocalProtocolError
        if we already sent FIN.
        """
        stream = self._streams.get(stream_id)
        if stream is None:
            raise StreamReset(f"stream {stream_id} was reset")
        if stream.state not in _WE_MAY_SEND:
            raise LocalProtocolError(f"send on stream {stream_id} after FIN")
        view = memoryview(data).cast("B")
        size = min(len(view), stream.send_window)
        if not size:
            return 0
        stream.send_window -= size
        # Views of immutable bytes may wait in the queue; anything mutable is copied now.
        immutable = isinstance(view.obj, bytes)
        pack_header = _HEADER.pack
        out = self._out
        for start in range(0, size, MAX_FRAME_PAYLOAD):
            chunk = view[start : min(start + MAX_FRAME_PAYLOAD, size)]
            out.append(pack_header(_VERSION, _DATA, 0, stream_id, len(chunk)))
            out.append(chunk if immutable else bytes(chunk))
        return size

    def close_stream(self, stream_id: int) -> None:
        """Half-close the stream (FIN). Idempotent; a no-op on a reset or forgotten stream."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.state is _State.LOCAL_CLOSED:
            return
        self._out.append(_HEADER.pack(_VERSION, _WINDOW_UPDATE, _FIN, stream_id, 0))
        self._transition(stream_id, stream, _Input.SEND_FIN)

    def reset_stream(self, stream_id: int) -> None:
        """Reset the stream (RST) and forget it. A no-op on an unknown stream."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        self._out.append(_HEADER.pack(_VERSION, _WINDOW_UPDATE, _RST, stream_id, 0))
        self._transition(stream_id, stream, _Input.SEND_RST)

    def consume(self, stream_id: int, n: int) -> None:
        """Record that the application read `n` received bytes, reopening the receive window.

        The window update goes out once half the window is consumed, to batch them.
        A no-op on a forgotten stream; ValueError if `n` exceeds what was received.
        """
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        if not 0 <= n <= stream.unconsumed:
            raise ValueError(f"cannot consume {n} bytes, {stream.unconsumed} are unread")
        stream.unconsumed -= n
        stream.credit += n
        if stream.credit >= self._window // 2 and stream.state in _REMOTE_MAY_SEND:
            self._out.append(_HEADER.pack(_VERSION, _WINDOW_UPDATE, 0, stream_id, stream.credit))
            stream.recv_window += stream.credit
            stream.credit = 0

    def ping(self, opaque: int) -> None:
        """Queue a ping; the answer arrives as PongReceived(opaque). `opaque` is a u32."""
        if not 0 <= opaque <= _MAX_U32:
            raise ValueError("ping opaque value must fit in 32 bits")
        if not self._closed:
            self._out.append(_HEADER.pack(_VERSION, _PING, _SYN, 0, opaque))

    def go_away(self, code: int = GO_AWAY_NORMAL) -> None:
        """Tell the remote we accept no new streams; existing streams go on. Idempotent."""
        if not 0 <= code <= _MAX_U32:
            raise ValueError("go away code must fit in 32 bits")
        if self._closed or self._going_away:
            return
        self._going_away = True
        self._out.append(_HEADER.pack(_VERSION, _GO_AWAY, 0, 0, code))
