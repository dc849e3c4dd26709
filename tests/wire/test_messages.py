from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdcn_p2p.errors import LocalProtocolError, MessageTooLarge, ProtocolError, RemoteProtocolError
from sdcn_p2p.wire.messages import (
    MAX_DEPTH,
    MessageDecoder,
    encode_message,
    expect_map,
    pack,
    unpack,
)
from sdcn_p2p.wire.varint import encode_varint

CAP = 1 << 20

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(1 << 63), (1 << 64) - 1),
    st.floats(allow_nan=False),
    st.text(),
    st.binary(),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.one_of(st.text(), st.binary()), children, max_size=5),
    ),
    max_leaves=30,
)
messages = values.filter(lambda v: v is not None)


# --- unpack -------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(values)
def test_pack_unpack_round_trip(value: object) -> None:
    assert unpack(pack(value), max_size=CAP) == value


def test_bytes_and_str_stay_distinct() -> None:
    assert unpack(pack({"s": "text", "b": b"bin"}), max_size=CAP) == {"s": "text", "b": b"bin"}


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x92\x01", id="truncated"),
        pytest.param(b"\x01\x02", id="trailing-bytes"),
        pytest.param(b"\xc1", id="reserved-byte"),
        pytest.param(b"\xa1\xff", id="invalid-utf8"),
        pytest.param(b"\x81\x01\x02", id="int-key"),
        pytest.param(b"\x81\x90\x02", id="array-key"),
        pytest.param(b"\x82\xa1a\x01\xa1a\x02", id="duplicate-key"),
        pytest.param(b"\xd4\x05\x00", id="ext-fixext1"),
        pytest.param(b"\xc7\x03\x07abc", id="ext8"),
        pytest.param(b"\xd6\xff\x00\x00\x00\x01", id="timestamp32"),
        pytest.param(b"\xd7\xff" + b"\x00" * 8, id="timestamp64"),
        pytest.param(b"\xc7\x0c\xff" + b"\x00" * 12, id="timestamp96"),
        pytest.param(b"\xd7\xff" + b"\xff" * 8, id="bad-timestamp"),
        pytest.param(b"\x91\xd6\xff\x00\x00\x00\x01", id="timestamp-in-array"),
        pytest.param(b"\x81\xa1t\xd6\xff\x00\x00\x00\x01", id="timestamp-in-map"),
        pytest.param(b"\xdd\xff\xff\xff\xff", id="huge-array-header"),
        pytest.param(b"\xdf\xff\xff\xff\xff", id="huge-map-header"),
        pytest.param(b"\xc6\xff\xff\xff\xff", id="huge-bin-header"),
        pytest.param(b"\xdb\xff\xff\xff\xff", id="huge-str-header"),
    ],
)
def test_unpack_rejects(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        unpack(data, max_size=CAP)


def test_msgpack_alone_would_accept_a_timestamp() -> None:
    # Why the post-check exists: ext_hook never sees ext type -1.
    assert isinstance(msgpack.unpackb(b"\xd6\xff\x00\x00\x00\x01"), msgpack.Timestamp)


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 1_000, 100_000])
def test_nesting_bomb_is_a_protocol_error(depth: int) -> None:
    with pytest.raises(ProtocolError):
        unpack(b"\x91" * depth + b"\x00", max_size=CAP)
    with pytest.raises(ProtocolError):
        unpack(b"\x81\xa1k" * depth + b"\x00", max_size=CAP)


def test_nesting_up_to_max_depth_is_fine() -> None:
    value: object = 0
    for _ in range(MAX_DEPTH):
        value = [value]
    assert unpack(pack(value), max_size=CAP) == value


def test_unpack_enforces_max_size() -> None:
    data = pack(b"x" * 100)
    assert unpack(data, max_size=len(data)) == b"x" * 100
    with pytest.raises(MessageTooLarge) as excinfo:
        unpack(data, max_size=len(data) - 1)
    assert isinstance(excinfo.value, RemoteProtocolError)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_garbage_only_raises_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        unpack(data, max_size=CAP)


@settings(max_examples=200, deadline=None)
@given(value=values, position=st.integers(0, 1 << 16), byte=st.integers(0, 255))
def test_corrupted_messages_only_raise_protocol_error(
    value: object, position: int, byte: int
) -> None:
    data = bytearray(pack(value))
    data[position % len(data)] = byte
    with contextlib.suppress(ProtocolError):
        unpack(data, max_size=CAP)


# --- framing ------------------------------------------------------------------------------


def test_encode_message_is_varint_length_then_body() -> None:
    body = pack({"op": "ping"})
    assert encode_message({"op": "ping"}, max_size=CAP) == encode_varint(len(body)) + body


def test_encode_message_refuses_oversize_and_nil() -> None:
    with pytest.raises(LocalProtocolError) as excinfo:
        encode_message(b"x" * 100, max_size=50)
    assert isinstance(excinfo.value, LocalProtocolError)
    with pytest.raises(ValueError):
        encode_message(None, max_size=CAP)


@settings(max_examples=100, deadline=None)
@given(st.lists(messages, min_size=1, max_size=5))
def test_decoder_fed_byte_by_byte(items: list[object]) -> None:
    stream = b"".join(encode_message(item, max_size=CAP) for item in items)
    decoder = MessageDecoder(CAP)
    out = []
    for i in range(len(stream)):
        decoder.feed(stream[i : i + 1])
        while (message := decoder.next_message()) is not None:
            out.append(message)
    assert out == items
    assert decoder.next_message() is None


def test_decoder_returns_messages_fed_in_one_chunk() -> None:
    decoder = MessageDecoder(CAP)
    decoder.feed(
        memoryview(encode_message([1], max_size=CAP) + encode_message("two", max_size=CAP))
    )
    assert decoder.next_message() == [1]
    assert decoder.next_message() == "two"
    assert decoder.next_message() is None


def test_oversize_prefix_is_refused_before_the_body_arrives() -> None:
    decoder = MessageDecoder(1000)
    decoder.feed(encode_varint(1001))
    with pytest.raises(MessageTooLarge) as excinfo:
        decoder.next_message()
    assert isinstance(excinfo.value, RemoteProtocolError)


def test_message_of_exactly_max_size_is_accepted() -> None:
    encoded = encode_message(b"x" * 1000, max_size=1003)
    decoder = MessageDecoder(1003)
    decoder.feed(encoded)
    assert decoder.next_message() == b"x" * 1000


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\x80" * 10, id="varint-too-long"),
        pytest.param(b"\x81\x00", id="varint-not-minimal"),
    ],
)
def test_bad_varint_is_a_protocol_error(data: bytes) -> None:
    decoder = MessageDecoder(CAP)
    decoder.feed(data)
    with pytest.raises(ProtocolError):
        decoder.next_message()


def test_bad_body_is_a_protocol_error_and_stays_one() -> None:
    decoder = MessageDecoder(CAP)
    decoder.feed(b"\x01\xc1")
    for _ in range(2):
        with pytest.raises(ProtocolError):
            decoder.next_message()
    decoder.feed(b"more")  # the buffer is not pinned by the failed decode


def test_nil_message_is_a_protocol_error() -> None:
    decoder = MessageDecoder(CAP)
    decoder.feed(b"\x01\xc0")
    with pytest.raises(ProtocolError):
        decoder.next_message()


def test_empty_message_is_a_protocol_error() -> None:
    decoder = MessageDecoder(CAP)
    decoder.feed(b"\x00")
    with pytest.raises(ProtocolError):
        decoder.next_message()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_decoder_garbage_only_raises_protocol_error(data: bytes) -> None:
    decoder = MessageDecoder(32)
    decoder.feed(data)
    with contextlib.suppress(ProtocolError):
        while decoder.next_message() is not None:
            pass


# --- expect_map ---------------------------------------------------------------------------


def test_expect_map_accepts_matching_fields() -> None:
    message = {"n": 3, "key": b"k", "extra": "ignored", "ttl": 1.5}
    assert expect_map(message, {"n": int, "key": bytes}, {"ttl": (int, float)}) is message


@pytest.mark.parametrize(
    ("obj", "error"),
    [
        ([1], "expected a map"),
        ({}, "field 'n' is missing"),
        ({"n": "3"}, "field 'n' must be int"),
        ({"n": True}, "field 'n' must be int"),
        ({"n": 1, "ttl": "soon"}, "field 'ttl' must be int or float"),
    ],
)
def test_expect_map_rejects(obj: object, error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        expect_map(obj, {"n": int}, {"ttl": (int, float)})
