"""Signed envelopes (libp2p RFC 0002) and the records sealed in them.

An `Envelope` carries a payload signed by a peer's identity key over RFC 0002's signing buffer::

    varint(len(domain)) domain varint(len(payload_type)) payload_type varint(len(payload)) payload

The domain separates record kinds (``sdcn-peer-record``, ``sdcn-advert``) so a signature made
for one can never be replayed as another. Our envelopes and payloads are msgpack; a
`PeerRecord` is also sealed as libp2p seals one (RFC 0003: protobuf envelope and payload,
domain ``libp2p-peer-record``), for ``/ipfs/id/1.0.0``.
Receivers verify an envelope before decoding its payload (`open_signed`), check that the signing
key is the peer id the payload names, and accept a record only if its ``seq`` is above the one
they hold (`check_newer`).
"""

from __future__ import annotations

import enum
import hashlib
import reprlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from sdcn_p2p.errors import MultiaddrError, ProtocolError, RecordError
from sdcn_p2p.identity import Identity, PeerId, decode_public_key, verify_signature
from sdcn_p2p.multiaddr import Multiaddr
from sdcn_p2p.wire.libp2p import (
    PEER_RECORD_DOMAIN,
    PEER_RECORD_PAYLOAD_TYPE,
    EnvelopeMessage,
    PeerRecordMessage,
)
from sdcn_p2p.wire.messages import pack, unpack
from sdcn_p2p.wire.multiaddr import decode_multiaddr, encode_multiaddr
from sdcn_p2p.wire.varint import encode_varint

__all__ = [
    "MAX_ENVELOPE_SIZE",
    "Advert",
    "AdvertState",
    "Envelope",
    "LoraInfo",
    "ModelInfo",
    "PeerRecord",
    "Reachability",
    "Role",
    "check_newer",
    "model_key",
    "normalize_model_name",
    "open_signed",
    "peer_key",
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
        return cls._checked(*fields)

    def to_protobuf(self) -> bytes:
        """libp2p's encoding: the protobuf ``Envelope`` (as identify's signedPeerRecord)."""
        return EnvelopeMessage(
            self.public_key, self.payload_type, self.payload, self.signature
        ).encode()

    @classmethod
    def from_protobuf(cls, data: bytes, *, max_size: int = MAX_ENVELOPE_SIZE) -> Envelope:
        """Decode `to_protobuf` output of at most `max_size` bytes, without verifying it.

        Raises RecordError, and only RecordError, for any other input.
        """
        if len(data) > max_size:
            raise RecordError(f"envelope of {len(data)} bytes is over the {max_size}-byte cap")
        try:
            message = EnvelopeMessage.decode(data)
        except ProtocolError as exc:
            raise RecordError(f"malformed envelope: {exc}") from None
        return cls._checked(
            message.public_key, message.payload_type, message.payload, message.signature
        )

    @classmethod
    def _checked(
        cls, public_key: bytes, payload_type: bytes, payload: bytes, signature: bytes
    ) -> Envelope:
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

    def seal_libp2p(self, identity: Identity) -> Envelope:
        """Sign the record as libp2p does (RFC 0003): a protobuf ``PeerRecord`` with binary
        addresses, domain ``libp2p-peer-record``; raises ValueError for another identity.
        """
        if identity.peer_id != self.peer_id:
            raise ValueError(f"cannot seal a record of {self.peer_id} with the key of {identity}")
        addrs = tuple(encode_multiaddr(addr) for addr in self.addrs)
        payload = PeerRecordMessage(self.peer_id.bytes, self.seq, addrs).encode()
        return Envelope.seal(identity, PEER_RECORD_DOMAIN, PEER_RECORD_PAYLOAD_TYPE, payload)

    @classmethod
    def from_libp2p_envelope(cls, envelope: Envelope) -> PeerRecord:
        """Verify and decode a record sealed as libp2p seals one (any libp2p peer's).

        Addresses of shapes SDCN cannot dial (TCP without WebSocket, QUIC, relays) are left
        out, and past MAX_ADDRS. Raises RecordError when the envelope does not verify, the
        payload is malformed, or it names another peer than the signer.
        """
        signer = envelope.open(PEER_RECORD_DOMAIN, PEER_RECORD_PAYLOAD_TYPE)
        try:
            message = PeerRecordMessage.decode(envelope.payload)
            peer_id = PeerId(message.peer_id)
        except (ProtocolError, ValueError) as exc:
            raise RecordError(f"malformed libp2p peer record: {exc}") from None
        if peer_id != signer:
            raise RecordError(f"libp2p peer record of {peer_id} is signed by another key")
        addrs: list[Multiaddr] = []
        for data in message.addrs:
            try:
                addr = decode_multiaddr(data)
            except (ProtocolError, MultiaddrError):
                continue
            if addr.peer_id in (None, peer_id) and len(addrs) < cls.MAX_ADDRS:
                addrs.append(addr)
        return cls(peer_id, message.seq, tuple(addrs))

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

    @property
    def dht_key(self) -> bytes:
        """The DHT key this record is stored under: sha256("/sdcn/peer/" + peer id)."""
        return peer_key(self.peer_id)


def normalize_model_name(name: str) -> str:
    """The form model names are matched and hashed in: case-folded, whitespace collapsed."""
    return " ".join(name.split()).casefold()


def model_key(name: str) -> bytes:
    """DHT key of the providers of a model: sha256("/sdcn/model/" + normalized name)."""
    return hashlib.sha256(b"/sdcn/model/" + normalize_model_name(name).encode()).digest()


def peer_key(peer_id: PeerId) -> bytes:
    """DHT key of a peer's signed PeerRecord: sha256("/sdcn/peer/" + peer id)."""
    return hashlib.sha256(b"/sdcn/peer/" + str(peer_id).encode()).digest()


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A model a provider can run. `architecture` is e.g. "sd1", "sd2", "sdxl"."""

    name: str
    title: str = ""
    hash: str = ""
    architecture: str = ""


@dataclass(frozen=True, slots=True)
class LoraInfo:
    """A LoRA a provider can apply."""

    name: str
    hash: str = ""


class Reachability(enum.StrEnum):
    """Whether others can dial a peer (the values are the advert's wire strings)."""

    PUBLIC = "public"
    OUTBOUND_ONLY = "outbound-only"  # behind NAT: it dials out, and takes jobs over those


class AdvertState(enum.StrEnum):
    """What a provider does with new jobs (the values are the advert's wire strings)."""

    ONLINE = "online"  # taking jobs
    DRAINING = "draining"  # finishing its jobs before leaving
    UNAVAILABLE = "unavailable"  # its backend cannot run jobs now (a webui that went away)


class Role(enum.StrEnum):
    """What a peer does, in its advert and its identify info (the values are the wire strings).

    Peers may announce roles this version does not know; they are kept as plain strings.
    """

    PROVIDER = "provider"  # runs jobs
    GATEWAY = "gateway"  # takes HTTP requests (providers behind NAT dial the ones they learn of)
    BOOTSTRAP = "bootstrap"  # a well-known DHT server, the door into the network


def _member(enum_type: type[enum.StrEnum], name: str, value: object) -> Any:
    """`value` as a member of `enum_type`; ValueError naming the field if it is none."""
    try:
        return enum_type(value)
    except ValueError:
        raise ValueError(f"{name} must be one of {tuple(map(str, enum_type))}") from None


def _check_text(name: str, value: object, limit: int, *, empty: bool = True) -> str:
    if not isinstance(value, str) or len(value) > limit or (not empty and not value.strip()):
        raise ValueError(
            f"{name} must be a {'' if empty else 'non-empty '}string of at most {limit} chars"
        )
    return value


def _check_int(name: str, value: object, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"{name} must be an int in {low}..{high}, not {value!r}")
    return value


def _check_number(name: str, value: object, low: float, high: float) -> float:
    if type(value) not in (int, float) or not low <= value <= high:  # NaN fails too
        raise ValueError(f"{name} must be a number in {low}..{high}, not {value!r}")
    return float(value)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Advert:
    """What a provider offers, signed by it: models, LoRAs, samplers, capacity and load.

    Valid from `issued_at` (wall seconds) for `ttl` seconds; a newer `seq` replaces an older
    advert of the same peer. The constructor raises ValueError for a field out of bounds.
    """

    peer_id: PeerId
    seq: int
    issued_at: float
    ttl: float
    addrs: tuple[Multiaddr, ...] = ()
    reachability: Reachability = Reachability.PUBLIC
    backend: str = ""
    models: tuple[ModelInfo, ...] = ()
    loras: tuple[LoraInfo, ...] = ()
    samplers: tuple[str, ...] = ()
    vram_total_mb: int = 0
    vram_free_mb: int = 0
    max_pixels: int = 0
    max_steps: int = 0
    slots: int = 1
    queue: int = 0  # jobs running or waiting there
    #: Jobs that may wait for a slot before the provider answers busy; None: not advertised.
    max_queue: int | None = None
    speed: float = 0.0  # iterations per second at 512x512
    state: AdvertState = AdvertState.ONLINE
    #: What the peer does (`Role`; unknown roles are kept as strings).
    roles: tuple[str, ...] = (Role.PROVIDER,)

    DOMAIN: ClassVar[str] = "sdcn-advert"
    PAYLOAD_TYPE: ClassVar[bytes] = b"/sdcn/advert/1"
    MAX_TTL: ClassVar[float] = 3600.0
    MAX_MODELS: ClassVar[int] = 128
    MAX_LORAS: ClassVar[int] = 512
    MAX_SAMPLERS: ClassVar[int] = 64
    MAX_ADDRS: ClassVar[int] = 16
    MAX_ROLES: ClassVar[int] = 8
    #: Seconds an advert's issued_at may lie ahead of our clock.
    MAX_CLOCK_SKEW: ClassVar[float] = 60.0

    def __post_init__(self) -> None:
        if not isinstance(self.peer_id, PeerId):
            raise ValueError(f"peer_id must be a PeerId, not {type(self.peer_id).__name__}")
        _check_int("seq", self.seq, 0, _MAX_SEQ)
        object.__setattr__(self, "issued_at", _check_number("issued_at", self.issued_at, 0, 1e11))
        object.__setattr__(self, "ttl", _check_number("ttl", self.ttl, 1, self.MAX_TTL))
        addrs = tuple(self.addrs)
        if len(addrs) > self.MAX_ADDRS or not all(isinstance(a, Multiaddr) for a in addrs):
            raise ValueError(f"addrs must be at most {self.MAX_ADDRS} Multiaddrs")
        for addr in addrs:
            if addr.peer_id not in (None, self.peer_id):
                raise ValueError(f"address {addr} names another peer than {self.peer_id}")
        object.__setattr__(self, "addrs", tuple(a.without_peer_id() for a in addrs))
        reachability = _member(Reachability, "reachability", self.reachability)
        object.__setattr__(self, "reachability", reachability)
        object.__setattr__(self, "state", _member(AdvertState, "state", self.state))
        roles = tuple(self.roles)
        if len(roles) > self.MAX_ROLES:
            raise ValueError(f"at most {self.MAX_ROLES} roles")
        for role in roles:
            _check_text("role", role, 32, empty=False)
        object.__setattr__(self, "roles", roles)
        _check_text("backend", self.backend, 32)
        models, loras, samplers = tuple(self.models), tuple(self.loras), tuple(self.samplers)
        if len(models) > self.MAX_MODELS or not all(isinstance(m, ModelInfo) for m in models):
            raise ValueError(f"models must be at most {self.MAX_MODELS} ModelInfo")
        for m in models:
            _check_text("model name", m.name, 256, empty=False)
            _check_text("model title", m.title, 512)
            _check_text("model hash", m.hash, 128)
            _check_text("model architecture", m.architecture, 32)
        if len(loras) > self.MAX_LORAS or not all(isinstance(lo, LoraInfo) for lo in loras):
            raise ValueError(f"loras must be at most {self.MAX_LORAS} LoraInfo")
        for lo in loras:
            _check_text("LoRA name", lo.name, 256, empty=False)
            _check_text("LoRA hash", lo.hash, 128)
        if len(samplers) > self.MAX_SAMPLERS:
            raise ValueError(f"at most {self.MAX_SAMPLERS} samplers")
        for s in samplers:
            _check_text("sampler", s, 64, empty=False)
        object.__setattr__(self, "models", models)
        object.__setattr__(self, "loras", loras)
        object.__setattr__(self, "samplers", samplers)
        _check_int("vram_total_mb", self.vram_total_mb, 0, 10**7)
        _check_int("vram_free_mb", self.vram_free_mb, 0, 10**7)
        _check_int("max_pixels", self.max_pixels, 0, 2**32)
        _check_int("max_steps", self.max_steps, 0, 10_000)
        _check_int("slots", self.slots, 1, 1024)
        _check_int("queue", self.queue, 0, 10**6)
        if self.max_queue is not None:
            _check_int("max_queue", self.max_queue, 0, 10**6)
        object.__setattr__(self, "speed", _check_number("speed", self.speed, 0, 1e4))

    @property
    def expires_at(self) -> float:
        return self.issued_at + self.ttl

    @property
    def is_online_provider(self) -> bool:
        """Whether the peer runs jobs and takes new ones now (role provider, state online)."""
        return self.state is AdvertState.ONLINE and Role.PROVIDER in self.roles

    @property
    def full(self) -> bool:
        """Whether the provider was answering busy when it signed this: `slots` running and
        `max_queue` waiting. (Its busy answer is the authority; this may be a second old.)
        """
        return self.max_queue is not None and self.queue >= self.slots + self.max_queue

    def check_fresh(self, now: float) -> None:
        """Raise RecordError if the advert has expired at wall time `now` or is from the future."""
        if now >= self.expires_at:
            raise RecordError(f"advert of {self.peer_id} expired {now - self.expires_at:.0f} s ago")
        if self.issued_at > now + self.MAX_CLOCK_SKEW:
            raise RecordError(f"advert of {self.peer_id} is issued in the future")

    def has_model(self, name: str) -> bool:
        wanted = normalize_model_name(name)
        return any(normalize_model_name(m.name) == wanted for m in self.models)

    def has_loras(self, names: Iterable[str]) -> bool:
        held = {normalize_model_name(lo.name) for lo in self.loras}
        return all(normalize_model_name(n) in held for n in names)

    @property
    def dht_keys(self) -> tuple[bytes, ...]:
        """The DHT keys this advert is stored under: one per distinct (normalized) model."""
        return tuple(dict.fromkeys(model_key(m.name) for m in self.models))

    def seal(self, identity: Identity) -> Envelope:
        """Sign the advert; raises ValueError if `identity` is not the advert's peer."""
        if identity.peer_id != self.peer_id:
            raise ValueError(f"cannot seal an advert of {self.peer_id} with the key of {identity}")
        load = [self.slots, self.queue]
        if self.max_queue is not None:
            load.append(self.max_queue)
        payload = {
            "peer_id": self.peer_id.bytes,
            "seq": self.seq,
            "issued_at": self.issued_at,
            "ttl": self.ttl,
            "addrs": [str(a) for a in self.addrs],
            "reach": self.reachability,
            "backend": self.backend,
            "models": [[m.name, m.title, m.hash, m.architecture] for m in self.models],
            "loras": [[lo.name, lo.hash] for lo in self.loras],
            "samplers": list(self.samplers),
            "vram": [self.vram_total_mb, self.vram_free_mb],
            "limits": [self.max_pixels, self.max_steps],
            "load": load,
            "speed": self.speed,
            "state": self.state,
            "roles": list(self.roles),
        }
        return Envelope.seal(identity, self.DOMAIN, self.PAYLOAD_TYPE, pack(payload))

    @classmethod
    def from_envelope(cls, envelope: Envelope) -> Advert:
        """Verify and decode a sealed advert (not its expiry: see `check_fresh`).

        Raises RecordError if it is forged, malformed or out of bounds.
        """
        number = (int, float)
        peer_id, p = open_signed(
            envelope,
            cls.DOMAIN,
            cls.PAYLOAD_TYPE,
            {
                "seq": int,
                "issued_at": number,
                "ttl": number,
                "addrs": list,
                "reach": str,
                "backend": str,
                "models": list,
                "loras": list,
                "samplers": list,
                "vram": list,
                "limits": list,
                "load": list,
                "speed": number,
                "state": str,
                "roles": list,
            },
        )
        try:
            if len(p["models"]) > cls.MAX_MODELS or len(p["loras"]) > cls.MAX_LORAS:
                raise ValueError("too many models or LoRAs")
            models = tuple(ModelInfo(*_strings(m, 4)) for m in p["models"])
            loras = tuple(LoraInfo(*_strings(lo, 2)) for lo in p["loras"])
            vram_total, vram_free = _pair(p["vram"])
            max_pixels, max_steps = _pair(p["limits"])
            slots, queue, max_queue = _load(p["load"])
            return cls(
                peer_id=peer_id,
                seq=p["seq"],
                issued_at=p["issued_at"],
                ttl=p["ttl"],
                addrs=tuple(Multiaddr.parse(a) for a in p["addrs"][: cls.MAX_ADDRS + 1]),
                reachability=p["reach"],
                backend=p["backend"],
                models=models,
                loras=loras,
                samplers=tuple(p["samplers"]),
                vram_total_mb=vram_total,
                vram_free_mb=vram_free,
                max_pixels=max_pixels,
                max_steps=max_steps,
                slots=slots,
                queue=queue,
                max_queue=max_queue,
                speed=p["speed"],
                state=p["state"],
                roles=tuple(p["roles"][: cls.MAX_ROLES + 1]),
            )
        except (ValueError, TypeError) as exc:
            raise RecordError(f"invalid advert of {peer_id}: {exc}") from None


def _strings(value: object, count: int) -> list[str]:
    if type(value) is not list or len(value) != count:
        raise ValueError(f"expected a list of {count} strings")
    return value


def _load(value: object) -> tuple[int, int, int | None]:
    """``[slots, queue]``, or ``[slots, queue, max_queue]`` from providers that say it."""
    if type(value) is list and len(value) == 3:
        return value[0], value[1], value[2]
    return (*_pair(value), None)


def _pair(value: object) -> tuple[int, int]:
    if type(value) is not list or len(value) != 2:
        raise ValueError("expected a pair of numbers")
    return value[0], value[1]
