"""Interop with real libp2p: py-libp2p (the `libp2p` package, pinned in the test extra).

Its host and ours, in one trio run, over real WebSockets on loopback: each dials the other
over ``/ws`` (multistream-select, Noise with 2-byte frames, yamux selected in the secure
channel, since py-libp2p does not offer muxers in its handshake), pings with
``/ipfs/ping/1.0.0`` and identifies with ``/ipfs/id/1.0.0``; a protocol the other side lacks
is answered ``na``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

libp2p = pytest.importorskip(
    "libp2p", reason="py-libp2p is not installed: pip install -e '.[test]' brings it"
)

import multiaddr  # noqa: E402 (py-libp2p's multiaddr package, installed with it)
from libp2p.crypto.ed25519 import create_new_key_pair  # noqa: E402
from libp2p.host.ping import PingService  # noqa: E402
from libp2p.identity.identify.identify import ID as PY_IDENTIFY  # noqa: E402
from libp2p.identity.identify.identify import parse_identify_response  # noqa: E402
from libp2p.peer.envelope import consume_envelope  # noqa: E402
from libp2p.peer.peerinfo import info_from_p2p_addr  # noqa: E402

from sdcn_p2p.cli import ping_peer  # noqa: E402
from sdcn_p2p.errors import UnsupportedProtocol  # noqa: E402
from sdcn_p2p.host import AGENT_VERSION, Host, HostConfig, open_host  # noqa: E402
from sdcn_p2p.identity import Identity  # noqa: E402
from sdcn_p2p.multiaddr import Multiaddr  # noqa: E402
from sdcn_p2p.protocols import libp2p_identify, ping  # noqa: E402

LOOPBACK_WS = "/ip4/127.0.0.1/tcp/0/ws"
UNKNOWN = "/sdcn/no-such-protocol/1.0.0"
# Generous: real sockets, and py-libp2p's own timeouts are seconds long.
TIMEOUT = 30


@asynccontextmanager
async def open_pair() -> AsyncIterator[tuple[Host, object]]:
    """Our host and a py-libp2p host, both listening on loopback /ws."""
    listen = [multiaddr.Multiaddr(LOOPBACK_WS)]
    theirs = libp2p.new_host(key_pair=create_new_key_pair(), listen_addrs=listen)
    config = HostConfig(listen=(Multiaddr.parse(LOOPBACK_WS),))
    with trio.fail_after(TIMEOUT):
        async with theirs.run(listen_addrs=listen), open_host(Identity.generate(), config) as ours:
            try:
                yield ours, theirs
            finally:
                # py-libp2p leaves the sockets it dialled open when its host stops.
                for peer in theirs.get_connected_peers():
                    await theirs.disconnect(peer)


def their_addr(theirs: object) -> Multiaddr:
    return Multiaddr.parse(str(theirs.get_addrs()[0]))  # type: ignore[attr-defined]


def our_info(ours: Host):  # type: ignore[no-untyped-def]
    addr = ours.listen_addrs[0].with_peer_id(ours.peer_id)
    return info_from_p2p_addr(multiaddr.Multiaddr(str(addr)))


async def test_py_libp2p_dials_us_pings_and_identifies() -> None:
    async with open_pair() as (ours, theirs):
        info = our_info(ours)
        await theirs.connect(info)
        rtts = await PingService(theirs).ping(info.peer_id, ping_amt=3)
        assert len(rtts) == 3

        stream = await theirs.new_stream(info.peer_id, [PY_IDENTIFY])
        message = parse_identify_response(await stream.read())
        assert message.agent_version == AGENT_VERSION
        assert message.protocol_version == libp2p_identify.PROTOCOL_VERSION
        assert set(message.protocols) >= {ping.PING, libp2p_identify.LIBP2P_IDENTIFY}
        assert [multiaddr.Multiaddr(a) for a in message.listen_addrs] == [
            multiaddr.Multiaddr(str(ours.listen_addrs[0]))
        ]
        _, record = consume_envelope(message.signedPeerRecord, "libp2p-peer-record")
        assert str(record.peer_id) == str(ours.peer_id)
        assert [str(a) for a in record.addrs] == [str(ours.listen_addrs[0])]
        # It saw us where we are: the observed address is our socket's port.
        observed = multiaddr.Multiaddr(message.observed_addr)
        assert observed.value_for_protocol("tcp") == str(their_connection_port(ours, theirs))


def their_connection_port(ours: Host, theirs: object) -> int:
    [conn] = ours._conns[next(iter(ours._conns))]
    assert conn.remote_addr is not None
    return conn.remote_addr.port


async def test_we_dial_py_libp2p_ping_and_identify() -> None:
    async with open_pair() as (ours, theirs):
        target = their_addr(theirs)
        identified = trio.Event()
        with ours.subscribe(on_identified=lambda peer: identified.set()):
            rtt = await ours.ping(target)
            await identified.wait()
        assert rtt > 0
        assert target.peer_id is not None
        peer = ours.peerstore.get(target.peer_id)
        assert peer is not None
        assert peer.agent_version.startswith("py-libp2p/")
        assert {ping.PING, libp2p_identify.LIBP2P_IDENTIFY} <= set(peer.protocols)
        assert target.without_peer_id() in peer.addrs

        conn = ours.connection(target.peer_id)
        assert conn is not None
        info = await libp2p_identify.query(conn)
        assert info.record is not None and info.record.peer_id == target.peer_id
        assert target.without_peer_id() in info.record.addrs


async def test_a_protocol_py_libp2p_lacks_is_refused_with_na() -> None:
    async with open_pair() as (ours, theirs):
        stream = await ours.new_stream(their_addr(theirs), UNKNOWN)
        await stream.send_all(b"lazily sent with the proposal")
        with pytest.raises(UnsupportedProtocol):
            await stream.receive_some()
        assert await ours.ping(their_addr(theirs)) > 0  # the connection is fine


async def test_a_protocol_we_lack_is_refused_with_na() -> None:
    async with open_pair() as (ours, theirs):
        info = our_info(ours)
        await theirs.connect(info)
        with pytest.raises(Exception) as caught:  # py-libp2p's StreamFailure
            await theirs.new_stream(info.peer_id, [UNKNOWN])
        causes = []
        error: BaseException | None = caught.value
        while error is not None:
            causes.append(str(error))
            error = error.__cause__ or error.__context__
        assert any("response='na'" in cause for cause in causes), causes
        assert len(await PingService(theirs).ping(info.peer_id, ping_amt=1)) == 1


async def test_sdcn_ping_pings_py_libp2p(capsys) -> None:
    async with open_pair() as (_, theirs):
        rtts = await ping_peer(their_addr(theirs), 2, 0)
    assert len(rtts) == 2 and all(rtt > 0 for rtt in rtts)
    assert f"connected to {their_addr(theirs).peer_id}" in capsys.readouterr().out
