from __future__ import annotations

import contextlib
import dataclasses

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdcn_p2p.errors import RecordError
from sdcn_p2p.identity import Identity, verify_signature
from sdcn_p2p.multiaddr import Multiaddr
from sdcn_p2p.records import (
    MAX_ENVELOPE_SIZE,
    Envelope,
    PeerRecord,
    check_newer,
    open_signed,
)

ALICE = Identity.from_seed(b"\x01" * 32)
BOB = Identity.from_seed(b"\x02" * 32)
ADDRS = (
    Multiaddr.parse("/ip4/1.2.3.4/tcp/4001/ws"),
    Multiaddr.parse("/dns4/alice.example.com/tcp/443/wss"),
)
FUZZ = settings(max_examples=200, deadline=None)


def sealed_record(identity: Identity = ALICE, seq: int = 1) -> Envelope:
    return PeerRecord(identity.peer_id, seq, ADDRS).seal(identity)


def seal_payload(identity: Identity, payload: object) -> Envelope:
    """Sign an arbitrary peer-record payload, as a malicious peer could."""
    return Envelope.seal(
        identity,
        PeerRecord.DOMAIN,
        PeerRecord.PAYLOAD_TYPE,
        msgpack.packb(payload, use_bin_type=True),
    )


# Envelope


def test_envelope_seal_open_round_trip() -> None:
    envelope = Envelope.seal(ALICE, "test-domain", b"/test/1", b"payload")
    assert envelope.public_key == ALICE.public_key_bytes
    assert envelope.open("test-domain", b"/test/1") == ALICE.peer_id
    decoded = Envelope.from_bytes(envelope.to_bytes())
    assert decoded == envelope
    assert decoded.open("test-domain", b"/test/1") == ALICE.peer_id


def test_signature_covers_the_rfc_0002_signing_buffer() -> None:
    envelope = Envelope.seal(ALICE, "sdcn-peer-record", b"/sdcn/peer-record/1", b"\x01\x02")
    buffer = b"\x10sdcn-peer-record" + b"\x13/sdcn/peer-record/1" + b"\x02\x01\x02"
    assert verify_signature(ALICE.public_key, envelope.signature, buffer)


def test_envelope_wire_format_is_a_msgpack_array_of_bin() -> None:
    envelope = Envelope.seal(ALICE, "d", b"t", b"p")
    assert msgpack.unpackb(envelope.to_bytes()) == [
        envelope.public_key,
        b"t",
        b"p",
        envelope.signature,
    ]


def flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda e: dataclasses.replace(e, payload=e.payload + b"!"), "signature does not verify"),
        (lambda e: dataclasses.replace(e, signature=flip_last_byte(e.signature)), "signature"),
        (lambda e: dataclasses.replace(e, signature=e.signature[:-1]), "signature"),
        (lambda e: dataclasses.replace(e, public_key=BOB.public_key_bytes), "signature"),
        (lambda e: dataclasses.replace(e, public_key=b"\x08\x02\x12\x00"), "public key"),
        (lambda e: dataclasses.replace(e, public_key=b""), "public key"),
        (lambda e: dataclasses.replace(e, payload_type=b"/test/2"), "payload type"),
    ],
    ids=[
        "payload",
        "signature",
        "short-signature",
        "other-key",
        "rsa-key",
        "no-key",
        "payload-type",
    ],
)
def test_tampered_envelope_does_not_open(tamper, message: str) -> None:
    envelope = tamper(Envelope.seal(ALICE, "test-domain", b"/test/1", b"payload"))
    with pytest.raises(RecordError, match=message):
        envelope.open("test-domain", b"/test/1")


def test_envelope_does_not_open_in_another_domain() -> None:
    envelope = Envelope.seal(ALICE, "sdcn-advert", PeerRecord.PAYLOAD_TYPE, b"payload")
    with pytest.raises(RecordError, match="does not verify for domain 'sdcn-peer-record'"):
        envelope.open("sdcn-peer-record", PeerRecord.PAYLOAD_TYPE)


def test_record_sealed_for_another_domain_is_rejected() -> None:
    record = PeerRecord(ALICE.peer_id, 1, ADDRS)
    payload = msgpack.unpackb(record.seal(ALICE).payload)
    envelope = Envelope.seal(
        ALICE, "sdcn-advert", PeerRecord.PAYLOAD_TYPE, msgpack.packb(payload, use_bin_type=True)
    )
    with pytest.raises(RecordError, match="domain"):
        PeerRecord.from_envelope(envelope)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "malformed msgpack"),
        (b"\xc1", "malformed msgpack"),  # never-used type byte
        (msgpack.packb([b"a", b"b", b"c"]), "array of 4"),
        (msgpack.packb([b"a", b"b", b"c", b"d", b"e"]), "array of 4"),
        (msgpack.packb({"public_key": b""}), "array of 4"),
        (msgpack.packb([b"a", "b", b"c", b"d"]), "bin"),
        (msgpack.packb([b"a", b"b", b"c", 4]), "bin"),
        (msgpack.packb([b"k", b"t", b"p", b"s" * 64]) + b"\x00", "malformed msgpack"),
        (msgpack.packb([b"k" * 129, b"t", b"p", b"s" * 64]), "public key of 129 bytes"),
        (msgpack.packb([b"k", b"t" * 129, b"p", b"s" * 64]), "payload type of 129 bytes"),
        (msgpack.packb([b"k", b"t", b"p", b"s" * 63]), "signature of 63 bytes"),
        (msgpack.packb([b"k", b"t", msgpack.ExtType(5, b"x"), b"s"]), "malformed msgpack"),
        (msgpack.packb([b"k", b"t", msgpack.Timestamp(0), b"s"]), "malformed msgpack"),
        (b"\x94" + b"\xc4\x00" * 3 + b"\xc6\xff\xff\xff\xff", "malformed msgpack"),  # bin32 lie
        (b"\x91" * 100_000, "malformed msgpack"),  # nested past msgpack's stack limit
    ],
)
def test_malformed_envelope_bytes_are_rejected(data: bytes, message: str) -> None:
    with pytest.raises(RecordError, match=message):
        Envelope.from_bytes(data, max_size=len(data) + 1)


def test_oversize_envelope_is_rejected_before_decoding() -> None:
    envelope = Envelope.seal(ALICE, "d", b"t", b"x" * MAX_ENVELOPE_SIZE)
    with pytest.raises(RecordError, match="over the 65536-byte cap"):
        Envelope.from_bytes(envelope.to_bytes())
    small = Envelope.seal(ALICE, "d", b"t", b"x" * 100).to_bytes()
    with pytest.raises(RecordError, match="cap"):
        Envelope.from_bytes(small, max_size=len(small) - 1)
    assert Envelope.from_bytes(small, max_size=len(small)).to_bytes() == small


def test_from_bytes_rejects_non_bytes() -> None:
    with pytest.raises(RecordError, match="must be bytes"):
        Envelope.from_bytes("text")  # type: ignore[arg-type]


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_raise_record_error(data: bytes) -> None:
    try:
        envelope = Envelope.from_bytes(data)
    except RecordError:
        return
    assert Envelope.from_bytes(envelope.to_bytes()) == envelope


_MSGPACK_VALUE = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text()
    | st.binary()
    | st.sampled_from([ALICE.peer_id.bytes, "/ip4/1.2.3.4/tcp/1/ws"]),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=4)
    ),
    max_leaves=10,
)
_PAYLOAD = st.binary(max_size=200) | st.dictionaries(
    st.sampled_from(["peer_id", "seq", "addrs", "extra"]), _MSGPACK_VALUE
).map(lambda fields: msgpack.packb(fields, use_bin_type=True))


@FUZZ
@given(_PAYLOAD)
def test_signed_garbage_payloads_only_raise_record_error(payload: bytes) -> None:
    envelope = Envelope.seal(ALICE, PeerRecord.DOMAIN, PeerRecord.PAYLOAD_TYPE, payload)
    with contextlib.suppress(RecordError):
        PeerRecord.from_envelope(envelope)


# open_signed


def test_open_signed_returns_signer_and_payload() -> None:
    envelope = seal_payload(ALICE, {"peer_id": ALICE.peer_id.bytes, "n": 1, "f": 0.5})
    signer, payload = open_signed(
        envelope, PeerRecord.DOMAIN, PeerRecord.PAYLOAD_TYPE, {"n": int, "f": (int, float)}
    )
    assert signer == ALICE.peer_id
    assert payload == {"peer_id": ALICE.peer_id.bytes, "n": 1, "f": 0.5}


def test_open_signed_verifies_before_decoding() -> None:
    envelope = Envelope.seal(ALICE, PeerRecord.DOMAIN, PeerRecord.PAYLOAD_TYPE, b"\xc1garbage")
    forged = dataclasses.replace(envelope, signature=bytes(64))
    with pytest.raises(RecordError, match="signature"):
        open_signed(forged, PeerRecord.DOMAIN, PeerRecord.PAYLOAD_TYPE, {})
    with pytest.raises(RecordError, match="malformed msgpack"):
        open_signed(envelope, PeerRecord.DOMAIN, PeerRecord.PAYLOAD_TYPE, {})


# PeerRecord


def test_peer_record_round_trip() -> None:
    record = PeerRecord(ALICE.peer_id, 1_700_000_000_000, ADDRS)
    envelope = Envelope.from_bytes(record.seal(ALICE).to_bytes())
    assert PeerRecord.from_envelope(envelope) == record


def test_peer_record_extremes_round_trip() -> None:
    for record in (
        PeerRecord(ALICE.peer_id, 0, ()),
        PeerRecord(ALICE.peer_id, 2**64 - 1, ADDRS * 16),
    ):
        assert PeerRecord.from_envelope(record.seal(ALICE)) == record


def test_peer_record_stores_addresses_without_p2p() -> None:
    record = PeerRecord(ALICE.peer_id, 1, [a.with_peer_id(ALICE.peer_id) for a in ADDRS])
    assert record.addrs == ADDRS


def test_peer_record_payload_is_the_documented_map() -> None:
    payload = msgpack.unpackb(PeerRecord(ALICE.peer_id, 7, ADDRS).seal(ALICE).payload)
    assert payload == {"peer_id": ALICE.peer_id.bytes, "seq": 7, "addrs": [str(a) for a in ADDRS]}


def test_sealing_with_another_identity_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot seal"):
        PeerRecord(ALICE.peer_id, 1, ADDRS).seal(BOB)


def test_record_naming_another_peer_is_rejected() -> None:
    # Bob signs a record that claims to be Alice's.
    envelope = seal_payload(BOB, {"peer_id": ALICE.peer_id.bytes, "seq": 1, "addrs": []})
    with pytest.raises(RecordError, match="a key that does not match the peer id"):
        PeerRecord.from_envelope(envelope)


def test_tampered_peer_record_is_rejected() -> None:
    envelope = sealed_record()
    payload = msgpack.unpackb(envelope.payload)
    payload["addrs"] = ["/ip4/6.6.6.6/tcp/80/ws"]
    forged = dataclasses.replace(envelope, payload=msgpack.packb(payload, use_bin_type=True))
    with pytest.raises(RecordError, match="signature does not verify"):
        PeerRecord.from_envelope(forged)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ([1, 2, 3], "not a msgpack map"),
        ({"peer_id": b"", "seq": 1}, "lacks addrs"),
        ({"seq": 1, "addrs": []}, "lacks peer_id"),
        ({"peer_id": b"", "seq": 1, "addrs": [], "extra": 1}, "unexpected fields"),
        ({"peer_id": b"", "seq": 1, "addrs": [], b"raw": 1}, "unexpected fields"),
        ({"peer_id": b"", "seq": True, "addrs": []}, "'seq' has type bool"),
        ({"peer_id": b"", "seq": 1.0, "addrs": []}, "'seq' has type float"),
        ({"peer_id": b"", "seq": -1, "addrs": []}, "seq must be an int"),
        ({"peer_id": b"", "seq": 1, "addrs": ("/ip4/1.2.3.4",)}, "invalid multiaddr"),
        ({"peer_id": b"", "seq": 1, "addrs": [1]}, "must be a str"),
        ({"peer_id": b"", "seq": 1, "addrs": "/ip4/1.2.3.4/tcp/1/ws"}, "'addrs' has type str"),
        ({"peer_id": b"", "seq": 1, "addrs": ["/ip4/1.2.3.4/tcp/1/ws"] * 33}, "at most 32"),
        ({"peer_id": "alice", "seq": 1, "addrs": []}, "'peer_id' has type str"),
        ({"peer_id": b"\x00\x05abc", "seq": 1, "addrs": []}, "invalid peer id"),
    ],
)
def test_malformed_peer_record_payload_is_rejected(payload: object, message: str) -> None:
    if isinstance(payload, dict) and payload.get("peer_id") == b"":
        payload["peer_id"] = ALICE.peer_id.bytes
    with pytest.raises(RecordError, match=message):
        PeerRecord.from_envelope(seal_payload(ALICE, payload))


def test_record_with_address_of_another_peer_is_rejected() -> None:
    addr = f"/ip4/1.2.3.4/tcp/1/ws/p2p/{BOB.peer_id}"
    envelope = seal_payload(ALICE, {"peer_id": ALICE.peer_id.bytes, "seq": 1, "addrs": [addr]})
    with pytest.raises(RecordError, match="names another peer"):
        PeerRecord.from_envelope(envelope)


def test_peer_record_payload_with_ext_type_is_rejected() -> None:
    payload = {"peer_id": ALICE.peer_id.bytes, "seq": msgpack.Timestamp(1), "addrs": []}
    with pytest.raises(RecordError, match="malformed msgpack"):
        PeerRecord.from_envelope(seal_payload(ALICE, payload))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"peer_id": str(ALICE.peer_id), "seq": 1, "addrs": ()}, "PeerId"),
        ({"peer_id": ALICE.peer_id, "seq": 2**64, "addrs": ()}, "seq"),
        ({"peer_id": ALICE.peer_id, "seq": -1, "addrs": ()}, "seq"),
        ({"peer_id": ALICE.peer_id, "seq": 1, "addrs": ADDRS * 17}, "at most 32"),
        ({"peer_id": ALICE.peer_id, "seq": 1, "addrs": ("/ip4/1.2.3.4/tcp/1/ws",)}, "Multiaddr"),
    ],
)
def test_peer_record_constructor_validates(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PeerRecord(**kwargs)


# seq ordering


def test_check_newer() -> None:
    check_newer(None, 0)
    check_newer(5, 6)
    with pytest.raises(RecordError, match="stale record: seq 5 is not above held seq 5"):
        check_newer(5, 5)
    with pytest.raises(RecordError, match="stale record: seq 4 is not above held seq 5"):
        check_newer(5, 4)


def test_is_newer_than() -> None:
    held = PeerRecord(ALICE.peer_id, 5, ADDRS)
    assert PeerRecord(ALICE.peer_id, 6, ()).is_newer_than(held)
    assert PeerRecord(ALICE.peer_id, 0, ()).is_newer_than(None)
    assert not PeerRecord(ALICE.peer_id, 5, ()).is_newer_than(held)
    assert not PeerRecord(ALICE.peer_id, 4, ()).is_newer_than(held)
    with pytest.raises(ValueError, match="cannot order"):
        PeerRecord(BOB.peer_id, 6, ()).is_newer_than(held)
