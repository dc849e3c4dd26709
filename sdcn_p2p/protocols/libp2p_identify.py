"""``/ipfs/id/1.0.0``: libp2p's identify, so that any libp2p peer learns who we are.

The peer that opens the stream only reads: the other writes one Identify message (a
varint-length-prefixed protobuf, `wire.libp2p.IdentifyMessage`) and closes its side. Every Host
answers with what libp2p has fields for: protocol and agent versions, its public key, its
listen addresses and the address it observes the asker at (binary multiaddrs), its protocols,
and its signed peer record as libp2p seals one (RFC 0003). A Host asks it of a peer it dialled
that does not speak `/sdcn/identify/2.0.0`: a libp2p peer that is not an SDCN peer.

Like `identify`, this module never touches the Host: `answer` sends the snapshot the Host
builds, `query` returns what it learned.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sdcn_p2p.connection import Connection, Stream
from sdcn_p2p.errors import (
    MessageTooLarge,
    MultiaddrError,
    ProtocolError,
    RecordError,
    RemoteProtocolError,
)
from sdcn_p2p.identity import PeerId, decode_public_key
from sdcn_p2p.multiaddr import Multiaddr
from sdcn_p2p.protocols.identify import MAX_TEXT, IdentifySnapshot
from sdcn_p2p.records import Envelope, PeerRecord
from sdcn_p2p.wire.libp2p import IdentifyMessage
from sdcn_p2p.wire.multiaddr import decode_multiaddr, encode_multiaddr
from sdcn_p2p.wire.varint import decode_varint, encode_varint

__all__ = [
    "LIBP2P_IDENTIFY",
    "MAX_MESSAGE",
    "PROTOCOL_VERSION",
    "Libp2pIdentifyInfo",
    "answer",
    "build_message",
    "parse_message",
    "query",
]

LIBP2P_IDENTIFY = "/ipfs/id/1.0.0"
#: Our protocolVersion: the generation of the SDCN wire (libp2p peers do not check it).
PROTOCOL_VERSION = "sdcn/2.0.0"
MAX_MESSAGE = 64 * 1024
#: Most addresses or protocols a peer may list; entries we cannot use are skipped.
MAX_LIST = 256


@dataclass(frozen=True, slots=True)
class Libp2pIdentifyInfo:
    """What ``/ipfs/id/1.0.0`` told of the peer at the other end of a connection."""

    protocol_version: str
    agent_version: str
    listen_addrs: tuple[Multiaddr, ...]  # those SDCN can dial (WebSocket)
    observed_addr: Multiaddr | None  # where that peer saw us, if we could dial it
    protocols: tuple[str, ...]
    record: PeerRecord | None  # from its signed peer record, verified


def build_message(snapshot: IdentifySnapshot, conn: Connection) -> bytes:
    """The length-prefixed Identify message announcing `snapshot` to `conn`'s peer."""
    observed = conn.remote_addr
    body = IdentifyMessage(
        protocol_version=PROTOCOL_VERSION,
        agent_version=snapshot.agent_version,
        public_key=snapshot.envelope.public_key,
        listen_addrs=tuple(encode_multiaddr(addr) for addr in snapshot.listen_addrs),
        observed_addr=encode_multiaddr(observed) if observed is not None else None,
        protocols=snapshot.protocols,
        signed_peer_record=snapshot.libp2p_record.to_protobuf(),
    ).encode()
    return encode_varint(len(body)) + body


def _dialable(data: bytes) -> Multiaddr | None:
    try:
        return decode_multiaddr(data).without_peer_id()
    except (ProtocolError, MultiaddrError):
        return None


def _text(name: str, value: str | None) -> str:
    if value is not None and len(value) > MAX_TEXT:
        raise RemoteProtocolError(f"identify {name} is over {MAX_TEXT} characters")
    return value or ""


def parse_message(data: bytes, peer: PeerId) -> Libp2pIdentifyInfo:
    """Validate the length-prefixed Identify message of `peer`; raises RemoteProtocolError."""
    header = decode_varint(data)
    if header is None or header[0] != len(data) - header[1]:
        raise RemoteProtocolError("identify message is not one length-prefixed protobuf")
    message = IdentifyMessage.decode(data[header[1] :])
    if len(message.listen_addrs) > MAX_LIST or len(message.protocols) > MAX_LIST:
        raise RemoteProtocolError(f"identify lists over {MAX_LIST} addresses or protocols")
    if message.public_key is not None:
        try:
            if PeerId.from_public_key(decode_public_key(message.public_key)) != peer:
                raise RemoteProtocolError("identify public key is another peer's")
        except ProtocolError as exc:
            raise RemoteProtocolError(f"identify public key is unusable: {exc}") from None
    record = None
    if message.signed_peer_record is not None:
        try:
            envelope = Envelope.from_protobuf(message.signed_peer_record)
            record = PeerRecord.from_libp2p_envelope(envelope)
        except RecordError as exc:
            raise RemoteProtocolError(f"identify peer record: {exc}") from None
        if record.peer_id != peer:
            raise RemoteProtocolError("identify peer record is another peer's")
    listen = (_dialable(addr) for addr in message.listen_addrs)
    observed = _dialable(message.observed_addr) if message.observed_addr else None
    return Libp2pIdentifyInfo(
        protocol_version=_text("protocolVersion", message.protocol_version),
        agent_version=_text("agentVersion", message.agent_version),
        listen_addrs=tuple(addr for addr in listen if addr is not None),
        observed_addr=observed,
        protocols=tuple(p for p in message.protocols if 0 < len(p) <= MAX_TEXT),
        record=record,
    )


async def answer(stream: Stream, snapshot: Callable[[], IdentifySnapshot]) -> None:
    """Serve one query: send our Identify message (the Host closes the stream after)."""
    await stream.send_all(build_message(snapshot(), stream.connection))


async def query(conn: Connection) -> Libp2pIdentifyInfo:
    """Ask the peer at the other end of `conn` who it is. Raises UnsupportedProtocol,
    ProtocolError (a malformed or oversized answer), trio errors; the caller sets a timeout.
    """
    stream = await conn.open_stream(LIBP2P_IDENTIFY, max_message_size=MAX_MESSAGE)
    async with stream:
        await stream.send_eof()
        data = bytearray()
        while chunk := await stream.receive_some(MAX_MESSAGE):
            data += chunk
            if len(data) > MAX_MESSAGE:
                stream.reset()
                raise MessageTooLarge(f"identify message over {MAX_MESSAGE} bytes")
    return parse_message(bytes(data), conn.peer_id)
