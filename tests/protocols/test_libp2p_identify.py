import ast
import contextlib
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from sdcn_p2p.errors import ProtocolError, RemoteProtocolError
from sdcn_p2p.host import AGENT_VERSION
from sdcn_p2p.protocols import identify, libp2p_identify
from sdcn_p2p.testing import open_memory_hosts, test_identity
from sdcn_p2p.wire.libp2p import IdentifyMessage
from sdcn_p2p.wire.varint import encode_varint

PEER = test_identity(1).peer_id


async def test_query_learns_what_the_peer_announces(autojump_clock) -> None:
    async with open_memory_hosts(2) as (a, b):
        conn = await a.connect(b.listen_addrs[0].with_peer_id(b.peer_id))
        info = await libp2p_identify.query(conn)
        assert info.protocol_version == libp2p_identify.PROTOCOL_VERSION
        assert info.agent_version == AGENT_VERSION
        assert list(info.listen_addrs) == b.listen_addrs
        assert info.observed_addr == conn.local_addr
        assert info.protocols == tuple(b.protocols)
        assert info.record is not None
        assert info.record.peer_id == b.peer_id and list(info.record.addrs) == b.listen_addrs


async def test_a_peer_without_our_identify_is_identified_with_libp2ps(autojump_clock) -> None:
    async with open_memory_hosts(2) as (a, b):
        b.remove_handler(identify.IDENTIFY)  # as a libp2p peer that is no SDCN peer
        identified = trio.Event()
        with a.subscribe(on_identified=lambda peer: identified.set()):
            await a.connect(b.listen_addrs[0].with_peer_id(b.peer_id))
            await identified.wait()
        info = a.peerstore.get(b.peer_id)
        assert info is not None
        assert info.protocols == tuple(b.protocols)
        assert info.agent_version == AGENT_VERSION
        assert info.addrs == b.listen_addrs
        assert info.roles == () and info.record is None


def message(**fields) -> bytes:  # type: ignore[no-untyped-def]
    body = IdentifyMessage(**fields).encode()
    return encode_varint(len(body)) + body


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (IdentifyMessage(agent_version="a").encode(), "length-prefixed"),
        (message(public_key=test_identity(2).public_key_bytes), "another peer"),
        (message(public_key=b"junk"), "unusable"),
        (message(signed_peer_record=b"\x0a\x01"), "peer record"),
        (message(protocols=("/p",) * (libp2p_identify.MAX_LIST + 1)), "over 256"),
        (message(agent_version="v" * 200), "agentVersion"),
    ],
)
def test_bad_messages_are_rejected(data: bytes, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        libp2p_identify.parse_message(data, PEER)


def test_entries_we_cannot_use_are_skipped() -> None:
    quic = bytes.fromhex("040102030491020fa1cd03")
    info = libp2p_identify.parse_message(
        message(listen_addrs=(quic, b"\xff\xff"), protocols=("", "/ok/1", "x" * 500)), PEER
    )
    assert info.listen_addrs == () and info.protocols == ("/ok/1",)
    assert info.record is None and info.agent_version == ""


async def test_another_peers_record_is_rejected(autojump_clock) -> None:
    async with open_memory_hosts(2) as (a, b):
        record = b.libp2p_signed_record.to_protobuf()
        with pytest.raises(RemoteProtocolError, match="another peer"):
            libp2p_identify.parse_message(message(signed_peer_record=record), a.peer_id)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_only_raises_protocol_errors(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        libp2p_identify.parse_message(encode_varint(len(data)) + data, PEER)


def test_libp2p_identify_does_not_import_the_host() -> None:
    nodes = list(ast.walk(ast.parse(Path(libp2p_identify.__file__).read_text())))
    imported = {n.module for n in nodes if isinstance(n, ast.ImportFrom)}
    assert "sdcn_p2p.host" not in imported
