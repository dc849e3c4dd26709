"""Length-prefixed msgpack messages, decoded strictly.

On a stream every message is ``varint(len(body)) + body``, the body one msgpack object.
Decoding accepts only what `pack` produces from plain data: nil, bool, int, float, str
(valid UTF-8), bin, arrays, and maps with str or bin keys, no key twice, nested at most
`MAX_DEPTH` deep. Ext types (the timestamp included) are refused. Every size is bounded by the
message cap, and whatever the bytes, the only error raised is ProtocolError (or a subclass).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeAlias

import msgpack

from sdcn_p2p.errors import LocalProtocolError, MessageTooLarge, ProtocolError, RemoteProtocolError
from sdcn_p2p.wire.varint import decode_varint, encode_varint

__all__ = [
    "MAX_DEPTH",
    "MessageDecoder",
    "encode_message",
    "expect_map",
    "pack",
    "unpack",
]

#: Deepest nesting of arrays and maps accepted, far below Python's recursion limit so that
#: recursive code (repr, ==) is safe on anything `unpack` returns.
MAX_DEPTH = 64

_TypeSpec: TypeAlias = type | tuple[type, ...]


def pack(obj: object) -> bytes:
    """Encode `obj` as msgpack (bytes as bin, str as str).

    Raises TypeError for objects msgpack cannot encode. Only plain data round-trips through
    `unpack`: maps need str or bytes keys, and tuples come back as lists.
    """
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes | bytearray | memoryview, *, max_size: int) -> Any:
    """Decode one msgpack object that must fill `data` exactly.

    Raises MessageTooLarge if `data` is over `max_size` bytes, ProtocolError for anything
    else wrong with it.
    """
    size = len(data)
    if size > max_size:
        raise MessageTooLarge(f"message of {size} bytes exceeds the cap of {max_size}")
    try:
        # No container or string can be longer than the data holding it.
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            ext_hook=_refuse_ext,
            object_pairs_hook=_unique_map,
            max_str_len=size,
            max_bin_len=size,
            max_array_len=size,
            max_map_len=size,
            max_ext_len=size,
        )
    except ProtocolError:
        raise
    except (ValueError, TypeError, RecursionError) as exc:
        # msgpack's own errors (FormatError, StackError, ExtraData, ...) and invalid UTF-8
        # (UnicodeDecodeError) are ValueErrors; the others are defensive.
        raise RemoteProtocolError(f"bad msgpack: {exc or type(exc).__name__}") from exc
    _check_tree(obj)
    return obj


def encode_message(obj: object, *, max_size: int) -> bytes:
    """Return `obj` packed, behind its varint length.

    Raises LocalProtocolError if the packed body is over `max_size` bytes, and
    ValueError for None (see `MessageDecoder.next_message`).
    """
    if obj is None:
        raise ValueError("None cannot be a message: MessageDecoder reserves it for 'no message'")
    body = pack(obj)
    if len(body) > max_size:
        raise LocalProtocolError(f"message of {len(body)} bytes exceeds the cap of {max_size}")
    return encode_varint(len(body)) + body


class MessageDecoder:
    """Split a byte stream into messages of at most `max_size` bytes each."""

    def __init__(self, max_size: int) -> None:
        self._max_size = max_size
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes received from the stream."""
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a message."""
        return len(self._buf)

    def next_message(self) -> Any | None:
        """Return the next complete message, or None if more bytes are needed.

        Raises MessageTooLarge as soon as a length prefix announces more than `max_size`
        bytes, ProtocolError for a bad prefix or body, or a nil message (None is reserved for
        "need more bytes"). After an error the decoder keeps raising it: reset the stream.
        """
        header = decode_varint(self._buf)
        if header is None:
            return None
        length, start = header
        if length > self._max_size:
            raise MessageTooLarge(f"message of {length} bytes exceeds the cap of {self._max_size}")
        end = start + length
        if len(self._buf) < end:
            return None
        body = memoryview(self._buf)[start:end]
        try:
            obj = unpack(body, max_size=self._max_size)
        finally:
            body.release()  # a traceback holding it would pin _buf, and feed() would fail
        if obj is None:
            raise RemoteProtocolError("a message may not be nil")
        del self._buf[:end]  # cheap: CPython drops a bytearray's head without moving the rest
        return obj


def expect_map(
    obj: object,
    required: Mapping[str, _TypeSpec],
    optional: Mapping[str, _TypeSpec] | None = None,
) -> dict[str, Any]:
    """Return `obj` if it is a map whose fields have the given types; other keys are allowed.

    Raises ProtocolError naming the first field that is missing or of the wrong type. bool is
    not accepted where int is asked for.
    """
    if not isinstance(obj, dict):
        raise RemoteProtocolError(f"expected a map, got {type(obj).__name__}")
    for name, types in required.items():
        if name not in obj:
            raise RemoteProtocolError(f"field {name!r} is missing")
        _check_field(name, obj[name], types)
    for name, types in (optional or {}).items():
        if name in obj:
            _check_field(name, obj[name], types)
    return obj


def _check_field(name: str, value: object, types: _TypeSpec) -> None:
    allowed = types if isinstance(types, tuple) else (types,)
    # bool is an int subclass, but a flag where a count belongs is a bug on the remote side.
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        names = " or ".join(t.__name__ for t in allowed)
        raise RemoteProtocolError(f"field {name!r} must be {names}")


def _refuse_ext(code: int, data: bytes) -> object:
    raise RemoteProtocolError(f"msgpack ext type {code} is not allowed")


def _unique_map(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise RemoteProtocolError("msgpack map has a duplicate key")
    return result


def _check_tree(obj: object) -> None:
    """Refuse timestamps (msgpack decodes ext -1 without calling ext_hook) and deep nesting."""
    stack = [(obj, 0)]
    while stack:
        item, depth = stack.pop()
        kind = type(item)
        if kind is list:
            children: Any = item
        elif kind is dict:
            children = item.values()  # keys are str or bytes (strict_map_key)
        elif kind is msgpack.Timestamp:
            raise RemoteProtocolError("msgpack timestamps are not allowed")
        else:
            continue
        if depth >= MAX_DEPTH:
            raise RemoteProtocolError(f"msgpack nesting deeper than {MAX_DEPTH}")
        for child in children:
            if type(child) in (list, dict, msgpack.Timestamp):
                stack.append((child, depth + 1))
