"""Gossip wire messages: msgpack maps on short-lived ``/sdcn/gossip/2.0.0`` streams. Pure.

Each message is capped at `GossipConfig.max_message_size`::

    {"type": "ADVERTS", "adverts": [envelope, ...]}            a push: one message per stream
    {"type": "DIGEST", "digest": [[peer id, seq], ...]}        answered by ADVERTS messages,
    {"type": "ADVERTS", "adverts": [...], "want": [peer id]}   the last one with "want"; the
                                                               asker sends those and closes
    {"type": "GRAFT"}   answered by {"type": "GRAFT"} (joined) or {"type": "PRUNE"} (refused)
    {"type": "PRUNE"}   one way: the sender dropped us from its mesh

`parse_message` validates a decoded map into one of the message types; each type's
`to_wire()` gives the map to send. The size constants let a sender pack a message that fits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias

from sdcn_p2p.errors import RemoteProtocolError
from sdcn_p2p.identity import PeerId

__all__ = [
    "BIN_OVERHEAD",
    "DIGEST_EXTENSION",
    "ENTRY_SIZE",
    "GOSSIP",
    "MAX_SEQ",
    "MESSAGE_OVERHEAD",
    "AdvertBatch",
    "Digest",
    "GossipMessage",
    "Graft",
    "Prune",
    "max_entries",
    "parse_message",
]

GOSSIP = "/sdcn/gossip/2.0.0"
#: Identify extension carrying `AdvertCache.digest_hash`.
DIGEST_EXTENSION = "gossip/digest"

MAX_SEQ = 2**64 - 1
#: Upper bound on one encoded digest entry or wanted peer id: a 44-byte peer id behind its bin
#: header, an array header and a uint64.
ENTRY_SIZE = 56
#: Room for a message's map keys and list headers.
MESSAGE_OVERHEAD = 64
#: A msgpack bin header is at most 5 bytes.
BIN_OVERHEAD = 5


def max_entries(max_message_size: int) -> int:
    """How many digest entries or wanted peer ids fit in a message of `max_message_size`."""
    return max(1, (max_message_size - MESSAGE_OVERHEAD) // ENTRY_SIZE)


@dataclass(frozen=True, slots=True)
class AdvertBatch:
    """Advert envelopes (encoded); `want` is set only on the last answer to a Digest."""

    adverts: tuple[bytes, ...]
    want: tuple[PeerId, ...] | None = None

    def to_wire(self) -> dict[str, Any]:
        message: dict[str, Any] = {"type": "ADVERTS", "adverts": list(self.adverts)}
        if self.want is not None:
            message["want"] = [peer.bytes for peer in self.want]
        return message


@dataclass(frozen=True, slots=True)
class Digest:
    """The seq the sender holds for each peer's advert."""

    seqs: dict[PeerId, int]

    def to_wire(self) -> dict[str, Any]:
        return {"type": "DIGEST", "digest": [[p.bytes, seq] for p, seq in self.seqs.items()]}


@dataclass(frozen=True, slots=True)
class Graft:
    """Asks to join the receiver's mesh; also the answer that accepts."""

    def to_wire(self) -> dict[str, Any]:
        return {"type": "GRAFT"}


@dataclass(frozen=True, slots=True)
class Prune:
    """Leaves the receiver's mesh; also the answer that refuses a Graft."""

    def to_wire(self) -> dict[str, Any]:
        return {"type": "PRUNE"}


GossipMessage: TypeAlias = AdvertBatch | Digest | Graft | Prune


def parse_message(obj: object, *, max_entries: int) -> GossipMessage:
    """Validate a decoded gossip message; raises ProtocolError.

    Digests and want lists may hold at most `max_entries` peers, each once. Envelopes are
    only checked to be bytes here: each is verified on its own when received.
    """
    if type(obj) is not dict:
        raise RemoteProtocolError("gossip message must be a map")
    kind = obj.get("type")
    if kind == "ADVERTS":
        adverts = obj.get("adverts")
        if type(adverts) is not list or not all(type(a) is bytes for a in adverts):
            raise RemoteProtocolError("ADVERTS 'adverts' must be a list of bin")
        want = None
        if "want" in obj:
            want = _peer_list(obj["want"], max_entries)
        return AdvertBatch(tuple(adverts), want)
    if kind == "DIGEST":
        entries = obj.get("digest")
        if type(entries) is not list or len(entries) > max_entries:
            raise RemoteProtocolError(f"DIGEST 'digest' must be a list of at most {max_entries}")
        seqs: dict[PeerId, int] = {}
        for entry in entries:
            if type(entry) is not list or len(entry) != 2:
                raise RemoteProtocolError("DIGEST entries must be [peer id, seq]")
            peer_bytes, seq = entry
            if type(seq) is not int or not 0 <= seq <= MAX_SEQ:
                raise RemoteProtocolError("DIGEST seq must be an int in 0..2**64-1")
            peer = _peer_id(peer_bytes)
            if peer in seqs:
                raise RemoteProtocolError(f"DIGEST names {peer} twice")
            seqs[peer] = seq
        return Digest(seqs)
    if kind == "GRAFT":
        return Graft()
    if kind == "PRUNE":
        return Prune()
    raise RemoteProtocolError(f"unknown gossip message type {kind!r:.40}")


def _peer_id(value: object) -> PeerId:
    if type(value) is not bytes:
        raise RemoteProtocolError("peer id must be bin")
    try:
        return PeerId(value)
    except ValueError as exc:
        raise RemoteProtocolError(f"invalid peer id: {exc}") from None


def _peer_list(value: object, limit: int) -> tuple[PeerId, ...]:
    if type(value) is not list or len(value) > limit:
        raise RemoteProtocolError(f"ADVERTS 'want' must be a list of at most {limit} peer ids")
    peers = tuple(_peer_id(v) for v in value)
    if len(set(peers)) != len(peers):
        raise RemoteProtocolError("ADVERTS 'want' names a peer twice")
    return peers
