from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdcn_p2p.errors import MultiaddrError, RemoteProtocolError
from sdcn_p2p.identity import Identity
from sdcn_p2p.multiaddr import Multiaddr
from sdcn_p2p.wire.multiaddr import (
    MAX_BINARY_MULTIADDR,
    decode_components,
    decode_multiaddr,
    encode_multiaddr,
)

PEER = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"
# Written by the multiformats `multiaddr` package (py-libp2p's).
VECTORS = [
    ("/ip4/127.0.0.1/tcp/4001/ws", "047f000001060fa1dd03"),
    ("/ip6/::1/tcp/443/wss", "29000000000000000000000000000000010601bbde03"),
    (
        f"/ip4/1.2.3.4/tcp/4001/ws/p2p/{PEER}",
        "0401020304060fa1dd03a503260024080112202ffa35a99d3a3cfbb17bb7c1dc5561b18a8dcca4df38dc"
        "613ea859c37eb1336b",
    ),
]


@pytest.mark.parametrize(("text", "hex_bytes"), VECTORS)
def test_vectors(text: str, hex_bytes: str) -> None:
    addr = Multiaddr.parse(text)
    assert encode_multiaddr(addr).hex() == hex_bytes
    assert decode_multiaddr(bytes.fromhex(hex_bytes)) == addr


def test_tls_ws_reads_as_wss() -> None:
    data = bytes.fromhex(
        "360b6578616d706c652e636f6d060050c003dd03"
    )  # /dns4/example.com/tcp/80/tls/ws
    assert decode_multiaddr(data) == Multiaddr.parse("/dns4/example.com/tcp/80/wss")


@pytest.mark.parametrize(
    ("hex_bytes", "shape"),
    [
        ("040102030491020fa1cd03", "/ip4/udp/quic-v1"),
        ("0401020304060fa1", "/ip4/tcp"),
        ("0401020304060fa1dd03a202", "/ip4/tcp/ws/p2p-circuit"),
    ],
)
def test_other_shapes_are_read_but_not_dialled(hex_bytes: str, shape: str) -> None:
    data = bytes.fromhex(hex_bytes)
    assert "/" + "/".join(name for name, _ in decode_components(data)) == shape
    with pytest.raises(MultiaddrError, match="unsupported multiaddr"):
        decode_multiaddr(data)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x04\x01\x02", id="truncated-ip4"),
        pytest.param(b"\xff\x7f", id="unknown-code"),
        pytest.param(b"\x36\x05abc", id="truncated-name"),
        pytest.param(b"\x36", id="missing-length"),
        pytest.param(b"\x04" * (MAX_BINARY_MULTIADDR + 1), id="too-long"),
    ],
)
def test_malformed_bytes_are_remote_protocol_errors(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_multiaddr(data)


def test_invalid_values_are_multiaddr_errors() -> None:
    bad_name = bytes.fromhex("3603") + b"a_b" + bytes.fromhex("060050dd03")
    with pytest.raises(MultiaddrError):
        decode_multiaddr(bad_name)
    bad_peer = bytes.fromhex("0401020304060fa1dd03a50302ffff")
    with pytest.raises(MultiaddrError, match="peer id"):
        decode_multiaddr(bad_peer)


addrs = st.builds(
    lambda family, ip4, ip6, port, secure, seed: Multiaddr(
        family,
        str(ip4 if family == "ip4" else ip6),
        port,
        secure,
        Identity.from_seed(seed).peer_id if seed else None,
    ),
    st.sampled_from(["ip4", "ip6"]),
    st.ip_addresses(v=4),
    st.ip_addresses(v=6),
    st.integers(0, 65535),
    st.booleans(),
    st.none() | st.binary(min_size=32, max_size=32),
) | st.builds(
    lambda family, name, port, secure: Multiaddr(family, name, port, secure),
    st.sampled_from(["dns4", "dns6"]),
    st.from_regex(r"[a-z0-9]{1,10}(\.[a-z0-9]{1,10}){0,3}", fullmatch=True),
    st.integers(0, 65535),
    st.booleans(),
)


@settings(max_examples=200, deadline=None)
@given(addrs)
def test_round_trip(addr: Multiaddr) -> None:
    assert decode_multiaddr(encode_multiaddr(addr)) == addr


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_garbage_is_a_multiaddr_or_one_of_two_errors(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError, MultiaddrError):
        assert isinstance(decode_multiaddr(data), Multiaddr)


def test_agrees_with_the_multiformats_package() -> None:
    multiaddr = pytest.importorskip("multiaddr", reason="py-libp2p's multiaddr is not installed")
    for text in (
        "/ip4/10.0.0.1/tcp/1/ws",
        "/ip6/2001:db8::1/tcp/65535/wss",
        f"/dns6/x.y/tcp/9/ws/p2p/{PEER}",
    ):
        theirs = multiaddr.Multiaddr(text).to_bytes()
        assert encode_multiaddr(Multiaddr.parse(text)) == theirs
        assert str(decode_multiaddr(theirs)) == text
