"""multistream-select 1.0: agreeing on the protocol a connection or stream speaks.

Sans-IO. Every message is ``varint(len) + UTF-8 token + "\\n"`` (the length counts the
newline). Both sides first send the header ``/multistream/1.0.0``; the dialer then proposes a
protocol, and the listener echoes it to accept or answers ``na`` to refuse, after which the
dialer may propose another::

    dialer                                listener
    /multistream/1.0.0  /sdcn/kad/2.0.0   ->
                                          <-  /multistream/1.0.0  /sdcn/kad/2.0.0 (or na)

`Dialer` is lazy (as go-libp2p's ``SelectProtoOrFail`` with lazy negotiation): it sends the
header, its one protocol and the first bytes of that protocol together, and reads the answer
in front of the listener's first bytes, so selecting costs no round trip. `Listener` answers
each message as it comes; the driver sends its `data_to_send` whenever it must wait for more
input (a dialer that is not lazy waits for the header before proposing) and may hold the final
echo back to go with its own first bytes.

Limits: a token is at most `MAX_TOKEN` bytes (protocol ids included); a listener refuses at
most `MAX_REFUSALS` proposals on one stream. ``ls`` is answered with ``na``.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass

from sdcn_p2p.errors import LocalProtocolError, RemoteProtocolError
from sdcn_p2p.wire.varint import decode_varint, encode_varint

__all__ = [
    "MAX_REFUSALS",
    "MAX_TOKEN",
    "NA",
    "PROTOCOL_ID",
    "Dialer",
    "Listener",
    "ProtocolAccepted",
    "ProtocolRefused",
    "ProtocolSelected",
    "encode_token",
    "parse_token",
]

PROTOCOL_ID = "/multistream/1.0.0"
NA = "na"
_LS = "ls"
#: Longest token accepted or sent, in bytes (without the newline).
MAX_TOKEN = 128
#: Proposals a listener refuses on one stream before it gives up on the dialer.
MAX_REFUSALS = 16


def encode_token(token: str) -> bytes:
    """One multistream message; LocalProtocolError for an empty, long or multi-line token."""
    data = token.encode("utf-8")
    if not data or len(data) > MAX_TOKEN or b"\n" in data:
        raise LocalProtocolError(f"bad multistream token {token!r}")
    return encode_varint(len(data) + 1) + data + b"\n"


def parse_token(data: bytes | bytearray, offset: int = 0) -> tuple[str, int] | None:
    """Decode the message at `offset`: (token, offset after it), or None if incomplete.

    Raises RemoteProtocolError for a message that is too long, lacks its newline, or is not
    UTF-8.
    """
    header = decode_varint(data, offset)
    if header is None:
        if len(data) - offset > 2:  # MAX_TOKEN + 1 fits in two varint bytes
            raise RemoteProtocolError("multistream message length is too large")
        return None
    length, start = header
    if not 2 <= length <= MAX_TOKEN + 1:
        raise RemoteProtocolError(f"multistream message of {length} bytes")
    end = start + length
    if len(data) < end:
        return None
    if data[end - 1] != 0x0A:
        raise RemoteProtocolError("multistream message does not end with a newline")
    try:
        token = bytes(data[start : end - 1]).decode("utf-8")
    except UnicodeDecodeError:
        raise RemoteProtocolError("multistream message is not UTF-8") from None
    if "\n" in token:
        raise RemoteProtocolError("multistream message holds a newline")
    return token, end


@dataclass(frozen=True, slots=True)
class ProtocolAccepted:
    """The listener accepted the dialer's protocol."""

    protocol: str


@dataclass(frozen=True, slots=True)
class ProtocolRefused:
    """The listener answered ``na``: it does not speak the protocol."""

    protocol: str


@dataclass(frozen=True, slots=True)
class ProtocolSelected:
    """The dialer proposed a protocol the listener speaks; the listener echoed it."""

    protocol: str


class _Machine:
    """Input buffer and output queue shared by both sides."""

    def __init__(self) -> None:
        self._in = bytearray()
        self._out = bytearray()
        self._done = False
        self._header_seen = False

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the peer (after the result, they are kept for `unused`)."""
        self._in += data

    def data_to_send(self) -> bytes:
        """Bytes to send to the peer now (empty if none)."""
        out, self._out = bytes(self._out), bytearray()
        return out

    @property
    def done(self) -> bool:
        """Whether the negotiation has its result."""
        return self._done

    def unused(self) -> bytes:
        """The bytes received past the negotiation: the start of the protocol itself."""
        if not self._done:
            raise LocalProtocolError("the negotiation is not over")
        rest, self._in = bytes(self._in), bytearray()
        return rest

    def _next_token(self) -> str | None:
        parsed = parse_token(self._in)
        if parsed is None:
            return None
        token, end = parsed
        del self._in[:end]
        return token

    def _header_read(self) -> bool:
        """Read the peer's header once; whether it has been read (False: need more bytes)."""
        if self._done:
            raise LocalProtocolError("the negotiation is over")
        if not self._header_seen:
            token = self._next_token()
            if token is None:
                return False
            if token != PROTOCOL_ID:
                raise RemoteProtocolError(f"peer does not speak {PROTOCOL_ID} (sent {token!r})")
            self._header_seen = True
            self._on_header()
        return True

    def _on_header(self) -> None:
        """Called once the peer's header is read."""


class Dialer(_Machine):
    """The lazy dialer of one protocol: its whole proposal is in `data_to_send` at once."""

    def __init__(self, protocol: str) -> None:
        super().__init__()
        self.protocol = protocol
        self._out += encode_token(PROTOCOL_ID) + encode_token(protocol)

    def next_event(self) -> ProtocolAccepted | ProtocolRefused | None:
        """The listener's answer, or None while more bytes are needed.

        Raises RemoteProtocolError when the listener does not speak multistream-select or
        answers something else than our protocol or ``na``.
        """
        if not self._header_read():
            return None
        token = self._next_token()
        if token is None:
            return None
        self._done = True
        if token == self.protocol:
            return ProtocolAccepted(token)
        if token == NA:
            return ProtocolRefused(self.protocol)
        raise RemoteProtocolError(f"asked for {self.protocol!r}, the peer answered {token!r}")


class Listener(_Machine):
    """The listener: accepts the first proposal that is in `supported`."""

    def __init__(self, supported: Container[str]) -> None:
        super().__init__()
        self._supported = supported
        self._refusals = 0

    def _on_header(self) -> None:
        self._out += encode_token(PROTOCOL_ID)

    def next_event(self) -> ProtocolSelected | None:
        """The protocol selected, or None while more bytes are needed (send `data_to_send`
        before waiting for them: it may hold the header or a refusal).

        Raises RemoteProtocolError when the dialer does not speak multistream-select or
        proposed more than MAX_REFUSALS protocols we lack.
        """
        if not self._header_read():
            return None
        while (token := self._next_token()) is not None:
            if token != _LS and token != NA and token in self._supported:
                self._out += encode_token(token)
                self._done = True
                return ProtocolSelected(token)
            self._refusals += 1
            if self._refusals > MAX_REFUSALS:
                raise RemoteProtocolError(f"peer proposed over {MAX_REFUSALS} unknown protocols")
            self._out += encode_token(NA)
        return None
