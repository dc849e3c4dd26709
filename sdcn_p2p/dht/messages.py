"""The wire format of ``/sdcn/kad/2.0.0``: one msgpack request and one response per stream.

::

    {"type": "FIND_NODE", "key": key}                 -> {"closer": [contact, ...]}
    {"type": "GET_VALUE", "key": key}                 -> {"values": [envelope, ...],
                                                          "closer": [contact, ...]}
    {"type": "PUT_VALUE", "key": key, "value": envelope}  -> {"ok": bool, "error": str}

A key is 32 bytes, an envelope the bytes of `Envelope.to_bytes`, a contact
``[peer id bytes, [multiaddr text, ...]]``. Decoders check every field they read (type, size,
count) and raise ProtocolError; fields they do not know are ignored.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from sdcn_p2p.dht.keys import KEY_SIZE
from sdcn_p2p.errors import RemoteProtocolError
from sdcn_p2p.identity import PeerId
from sdcn_p2p.multiaddr import MAX_MULTIADDR_LEN, Multiaddr
from sdcn_p2p.records import MAX_ENVELOPE_SIZE
from sdcn_p2p.wire.messages import expect_map

__all__ = [
    "KAD",
    "MAX_ADDRS",
    "MAX_CLOSER",
    "MAX_ERROR_LEN",
    "MAX_MESSAGE_SIZE",
    "Contact",
    "FindNode",
    "GetValue",
    "PutValue",
    "Request",
    "decode_nodes",
    "decode_put",
    "decode_request",
    "decode_values",
    "encode_request",
    "nodes_response",
    "put_response",
    "values_response",
]

KAD = "/sdcn/kad/2.0.0"
MAX_MESSAGE_SIZE = 4 * 1024 * 1024
#: Most contacts in one answer, and most addresses per contact.
MAX_CLOSER = 20
MAX_ADDRS = 16
MAX_ERROR_LEN = 512
_MAX_PEER_ID = 64


@dataclass(frozen=True, slots=True)
class FindNode:
    key: bytes


@dataclass(frozen=True, slots=True)
class GetValue:
    key: bytes


@dataclass(frozen=True, slots=True)
class PutValue:
    key: bytes
    value: bytes  # an encoded envelope


Request = FindNode | GetValue | PutValue


@dataclass(frozen=True, slots=True)
class Contact:
    """A server peer and the addresses it can be dialled at."""

    peer_id: PeerId
    addrs: tuple[Multiaddr, ...]


def encode_request(request: Request) -> dict[str, Any]:
    if isinstance(request, FindNode):
        return {"type": "FIND_NODE", "key": request.key}
    if isinstance(request, GetValue):
        return {"type": "GET_VALUE", "key": request.key}
    return {"type": "PUT_VALUE", "key": request.key, "value": request.value}


def _key(message: dict[str, Any]) -> bytes:
    key = message["key"]
    if len(key) != KEY_SIZE:
        raise RemoteProtocolError(f"a DHT key must be {KEY_SIZE} bytes, not {len(key)}")
    return key


def decode_request(message: Any, *, max_value_size: int = MAX_ENVELOPE_SIZE) -> Request:
    """Validate a request; raises ProtocolError."""
    message = expect_map(message, {"type": str, "key": bytes})
    kind = message["type"]
    if kind == "FIND_NODE":
        return FindNode(_key(message))
    if kind == "GET_VALUE":
        return GetValue(_key(message))
    if kind == "PUT_VALUE":
        expect_map(message, {"value": bytes})
        value = message["value"]
        if len(value) > max_value_size:
            raise RemoteProtocolError(f"value of {len(value)} bytes is over {max_value_size}")
        return PutValue(_key(message), value)
    raise RemoteProtocolError(f"unknown DHT request type {kind[:32]!r}")


def _encode_contacts(contacts: list[Contact]) -> list[list[Any]]:
    return [[c.peer_id.bytes, [str(a) for a in c.addrs[:MAX_ADDRS]]] for c in contacts]


def nodes_response(closer: list[Contact]) -> dict[str, Any]:
    return {"closer": _encode_contacts(closer[:MAX_CLOSER])}


def values_response(values: list[bytes], closer: list[Contact]) -> dict[str, Any]:
    return {"values": values, "closer": _encode_contacts(closer[:MAX_CLOSER])}


def put_response(ok: bool, error: str | None = None) -> dict[str, Any]:
    if error is None:
        return {"ok": ok}
    return {"ok": ok, "error": error[:MAX_ERROR_LEN]}


# Lookups see the same few thousand peers again and again: parse each id and address once.
@functools.lru_cache(maxsize=16_384)
def _peer_id(data: bytes) -> PeerId:
    return PeerId(data)


@functools.lru_cache(maxsize=16_384)
def _multiaddr(text: str) -> Multiaddr:
    return Multiaddr.parse(text)


def _contact(item: object) -> Contact:
    if type(item) is not list or len(item) != 2:
        raise RemoteProtocolError("a contact must be [peer id, [addresses]]")
    peer_bytes, addr_texts = item
    if type(peer_bytes) is not bytes or len(peer_bytes) > _MAX_PEER_ID:
        raise RemoteProtocolError("a contact's peer id must be at most 64 bytes")
    if type(addr_texts) is not list or len(addr_texts) > MAX_ADDRS:
        raise RemoteProtocolError(f"a contact must list at most {MAX_ADDRS} addresses")
    try:
        peer_id = _peer_id(peer_bytes)
        addrs = []
        for text in addr_texts:
            if type(text) is not str or len(text) > MAX_MULTIADDR_LEN:
                raise RemoteProtocolError("a contact address must be multiaddr text")
            addr = _multiaddr(text)
            if addr.peer_id is not None:
                if addr.peer_id != peer_id:
                    raise RemoteProtocolError(f"contact address {addr} names another peer")
                addr = addr.without_peer_id()
            addrs.append(addr)
    except ValueError as exc:  # MultiaddrError is a ValueError
        raise RemoteProtocolError(f"bad contact: {exc}") from None
    return Contact(peer_id, tuple(addrs))


def decode_nodes(message: Any) -> list[Contact]:
    """Validate a FIND_NODE answer; raises ProtocolError."""
    message = expect_map(message, {"closer": list})
    closer = message["closer"]
    if len(closer) > MAX_CLOSER:
        raise RemoteProtocolError(f"{len(closer)} contacts in one answer, at most {MAX_CLOSER}")
    return [_contact(item) for item in closer]


def decode_values(
    message: Any, *, max_values: int = 256, max_value_size: int = MAX_ENVELOPE_SIZE
) -> tuple[list[bytes], list[Contact]]:
    """Validate a GET_VALUE answer: (envelope bytes, contacts). Raises ProtocolError."""
    message = expect_map(message, {"values": list})
    values = message["values"]
    if len(values) > max_values:
        raise RemoteProtocolError(f"{len(values)} values in one answer, at most {max_values}")
    for value in values:
        if type(value) is not bytes or len(value) > max_value_size:
            raise RemoteProtocolError(
                f"a value must be an envelope of at most {max_value_size} bytes"
            )
    return values, decode_nodes(message)


def decode_put(message: Any) -> tuple[bool, str | None]:
    """Validate a PUT_VALUE answer: (stored, why not). Raises ProtocolError."""
    message = expect_map(message, {"ok": bool}, {"error": str})
    error = message.get("error")
    if error is not None and len(error) > MAX_ERROR_LEN:
        raise RemoteProtocolError(f"error text longer than {MAX_ERROR_LEN} characters")
    return message["ok"], error
