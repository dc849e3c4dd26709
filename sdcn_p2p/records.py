"""Signed envelopes (libp2p RFC 0002) and the records sealed in them.

An `Envelope` carries a payload signed by a peer's identity key over RFC 0002's signing buffer::

    varint(len(domain)) domain varint(len(payload_type)) payload_type varint(len(payload)) payload

The domain separates record kinds (``sdcn-peer-record``, ``sdcn-advert``) so a signature made
for one can never be replayed as another. Envelopes and payloads are msgpack, not protobuf.
Receivers verify an envelope before decoding its payload (`open_signed`), check that the signing
key is the peer id the payload names, and accept a record only if its ``seq`` is above the one
they hold (`check_newer`).
"""

from __future__ import annotations

import reprlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from sdcn_p2p.errors import ProtocolError, RecordError
from sdcn_p2p.identity import Identity, PeerId, decode_public_key, verify_signature
from sdcn_p2p.multiaddr import Multiaddr
from sdcn_p2p.wire.messages import pack, unpack
from sdcn_p2p.wire.varint import encode_varint

__all__ = [
    "MAX_ENVELOPE_SIZE",
    "Envelope",
    "PeerRecord",
    "check_newer",
    "open_signed",
]

#: Default cap on an encoded envelope, in bytes.
MAX_ENVELOPE_SIZE = 64 * 1024
_MAX_KEY_SIZE = 128
_MAX_PAYLOAD_TYPE_SIZE = 128
_ED25519_SIGNATURE_SIZE = 64
_MAX_SEQ = 2**64 - 1


def _signing_buffer(domain: str, payload_type: bytes, payload: bytes) -> bytes:
    domain_bytes = domain.encode("utf-8")
    return b"".join(
        (
            encode_varint(len(domain_bytes)),
            domain_bytes,
            encode_varint(len(payload_type)),
            payload_type,
            encode_varint(len(payload)),
            payload,
        )
    )


def _unpack_strict(data: bytes, max_size: int) -> Any:
    """Decode one msgpack value strictly (`wire.messages.unpack`); RecordError if malformed."""
    try:
        return unpack(data, max_size=max_size)
    except ProtocolError as exc:
        raise RecordError(f"malformed msgpack: {exc}") from None


@dataclass(frozen=True, slots=True)
class Envelope:
    """A payload signed by a peer's identity key for one domain (libp2p RFC 0002)."""

    public_key: bytes  # libp2p protobuf public key (`encode_public_key`)
    payload_type: bytes
    payload: bytes
    signature: bytes

    @classmethod
    def seal(cls, identity: Identity, domain: str, payload_type: bytes, payload: bytes) -> Envelope:
        """Sign `payload` with `identity` for `domain`."""
        signature = identity.sign(_signing_buffer(domain, payload_type, payload))
        return cls(identity.public_key_bytes, payload_type, payload, signature)

    def open(self, domain: str, payload_type: bytes) -> PeerId:
        """Verify the envelope for `domain` and `payload_type`; return the signer's peer id.

        Checks only the signature; the payload is not decoded. Raises RecordError when the
        payload type differs, the key is not an Ed25519 key, or the signature does not verify.
        """
        if self.payload_type != payload_type:
            raise RecordError(
                f"envelope payload type {self.payload_type!r} is not {payload_type!r}"
            )
        try:
            key = decode_public_key(self.public_key)
        except (ProtocolError, ValueError) as exc:
            raise RecordError(f"envelope public key is unusable: {exc}") from None
        if len(self.signature) != _ED25519_SIGNATURE_SIZE or not verify_signature(
            key, self.signature, _signing_buffer(domain, self.payload_type, self.payload)
        ):
            raise RecordError(f"envelope signature does not verify for domain {domain!r}")
        return PeerId.from_public_key(key)

    def to_bytes(self) -> bytes:
        """The msgpack array ``[public_key, payload_type, payload, signature]``."""
        return pack([self.public_key, self.payload_type, self.payload, self.signature])

    @classmethod
    def from_bytes(cls, data: bytes, *, max_size: int = MAX_ENVELOPE_SIZE) -> Envelope:
        """Decode `to_bytes` output of at most `max_size` bytes, without verifying it.

        Raises RecordError, and only RecordError, for any other input.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise RecordError(f"envelope must be bytes, not {type(data).__name__}")
        if len(data) > max_size:
            raise RecordError(f"envelope of {len(data)} bytes is over the {max_size}-byte cap")
        fields = _unpack_strict(data, max_size)
        if type(fields) is not list or len(fields) != 4:
            raise RecordError("envelope is not a msgpack array of 4 fields")
        if not all(type(field) is bytes for field in fields):
            raise RecordError("envelope fields must all be msgpack bin")
        public_key, payload_type, payload, signature = fields
        if len(public_key) > _MAX_KEY_SIZE:
            raise RecordError(f"envelope public key of {len(public_key)} bytes is too long")
        if len(payload_type) > _MAX_PAYLOAD_TYPE_SIZE:
            raise RecordError(f"envelope payload type of {len(payload_type)} bytes is too long")
        if len(signature) != _ED25519_SIGNATURE_SIZE:
            raise RecordError(f"envelope signature of {len(signature)} bytes is not Ed25519's 64")
        return cls(public_key, payload_type, payload, signature)


def open_signed(
    envelope: Envelope,
    domain: str,
    payload_type: bytes,
    fields: Mapping[str, type | tuple[type, ...]],
) -> tuple[PeerId, dict[str, Any]]:
    """Verify `envelope`, then decode its payload: a msgpack map with a ``peer_id`` entry.

    `fields` names the other entries and their types (exact types: a bool is not an int); the
    map must hold exactly those and ``peer_id``. Returns the signer and the map. Raises
    RecordError when the envelope does not verify, the payload is malformed, or the signing key
    is not the payload's peer id.
    """
    signer = envelope.open(domain, payload_type)
    payload = _unpack_strict(envelope.payload, len(envelope.payload))
    if type(payload) is not dict:
        raise RecordError(f"{domain} payload is not a msgpack map")
    expected = {"peer_id": bytes, **fields}
    if missing := expected.keys() - payload.keys():
        raise RecordError(f"{domain} payload lacks {', '.join(sorted(missing))}")
    if unexpected := payload.keys() - expected.keys():
        raise RecordError(f"{domain} payload has unexpected fields {reprlib.repr(unexpected)}")
    for name, types in expected.items():
        if type(payload[name]) not in (types if isinstance(types, tuple) else (types,)):
            raise RecordError(f"{domain} field {name!r} has type {type(payload[name]).__name__}")
    try:
        peer_id = PeerId(payload["peer_id"])
    except ValueError as exc:
        raise RecordError(f"{domain} payload has an invalid peer id: {exc}") from None
    if peer_id != signer:
        raise RecordError(
            f"{domain} for {peer_id} is signed by a key that does not match the peer id"
        )
    return signer, payload


def _is_newer(held_seq: int | None, new_seq: int) -> bool:
    return held_seq is None or new_seq > held_seq


def check_newer(held_seq: int | None, new_seq: int) -> None:
    """Accept a record with `new_seq` only if it is above `held_seq` (None: nothing held).

    Raises RecordError for a stale or replayed record.
    """
    if not _is_newer(held_seq, new_seq):
        raise RecordError(f"stale record: seq {new_seq} is not above held seq {held_seq}")


@dataclass(frozen=True, slots=True)
class PeerRecord:
    """Where a peer can be reached, signed by the peer (libp2p's routing record).

    `seq` is by convention the wall time at creation in milliseconds, so a restarted peer's
    record supersedes the old one. `addrs` are stored without a ``/p2p/`` suffix. The
    constructor raises ValueError for an invalid field.
    """

    peer_id: PeerId
    seq: int
    addrs: tuple[Multiaddr, ...]

    DOMAIN: ClassVar[str] = "sdcn-peer-record"
    PAYLOAD_TYPE: ClassVar[bytes] = b"/sdcn/peer-record/1"
    MAX_ADDRS: ClassVar[int] = 32

    def __post_init__(self) -> None:
        if not isinstance(self.peer_id, PeerId):
            raise ValueError(f"peer_id must be a PeerId, not {type(self.peer_id).__name__}")
        if type(self.seq) is not int or not 0 <= self.seq <= _MAX_SEQ:
            raise ValueError(f"seq must be an int in 0..2**64-1, not {self.seq!r}")
        addrs = tuple(self.addrs)
        if len(addrs) > self.MAX_ADDRS:
            raise ValueError(f"{len(addrs)} addresses, at most {self.MAX_ADDRS}")
        for addr in addrs:
            if not isinstance(addr, Multiaddr):
                raise ValueError(f"address must be a Multiaddr, not {type(addr).__name__}")
            if addr.peer_id not in (None, self.peer_id):
                raise ValueError(f"address {addr} names another peer than {self.peer_id}")
        object.__setattr__(self, "addrs", tuple(addr.without_peer_id() for addr in addrs))

    def seal(self, identity: Identity) -> Envelope:
        """Sign the record; raises ValueError if `identity` is not the record's peer."""
        if identity.peer_id != self.peer_id:
            raise ValueError(f"cannot seal a record of {self.peer_id} with the key of {identity}")
        payload = pack(
            {"peer_id": self.peer_id.bytes, "seq": self.seq, "addrs": [str(a) for a in self.addrs]}
        )
        return Envelope.seal(identity, self.DOMAIN, self.PAYLOAD_TYPE, payload)

    @classmethod
    def from_envelope(cls, envelope: Envelope) -> PeerRecord:
        """Verify and decode a sealed record; raises RecordError if it is invalid."""
        peer_id, payload = open_signed(
            envelope, cls.DOMAIN, cls.PAYLOAD_TYPE, {"seq": int, "addrs": list}
        )
        try:
            addrs = tuple(Multiaddr.parse(text) for text in payload["addrs"])
            return cls(peer_id, payload["seq"], addrs)
        except ValueError as exc:  # MultiaddrError is a ValueError
            raise RecordError(f"invalid peer record of {peer_id}: {exc}") from None

    def is_newer_than(self, held: PeerRecord | None) -> bool:
        """Whether this record should replace `held` (the record of the same peer, if any)."""
        if held is not None and held.peer_id != self.peer_id:
            raise ValueError(f"cannot order records of {self.peer_id} and {held.peer_id}")
        return _is_newer(None if held is None else held.seq, self.seq)
