from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdcn_p2p.dht.messages import (
    MAX_ADDRS,
    MAX_CLOSER,
    Contact,
    FindNode,
    GetValue,
    PutValue,
    decode_nodes,
    decode_put,
    decode_request,
    decode_values,
    encode_request,
    nodes_response,
    put_response,
    values_response,
)
from sdcn_p2p.errors import ProtocolError
from sdcn_p2p.multiaddr import Multiaddr
from sdcn_p2p.testing import test_identity
from sdcn_p2p.wire.messages import pack, unpack

FUZZ = settings(max_examples=200, deadline=None)
KEY = bytes(range(32))
PEER = test_identity(1).peer_id
ADDR = Multiaddr.parse("/ip4/10.0.0.1/tcp/4001/ws")
CONTACT = Contact(PEER, (ADDR,))


def wire(obj: object) -> object:
    """What the other side decodes: `obj` through msgpack."""
    return unpack(pack(obj), max_size=1 << 22)


@pytest.mark.parametrize("request_", [FindNode(KEY), GetValue(KEY), PutValue(KEY, b"envelope")])
def test_requests_round_trip(request_: FindNode | GetValue | PutValue) -> None:
    assert decode_request(wire(encode_request(request_))) == request_


def test_responses_round_trip() -> None:
    assert decode_nodes(wire(nodes_response([CONTACT] * 3))) == [CONTACT] * 3
    assert decode_values(wire(values_response([b"a", b"b"], [CONTACT]))) == (
        [b"a", b"b"],
        [CONTACT],
    )
    assert decode_put(wire(put_response(True))) == (True, None)
    assert decode_put(wire(put_response(False, "stale" * 1000))) == (False, ("stale" * 1000)[:512])
    # Answers are capped when encoded: at most 20 contacts of 16 addresses each.
    many = Contact(PEER, (ADDR,) * 40)
    (decoded,) = decode_nodes(wire(nodes_response([many])))
    assert len(decoded.addrs) == MAX_ADDRS
    assert len(decode_nodes(wire(nodes_response([CONTACT] * 40)))) == MAX_CLOSER


def test_a_contact_address_naming_its_own_peer_is_accepted_without_the_suffix() -> None:
    (contact,) = decode_nodes({"closer": [[PEER.bytes, [str(ADDR.with_peer_id(PEER))]]]})
    assert contact == CONTACT


OTHER = test_identity(2).peer_id


@pytest.mark.parametrize(
    "message",
    [
        None,
        [],
        {"type": "FIND_NODE"},
        {"type": "FIND_NODE", "key": "text"},
        {"type": "FIND_NODE", "key": b"short"},
        {"type": "GET_VALUE", "key": KEY * 2},
        {"type": "PUT_VALUE", "key": KEY},
        {"type": "PUT_VALUE", "key": KEY, "value": "text"},
        {"type": "PUT_VALUE", "key": KEY, "value": b"x" * (64 * 1024 + 1)},
        {"type": "PING", "key": KEY},
        {"type": 1, "key": KEY},
    ],
)
def test_bad_requests_raise_protocol_error(message: object) -> None:
    with pytest.raises(ProtocolError):
        decode_request(message)


@pytest.mark.parametrize(
    "message",
    [
        {},
        {"closer": "x"},
        {"closer": [[PEER.bytes, [str(ADDR)]]] * 21},
        {"closer": [[PEER.bytes]]},
        {"closer": [[b"not a peer id", []]]},
        {"closer": [[PEER.bytes, [str(ADDR)] * 17]]},
        {"closer": [[PEER.bytes, ["/ip4/1.2.3.4/udp/1"]]]},
        {"closer": [[PEER.bytes, [str(ADDR.with_peer_id(OTHER))]]]},
        {"closer": [[PEER.bytes, [b"/ip4/1.2.3.4/tcp/1/ws"]]]},
        {"closer": [[PEER.bytes, "x"]]},
    ],
)
def test_bad_contacts_raise_protocol_error(message: object) -> None:
    with pytest.raises(ProtocolError):
        decode_nodes(message)


def test_bad_value_and_put_answers_raise_protocol_error() -> None:
    for message in (
        {"closer": []},
        {"values": "x", "closer": []},
        {"values": ["text"], "closer": []},
        {"values": [b"x"] * 3, "closer": []},
        {"values": [b"x" * 101], "closer": []},
    ):
        with pytest.raises(ProtocolError):
            decode_values(message, max_values=2, max_value_size=100)
    for message in ({}, {"ok": 1}, {"ok": True, "error": 5}, {"ok": False, "error": "x" * 600}):
        with pytest.raises(ProtocolError):
            decode_put(message)


FIELDS = ["type", "key", "value", "closer", "values", "ok"]
plain = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8) | st.binary(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(FIELDS), children)
    ),
    max_leaves=20,
)


@FUZZ
@given(plain)
def test_decoders_raise_only_protocol_error(message: object) -> None:
    for decode in (decode_request, decode_nodes, decode_values, decode_put):
        with contextlib.suppress(ProtocolError):
            decode(message)
