import pytest
import trio

from sdcn_p2p.errors import ProtocolError
from sdcn_p2p.protocols.ping import MAX_PINGS_PER_STREAM, PING, ping_once
from sdcn_p2p.testing import open_memory_hosts
from sdcn_p2p.transport.memory import MemoryNetwork


async def test_ping_measures_the_round_trip(autojump_clock) -> None:
    async with open_memory_hosts(2, network=MemoryNetwork(latency=0.025)) as (a, b):
        target = b.listen_addrs[0].with_peer_id(b.peer_id)
        await a.connect(target)
        assert await a.ping(b.peer_id) == pytest.approx(0.05)


async def test_responder_echoes_a_bounded_number_of_pings_per_stream(autojump_clock) -> None:
    async with open_memory_hosts(2) as (a, b):
        stream = await a.new_stream(b.listen_addrs[0].with_peer_id(b.peer_id), PING)
        for _ in range(MAX_PINGS_PER_STREAM):
            await ping_once(stream)
        with pytest.raises(ProtocolError, match="ended"):
            await ping_once(stream)


async def test_a_wrong_echo_is_a_protocol_error(autojump_clock) -> None:
    async with open_memory_hosts(2) as (a, b):

        async def liar(stream) -> None:
            await stream.receive_some(32)
            await stream.send_all(b"\0" * 32)
            await trio.sleep_forever()

        b.set_handler(PING, liar)
        with pytest.raises(ProtocolError, match="wrong bytes"):
            await a.ping(b.listen_addrs[0].with_peer_id(b.peer_id))
