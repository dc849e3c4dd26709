from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdcn_p2p.errors import MultiaddrError
from sdcn_p2p.identity import Identity, PeerId
from sdcn_p2p.multiaddr import MAX_MULTIADDR_LEN, Multiaddr

PEER = Identity.from_seed(bytes(32)).peer_id
FUZZ = settings(max_examples=200, deadline=None)


@pytest.mark.parametrize(
    "text",
    [
        "/ip4/1.2.3.4/tcp/80/ws",
        "/ip4/0.0.0.0/tcp/0/ws",
        "/ip6/::1/tcp/443/wss",
        "/ip6/2001:db8::1/tcp/4001/ws",
        "/dns4/example.com/tcp/80/ws",
        "/dns6/a-b.example.org/tcp/65535/wss",
        "/dns4/localhost/tcp/8080/ws",
        f"/ip4/127.0.0.1/tcp/9000/ws/p2p/{PEER}",
        "/ip4/1.2.3.4/tcp/1/wss/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",
    ],
)
def test_canonical_text_round_trips(text: str) -> None:
    addr = Multiaddr.parse(text)
    assert str(addr) == text
    assert Multiaddr.parse(str(addr)) == addr


def test_fields_of_a_parsed_address() -> None:
    addr = Multiaddr.parse(f"/ip6/::1/tcp/443/wss/p2p/{PEER}")
    assert addr == Multiaddr("ip6", "::1", 443, secure=True, peer_id=PEER)
    assert repr(addr) == f"Multiaddr('/ip6/::1/tcp/443/wss/p2p/{PEER}')"


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("/ip6/0:0:0:0:0:0:0:1/tcp/1/ws", "/ip6/::1/tcp/1/ws"),
        ("/ip6/2001:DB8:0:0:0::1/tcp/1/ws", "/ip6/2001:db8::1/tcp/1/ws"),
        ("/ip6/0::0/tcp/1/ws", "/ip6/::/tcp/1/ws"),
        ("/dns4/Example.COM/tcp/1/ws", "/dns4/example.com/tcp/1/ws"),
        ("/ip4/1.2.3.4/tcp/0080/ws", "/ip4/1.2.3.4/tcp/80/ws"),
        ("/ip4/1.2.3.4/tcp/443/tls/ws", "/ip4/1.2.3.4/tcp/443/wss"),
        (f"/ip4/1.2.3.4/tcp/1/tls/ws/p2p/{PEER}", f"/ip4/1.2.3.4/tcp/1/wss/p2p/{PEER}"),
    ],
)
def test_parse_normalizes(text: str, canonical: str) -> None:
    assert str(Multiaddr.parse(text)) == canonical


def test_peer_id_in_cid_form_is_written_in_base58() -> None:
    addr = Multiaddr.parse(f"/ip4/1.2.3.4/tcp/80/ws/p2p/{PEER.to_cid()}")
    assert addr.peer_id == PEER
    assert str(addr) == f"/ip4/1.2.3.4/tcp/80/ws/p2p/{PEER}"
    assert str(PEER).startswith("12D3KooW")


def test_constructor_normalizes_too() -> None:
    assert Multiaddr("ip6", "0:0::1", 1).host == "::1"
    assert Multiaddr("dns4", "EXAMPLE.com", 1).host == "example.com"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty multiaddr"),
        ("/" + "a" * MAX_MULTIADDR_LEN, "too long"),
        ("ip4/1.2.3.4/tcp/80/ws", "must start with '/'"),
        ("/", "empty component at position 1"),
        ("/ip4//tcp/80/ws", "empty component at position 2"),
        ("/ip4/1.2.3.4/tcp/80/ws/", "empty component at position 6"),
        ("/ip5/1.2.3.4/tcp/80/ws", "unsupported protocol 'ip5' at position 1"),
        ("/p2p/" + str(PEER), "unsupported protocol 'p2p' at position 1"),
        ("/ip4", "missing host after /ip4"),
        ("/ip4/1.2.3.4", r"missing /tcp/<port>"),
        ("/ip4/1.2.3.4/udp/53/ws", "unsupported protocol 'udp' at position 3"),
        ("/ip4/1.2.3.4/tcp", "missing port after /tcp"),
        ("/ip4/1.2.3.4/tcp/http/ws", "invalid port 'http'"),
        ("/ip4/1.2.3.4/tcp/-1/ws", "invalid port '-1'"),
        ("/ip4/1.2.3.4/tcp/+80/ws", r"invalid port '\+80'"),
        ("/ip4/1.2.3.4/tcp/८०/ws", "invalid port"),  # non-ASCII digits
        ("/ip4/1.2.3.4/tcp/70000/ws", "port 70000 out of range"),
        ("/ip4/1.2.3.4/tcp/80", "missing /ws or /wss"),
        (f"/ip4/1.2.3.4/tcp/80/p2p/{PEER}", "missing /ws or /wss"),
        ("/ip4/1.2.3.4/tcp/80/http", "unsupported protocol 'http' at position 5"),
        ("/ip4/1.2.3.4/tcp/80/tls", "missing /ws after /tls"),
        ("/ip4/1.2.3.4/tcp/80/tls/http", "unsupported protocol 'http' at position 6"),
        ("/ip4/1.2.3.4/tcp/80/ws/webrtc", "unsupported protocol 'webrtc' at position 6"),
        ("/ip4/1.2.3.4/tcp/80/ws/p2p", "missing peer id after /p2p"),
        ("/ip4/1.2.3.4/tcp/80/ws/p2p/12D3KooW0", "invalid peer id '12D3KooW0'"),
        (f"/ip4/1.2.3.4/tcp/80/ws/p2p/{str(PEER)[:-1]}", "invalid peer id .*wrong length"),
        ("/ip4/1.2.3.4/tcp/80/ws/p2p/hello", "invalid peer id 'hello'"),
        (f"/ip4/1.2.3.4/tcp/80/ws/p2p/{PEER}/ws", "must be last, found 'ws' at position 8"),
        ("/ip4/1.2.3/tcp/80/ws", "invalid IPv4 address '1.2.3'"),
        ("/ip4/1.2.3.256/tcp/80/ws", "invalid IPv4 address"),
        ("/ip4/01.2.3.4/tcp/80/ws", "invalid IPv4 address"),
        ("/ip4/::1/tcp/80/ws", "invalid IPv4 address"),
        ("/ip6/1.2.3.4/tcp/80/ws", "invalid IPv6 address"),
        ("/ip6/1::2::3/tcp/80/ws", "invalid IPv6 address"),
        ("/ip6/fe80::1%eth0/tcp/80/ws", "zones are not supported"),
        ("/dns4/-example.com/tcp/80/ws", "label '-example'"),
        ("/dns4/example-.com/tcp/80/ws", "label 'example-'"),
        ("/dns4/exa_mple.com/tcp/80/ws", "label 'exa_mple'"),
        ("/dns4/example..com/tcp/80/ws", "empty label"),
        ("/dns4/example.com./tcp/80/ws", "empty label"),
        ("/dns4/" + "a" * 64 + ".com/tcp/80/ws", "label longer than 63"),
        ("/dns4/" + ".".join(["a" * 63] * 4) + "/tcp/80/ws", "longer than 253"),
        ("/dns4/bücher.de/tcp/80/ws", "not ASCII"),
        ("/dns4/\u212aelvin.com/tcp/80/ws", "not ASCII"),  # KELVIN SIGN lowercases to 'k'
    ],
)
def test_parse_errors_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(MultiaddrError, match=message):
        Multiaddr.parse(text)


def test_multiaddr_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        Multiaddr.parse("/ip4/1.2.3.4/tcp/80")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"family": "ip7", "host": "1.2.3.4", "port": 1}, "unsupported address family"),
        ({"family": "ip4", "host": b"1.2.3.4", "port": 1}, "host must be a str"),
        ({"family": "ip4", "host": "1.2.3.4", "port": 65536}, "out of range"),
        ({"family": "ip4", "host": "1.2.3.4", "port": True}, "port must be an int"),
        ({"family": "ip4", "host": "1.2.3.4", "port": 1, "secure": 1}, "secure must be a bool"),
        ({"family": "ip4", "host": "1.2.3.4", "port": 1, "peer_id": str(PEER)}, "PeerId"),
    ],
)
def test_constructor_rejects_invalid_fields(kwargs: dict, message: str) -> None:
    with pytest.raises(MultiaddrError, match=message):
        Multiaddr(**kwargs)


def test_parse_rejects_non_strings() -> None:
    with pytest.raises(MultiaddrError, match="must be a str"):
        Multiaddr.parse(b"/ip4/1.2.3.4/tcp/80/ws")  # type: ignore[arg-type]


def test_with_and_without_peer_id() -> None:
    addr = Multiaddr.parse("/ip4/1.2.3.4/tcp/80/ws")
    named = addr.with_peer_id(PEER)
    assert named.peer_id == PEER
    assert str(named) == f"/ip4/1.2.3.4/tcp/80/ws/p2p/{PEER}"
    assert named.without_peer_id() == addr
    assert addr.peer_id is None  # frozen: the original is unchanged


@pytest.mark.parametrize(
    ("text", "url"),
    [
        ("/ip4/1.2.3.4/tcp/80/ws", "ws://1.2.3.4:80/"),
        ("/ip6/::1/tcp/443/wss", "wss://[::1]:443/"),
        ("/dns4/example.com/tcp/80/ws", "ws://example.com:80/"),
        (f"/dns6/example.com/tcp/443/wss/p2p/{PEER}", "wss://example.com:443/"),
    ],
)
def test_url(text: str, url: str) -> None:
    assert Multiaddr.parse(text).url == url


@pytest.mark.parametrize(
    ("text", "loopback", "unspecified"),
    [
        ("/ip4/127.0.0.1/tcp/1/ws", True, False),
        ("/ip4/127.1.2.3/tcp/1/ws", True, False),
        ("/ip6/::1/tcp/1/ws", True, False),
        ("/ip4/0.0.0.0/tcp/1/ws", False, True),
        ("/ip6/::/tcp/1/ws", False, True),
        ("/ip4/192.168.1.2/tcp/1/ws", False, False),
        ("/dns4/localhost/tcp/1/ws", True, False),
        ("/dns4/foo.localhost/tcp/1/ws", True, False),
        ("/dns4/example.com/tcp/1/ws", False, False),
    ],
)
def test_loopback_and_unspecified(text: str, loopback: bool, unspecified: bool) -> None:
    addr = Multiaddr.parse(text)
    assert addr.is_loopback is loopback
    assert addr.is_unspecified is unspecified


def test_addresses_are_hashable_values() -> None:
    a = Multiaddr.parse("/ip6/0::1/tcp/1/ws")
    b = Multiaddr.parse("/ip6/::1/tcp/1/ws")
    assert a == b
    assert len({a, b}) == 1


_DNS_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
_DNS_NAME = st.lists(_DNS_LABEL, min_size=1, max_size=4).map(".".join)
_PEER_ID = st.one_of(
    st.binary(min_size=32, max_size=32).map(lambda seed: Identity.from_seed(seed).peer_id),
    st.binary(min_size=32, max_size=32).map(lambda digest: PeerId(b"\x12\x20" + digest)),
)
_FAMILY_AND_HOST = st.one_of(
    st.tuples(st.just("ip4"), st.ip_addresses(v=4).map(str)),
    st.tuples(st.just("ip6"), st.ip_addresses(v=6).map(str)),
    st.tuples(st.sampled_from(["dns4", "dns6"]), _DNS_NAME),
)
_MULTIADDR = st.builds(
    lambda family_and_host, port, secure, peer_id: Multiaddr(
        *family_and_host, port, secure, peer_id
    ),
    _FAMILY_AND_HOST,
    st.integers(min_value=0, max_value=65535),
    st.booleans(),
    st.none() | _PEER_ID,
)


@FUZZ
@given(_MULTIADDR)
def test_generated_addresses_round_trip(addr: Multiaddr) -> None:
    text = str(addr)
    assert Multiaddr.parse(text) == addr
    assert str(Multiaddr.parse(text)) == text


@FUZZ
@given(
    st.lists(
        st.sampled_from(["", "ip4", "ip6", "dns4", "tcp", "ws", "wss", "tls", "p2p", "1.2.3.4"])
        | st.text(max_size=12),
        max_size=9,
    ).map("/".join)
)
def test_parse_raises_only_multiaddr_error(text: str) -> None:
    try:
        addr = Multiaddr.parse(text)
    except MultiaddrError:
        return
    assert Multiaddr.parse(str(addr)) == addr
