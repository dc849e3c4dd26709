from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdcn_p2p.errors import RemoteProtocolError
from sdcn_p2p.wire import protobuf
from sdcn_p2p.wire.protobuf import Field

SCHEMA = {
    1: Field("data", "bytes"),
    2: Field("names", "string", repeated=True),
    3: Field("seq", "uint64"),
    4: Field("flag", "bool"),
}


def test_encoding_matches_protobuf() -> None:
    # Bytes the protobuf library writes for {data: "hi", names: ["a", "b"], seq: 300}.
    expected = b"\x0a\x02hi\x12\x01a\x12\x01b\x18\xac\x02"
    assert protobuf.encode([(1, b"hi"), (2, "a"), (2, "b"), (3, 300), (4, None)]) == expected
    assert protobuf.decode(expected, SCHEMA) == {
        "data": b"hi",
        "names": ["a", "b"],
        "seq": 300,
        "flag": None,
    }


def test_unknown_fields_of_every_wire_type_are_skipped() -> None:
    unknown = (
        b"\x28\x96\x01"  # field 5, varint
        + b"\x31" + bytes(8)  # field 6, fixed64
        + b"\x3a\x03abc"  # field 7, bytes
        + b"\x45" + bytes(4)  # field 8, fixed32
    )  # fmt: skip
    assert protobuf.decode(unknown + b"\x18\x07", SCHEMA)["seq"] == 7


def test_the_last_value_of_a_singular_field_wins() -> None:
    assert protobuf.decode(b"\x18\x01\x18\x02", SCHEMA)["seq"] == 2


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\x0a\x05hi", id="truncated-bytes"),
        pytest.param(b"\x18", id="missing-varint"),
        pytest.param(b"\x18" + b"\xff" * 10 + b"\x01", id="varint-over-10-bytes"),
        pytest.param(b"\x18\xff\xff\xff\xff\xff\xff\xff\xff\xff\x7f", id="varint-over-64-bits"),
        pytest.param(b"\x00\x01", id="field-0"),
        pytest.param(b"\x0b", id="start-group"),
        pytest.param(b"\x0e", id="wire-type-6"),
        pytest.param(b"\x08\x01", id="bytes-as-varint"),
        pytest.param(b"\x1a\x01x", id="uint64-as-bytes"),
        pytest.param(b"\x12\x02\xff\xfe", id="string-not-utf8"),
        pytest.param(b"\x31" + bytes(7), id="truncated-fixed64"),
    ],
)
def test_malformed_messages_are_remote_protocol_errors(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        protobuf.decode(data, SCHEMA)


def test_out_of_range_values_cannot_be_encoded() -> None:
    with pytest.raises(ValueError):
        protobuf.encode_field(3, -1)
    with pytest.raises(ValueError):
        protobuf.encode_field(3, 1 << 64)


messages = st.fixed_dictionaries(
    {
        "data": st.none() | st.binary(max_size=300),
        "names": st.lists(st.text(max_size=20), max_size=5),
        "seq": st.none() | st.integers(0, 2**64 - 1),
        "flag": st.none() | st.booleans(),
    }
)


@settings(max_examples=200, deadline=None)
@given(messages)
def test_round_trip(message: dict) -> None:
    encoded = protobuf.encode(
        [
            (1, message["data"]),
            *((2, name) for name in message["names"]),
            (3, message["seq"]),
            (4, message["flag"]),
        ]
    )
    assert protobuf.decode(encoded, SCHEMA) == message


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_is_a_remote_protocol_error_or_a_message(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        decoded = protobuf.decode(data, SCHEMA)
        assert set(decoded) == {"data", "names", "seq", "flag"}
