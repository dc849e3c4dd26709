"""The protobuf wire format, just enough for the few libp2p messages we speak.

Hand-written rather than generated: libp2p's messages here (`wire.libp2p`) are five small
ones with bytes, string and uint64 fields, and a schema of a few lines each beats a
dependency on `protobuf` plus generated code whose parser we would still have to bound (it
accepts messages up to 2 GiB and nests 100 deep). This codec decodes only what we ask for:
no nesting of its own (a sub-message is a bytes field the caller decodes with its schema),
unknown fields skipped as protobuf requires, every length checked against the data holding
it, and RemoteProtocolError for anything malformed.

A `Schema` maps field numbers to `Field`\\ s. Decoding returns a dict by field name: the last
value of a singular field (None when absent), a list for a repeated one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from sdcn_p2p.errors import RemoteProtocolError

__all__ = ["Field", "Schema", "decode", "encode", "encode_field"]

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_MAX_VARINT_BYTES = 10
_MAX_FIELD_NUMBER = (1 << 29) - 1

Kind: TypeAlias = Literal["bytes", "string", "uint64", "bool"]


@dataclass(frozen=True, slots=True)
class Field:
    """One field of a message: its name in the decoded dict, its type, whether repeated.

    ``bytes`` also carries sub-messages, which the caller decodes with their own schema.
    """

    name: str
    kind: Kind
    repeated: bool = False


Schema: TypeAlias = Mapping[int, Field]


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_field(number: int, value: bytes | str | int | bool) -> bytes:
    """One field: bytes and str length-delimited, int and bool as varints."""
    if isinstance(value, str):
        value = value.encode("utf-8")
    if isinstance(value, bytes | bytearray):
        return _varint(number << 3 | _LEN) + _varint(len(value)) + bytes(value)
    if not 0 <= value < 1 << 64:
        raise ValueError(f"protobuf varint out of range: {value}")
    return _varint(number << 3 | _VARINT) + _varint(int(value))


def encode(fields: Iterable[tuple[int, bytes | str | int | bool | None]]) -> bytes:
    """A message from (field number, value) pairs in order; None values are left out.

    Repeat a number for a repeated field.
    """
    return b"".join(encode_field(number, value) for number, value in fields if value is not None)


def _read_varint(data: memoryview, offset: int) -> tuple[int, int]:
    value = 0
    for i in range(_MAX_VARINT_BYTES):
        if offset + i >= len(data):
            raise RemoteProtocolError("protobuf message ends inside a varint")
        byte = data[offset + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if value >= 1 << 64:
                raise RemoteProtocolError("protobuf varint over 64 bits")
            return value, offset + i + 1
    raise RemoteProtocolError("protobuf varint longer than 10 bytes")


def decode(data: bytes | bytearray | memoryview, schema: Schema) -> dict[str, Any]:
    """Decode a message of `schema`; unknown fields are skipped.

    Raises RemoteProtocolError for a truncated message, a bad varint, field number 0, group
    or unknown wire types, a known field with the wrong wire type, or a string that is not
    UTF-8.
    """
    view = memoryview(data).cast("B")
    result: dict[str, Any] = {f.name: [] if f.repeated else None for f in schema.values()}
    offset = 0
    while offset < len(view):
        tag, offset = _read_varint(view, offset)
        number, wire_type = tag >> 3, tag & 7
        if not 0 < number <= _MAX_FIELD_NUMBER:
            raise RemoteProtocolError(f"protobuf field number {number}")
        if wire_type == _VARINT:
            value: Any
            value, end = _read_varint(view, offset)
        elif wire_type == _LEN:
            length, offset = _read_varint(view, offset)
            end = offset + length
            value = None  # sliced below, only for a known field
        elif wire_type == _I64:
            end, value = offset + 8, None
        elif wire_type == _I32:
            end, value = offset + 4, None
        else:
            raise RemoteProtocolError(f"protobuf wire type {wire_type} is not supported")
        if end > len(view):
            raise RemoteProtocolError("protobuf message is truncated")
        field = schema.get(number)
        if field is not None:
            result_value = _field_value(field, wire_type, value, view[offset:end])
            if field.repeated:
                result[field.name].append(result_value)
            else:
                result[field.name] = result_value
        offset = end
    return result


def _field_value(field: Field, wire_type: int, varint: int | None, raw: memoryview) -> Any:
    wanted = _VARINT if field.kind in ("uint64", "bool") else _LEN
    if wire_type != wanted:
        raise RemoteProtocolError(f"protobuf field {field.name!r} has wire type {wire_type}")
    if field.kind == "uint64":
        return varint
    if field.kind == "bool":
        return bool(varint)
    if field.kind == "string":
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            raise RemoteProtocolError(f"protobuf field {field.name!r} is not UTF-8") from None
    return bytes(raw)
