import ast
from pathlib import Path

import pytest

from sdcn_p2p.errors import ProtocolError
from sdcn_p2p.protocols import identify
from sdcn_p2p.testing import open_memory_hosts


async def info_from(a, b) -> dict:
    conn = await a.connect(b.listen_addrs[0].with_peer_id(b.peer_id))
    return identify.build_info(b.identify_snapshot(), conn), conn


async def test_build_and_parse_round_trip(autojump_clock) -> None:
    async with open_memory_hosts(2) as (a, b):
        message, conn_from_a = await info_from(a, b)
        parsed = identify.parse_info(message, conn_from_a)
        assert parsed.record.peer_id == b.peer_id
        assert list(parsed.listen_addrs) == b.listen_addrs
        assert identify.IDENTIFY in parsed.protocols


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("record", b"garbage", "bad identify message"),
        ("listen_addrs", ["/ip4/1.2.3.4/udp/1"], "bad identify message"),
        ("protocols", ["x"] * 65, "at most 64"),
        ("protocols", [7], "short strings"),
        ("agent_version", "v" * 200, "agent_version"),
    ],
)
async def test_malformed_identify_messages_are_rejected(autojump_clock, field, value, match):
    async with open_memory_hosts(2) as (a, b):
        message, conn = await info_from(a, b)
        message[field] = value
        with pytest.raises(ProtocolError, match=match):
            identify.parse_info(message, conn)


async def test_a_record_of_another_peer_is_rejected(autojump_clock) -> None:
    async with open_memory_hosts(3) as (a, b, c):
        message, conn = await info_from(a, b)
        message["record"] = c.signed_record.to_bytes()
        with pytest.raises(ProtocolError, match="another peer"):
            identify.parse_info(message, conn)


def test_identify_does_not_import_the_host() -> None:
    # It sends what the Host snapshots and returns what it learned: the Host applies it.
    nodes = list(ast.walk(ast.parse(Path(identify.__file__).read_text())))
    imported = {n.module for n in nodes if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in nodes if isinstance(n, ast.Import) for a in n.names}
    assert "sdcn_p2p.host" not in imported
