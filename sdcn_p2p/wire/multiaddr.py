"""Binary multiaddrs, as identify, peer records and the DHT of libp2p carry them.

A binary multiaddr is a sequence of components, each ``varint(protocol code)`` followed by its
value: fixed-size for IP addresses and ports, ``varint(len) + bytes`` for names and peer ids,
nothing for ``ws``, ``wss``, ``tls`` and the like. `decode_components` reads any multiaddr
whose protocols it knows (so a peer's QUIC or circuit addresses are read, then skipped by the
caller); `decode_multiaddr` turns the shapes SDCN dials into a `Multiaddr`
(``/tls/ws`` read as ``/wss``); `encode_multiaddr` writes one.
"""

from __future__ import annotations

import ipaddress

from sdcn_p2p.errors import MultiaddrError, RemoteProtocolError
from sdcn_p2p.identity import PeerId
from sdcn_p2p.multiaddr import Multiaddr
from sdcn_p2p.wire.varint import decode_varint, encode_varint

__all__ = ["MAX_BINARY_MULTIADDR", "decode_components", "decode_multiaddr", "encode_multiaddr"]

#: Longest binary multiaddr decoded, in bytes.
MAX_BINARY_MULTIADDR = 1024

_VARIABLE = -1
# code -> (name, value size in bytes or _VARIABLE), from the multiformats table.
_PROTOCOLS: dict[int, tuple[str, int]] = {
    4: ("ip4", 4),
    6: ("tcp", 2),
    33: ("dccp", 2),
    41: ("ip6", 16),
    42: ("ip6zone", _VARIABLE),
    43: ("ipcidr", 1),
    53: ("dns", _VARIABLE),
    54: ("dns4", _VARIABLE),
    55: ("dns6", _VARIABLE),
    56: ("dnsaddr", _VARIABLE),
    132: ("sctp", 2),
    273: ("udp", 2),
    275: ("p2p-webrtc-star", 0),
    276: ("p2p-webrtc-direct", 0),
    277: ("p2p-stardust", 0),
    280: ("webrtc-direct", 0),
    281: ("webrtc", 0),
    290: ("p2p-circuit", 0),
    301: ("udt", 0),
    302: ("utp", 0),
    400: ("unix", _VARIABLE),
    421: ("p2p", _VARIABLE),
    443: ("https", 0),
    444: ("onion", 12),
    445: ("onion3", 37),
    446: ("garlic64", _VARIABLE),
    447: ("garlic32", _VARIABLE),
    448: ("tls", 0),
    449: ("sni", _VARIABLE),
    454: ("noise", 0),
    460: ("quic", 0),
    461: ("quic-v1", 0),
    465: ("webtransport", 0),
    466: ("certhash", _VARIABLE),
    477: ("ws", 0),
    478: ("wss", 0),
    479: ("p2p-websocket-star", 0),
    480: ("http", 0),
    481: ("http-path", _VARIABLE),
}
_CODES = {name: code for code, (name, _) in _PROTOCOLS.items()}


def _component(name: str, value: bytes = b"") -> bytes:
    size = _PROTOCOLS[_CODES[name]][1]
    prefix = encode_varint(len(value)) if size == _VARIABLE else b""
    return encode_varint(_CODES[name]) + prefix + value


def encode_multiaddr(addr: Multiaddr) -> bytes:
    """The binary form of `addr` (``/wss`` written as ``wss``)."""
    if addr.family in ("ip4", "ip6"):
        host = ipaddress.ip_address(addr.host).packed
    else:
        host = addr.host.encode("ascii")
    parts = [
        _component(addr.family, host),
        _component("tcp", addr.port.to_bytes(2, "big")),
        _component("wss" if addr.secure else "ws"),
    ]
    if addr.peer_id is not None:
        parts.append(_component("p2p", addr.peer_id.bytes))
    return b"".join(parts)


def decode_components(data: bytes | bytearray | memoryview) -> list[tuple[str, bytes]]:
    """Split a binary multiaddr into (protocol name, raw value) pairs.

    Raises RemoteProtocolError for an empty or over-long one, an unknown protocol code (its
    size cannot be known), a bad varint or a truncated value.
    """
    data = bytes(data)
    if not data:
        raise RemoteProtocolError("empty binary multiaddr")
    if len(data) > MAX_BINARY_MULTIADDR:
        raise RemoteProtocolError(f"binary multiaddr over {MAX_BINARY_MULTIADDR} bytes")
    components = []
    offset = 0
    while offset < len(data):
        code, offset = _varint(data, offset)
        known = _PROTOCOLS.get(code)
        if known is None:
            raise RemoteProtocolError(f"unknown multiaddr protocol code {code}")
        name, size = known
        if size == _VARIABLE:
            size, offset = _varint(data, offset)
        end = offset + size
        if end > len(data):
            raise RemoteProtocolError(f"binary multiaddr truncated in /{name}")
        components.append((name, data[offset:end]))
        offset = end
    return components


def _varint(data: bytes, offset: int) -> tuple[int, int]:
    decoded = decode_varint(data, offset)
    if decoded is None:
        raise RemoteProtocolError("binary multiaddr ends inside a varint")
    return decoded


def decode_multiaddr(data: bytes | bytearray | memoryview) -> Multiaddr:
    """Decode a binary multiaddr of a shape SDCN dials:
    ``/ip4|ip6|dns4|dns6/<host>/tcp/<port>/ws|wss|tls/ws[/p2p/<id>]``.

    Raises RemoteProtocolError when the bytes are malformed (`decode_components`), and
    MultiaddrError for a well-formed multiaddr of another shape or with an invalid value.
    """
    components = decode_components(data)
    names = [name for name, _ in components]
    if names[1:3] == ["tcp", "tls"] and names[3:4] == ["ws"]:
        del components[2]  # /tls/ws is /wss
        components[2] = ("wss", b"")
        names = [name for name, _ in components]
    shape = names[:3]
    if (
        len(names) not in (3, 4)
        or shape[0] not in ("ip4", "ip6", "dns4", "dns6")
        or shape[1:] not in (["tcp", "ws"], ["tcp", "wss"])
        or names[3:] not in ([], ["p2p"])
    ):
        raise MultiaddrError(f"unsupported multiaddr /{'/'.join(names)}")
    (family, host_bytes), (_, port_bytes), (transport, _) = components[:3]
    if family in ("ip4", "ip6"):
        host = str(ipaddress.ip_address(host_bytes))
    else:
        try:
            host = host_bytes.decode("ascii")
        except UnicodeDecodeError:
            raise MultiaddrError(f"invalid DNS name {host_bytes!r}") from None
    peer_id = None
    if len(components) == 4:
        try:
            peer_id = PeerId(components[3][1])
        except ValueError as exc:
            raise MultiaddrError(f"invalid peer id in multiaddr: {exc}") from None
    return Multiaddr(family, host, int.from_bytes(port_bytes, "big"), transport == "wss", peer_id)
