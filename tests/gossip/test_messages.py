"""Gossip's wire messages alone: round trips, the wire format, malformed and arbitrary input."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdcn_p2p.errors import ProtocolError
from sdcn_p2p.gossip.messages import (
    AdvertBatch,
    Digest,
    Graft,
    Prune,
    max_entries,
    parse_message,
)
from sdcn_p2p.identity import PeerId
from sdcn_p2p.testing import test_identity

PEER_IDS = [test_identity(i, seed=3).peer_id for i in range(8)]
ENTRIES = max_entries(4 * 1024 * 1024)


@pytest.mark.parametrize(
    "message",
    [
        AdvertBatch((b"a", b"bb")),
        AdvertBatch(()),
        AdvertBatch((b"a",), want=(PEER_IDS[0], PEER_IDS[1])),
        AdvertBatch((), want=()),
        Digest({PEER_IDS[0]: 0, PEER_IDS[1]: 2**64 - 1}),
        Digest({}),
        Graft(),
        Prune(),
    ],
)
def test_messages_round_trip(message) -> None:
    wire = msgpack.unpackb(msgpack.packb(message.to_wire(), use_bin_type=True))
    assert parse_message(wire, max_entries=ENTRIES) == message


def test_message_wire_format() -> None:
    assert Graft().to_wire() == {"type": "GRAFT"}
    assert Prune().to_wire() == {"type": "PRUNE"}
    assert AdvertBatch((b"e",)).to_wire() == {"type": "ADVERTS", "adverts": [b"e"]}
    assert AdvertBatch((), (PEER_IDS[0],)).to_wire() == {
        "type": "ADVERTS",
        "adverts": [],
        "want": [PEER_IDS[0].bytes],
    }
    assert Digest({PEER_IDS[0]: 7}).to_wire() == {
        "type": "DIGEST",
        "digest": [[PEER_IDS[0].bytes, 7]],
    }


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ([], "must be a map"),
        ({}, "unknown gossip message type None"),
        ({"type": "IHAVE"}, "unknown gossip message type"),
        ({"type": b"GRAFT"}, "unknown gossip message type"),
        ({"type": "ADVERTS"}, "list of bin"),
        ({"type": "ADVERTS", "adverts": b"x"}, "list of bin"),
        ({"type": "ADVERTS", "adverts": ["x"]}, "list of bin"),
        ({"type": "ADVERTS", "adverts": [b"x", 1]}, "list of bin"),
        ({"type": "ADVERTS", "adverts": [], "want": b""}, "'want' must be a list"),
        ({"type": "ADVERTS", "adverts": [], "want": [b"\x00\x05abc"]}, "invalid peer id"),
        ({"type": "ADVERTS", "adverts": [], "want": ["peer"]}, "peer id must be bin"),
        (
            {"type": "ADVERTS", "adverts": [], "want": [PEER_IDS[0].bytes] * 2},
            "names a peer twice",
        ),
        ({"type": "ADVERTS", "adverts": [], "want": [PEER_IDS[0].bytes] * 5}, "at most 4"),
        ({"type": "DIGEST"}, "'digest' must be a list"),
        ({"type": "DIGEST", "digest": {}}, "'digest' must be a list"),
        ({"type": "DIGEST", "digest": [[PEER_IDS[0].bytes] * 2] * 5}, "at most 4"),
        ({"type": "DIGEST", "digest": [PEER_IDS[0].bytes]}, r"\[peer id, seq\]"),
        ({"type": "DIGEST", "digest": [[PEER_IDS[0].bytes, 1, 2]]}, r"\[peer id, seq\]"),
        ({"type": "DIGEST", "digest": [[PEER_IDS[0].bytes, -1]]}, "seq must be an int"),
        ({"type": "DIGEST", "digest": [[PEER_IDS[0].bytes, 2**64]]}, "seq must be an int"),
        ({"type": "DIGEST", "digest": [[PEER_IDS[0].bytes, True]]}, "seq must be an int"),
        ({"type": "DIGEST", "digest": [[PEER_IDS[0].bytes, 1.0]]}, "seq must be an int"),
        ({"type": "DIGEST", "digest": [[b"junk", 1]]}, "invalid peer id"),
        (
            {"type": "DIGEST", "digest": [[PEER_IDS[0].bytes, 1], [PEER_IDS[0].bytes, 2]]},
            "twice",
        ),
    ],
)
def test_malformed_messages_are_refused(obj: object, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        parse_message(obj, max_entries=4)


_ANY_VALUE = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=40)
    | st.sampled_from([PEER_IDS[0].bytes, "ADVERTS", "DIGEST", "GRAFT", "PRUNE"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(["type", "adverts", "digest", "want", "x"]), children)
    ),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(_ANY_VALUE)
def test_arbitrary_messages_only_raise_protocol_error(obj: object) -> None:
    try:
        message = parse_message(obj, max_entries=4)
    except ProtocolError:
        return
    assert parse_message(message.to_wire(), max_entries=4) == message


def test_max_entries_fit_in_a_message() -> None:
    size = 128 * 1024
    count = max_entries(size)
    # The largest peer ids the PeerId type accepts, with the largest seqs.
    peers = [PeerId(b"\x00\x2a" + i.to_bytes(4, "big") + bytes(38)) for i in range(count)]
    digest = Digest(dict.fromkeys(peers, 2**64 - 1)).to_wire()
    assert len(msgpack.packb(digest, use_bin_type=True)) <= size
    want = AdvertBatch((), tuple(peers)).to_wire()
    assert len(msgpack.packb(want, use_bin_type=True)) <= size
