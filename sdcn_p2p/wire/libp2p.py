"""libp2p's protobuf messages that SDCN speaks, on the `wire.protobuf` codec.

- `NoiseHandshakePayload` (noise spec): the identity key, its signature over the Noise static
  key, and ``extensions.stream_muxers`` for agreeing on the muxer inside the handshake.
- `IdentifyMessage` (``/ipfs/id/1.0.0``): protocol and agent versions, public key, binary
  listen and observed addresses, protocols, and a signed peer record.
- `EnvelopeMessage` (RFC 0002 signed envelope) and `PeerRecordMessage` (RFC 0003 peer record,
  the payload of domain ``libp2p-peer-record``, type `PEER_RECORD_PAYLOAD_TYPE`).

Decoding keeps what the schema names, raw (addresses stay binary multiaddrs, sub-messages are
decoded here), and raises RemoteProtocolError for anything malformed; the protocol using a
message checks its sizes and meaning.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdcn_p2p.errors import RemoteProtocolError
from sdcn_p2p.wire import protobuf
from sdcn_p2p.wire.protobuf import Field

__all__ = [
    "PEER_RECORD_DOMAIN",
    "PEER_RECORD_PAYLOAD_TYPE",
    "EnvelopeMessage",
    "IdentifyMessage",
    "NoiseHandshakePayload",
    "PeerRecordMessage",
]

#: The signing domain and payload type (multicodec ``libp2p-peer-record``, 0x0301, as the two
#: bytes go-libp2p writes) of a libp2p peer record.
PEER_RECORD_DOMAIN = "libp2p-peer-record"
PEER_RECORD_PAYLOAD_TYPE = b"\x03\x01"

_NOISE_EXTENSIONS: protobuf.Schema = {
    1: Field("webtransport_certhashes", "bytes", repeated=True),
    2: Field("stream_muxers", "string", repeated=True),
}
_NOISE_PAYLOAD: protobuf.Schema = {
    1: Field("identity_key", "bytes"),
    2: Field("identity_sig", "bytes"),
    4: Field("extensions", "bytes"),
}
_IDENTIFY: protobuf.Schema = {
    1: Field("public_key", "bytes"),
    2: Field("listen_addrs", "bytes", repeated=True),
    3: Field("protocols", "string", repeated=True),
    4: Field("observed_addr", "bytes"),
    5: Field("protocol_version", "string"),
    6: Field("agent_version", "string"),
    8: Field("signed_peer_record", "bytes"),
}
_ENVELOPE: protobuf.Schema = {
    1: Field("public_key", "bytes"),
    2: Field("payload_type", "bytes"),
    3: Field("payload", "bytes"),
    5: Field("signature", "bytes"),
}
_PEER_RECORD: protobuf.Schema = {
    1: Field("peer_id", "bytes"),
    2: Field("seq", "uint64"),
    3: Field("addresses", "bytes", repeated=True),
}
_ADDRESS_INFO: protobuf.Schema = {1: Field("multiaddr", "bytes")}


@dataclass(frozen=True, slots=True)
class NoiseHandshakePayload:
    """What a Noise handshake message carries after the keys."""

    identity_key: bytes  # libp2p protobuf PublicKey
    identity_sig: bytes  # over b"noise-libp2p-static-key:" + the Noise static key
    stream_muxers: tuple[str, ...] = ()  # in order of preference; empty: not offered

    def encode(self) -> bytes:
        fields: list[tuple[int, bytes | None]] = [(1, self.identity_key), (2, self.identity_sig)]
        if self.stream_muxers:
            extensions = protobuf.encode((2, muxer) for muxer in self.stream_muxers)
            fields.append((4, extensions))
        return protobuf.encode(fields)

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> NoiseHandshakePayload:
        """Raises RemoteProtocolError when malformed or without key or signature."""
        fields = protobuf.decode(data, _NOISE_PAYLOAD)
        if fields["identity_key"] is None or fields["identity_sig"] is None:
            raise RemoteProtocolError("handshake payload lacks the identity key or signature")
        muxers: tuple[str, ...] = ()
        if fields["extensions"] is not None:
            muxers = tuple(
                protobuf.decode(fields["extensions"], _NOISE_EXTENSIONS)["stream_muxers"]
            )
        return cls(fields["identity_key"], fields["identity_sig"], muxers)


@dataclass(frozen=True, slots=True)
class IdentifyMessage:
    """The ``/ipfs/id/1.0.0`` message; every field is optional on the wire."""

    protocol_version: str | None = None
    agent_version: str | None = None
    public_key: bytes | None = None  # libp2p protobuf PublicKey
    listen_addrs: tuple[bytes, ...] = ()  # binary multiaddrs
    observed_addr: bytes | None = None  # binary multiaddr
    protocols: tuple[str, ...] = ()
    signed_peer_record: bytes | None = None  # an `EnvelopeMessage`

    def encode(self) -> bytes:
        return protobuf.encode(
            [
                (5, self.protocol_version),
                (6, self.agent_version),
                (1, self.public_key),
                *((2, addr) for addr in self.listen_addrs),
                (4, self.observed_addr),
                *((3, protocol) for protocol in self.protocols),
                (8, self.signed_peer_record),
            ]
        )

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> IdentifyMessage:
        """Raises RemoteProtocolError when malformed."""
        fields = protobuf.decode(data, _IDENTIFY)
        return cls(
            protocol_version=fields["protocol_version"],
            agent_version=fields["agent_version"],
            public_key=fields["public_key"],
            listen_addrs=tuple(fields["listen_addrs"]),
            observed_addr=fields["observed_addr"],
            protocols=tuple(fields["protocols"]),
            signed_peer_record=fields["signed_peer_record"],
        )


@dataclass(frozen=True, slots=True)
class EnvelopeMessage:
    """A signed envelope as libp2p encodes it (the signature is not checked here)."""

    public_key: bytes  # libp2p protobuf PublicKey
    payload_type: bytes
    payload: bytes
    signature: bytes

    def encode(self) -> bytes:
        return protobuf.encode(
            [(1, self.public_key), (2, self.payload_type), (3, self.payload), (5, self.signature)]
        )

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> EnvelopeMessage:
        """Raises RemoteProtocolError when malformed. A missing field reads as empty, as
        in proto3 (the signature then does not verify)."""
        fields = protobuf.decode(data, _ENVELOPE)
        return cls(
            *(
                fields[name] or b""
                for name in ("public_key", "payload_type", "payload", "signature")
            )
        )


@dataclass(frozen=True, slots=True)
class PeerRecordMessage:
    """A libp2p peer record: a peer id, a sequence number and binary multiaddrs."""

    peer_id: bytes  # the peer id's multihash
    seq: int
    addrs: tuple[bytes, ...]

    def encode(self) -> bytes:
        addresses = [(3, protobuf.encode([(1, addr)])) for addr in self.addrs]
        return protobuf.encode([(1, self.peer_id), (2, self.seq), *addresses])

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> PeerRecordMessage:
        """Raises RemoteProtocolError when malformed, without a peer id, or with an address
        entry that holds no multiaddr."""
        fields = protobuf.decode(data, _PEER_RECORD)
        if fields["peer_id"] is None:
            raise RemoteProtocolError("peer record lacks a peer id")
        addrs = []
        for info in fields["addresses"]:
            addr = protobuf.decode(info, _ADDRESS_INFO)["multiaddr"]
            if addr is None:
                raise RemoteProtocolError("peer record address lacks its multiaddr")
            addrs.append(addr)
        return cls(fields["peer_id"], fields["seq"] or 0, tuple(addrs))
