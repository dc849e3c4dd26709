from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdcn_p2p.errors import LocalProtocolError, RemoteProtocolError
from sdcn_p2p.wire.multistream import (
    MAX_REFUSALS,
    MAX_TOKEN,
    NA,
    PROTOCOL_ID,
    Dialer,
    Listener,
    ProtocolAccepted,
    ProtocolRefused,
    ProtocolSelected,
    encode_token,
    parse_token,
)

KAD = "/sdcn/kad/2.0.0"
PING = "/ipfs/ping/1.0.0"

# The spec's example bytes: varint length (counting the newline), token, newline.
HEADER_BYTES = b"\x13/multistream/1.0.0\n"


def test_messages_are_length_prefixed_lines() -> None:
    assert encode_token(PROTOCOL_ID) == HEADER_BYTES
    assert encode_token(NA) == b"\x03na\n"
    assert parse_token(HEADER_BYTES + b"rest") == (PROTOCOL_ID, len(HEADER_BYTES))


@pytest.mark.parametrize("token", ["", "a\nb", "/x" * (MAX_TOKEN // 2 + 1)])
def test_we_never_send_a_bad_token(token: str) -> None:
    with pytest.raises(LocalProtocolError):
        encode_token(token)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\x01\n", id="empty-token"),
        pytest.param(b"\x03na!", id="no-newline"),
        pytest.param(b"\x04n\na\n", id="inner-newline"),
        pytest.param(b"\x03\xff\xfe\n", id="not-utf8"),
        pytest.param(bytes([MAX_TOKEN + 2]) + b"x" * (MAX_TOKEN + 1) + b"\n", id="too-long"),
        pytest.param(b"\xff\xff\xff", id="huge-length"),
        pytest.param(b"\x80\x00", id="non-minimal-varint"),
    ],
)
def test_bad_messages_are_remote_protocol_errors(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_token(data)


def test_incomplete_messages_need_more_bytes() -> None:
    for end in range(len(HEADER_BYTES)):
        assert parse_token(HEADER_BYTES[:end]) is None


def negotiate(dialer: Dialer, listener: Listener) -> tuple[object, object]:
    """Run both sides back to back, the dialer's proposal in one piece (lazily)."""
    listener.receive_data(dialer.data_to_send())
    selected = listener.next_event()
    dialer.receive_data(listener.data_to_send())
    return selected, dialer.next_event()


def test_a_lazy_dialer_gets_its_protocol_in_one_exchange() -> None:
    dialer, listener = Dialer(KAD), Listener({KAD, PING})
    proposal = dialer.data_to_send()
    assert proposal == HEADER_BYTES + encode_token(KAD)
    listener.receive_data(proposal + b"first data")
    assert listener.next_event() == ProtocolSelected(KAD)
    assert listener.unused() == b"first data"
    answer = listener.data_to_send()
    assert answer == HEADER_BYTES + encode_token(KAD)
    dialer.receive_data(answer + b"reply")
    assert dialer.next_event() == ProtocolAccepted(KAD)
    assert dialer.unused() == b"reply"


def test_a_protocol_the_listener_lacks_is_answered_na() -> None:
    selected, answer = negotiate(Dialer("/nope/1.0.0"), Listener({KAD}))
    assert selected is None
    assert answer == ProtocolRefused("/nope/1.0.0")


def test_the_listener_answers_the_header_before_the_proposal_arrives() -> None:
    # A dialer that is not lazy waits for our header before it proposes anything.
    listener = Listener({KAD})
    listener.receive_data(HEADER_BYTES)
    assert listener.next_event() is None
    assert listener.data_to_send() == HEADER_BYTES
    listener.receive_data(encode_token("/other/1.0.0"))
    assert listener.next_event() is None
    assert listener.data_to_send() == encode_token(NA)
    listener.receive_data(encode_token(KAD)[:3])
    assert listener.next_event() is None
    listener.receive_data(encode_token(KAD)[3:])
    assert listener.next_event() == ProtocolSelected(KAD)
    assert listener.data_to_send() == encode_token(KAD)


@pytest.mark.parametrize("token", ["ls", NA])
def test_ls_and_na_are_never_selected(token: str) -> None:
    listener = Listener({token, KAD})
    listener.receive_data(HEADER_BYTES + encode_token(token))
    assert listener.next_event() is None
    assert listener.data_to_send() == HEADER_BYTES + encode_token(NA)


def test_a_listener_gives_up_after_too_many_refusals() -> None:
    listener = Listener({KAD})
    listener.receive_data(HEADER_BYTES + encode_token("/x/1") * MAX_REFUSALS)
    assert listener.next_event() is None
    listener.receive_data(encode_token("/x/1"))
    with pytest.raises(RemoteProtocolError, match="unknown protocols"):
        listener.next_event()


@pytest.mark.parametrize("side", [Dialer, Listener])
def test_a_peer_that_does_not_speak_multistream_is_refused(side: type) -> None:
    machine = side(KAD) if side is Dialer else side({KAD})
    machine.receive_data(encode_token("/multistream/2.0.0"))
    with pytest.raises(RemoteProtocolError, match="does not speak"):
        machine.next_event()


def test_a_dialer_refuses_an_answer_for_another_protocol() -> None:
    dialer = Dialer(KAD)
    dialer.receive_data(HEADER_BYTES + encode_token(PING))
    with pytest.raises(RemoteProtocolError, match="answered"):
        dialer.next_event()


def test_the_result_is_final() -> None:
    dialer = Dialer(KAD)
    with pytest.raises(LocalProtocolError):
        dialer.unused()
    dialer.receive_data(HEADER_BYTES + encode_token(KAD))
    assert dialer.next_event() == ProtocolAccepted(KAD)
    with pytest.raises(LocalProtocolError):
        dialer.next_event()


protocols = st.text(
    st.characters(blacklist_characters="\n", blacklist_categories=("Cs",)), min_size=1
).filter(lambda t: 0 < len(t.encode()) <= MAX_TOKEN and t not in ("ls", NA))


@settings(max_examples=200, deadline=None)
@given(protocols, st.binary(max_size=50), st.binary(max_size=50), st.integers(1, 7))
def test_round_trip_in_any_pieces(protocol: str, first: bytes, reply: bytes, piece: int) -> None:
    dialer, listener = Dialer(protocol), Listener({protocol})
    sent = dialer.data_to_send() + first
    event = None
    for start in range(0, len(sent), piece):
        listener.receive_data(sent[start : start + piece])
        event = event or listener.next_event()
    assert event == ProtocolSelected(protocol)
    assert listener.unused() == first
    answer = listener.data_to_send() + reply
    result = None
    for start in range(0, len(answer), piece):
        dialer.receive_data(answer[start : start + piece])
        result = result or dialer.next_event()
    assert result == ProtocolAccepted(protocol)
    assert dialer.unused() == reply


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.booleans())
def test_garbage_is_a_remote_protocol_error_or_needs_more(data: bytes, as_dialer: bool) -> None:
    machine = Dialer(KAD) if as_dialer else Listener({KAD})
    machine.receive_data(data)
    with contextlib.suppress(RemoteProtocolError):
        event = machine.next_event()
        assert event is None or isinstance(
            event, ProtocolAccepted | ProtocolRefused | ProtocolSelected
        )
