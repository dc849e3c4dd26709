from __future__ import annotations

import struct
from collections import defaultdict

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdcn_p2p.errors import (
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    ResourceLimitExceeded,
    StreamReset,
)
from sdcn_p2p.wire.yamux import (
    DEFAULT_WINDOW,
    GO_AWAY_NORMAL,
    GO_AWAY_PROTOCOL_ERROR,
    MAX_FRAME_PAYLOAD,
    DataReceived,
    Event,
    GoAwayReceived,
    PingReceived,
    PongReceived,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamResetReceived,
    WindowUpdated,
    YamuxSession,
)

HEADER = struct.Struct(">BBHII")
DATA, WINDOW_UPDATE, PING, GO_AWAY = 0, 1, 2, 3
SYN, ACK, FIN, RST = 1, 2, 4, 8


def frame(ftype: int, flags: int, stream_id: int, length: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(0, ftype, flags, stream_id, length) + payload


def data_frame(stream_id: int, payload: bytes, flags: int = 0) -> bytes:
    return frame(DATA, flags, stream_id, len(payload), payload)


def parse_frames(data: bytes) -> list[tuple[int, int, int, int, int]]:
    """Split output into (version, type, flags, stream id, length) headers, skipping payloads."""
    frames = []
    offset = 0
    while offset < len(data):
        header = HEADER.unpack_from(data, offset)
        frames.append(header)
        offset += HEADER.size + (header[4] if header[1] == DATA else 0)
    assert offset == len(data)
    return frames


class Pair:
    """A client and a server session wired back to back (h11's ConnectionPair)."""

    def __init__(self, **kwargs: int) -> None:
        self.client = YamuxSession(is_client=True, **kwargs)
        self.server = YamuxSession(is_client=False, **kwargs)

    def peer(self, session: YamuxSession) -> YamuxSession:
        return self.server if session is self.client else self.client

    def send(self, session: YamuxSession) -> list[Event]:
        """Deliver everything `session` queued to its peer; return the peer's events."""
        return self.peer(session).receive_data(session.data_to_send())

    def open(self) -> int:
        stream_id = self.client.open_stream()
        assert self.send(self.client) == [StreamOpened(stream_id)]
        assert self.send(self.server) == [StreamAccepted(stream_id)]
        return stream_id


def received_bytes(events: list[Event], stream_id: int) -> bytes:
    return b"".join(
        e.data for e in events if isinstance(e, DataReceived) and e.stream_id == stream_id
    )


# --- opening and data ---------------------------------------------------------------------


def test_open_sends_syn_window_update_at_once() -> None:
    client = YamuxSession(is_client=True)
    assert client.open_stream() == 1
    # Byte for byte what go-yamux sends to open stream 1.
    assert client.data_to_send() == bytes.fromhex("000100010000000100000000")
    assert client.open_stream() == 3
    assert client.data_to_send() == bytes.fromhex("000100010000000300000000")
    assert client.data_to_send() == b""


def test_server_opens_even_ids_and_client_accepts() -> None:
    pair = Pair()
    assert pair.server.open_stream() == 2
    assert pair.server.open_stream() == 4
    assert pair.send(pair.server) == [StreamOpened(2), StreamOpened(4)]
    assert parse_frames(pair.client.data_to_send()) == [
        (0, WINDOW_UPDATE, ACK, 2, 0),
        (0, WINDOW_UPDATE, ACK, 4, 0),
    ]


def test_data_both_ways() -> None:
    pair = Pair()
    stream_id = pair.open()
    assert pair.client.send(stream_id, b"hello") == 5
    assert pair.send(pair.client) == [DataReceived(stream_id, b"hello")]
    assert pair.server.send(stream_id, memoryview(b"world")) == 5
    assert pair.send(pair.server) == [DataReceived(stream_id, b"world")]


def test_data_may_precede_the_ack() -> None:
    pair = Pair()
    stream_id = pair.client.open_stream()
    pair.client.send(stream_id, b"early")
    assert pair.send(pair.client) == [StreamOpened(stream_id), DataReceived(stream_id, b"early")]


def test_large_write_is_split_into_frames() -> None:
    pair = Pair()
    stream_id = pair.open()
    payload = bytes(range(256)) * 1000
    assert pair.client.send(stream_id, payload) == len(payload)
    out = pair.client.data_to_send()
    lengths = [h[4] for h in parse_frames(out)]
    assert max(lengths) == MAX_FRAME_PAYLOAD
    assert sum(lengths) == len(payload)
    assert received_bytes(pair.server.receive_data(out), stream_id) == payload


def test_send_copies_mutable_buffers() -> None:
    pair = Pair()
    stream_id = pair.open()
    buf = bytearray(b"abc")
    pair.client.send(stream_id, buf)
    buf[:] = b"xyz"
    assert pair.send(pair.client) == [DataReceived(stream_id, b"abc")]


def test_frames_split_anywhere_are_reassembled() -> None:
    pair = Pair()
    stream_id = pair.client.open_stream()
    pair.client.send(stream_id, b"x" * 1000)
    pair.client.close_stream(stream_id)
    out = pair.client.data_to_send()
    events: list[Event] = []
    for i in range(len(out)):
        events += pair.server.receive_data(out[i : i + 1])
    assert events[0] == StreamOpened(stream_id)
    assert received_bytes(events, stream_id) == b"x" * 1000
    assert events[-1] == StreamEnded(stream_id)


def test_accepts_bytearray_and_memoryview_input() -> None:
    pair = Pair()
    stream_id = pair.client.open_stream()
    pair.client.send(stream_id, b"data")
    out = pair.client.data_to_send()
    events = pair.server.receive_data(bytearray(out[:5]))
    events += pair.server.receive_data(memoryview(out)[5:])
    assert events == [StreamOpened(stream_id), DataReceived(stream_id, b"data")]


# --- closing and resetting ----------------------------------------------------------------


def test_half_close_then_full_close_forgets_the_stream() -> None:
    pair = Pair()
    stream_id = pair.open()
    pair.client.close_stream(stream_id)
    pair.client.close_stream(stream_id)  # idempotent
    assert pair.send(pair.client) == [StreamEnded(stream_id)]
    with pytest.raises(ProtocolError) as excinfo:
        pair.client.send(stream_id, b"late")
    assert isinstance(excinfo.value, LocalProtocolError)
    # The other direction is still open.
    assert pair.server.send(stream_id, b"reply") == 5
    pair.server.close_stream(stream_id)
    assert pair.send(pair.server) == [DataReceived(stream_id, b"reply"), StreamEnded(stream_id)]
    assert pair.client.num_streams == pair.server.num_streams == 0
    assert not pair.client.is_closed


def test_fin_can_ride_on_data() -> None:
    pair = Pair()
    stream_id = pair.open()
    events = pair.server.receive_data(data_frame(stream_id, b"bye", FIN))
    assert events == [DataReceived(stream_id, b"bye"), StreamEnded(stream_id)]


def test_reset_forgets_the_stream_on_both_sides() -> None:
    pair = Pair()
    stream_id = pair.open()
    pair.server.send(stream_id, b"in flight")
    pair.client.reset_stream(stream_id)
    assert pair.client.num_streams == 0
    assert pair.send(pair.client) == [StreamResetReceived(stream_id)]
    assert pair.server.num_streams == 0
    # Data the server sent before it saw the RST is ignored.
    assert pair.send(pair.server) == []
    with pytest.raises(StreamReset):
        pair.client.send(stream_id, b"x")
    with pytest.raises(StreamReset):
        pair.server.send(stream_id, b"x")
    # Every other command is a no-op on a forgotten stream.
    for session in (pair.client, pair.server):
        session.close_stream(stream_id)
        session.reset_stream(stream_id)
        session.consume(stream_id, 10)
        assert session.send_window(stream_id) == 0
    assert pair.client.data_to_send() == pair.server.data_to_send() == b""


def test_rst_with_fin_is_a_reset() -> None:
    pair = Pair()
    stream_id = pair.open()
    events = pair.server.receive_data(frame(WINDOW_UPDATE, FIN | RST, stream_id, 0))
    assert events == [StreamResetReceived(stream_id)]


def test_open_close_10k_streams_leaves_nothing_behind() -> None:
    pair = Pair()
    for _ in range(10_000):
        stream_id = pair.client.open_stream()
        pair.client.send(stream_id, b"q")
        pair.client.close_stream(stream_id)
        events = pair.send(pair.client)
        assert events[-1] == StreamEnded(stream_id)
        pair.server.consume(stream_id, 1)
        pair.server.send(stream_id, b"a")
        pair.server.close_stream(stream_id)
        assert pair.send(pair.server)[-1] == StreamEnded(stream_id)
    for stream_id in range(20_001, 40_001, 2):  # half of them reset instead
        assert pair.client.open_stream() == stream_id
        pair.send(pair.client)
        pair.server.reset_stream(stream_id)
        pair.send(pair.server)
    for session in (pair.client, pair.server):
        assert session.num_streams == 0
        assert session.stream_ids == []
        assert session._streams == {}
        assert session._num_inbound == 0
        assert session._in == bytearray()


# --- flow control -------------------------------------------------------------------------


def test_window_exhaustion_and_update() -> None:
    pair = Pair()
    stream_id = pair.open()
    payload = b"z" * (DEFAULT_WINDOW + 1000)
    assert pair.client.send_window(stream_id) == DEFAULT_WINDOW
    assert pair.client.send(stream_id, payload) == DEFAULT_WINDOW
    assert pair.client.send(stream_id, payload[DEFAULT_WINDOW:]) == 0
    assert pair.client.send_window(stream_id) == 0
    events = pair.send(pair.client)
    assert len(received_bytes(events, stream_id)) == DEFAULT_WINDOW

    # Less than half the window consumed: no update yet (batching).
    pair.server.consume(stream_id, DEFAULT_WINDOW // 2 - 1)
    assert pair.server.data_to_send() == b""
    pair.server.consume(stream_id, 1)
    assert pair.send(pair.server) == [WindowUpdated(stream_id)]
    assert pair.client.send_window(stream_id) == DEFAULT_WINDOW // 2
    assert pair.client.send(stream_id, payload[DEFAULT_WINDOW:]) == 1000
    assert received_bytes(pair.send(pair.client), stream_id) == b"z" * 1000


def test_ten_megabytes_flow_through_a_default_window() -> None:
    pair = Pair()
    stream_id = pair.open()
    payload = bytes(range(256)) * (10 * 1024 * 1024 // 256)
    view = memoryview(payload)
    sent = 0
    received = bytearray()
    while len(received) < len(payload):
        sent += pair.client.send(stream_id, view[sent:])
        for event in pair.send(pair.client):
            assert isinstance(event, DataReceived)
            received += event.data
            pair.server.consume(stream_id, len(event.data))
        pair.send(pair.server)
    assert received == payload


def test_consume_more_than_received_is_a_local_error() -> None:
    pair = Pair()
    stream_id = pair.open()
    pair.client.send(stream_id, b"abc")
    pair.send(pair.client)
    with pytest.raises(ValueError):
        pair.server.consume(stream_id, 4)
    with pytest.raises(ValueError):
        pair.server.consume(stream_id, -1)


def test_larger_window_is_announced_with_syn_and_ack() -> None:
    window = 4 * DEFAULT_WINDOW
    pair = Pair(window=window)
    stream_id = pair.client.open_stream()
    assert parse_frames(pair.client.data_to_send()) == [
        (0, WINDOW_UPDATE, SYN, stream_id, window - DEFAULT_WINDOW)
    ]
    pair.client.reset_stream(stream_id)
    pair.client.data_to_send()
    stream_id = pair.client.open_stream()
    assert pair.send(pair.client) == [StreamOpened(stream_id)]
    # The ACK carries the larger window: a writer blocked before it may go on.
    assert pair.send(pair.server) == [StreamAccepted(stream_id), WindowUpdated(stream_id)]
    assert pair.client.send_window(stream_id) == window
    assert pair.server.send_window(stream_id) == window


def test_data_beyond_the_receive_window_is_a_protocol_error() -> None:
    pair = Pair()
    stream_id = pair.open()
    chunk = b"x" * (DEFAULT_WINDOW // 2)
    pair.server.receive_data(data_frame(stream_id, chunk) + data_frame(stream_id, chunk))
    with pytest.raises(ProtocolError) as excinfo:
        pair.server.receive_data(data_frame(stream_id, b"!"))
    assert isinstance(excinfo.value, RemoteProtocolError)
    assert pair.server.is_closed
    assert pair.server.num_streams == 0
    assert parse_frames(pair.server.data_to_send()) == [(0, GO_AWAY, 0, 0, GO_AWAY_PROTOCOL_ERROR)]
    # A dead session ignores input and refuses commands.
    assert pair.server.receive_data(data_frame(stream_id, b"more")) == []
    with pytest.raises(StreamReset):
        pair.server.send(stream_id, b"x")
    with pytest.raises(ProtocolError):
        pair.server.open_stream()


def test_oversized_data_frame_is_refused_from_its_header() -> None:
    server = YamuxSession(is_client=False)
    with pytest.raises(ProtocolError):
        # Header only: the body never needs to arrive.
        server.receive_data(HEADER.pack(0, DATA, SYN, 1, DEFAULT_WINDOW + 1))


def test_oversized_data_for_an_unknown_stream_is_a_protocol_error() -> None:
    server = YamuxSession(is_client=False)
    assert server.receive_data(data_frame(7, b"x" * DEFAULT_WINDOW)) == []
    with pytest.raises(ProtocolError):
        server.receive_data(data_frame(7, b"x" * (DEFAULT_WINDOW + 1)))


def test_window_growing_past_the_maximum_is_a_protocol_error() -> None:
    pair = Pair(max_window=DEFAULT_WINDOW * 2)
    stream_id = pair.open()
    pair.client.receive_data(frame(WINDOW_UPDATE, 0, stream_id, DEFAULT_WINDOW))
    with pytest.raises(ProtocolError):
        pair.client.receive_data(frame(WINDOW_UPDATE, 0, stream_id, 1))


# --- limits and session control -----------------------------------------------------------


def test_inbound_streams_beyond_the_limit_are_reset() -> None:
    pair = Pair(max_inbound_streams=2)
    first, second, third = (pair.client.open_stream() for _ in range(3))
    pair.client.send(third, b"ignored")
    assert pair.send(pair.client) == [StreamOpened(first), StreamOpened(second)]
    assert pair.send(pair.server) == [
        StreamAccepted(first),
        StreamAccepted(second),
        StreamResetReceived(third),
    ]
    assert pair.server.num_streams == 2
    # Closing one makes room again.
    pair.server.reset_stream(first)
    pair.send(pair.server)
    fourth = pair.client.open_stream()
    assert pair.send(pair.client) == [StreamOpened(fourth)]


def test_ping_pong() -> None:
    pair = Pair()
    pair.client.ping(0xDEADBEEF)
    assert pair.send(pair.client) == [PingReceived(0xDEADBEEF)]
    assert pair.send(pair.server) == [PongReceived(0xDEADBEEF)]
    with pytest.raises(ValueError):
        pair.client.ping(1 << 32)


def test_go_away() -> None:
    pair = Pair()
    stream_id = pair.open()
    pair.client.go_away()
    pair.client.go_away()  # idempotent
    assert pair.send(pair.client) == [GoAwayReceived(GO_AWAY_NORMAL)]
    assert pair.server.went_away and not pair.client.went_away
    for session in (pair.client, pair.server):
        with pytest.raises(ProtocolError) as excinfo:
            session.open_stream()
        assert isinstance(excinfo.value, LocalProtocolError)
    # Existing streams carry on.
    pair.server.send(stream_id, b"still here")
    assert pair.send(pair.server) == [DataReceived(stream_id, b"still here")]
    # A stream opened anyway is refused with RST, not treated as an error.
    events = pair.client.receive_data(frame(WINDOW_UPDATE, SYN, 2, 0))
    assert events == []
    assert parse_frames(pair.client.data_to_send()) == [(0, WINDOW_UPDATE, RST, 2, 0)]


def test_stream_ids_exhausted() -> None:
    client = YamuxSession(is_client=True)
    client._next_id = 0xFFFFFFFF
    assert client.open_stream() == 0xFFFFFFFF
    with pytest.raises(ResourceLimitExceeded):
        client.open_stream()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (HEADER.pack(1, WINDOW_UPDATE, SYN, 1, 0), "version"),
        (HEADER.pack(0, 4, 0, 0, 0), "frame type"),
        (frame(WINDOW_UPDATE, SYN, 2, 0), "parity"),
        (frame(WINDOW_UPDATE, SYN, 1, 0) * 2, "in use"),
        (data_frame(0, b"x"), "stream 0"),
        (frame(WINDOW_UPDATE, 0, 0, 5), "stream 0"),
        (frame(PING, SYN, 1, 0), "ping"),
        (frame(PING, 0, 0, 0), "ping"),
        (frame(GO_AWAY, 0, 1, 0), "go away"),
        (frame(WINDOW_UPDATE, SYN | FIN, 1, 0) + data_frame(1, b"x"), "after FIN"),
        (frame(WINDOW_UPDATE, SYN | FIN, 1, 0) + frame(WINDOW_UPDATE, FIN, 1, 0), "FIN"),
    ],
)
def test_protocol_violations(data: bytes, reason: str) -> None:
    server = YamuxSession(is_client=False)
    with pytest.raises(ProtocolError, match=reason) as excinfo:
        server.receive_data(data)
    assert isinstance(excinfo.value, RemoteProtocolError)
    assert server.is_closed
    assert server.data_to_send().endswith(frame(GO_AWAY, 0, 0, GO_AWAY_PROTOCOL_ERROR))


def test_frames_for_unknown_streams_are_ignored() -> None:
    server = YamuxSession(is_client=False)
    data = (
        frame(WINDOW_UPDATE, 0, 5, 100)
        + frame(WINDOW_UPDATE, ACK | FIN, 5, 0)
        + data_frame(5, b"late", RST)
        + frame(WINDOW_UPDATE, 0, 6, 1)
    )
    assert server.receive_data(data) == []
    assert server.num_streams == 0
    assert not server.is_closed


def test_invalid_constructor_arguments() -> None:
    with pytest.raises(ValueError):
        YamuxSession(is_client=True, window=DEFAULT_WINDOW - 1)
    with pytest.raises(ValueError):
        YamuxSession(is_client=True, window=2 * DEFAULT_WINDOW, max_window=DEFAULT_WINDOW)


# --- hypothesis -----------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200), is_client=st.booleans())
def test_garbage_only_raises_protocol_error(data: bytes, is_client: bool) -> None:
    session = YamuxSession(is_client=is_client)
    try:
        session.receive_data(data)
    except ProtocolError:
        assert session.is_closed


frames_strategy = st.lists(
    st.builds(
        lambda version, ftype, flags, stream_id, payload, length: (
            HEADER.pack(version, ftype, flags, stream_id, len(payload) if ftype == 0 else length)
            + (payload if ftype == 0 else b"")
        ),
        version=st.sampled_from([0, 0, 0, 0, 1]),
        ftype=st.integers(0, 4),
        flags=st.integers(0, 15),
        stream_id=st.integers(0, 6),
        payload=st.binary(max_size=20),
        length=st.one_of(st.integers(0, 10), st.integers(0, 0xFFFFFFFF)),
    ),
    max_size=20,
)


@settings(max_examples=200, deadline=None)
@given(frames=frames_strategy, is_client=st.booleans(), chunk=st.integers(1, 30))
def test_plausible_frames_only_raise_protocol_error(
    frames: list[bytes], is_client: bool, chunk: int
) -> None:
    session = YamuxSession(is_client=is_client, max_inbound_streams=2)
    session.open_stream()
    data = b"".join(frames)
    try:
        for i in range(0, len(data), chunk):
            session.receive_data(data[i : i + chunk])
            session.data_to_send()
    except ProtocolError:
        assert session.is_closed
    assert session.num_streams <= 3


PATTERN = bytes(range(251)) * 1300  # longer than any single write below


class Side:
    """One application using a session: what it wrote, read, and still wants to write."""

    def __init__(self, session: YamuxSession) -> None:
        self.session = session
        self.streams: list[int] = []
        self.pending: dict[int, bytearray] = defaultdict(bytearray)  # not yet accepted by send
        self.close_wanted: set[int] = set()
        self.sent: dict[int, bytearray] = defaultdict(bytearray)
        self.received: dict[int, bytearray] = defaultdict(bytearray)
        self.unread: dict[int, int] = defaultdict(int)  # received, not yet consumed
        self.ended: set[int] = set()
        self.transit = bytearray()  # written by the session, not yet delivered

    def write(self, stream_id: int, size: int) -> None:
        if stream_id in self.close_wanted:
            return
        start = (stream_id * 7 + len(self.sent[stream_id])) % 251
        data = PATTERN[start : start + size]
        self.sent[stream_id] += data
        self.pending[stream_id] += data
        self.flush(stream_id)

    def flush(self, stream_id: int) -> None:
        pending = self.pending[stream_id]
        if pending:
            del pending[: self.session.send(stream_id, pending)]
        if not pending and stream_id in self.close_wanted:
            self.session.close_stream(stream_id)

    def close(self, stream_id: int) -> None:
        self.close_wanted.add(stream_id)
        self.flush(stream_id)

    def handle(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, StreamOpened):
                self.streams.append(event.stream_id)
            elif isinstance(event, DataReceived):
                self.received[event.stream_id] += event.data
                self.unread[event.stream_id] += len(event.data)
            elif isinstance(event, StreamEnded):
                self.ended.add(event.stream_id)
            elif isinstance(event, WindowUpdated):
                self.flush(event.stream_id)
            else:
                assert isinstance(event, StreamAccepted), event

    def consume_all(self) -> None:
        for stream_id, size in self.unread.items():
            self.session.consume(stream_id, size)
        self.unread.clear()


write_sizes = st.one_of(
    st.integers(0, 3000),
    st.sampled_from([MAX_FRAME_PAYLOAD, DEFAULT_WINDOW // 2, DEFAULT_WINDOW, DEFAULT_WINDOW + 1]),
    st.integers(0, 300_000),
)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("open"), st.booleans()),
        st.tuples(st.just("write"), st.booleans(), st.integers(0, 50), write_sizes),
        st.tuples(st.just("close"), st.booleans(), st.integers(0, 50)),
        st.tuples(st.just("deliver"), st.booleans(), st.integers(1, 300_000)),
        st.tuples(st.just("consume"), st.booleans()),
    ),
    min_size=3,
    max_size=40,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations)
def test_random_interleavings_deliver_every_byte_in_order(ops: list[tuple]) -> None:
    pair = Pair()
    sides = {True: Side(pair.client), False: Side(pair.server)}

    def deliver(is_client: bool, limit: int) -> None:
        side, other = sides[is_client], sides[not is_client]
        side.transit += side.session.data_to_send()
        chunk = bytes(side.transit[:limit])
        del side.transit[:limit]
        other.handle(other.session.receive_data(chunk))

    for op in ops:
        kind, is_client = op[0], op[1]
        side = sides[is_client]
        if kind == "open" or (kind in ("write", "close") and not side.streams):
            side.streams.append(side.session.open_stream())
        if kind == "write":
            side.write(side.streams[op[2] % len(side.streams)], op[3])
        elif kind == "close":
            side.close(side.streams[op[2] % len(side.streams)])
        elif kind == "deliver":
            deliver(is_client, op[2])
        elif kind == "consume":
            side.consume_all()

    # Let everything drain: the applications read all they receive.
    for _ in range(1000):
        for is_client in (True, False):
            sides[is_client].consume_all()
            deliver(is_client, 1 << 30)
        for side in sides.values():
            side.transit += side.session.data_to_send()
        if not any(side.transit or any(side.pending.values()) for side in sides.values()):
            break
    for side, other in ((sides[True], sides[False]), (sides[False], sides[True])):
        for stream_id, data in side.sent.items():
            assert other.received[stream_id] == data
        for stream_id in side.close_wanted:
            assert stream_id in other.ended
    assert not pair.client.is_closed and not pair.server.is_closed
    # Streams closed by both sides are forgotten.
    both = sides[True].close_wanted & sides[False].close_wanted
    assert not both & set(pair.client.stream_ids)
    assert not both & set(pair.server.stream_ids)
