"""Streams keep trio's contract, and a Host survives hostile peers.

Every attack ends only the attacker's connection (or stream): afterwards the victim holds
nothing from the attacker, still serves an honest peer, and leaves no task behind once closed.
All of it runs on the in-memory network under MockClock (the `autojump_clock` fixture).
"""

from __future__ import annotations

import logging
import random
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress

import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from sdcn_p2p.connection import (
    MAX_PROTOCOL_ID,
    SecureChannel,
    Stream,
    noise_credentials,
    secure_outbound,
)
from sdcn_p2p.errors import DialError, StreamReset
from sdcn_p2p.host import PROTOCOL_HEADER_TIMEOUT, Host, HostConfig, open_host
from sdcn_p2p.identity import Identity
from sdcn_p2p.multiaddr import Multiaddr
from sdcn_p2p.protocols.ping import PING
from sdcn_p2p.testing import TamperingTransport, all_tasks, open_memory_hosts, test_identity
from sdcn_p2p.transport import RawConnection
from sdcn_p2p.transport.memory import MemoryNetwork
from sdcn_p2p.wire import multistream, noise, yamux
from sdcn_p2p.wire.libp2p import NoiseHandshakePayload
from sdcn_p2p.wire.varint import encode_varint

ACCEPT = "/test/accept/1.0.0"
ECHO = "/test/echo/1.0.0"
HOLD = "/test/hold/1.0.0"
BOOM = "/test/boom/1.0.0"


# --- helpers -------------------------------------------------------------------------------------


@contextmanager
def no_task_left_behind() -> Iterator[None]:
    before = all_tasks()
    yield
    assert all_tasks() == before


def dial_addr(host: Host) -> Multiaddr:
    return host.listen_addrs[0].with_peer_id(host.peer_id)


def multistream_message(token: bytes) -> bytes:
    return encode_varint(len(token) + 1) + token + b"\n"


def protocol_header(protocol: bytes) -> bytes:
    """What a lazy dialer writes first, and a listener answers when it accepts: the
    multistream-select header and the protocol."""
    return multistream_message(multistream.PROTOCOL_ID.encode()) + multistream_message(protocol)


async def echo_handler(stream: Stream) -> None:
    while data := await stream.receive_some():
        await stream.send_all(data)


async def assert_recovered(victim: Host, honest: Host) -> None:
    """The victim holds no connection (the attacker's is gone) and still serves `honest`."""
    await trio.testing.wait_all_tasks_blocked()
    assert victim.num_connections == 0
    await honest.ping(dial_addr(victim))
    assert victim.connected_peers == [honest.peer_id]
    assert victim.num_connections == 1


class RawPeer:
    """A hand-driven client: a real Noise handshake, then yamux frames the test writes.

    It serves nothing: streams the victim opens (identify) are reset at once.
    """

    def __init__(self, channel: SecureChannel, identity: Identity) -> None:
        self.channel = channel
        self.peer_id = identity.peer_id
        self.session = yamux.YamuxSession(is_client=True)

    async def flush(self) -> None:
        if data := self.session.data_to_send():
            await self.channel.send_all(data)

    async def next_events(self) -> list[yamux.Event]:
        """The events of the victim's next transport message."""
        events = self.session.receive_data(await self.channel.receive_some())
        for event in events:
            if isinstance(event, yamux.StreamOpened):
                self.session.reset_stream(event.stream_id)
        # The victim may have hung up already; the next receive says so.
        with suppress(trio.BrokenResourceError):
            await self.flush()
        return events

    async def wait_for(self, wanted: yamux.Event) -> None:
        while wanted not in await self.next_events():
            pass

    async def events_until_closed(self) -> list[yamux.Event]:
        """Every event until the victim closes the connection."""
        events: list[yamux.Event] = []
        with suppress(trio.EndOfChannel, trio.BrokenResourceError):
            while True:
                events += await self.next_events()
        return events

    async def ping(self) -> None:
        """Run the ping protocol on a new stream, as a Host would."""
        payload = bytes(range(32))
        stream_id = self.session.open_stream()
        self.session.send(stream_id, protocol_header(PING.encode()) + payload)
        await self.flush()
        received = b""
        accepted = protocol_header(PING.encode())
        while len(received) < len(accepted) + len(payload):
            for event in await self.next_events():
                if isinstance(event, yamux.DataReceived) and event.stream_id == stream_id:
                    received += event.data
        assert received == accepted + payload  # the answer "accepted", then the echo


@asynccontextmanager
async def open_raw_peer(network: MemoryNetwork, victim: Host) -> AsyncIterator[RawPeer]:
    identity = test_identity(0, seed=99)
    raw = await network.transport().dial(victim.listen_addrs[0])
    try:
        channel, remote = await secure_outbound(raw, noise_credentials(identity), victim.peer_id)
        assert remote == victim.peer_id
        yield RawPeer(channel, identity)
    finally:
        await raw.aclose()


# --- 1. trio's stream conformance ----------------------------------------------------------------


async def test_streams_pass_trios_half_closeable_stream_checks(autojump_clock) -> None:
    with no_task_left_behind():
        async with open_memory_hosts(2) as (a, b):
            accepted_send, accepted = trio.open_memory_channel[Stream](0)

            async def accept(stream: Stream) -> None:
                await accepted_send.send(stream)
                await trio.sleep_forever()  # returning would close the stream under the check

            b.set_handler(ACCEPT, accept)

            async def stream_maker() -> tuple[Stream, Stream]:
                initiator = await a.new_stream(dial_addr(b), ACCEPT)
                return initiator, await accepted.receive()

            async def clogged_stream_maker() -> tuple[Stream, Stream]:
                # Fill both send windows: the multistream-select proposal and its answer
                # (the same bytes: header and protocol) count.
                initiator, responder = await stream_maker()
                header = len(multistream.Dialer(ACCEPT).data_to_send())
                await initiator.send_all(b"\0" * (yamux.DEFAULT_WINDOW - header))
                await responder.send_all(b"\0" * (yamux.DEFAULT_WINDOW - header))
                return initiator, responder

            await trio.testing.check_half_closeable_stream(stream_maker, clogged_stream_maker)
            assert a.num_connections == 1


# --- 2, 3. tampered transport messages -----------------------------------------------------------


class OnCue:
    """A tamper function: passes messages on until `cue()`, then rewrites the next one."""

    def __init__(self, rewrite: Callable[[bytes, list[bytes]], list[bytes]]) -> None:
        self._rewrite = rewrite
        self._cued = False
        self.sent: list[bytes] = []

    def cue(self) -> None:
        self._cued = True

    def __call__(self, index: int, message: bytes) -> list[bytes]:
        out = [message]
        if self._cued:
            self._cued = False
            out = self._rewrite(message, self.sent)
        self.sent.append(message)
        return out


def flip_a_byte(message: bytes, sent: list[bytes]) -> list[bytes]:
    middle = len(message) // 2
    return [message[:middle] + bytes([message[middle] ^ 0x01]) + message[middle + 1 :]]


def replay_the_previous(message: bytes, sent: list[bytes]) -> list[bytes]:
    return [sent[-1], message]


@pytest.mark.parametrize("rewrite", [flip_a_byte, replay_the_previous])
async def test_a_tampered_ciphertext_ends_the_connection(autojump_clock, caplog, rewrite) -> None:
    caplog.set_level(logging.INFO, logger="sdcn_p2p.connection")
    network = MemoryNetwork()
    tamper = OnCue(rewrite)
    with no_task_left_behind():
        async with (
            open_memory_hosts(2, network=network) as (victim, honest),
            open_host(
                test_identity(0, seed=1), transport=TamperingTransport(network.transport(), tamper)
            ) as attacker,
        ):
            victim.set_handler(ECHO, echo_handler)
            stream = await attacker.new_stream(dial_addr(victim), ECHO)
            await stream.send_all(b"before")
            assert await stream.receive_some() == b"before"
            assert len(tamper.sent) > 2  # past the dialler's two handshake messages

            tamper.cue()
            await stream.send_all(b"after")
            with pytest.raises(trio.BrokenResourceError):
                await stream.receive_some()

            assert f"connection to {attacker.peer_id.short()}: decryption failed" in caplog.text
            await assert_recovered(victim, honest)
            assert attacker.num_connections == 0


# --- 4, 5. hostile bytes after a real handshake --------------------------------------------------


async def test_a_data_frame_larger_than_the_window_ends_the_connection(
    autojump_clock, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="sdcn_p2p.connection")
    network = MemoryNetwork()
    with no_task_left_behind():
        async with open_memory_hosts(2, network=network) as (victim, honest):
            async with open_raw_peer(network, victim) as peer:
                syn, stream_id = 0x1, 1
                header = struct.pack(">BBHII", 0, 0, syn, stream_id, 300_000)
                await peer.channel.send_all(header)
                events = await peer.events_until_closed()
            assert yamux.GoAwayReceived(yamux.GO_AWAY_PROTOCOL_ERROR) in events
            assert "data frame of 300000 bytes exceeds the window" in caplog.text
            await assert_recovered(victim, honest)


@pytest.mark.parametrize("seed", [0, 1, 2])
async def test_encrypted_garbage_ends_the_connection(autojump_clock, seed) -> None:
    network = MemoryNetwork()
    with no_task_left_behind():
        async with open_memory_hosts(2, network=network) as (victim, honest):
            async with open_raw_peer(network, victim) as peer:
                await peer.channel.send_all(random.Random(seed).randbytes(4096))
                events = await peer.events_until_closed()
            assert yamux.GoAwayReceived(yamux.GO_AWAY_PROTOCOL_ERROR) in events
            await assert_recovered(victim, honest)


# --- 6, 7. identities ----------------------------------------------------------------------------


def signed_by_another_key(identity: Identity, static_key: X25519PrivateKey) -> bytes:
    return test_identity(1, seed=99).sign(
        noise._STATIC_KEY_PREFIX + noise._public_bytes(static_key)
    )


def signed_over_another_static_key(identity: Identity, static_key: X25519PrivateKey) -> bytes:
    other = X25519PrivateKey.generate()
    return identity.sign(noise._STATIC_KEY_PREFIX + noise._public_bytes(other))


@pytest.mark.parametrize("forge", [signed_by_another_key, signed_over_another_static_key])
async def test_a_forged_identity_signature_is_refused(autojump_clock, caplog, forge) -> None:
    caplog.set_level(logging.DEBUG, logger="sdcn_p2p.host")
    network = MemoryNetwork()
    with no_task_left_behind():
        async with open_memory_hosts(2, network=network) as (victim, honest):
            identity = test_identity(0, seed=99)
            static_key = X25519PrivateKey.generate()
            handshake = noise.NoiseHandshake(
                identity, initiator=True, expected_peer=victim.peer_id, static_key=static_key
            )
            # The payload carries our key with a signature that does not bind it to static_key.
            handshake._payload = NoiseHandshakePayload(
                identity.public_key_bytes, forge(identity, static_key)
            ).encode()
            raw = await network.transport().dial(victim.listen_addrs[0])
            select = multistream.Dialer(noise.PROTOCOL_ID)
            await raw.send_message(
                select.data_to_send() + noise.encode_frame(handshake.write_message())
            )
            while select.next_event() is None:
                select.receive_data(await raw.receive_message())
            frames = noise.FrameDecoder()
            frames.feed(select.unused())
            while (frame := frames.next_frame()) is None:
                frames.feed(await raw.receive_message())
            handshake.read_message(frame)
            await raw.send_message(noise.encode_frame(handshake.write_message()))
            with pytest.raises(trio.EndOfChannel):
                await raw.receive_message()
            await raw.aclose()
            assert "invalid identity signature" in caplog.text
            await assert_recovered(victim, honest)


async def test_an_address_naming_another_peer_fails_and_leaves_no_connection(
    autojump_clock,
) -> None:
    with no_task_left_behind():
        async with open_memory_hosts(3) as (dialler, b, c):
            impostor = b.listen_addrs[0].with_peer_id(c.peer_id)
            with pytest.raises(DialError, match="reached"):
                await dialler.connect(impostor)
            await trio.testing.wait_all_tasks_blocked()
            assert dialler.num_connections == b.num_connections == c.num_connections == 0
            await c.ping(dial_addr(b))
            await dialler.ping(dial_addr(b))


# --- 8, 9, 10. bad streams end only themselves ---------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        protocol_header(b"/x" * MAX_PROTOCOL_ID),
        protocol_header(b"/\xff\xfe/1.0.0"),
        b"\xff" * 10,  # a varint that never ends
    ],
    ids=["too-long", "not-utf8", "bad-varint"],
)
async def test_a_bad_protocol_header_resets_only_its_stream(autojump_clock, header) -> None:
    network = MemoryNetwork()
    with no_task_left_behind():
        async with open_memory_hosts(2, network=network) as (victim, honest):
            async with open_raw_peer(network, victim) as peer:
                stream_id = peer.session.open_stream()
                peer.session.send(stream_id, header)
                await peer.flush()
                await peer.wait_for(yamux.StreamResetReceived(stream_id))
                await peer.ping()  # the connection survived
                assert victim.is_connected(peer.peer_id)
            await assert_recovered(victim, honest)


@pytest.mark.parametrize("header", [b"", protocol_header(PING.encode())[:4]])
async def test_a_stream_that_never_names_its_protocol_is_reset_after_a_timeout(
    autojump_clock, header
) -> None:
    network = MemoryNetwork()
    with no_task_left_behind():
        async with open_memory_hosts(2, network=network) as (victim, honest):
            async with open_raw_peer(network, victim) as peer:
                stream_id = peer.session.open_stream()
                if header:
                    peer.session.send(stream_id, header)
                await peer.flush()
                start = trio.current_time()
                await peer.wait_for(yamux.StreamResetReceived(stream_id))
                assert trio.current_time() - start == pytest.approx(PROTOCOL_HEADER_TIMEOUT)
                conn = victim.connection(peer.peer_id)
                assert conn is not None and conn.num_streams == 0
                await peer.ping()
            await assert_recovered(victim, honest)


async def test_a_handler_that_raises_resets_its_stream_and_is_logged(
    autojump_clock, caplog
) -> None:
    async def boom(stream: Stream) -> None:
        raise RuntimeError("handler bug")

    with no_task_left_behind():
        async with open_memory_hosts(3) as (victim, client, honest):
            victim.set_handler(BOOM, boom)
            stream = await client.new_stream(dial_addr(victim), BOOM)
            with pytest.raises(StreamReset):
                await stream.receive_some()
            [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]
            assert record.getMessage() == f"handler for {BOOM} failed"
            assert record.exc_info is not None and record.exc_info[0] is RuntimeError
            conn = client.connection(victim.peer_id)
            await client.ping(victim.peer_id)
            assert client.connection(victim.peer_id) is conn
            await honest.ping(dial_addr(victim))


# --- 11, 12. floods ------------------------------------------------------------------------------


async def test_a_flood_of_streams_is_bounded_and_the_connection_survives(autojump_clock) -> None:
    limit = 8
    config = HostConfig(max_inbound_streams=limit)
    with no_task_left_behind():
        async with open_memory_hosts(3, config=config) as (victim, attacker, honest):
            release = trio.Event()

            async def hold(stream: Stream) -> None:
                await stream.send_all(b"!")
                await release.wait()

            victim.set_handler(HOLD, hold)
            conn = await attacker.connect(dial_addr(victim))
            await trio.testing.wait_all_tasks_blocked()  # identify is over both ways
            victim_conn = victim.connection(attacker.peer_id)
            assert victim_conn is not None

            streams = [await attacker.new_stream(victim.peer_id, HOLD) for _ in range(100)]
            outcomes: list[str] = []
            for stream in streams:
                try:
                    outcomes.append((await stream.receive_some()).decode())
                except StreamReset:
                    outcomes.append("reset")
                assert victim_conn.num_streams <= limit
                assert victim_conn._session.num_streams <= limit
            assert outcomes == ["!"] * limit + ["reset"] * (100 - limit)

            release.set()
            for stream in streams:
                await stream.aclose()
            await trio.testing.wait_all_tasks_blocked()
            assert victim_conn.num_streams == victim_conn._session.num_streams == 0
            await attacker.ping(victim.peer_id)
            assert attacker.connection(victim.peer_id) is conn
            await honest.ping(dial_addr(victim))


async def test_half_open_dials_beyond_the_pending_limit_are_refused_until_they_time_out(
    autojump_clock,
) -> None:
    config = HostConfig(max_pending_inbound=4, handshake_timeout=10)
    network = MemoryNetwork()
    with no_task_left_behind():
        async with open_memory_hosts(2, network=network, config=config) as (victim, honest):
            idle = all_tasks()
            attacker = network.transport()
            start = trio.current_time()
            raws = [await attacker.dial(victim.listen_addrs[0]) for _ in range(10)]
            for raw in raws[4:]:  # refused at once
                with pytest.raises(trio.EndOfChannel):
                    await raw.receive_message()
            with pytest.raises(DialError):
                await honest.connect(dial_addr(victim))

            for raw in raws[:4]:  # the handshake timeout frees the slots
                with pytest.raises(trio.EndOfChannel):
                    await raw.receive_message()
            assert trio.current_time() - start == pytest.approx(config.handshake_timeout)
            await honest.ping(dial_addr(victim))
            assert victim.connected_peers == [honest.peer_id]

            for raw in raws:
                await raw.aclose()
            await honest.disconnect(victim.peer_id)
            await trio.testing.wait_all_tasks_blocked()
            assert victim.num_connections == 0
            assert all_tasks() == idle


# --- 13. the upgrade, as libp2p does it ----------------------------------------------------------


@pytest.mark.parametrize("offers_muxer", [True, False], ids=["muxer-in-handshake", "multistream"])
async def test_a_new_connection_costs_three_round_trips_to_the_first_answer(
    autojump_clock, offers_muxer: bool
) -> None:
    """Dial (one round trip, as TCP), /noise with Noise message 1 -> answer with message 2,
    message 3 with the first stream's proposal and data -> its answer: as before libp2p's
    framing, with the muxer agreed in the handshake or lazily selected after it.
    """
    latency = 0.01
    network = MemoryNetwork(latency=latency)
    with no_task_left_behind():
        async with open_memory_hosts(2, network=network) as (a, b):
            if not offers_muxer:  # as py-libp2p: yamux is selected in the secure channel
                b._noise = noise.NoiseCredentials(b.identity)
            b.set_handler(ECHO, echo_handler)
            start = trio.current_time()
            stream = await a.new_stream(dial_addr(b), ECHO)
            await stream.send_all(b"first")
            assert await stream.receive_some() == b"first"
            assert trio.current_time() - start == pytest.approx(3 * 2 * latency)
            await stream.aclose()
            await trio.testing.wait_all_tasks_blocked()
            assert a.peerstore.get(b.peer_id).protocols == tuple(b.protocols)  # identified


async def test_a_dialler_offering_no_muxer_selects_yamux_in_the_channel(autojump_clock) -> None:
    with no_task_left_behind():
        async with open_memory_hosts(2) as (a, b):
            a._noise = noise.NoiseCredentials(a.identity)
            b.set_handler(ECHO, echo_handler)
            stream = await a.new_stream(dial_addr(b), ECHO)
            await stream.send_all(b"hello")
            assert await stream.receive_some() == b"hello"
            await b.ping(dial_addr(a))  # the same connection, the other way


async def test_a_listener_that_refuses_noise_fails_the_dial(autojump_clock) -> None:
    network = MemoryNetwork()

    async def no_noise(raw: RawConnection) -> None:
        await raw.receive_message()  # the header, /noise and Noise message 1
        refusal = multistream.encode_token(multistream.PROTOCOL_ID)
        await raw.send_message(refusal + multistream.encode_token(multistream.NA))
        with suppress(trio.EndOfChannel):
            await raw.receive_message()

    with no_task_left_behind():
        async with open_memory_hosts(1, network=network) as (a,), trio.open_nursery() as nursery:
            transport = network.transport()
            [addr] = await nursery.start(
                transport.serve, Multiaddr.parse(f"/ip4/{transport.host}/tcp/1/ws"), no_noise
            )
            with pytest.raises(DialError, match="does not speak /noise"):
                await a.connect(addr)
            nursery.cancel_scope.cancel()


async def test_a_push_closed_before_its_answer_arrives_is_not_reset(autojump_clock) -> None:
    """The opener writes and closes without reading (a push); the responder answers as soon as
    it waits for more data, so its answer reaches a stream already closed. The answer belongs
    to the negotiation: the stream is not reset for it under a responder still using it."""
    sink = "/test/sink/1.0.0"
    outcome: list[object] = []
    done = trio.Event()

    async def read_then_linger(stream: Stream) -> None:
        size = 0
        while chunk := await stream.receive_some():  # waits once between the two parts
            size += len(chunk)
        await trio.sleep(1)  # a reset for the answer would have arrived by now
        try:
            await stream.send_all(b"still here")
        except StreamReset as exc:
            outcome.append(exc)
        outcome.append(size)
        done.set()

    with no_task_left_behind():
        async with open_memory_hosts(2, network=MemoryNetwork(latency=0.05)) as (a, b):
            b.set_handler(sink, read_then_linger)
            stream = await a.new_stream(dial_addr(b), sink)
            await stream.send_all(bytes(10_000))
            await trio.sleep(0.02)
            await stream.send_all(bytes(10_000))
            await stream.aclose()
            await done.wait()
    assert outcome == [20_000]
