"""Unsigned LEB128 varints, as multiformats and libp2p use them."""

from __future__ import annotations

from sdcn_p2p.errors import RemoteProtocolError

__all__ = ["MAX_VARINT_LEN", "decode_varint", "encode_varint"]

#: multiformats caps unsigned varints at 9 bytes (63 bits).
MAX_VARINT_LEN = 9


def encode_varint(value: int) -> bytes:
    """Encode a non-negative integer below 2**63."""
    if not 0 <= value < 1 << 63:
        raise ValueError(f"varint out of range: {value}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_varint(data: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int] | None:
    """Decode a varint at `offset`; return (value, offset after it), or None if incomplete.

    Raises ProtocolError for a varint longer than 9 bytes or not minimally encoded.
    """
    value = 0
    for i in range(MAX_VARINT_LEN):
        pos = offset + i
        if pos >= len(data):
            return None
        byte = data[pos]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if byte == 0 and i > 0:
                raise RemoteProtocolError("varint is not minimally encoded")
            return value, pos + 1
    raise RemoteProtocolError("varint longer than 9 bytes")
