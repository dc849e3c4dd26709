"""Multiaddrs for WebSocket listen and dial addresses.

Only the shapes SDCN uses are supported::

    /ip4|ip6|dns4|dns6/<host>/tcp/<port>/ws|wss[/p2p/<peer id>]

``/tls/ws`` is read as a synonym of ``/wss``; text is always written in canonical form, so
``str(Multiaddr.parse(s))`` round-trips.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from sdcn_p2p.errors import MultiaddrError
from sdcn_p2p.identity import PeerId

__all__ = ["MAX_MULTIADDR_LEN", "Multiaddr"]

#: Longest multiaddr text accepted by `Multiaddr.parse`, in characters.
MAX_MULTIADDR_LEN = 512

_FAMILIES = ("ip4", "ip6", "dns4", "dns6")
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", re.ASCII)
_MAX_DNS_NAME = 253


@dataclass(frozen=True, slots=True, repr=False)
class Multiaddr:
    """A WebSocket address of a peer, optionally naming the peer.

    The constructor validates and normalizes: IP addresses in `ipaddress` form (compressed IPv6),
    DNS names lowercased. Raises MultiaddrError when a field is invalid.
    """

    family: str
    host: str
    port: int
    secure: bool = False
    peer_id: PeerId | None = None

    def __post_init__(self) -> None:
        if self.family not in _FAMILIES:
            raise MultiaddrError(f"unsupported address family {self.family!r}")
        object.__setattr__(self, "host", _normalize_host(self.family, self.host))
        if type(self.port) is not int:
            raise MultiaddrError(f"port must be an int, not {type(self.port).__name__}")
        if not 0 <= self.port <= 65535:
            raise MultiaddrError(f"port {self.port} out of range")
        if type(self.secure) is not bool:
            raise MultiaddrError("secure must be a bool")
        if self.peer_id is not None and not isinstance(self.peer_id, PeerId):
            raise MultiaddrError(f"peer_id must be a PeerId, not {type(self.peer_id).__name__}")

    @classmethod
    def parse(cls, text: str) -> Multiaddr:
        """Parse multiaddr text; raises MultiaddrError saying what is wrong and where.

        A peer id may be in base58 or CIDv1 form; it is written back in base58.
        """
        if not isinstance(text, str):
            raise MultiaddrError(f"multiaddr must be a str, not {type(text).__name__}")
        if not text:
            raise MultiaddrError("empty multiaddr")
        if len(text) > MAX_MULTIADDR_LEN:
            raise MultiaddrError(
                f"multiaddr too long ({len(text)} characters, at most {MAX_MULTIADDR_LEN})"
            )
        try:
            return cls._parse_components(text)
        except MultiaddrError as exc:
            raise MultiaddrError(f"invalid multiaddr {text!r}: {exc}") from None

    @classmethod
    def _parse_components(cls, text: str) -> Multiaddr:
        parts = _Components(text)
        family = parts.take()
        if family not in _FAMILIES:
            raise parts.unsupported(family)
        host = parts.take()
        if host is None:
            raise MultiaddrError(f"missing host after /{family}")
        tcp = parts.take()
        if tcp is None:
            raise MultiaddrError("missing /tcp/<port>")
        if tcp != "tcp":
            raise parts.unsupported(tcp)
        port = parts.take()
        if port is None:
            raise MultiaddrError("missing port after /tcp")
        if not (port.isascii() and port.isdigit()):
            raise MultiaddrError(f"invalid port {port!r}")
        if int(port) > 65535:
            raise MultiaddrError(f"port {int(port)} out of range")

        transport = parts.take()
        if transport == "tls":
            after_tls = parts.take()
            if after_tls is None:
                raise MultiaddrError("missing /ws after /tls")
            if after_tls != "ws":
                raise parts.unsupported(after_tls)
            transport = "wss"
        if transport is None or transport == "p2p":
            raise MultiaddrError("missing /ws or /wss")
        if transport not in ("ws", "wss"):
            raise parts.unsupported(transport)

        peer_id = None
        p2p = parts.take()
        if p2p is not None:
            if p2p != "p2p":
                raise parts.unsupported(p2p)
            peer_text = parts.take()
            if peer_text is None:
                raise MultiaddrError("missing peer id after /p2p")
            try:
                peer_id = PeerId.from_string(peer_text)
            except ValueError as exc:
                raise MultiaddrError(f"invalid peer id {peer_text!r}: {exc}") from None
            extra = parts.take()
            if extra is not None:
                raise MultiaddrError(
                    f"/p2p/<peer id> must be last, found {extra!r} at position {parts.position}"
                )
        return cls(family, host, int(port), transport == "wss", peer_id)

    def __str__(self) -> str:
        text = f"/{self.family}/{self.host}/tcp/{self.port}/{'wss' if self.secure else 'ws'}"
        if self.peer_id is not None:
            text += f"/p2p/{self.peer_id}"
        return text

    def __repr__(self) -> str:
        return f"Multiaddr({str(self)!r})"

    def with_peer_id(self, peer_id: PeerId) -> Multiaddr:
        if not isinstance(peer_id, PeerId):
            raise MultiaddrError(f"peer_id must be a PeerId, not {type(peer_id).__name__}")
        return self._with(peer_id)

    def without_peer_id(self) -> Multiaddr:
        return self if self.peer_id is None else self._with(None)

    def _with(self, peer_id: PeerId | None) -> Multiaddr:
        # The other fields are valid already: skip __post_init__'s parsing.
        addr = object.__new__(Multiaddr)
        for name in ("family", "host", "port", "secure"):
            object.__setattr__(addr, name, getattr(self, name))
        object.__setattr__(addr, "peer_id", peer_id)
        return addr

    @property
    def url(self) -> str:
        """The WebSocket URL to dial, e.g. ``wss://[::1]:443/``."""
        host = f"[{self.host}]" if self.family == "ip6" else self.host
        return f"{'wss' if self.secure else 'ws'}://{host}:{self.port}/"

    @property
    def is_loopback(self) -> bool:
        """Whether the host is a loopback address (or the name ``localhost``)."""
        if self.family in ("dns4", "dns6"):
            return self.host == "localhost" or self.host.endswith(".localhost")
        return ipaddress.ip_address(self.host).is_loopback

    @property
    def is_unspecified(self) -> bool:
        """Whether the host is ``0.0.0.0`` or ``::`` (listen on every interface)."""
        if self.family in ("dns4", "dns6"):
            return False
        return ipaddress.ip_address(self.host).is_unspecified


def _normalize_host(family: str, host: object) -> str:
    if not isinstance(host, str):
        raise MultiaddrError(f"host must be a str, not {type(host).__name__}")
    if family == "ip4":
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError:
            raise MultiaddrError(f"invalid IPv4 address {host!r}") from None
    if family == "ip6":
        # A zone ("fe80::1%eth0") is valid for ipaddress but is not part of /ip6.
        if "%" in host:
            raise MultiaddrError(f"invalid IPv6 address {host!r} (zones are not supported)")
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError:
            raise MultiaddrError(f"invalid IPv6 address {host!r}") from None
    return _normalize_dns_name(host)


def _normalize_dns_name(name: str) -> str:
    """Check an RFC 1123 host name and lowercase it."""
    # Check ASCII before lowercasing: str.lower() maps some non-ASCII letters to ASCII ones.
    if not name.isascii():
        raise MultiaddrError(f"invalid DNS name {name!r}: not ASCII (use punycode)")
    name = name.lower()
    if len(name) > _MAX_DNS_NAME:
        raise MultiaddrError(f"invalid DNS name {name!r}: longer than {_MAX_DNS_NAME} characters")
    for label in name.split("."):
        if not label:
            raise MultiaddrError(f"invalid DNS name {name!r}: empty label")
        if len(label) > 63:
            raise MultiaddrError(f"invalid DNS name {name!r}: label longer than 63 characters")
        if not _DNS_LABEL.fullmatch(label):
            raise MultiaddrError(
                f"invalid DNS name {name!r}: label {label!r} must be letters, digits and "
                "inner hyphens"
            )
    return name


class _Components:
    """The '/'-separated components of multiaddr text, taken front to back."""

    def __init__(self, text: str) -> None:
        if not text.startswith("/"):
            raise MultiaddrError("must start with '/'")
        self._parts = text[1:].split("/")
        for position, part in enumerate(self._parts, 1):
            if not part:
                raise MultiaddrError(f"empty component at position {position}")
        self.position = 0  # 1-based position of the component taken last

    def take(self) -> str | None:
        """The next component, or None at the end."""
        if self.position == len(self._parts):
            return None
        self.position += 1
        return self._parts[self.position - 1]

    def unsupported(self, part: str) -> MultiaddrError:
        return MultiaddrError(f"unsupported protocol {part!r} at position {self.position}")
