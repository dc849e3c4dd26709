"""``/sdcn/identify/2.0.0``: who a connected SDCN peer is and what it speaks.

On every new connection the dialler opens one identify stream and both sides send one
message each, the dialler first: its signed PeerRecord (an Envelope), listen addresses, the
address it observed the other side at, its protocols, roles and agent version.

Like a rust-libp2p behaviour, identify never touches the Host: it sends the
`IdentifySnapshot` the Host builds and returns the `IdentifyInfo` it learned, which the Host
stores (peerstore, observed addresses) before it tells its subscribers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sdcn_p2p.connection import Connection, Stream
from sdcn_p2p.errors import MultiaddrError, RecordError, RemoteProtocolError
from sdcn_p2p.multiaddr import Multiaddr
from sdcn_p2p.records import Envelope, PeerRecord

__all__ = [
    "IDENTIFY",
    "MAX_MESSAGE",
    "MAX_TEXT",
    "IdentifyInfo",
    "IdentifySnapshot",
    "answer",
    "build_info",
    "exchange",
    "parse_info",
]

IDENTIFY = "/sdcn/identify/2.0.0"
MAX_MESSAGE = 64 * 1024
_MAX_LIST = 64
MAX_TEXT = 128
#: Identify extensions (`Host.set_identify_extension`): at most 8, values ≤ 64 bytes.
MAX_EXTENSIONS = 8
MAX_EXTENSION_SIZE = 64


@dataclass(frozen=True, slots=True)
class IdentifySnapshot:
    """What a peer announces about itself, as of one message (the Host builds it)."""

    envelope: Envelope  # its signed PeerRecord
    libp2p_record: Envelope  # the same, sealed as libp2p does (for /ipfs/id/1.0.0)
    listen_addrs: tuple[Multiaddr, ...]
    protocols: tuple[str, ...]
    roles: tuple[str, ...]
    agent_version: str
    extensions: Mapping[str, bytes]


@dataclass(frozen=True, slots=True)
class IdentifyInfo:
    """What identify learned of the peer at the other end of a connection."""

    record: PeerRecord
    envelope: Envelope
    listen_addrs: tuple[Multiaddr, ...]
    observed_addr: Multiaddr | None  # where that peer saw us
    protocols: tuple[str, ...]
    roles: tuple[str, ...]
    agent_version: str
    extensions: dict[str, bytes]


def build_info(snapshot: IdentifySnapshot, conn: Connection) -> dict[str, Any]:
    """The identify message announcing `snapshot` to `conn`'s peer."""
    return {
        "record": snapshot.envelope.to_bytes(),
        "listen_addrs": [str(a) for a in snapshot.listen_addrs],
        "observed_addr": str(conn.remote_addr) if conn.remote_addr else None,
        "protocols": list(snapshot.protocols),
        "roles": list(snapshot.roles),
        "agent_version": snapshot.agent_version,
        "ext": dict(snapshot.extensions),
    }


def _texts(message: dict[str, Any], key: str) -> tuple[str, ...]:
    value = message.get(key)
    if not isinstance(value, list) or len(value) > _MAX_LIST:
        raise RemoteProtocolError(f"identify field {key!r} must be a list of at most {_MAX_LIST}")
    if not all(isinstance(v, str) and len(v) <= MAX_TEXT for v in value):
        raise RemoteProtocolError(f"identify field {key!r} must hold short strings")
    return tuple(value)


def parse_info(message: Any, conn: Connection) -> IdentifyInfo:
    """Validate an identify message from `conn`'s peer; raises ProtocolError."""
    if not isinstance(message, dict):
        raise RemoteProtocolError("identify message must be a map")
    try:
        envelope = Envelope.from_bytes(message.get("record"))  # type: ignore[arg-type]
        record = PeerRecord.from_envelope(envelope)
        listen = tuple(Multiaddr.parse(a) for a in _texts(message, "listen_addrs"))
        observed_text = message.get("observed_addr")
        observed = Multiaddr.parse(observed_text) if isinstance(observed_text, str) else None
    except (RecordError, MultiaddrError, TypeError) as exc:
        raise RemoteProtocolError(f"bad identify message: {exc}") from None
    if record.peer_id != conn.peer_id:
        raise RemoteProtocolError("identify record is signed by another peer")
    agent = message.get("agent_version")
    if not isinstance(agent, str) or len(agent) > MAX_TEXT:
        raise RemoteProtocolError("identify agent_version must be a short string")
    extensions = message.get("ext", {})
    if (
        not isinstance(extensions, dict)
        or len(extensions) > MAX_EXTENSIONS
        or not all(
            isinstance(k, str)
            and len(k) <= MAX_TEXT
            and isinstance(v, bytes)
            and len(v) <= MAX_EXTENSION_SIZE
            for k, v in extensions.items()
        )
    ):
        raise RemoteProtocolError(
            f"identify ext must map at most {MAX_EXTENSIONS} names to short bytes"
        )
    return IdentifyInfo(
        record=record,
        envelope=envelope,
        listen_addrs=listen,
        observed_addr=observed,
        protocols=_texts(message, "protocols"),
        roles=_texts(message, "roles"),
        agent_version=agent,
        extensions=extensions,
    )


async def exchange(conn: Connection, snapshot: Callable[[], IdentifySnapshot]) -> IdentifyInfo:
    """Tell the peer at the other end of `conn` who we are, and learn who it is (dialler).

    `snapshot()` is called as our message goes out, so that it announces what holds then.
    """
    stream = await conn.open_stream(IDENTIFY, max_message_size=MAX_MESSAGE)
    async with stream:
        await stream.send_message(build_info(snapshot(), conn))
        await stream.send_eof()
        return parse_info(await stream.receive_message(), conn)


async def answer(stream: Stream, snapshot: Callable[[], IdentifySnapshot]) -> IdentifyInfo:
    """The listener's side of `exchange`: learn who the dialler is, then tell it who we are."""
    info = parse_info(await stream.receive_message(), stream.connection)
    await stream.send_message(build_info(snapshot(), stream.connection))
    return info
