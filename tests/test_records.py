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
    Advert,
    AdvertState,
    Envelope,
    LoraInfo,
    ModelInfo,
    PeerRecord,
    check_newer,
    model_key,
    normalize_model_name,
    open_signed,
)
from sdcn_p2p.wire.libp2p import PeerRecordMessage
from sdcn_p2p.wire.multiaddr import encode_multiaddr
from sdcn_p2p.wire.varint import encode_varint

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


# PeerRecord sealed as libp2p seals one (RFC 0003)


def libp2p_record_payload(peer: bytes, seq: int, addrs: tuple[bytes, ...]) -> bytes:
    return PeerRecordMessage(peer, seq, addrs).encode()


def test_libp2p_sealed_record_round_trips_through_protobuf() -> None:
    record = PeerRecord(ALICE.peer_id, 2**63 + 5, ADDRS)
    envelope = record.seal_libp2p(ALICE)
    assert envelope.payload_type == b"\x03\x01"
    assert verify_signature(
        ALICE.public_key,
        envelope.signature,
        b"\x12libp2p-peer-record\x02\x03\x01"
        + encode_varint(len(envelope.payload))
        + envelope.payload,
    )
    decoded = Envelope.from_protobuf(envelope.to_protobuf())
    assert decoded == envelope
    assert PeerRecord.from_libp2p_envelope(decoded) == record


def test_libp2p_record_does_not_open_as_ours_nor_ours_as_libp2p() -> None:
    record = PeerRecord(ALICE.peer_id, 1, ADDRS)
    with pytest.raises(RecordError):
        PeerRecord.from_envelope(record.seal_libp2p(ALICE))
    with pytest.raises(RecordError):
        PeerRecord.from_libp2p_envelope(record.seal(ALICE))


def test_libp2p_record_keeps_only_addresses_we_can_dial() -> None:
    quic = bytes.fromhex("040102030491020fa1cd03")  # /ip4/1.2.3.4/udp/4001/quic-v1
    ws = encode_multiaddr(ADDRS[0])
    ws_with_id = encode_multiaddr(ADDRS[1].with_peer_id(ALICE.peer_id))
    payload = libp2p_record_payload(ALICE.peer_id.bytes, 3, (quic, ws, ws_with_id))
    envelope = Envelope.seal(ALICE, "libp2p-peer-record", b"\x03\x01", payload)
    assert PeerRecord.from_libp2p_envelope(envelope).addrs == ADDRS


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (libp2p_record_payload(BOB.peer_id.bytes, 1, ()), "signed by another key"),
        (libp2p_record_payload(b"not a peer id", 1, ()), "malformed"),
        (b"\x0a\x05short", "malformed"),
    ],
)
def test_bad_libp2p_records_are_rejected(payload: bytes, message: str) -> None:
    envelope = Envelope.seal(ALICE, "libp2p-peer-record", b"\x03\x01", payload)
    with pytest.raises(RecordError, match=message):
        PeerRecord.from_libp2p_envelope(envelope)


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_protobuf_envelopes_only_raise_record_error(data: bytes) -> None:
    with contextlib.suppress(RecordError):
        envelope = Envelope.from_protobuf(data)
        with contextlib.suppress(RecordError):
            PeerRecord.from_libp2p_envelope(envelope)


# Advert

NOW = 1_700_000_000.0
FULL_ADVERT = Advert(
    peer_id=ALICE.peer_id,
    seq=1_700_000_000_123,
    issued_at=NOW,
    ttl=180.0,
    addrs=ADDRS,
    reachability="outbound-only",
    backend="webui",
    models=(
        ModelInfo("SDXL Base 1.0", "sd_xl_base_1.0.safetensors [31e35c80fc]", "31e35c80fc", "sdxl"),
        ModelInfo("Realistic Vision", architecture="sd1"),
    ),
    loras=(LoraInfo("Detail Tweaker", "abc123"), LoraInfo("add_detail")),
    samplers=("Euler a", "DPM++ 2M Karras"),
    vram_total_mb=24_576,
    vram_free_mb=20_000,
    max_pixels=2048 * 2048,
    max_steps=150,
    slots=2,
    queue=3,
    speed=7.5,
    state="draining",
)


def advert_payload(**changes: object) -> dict:
    """The payload map of `FULL_ADVERT`, with `changes` applied."""
    payload = msgpack.unpackb(FULL_ADVERT.seal(ALICE).payload)
    payload.update(changes)
    return payload


def seal_advert_payload(identity: Identity, payload: object) -> Envelope:
    """Sign an arbitrary advert payload, as a malicious provider could."""
    return Envelope.seal(
        identity, Advert.DOMAIN, Advert.PAYLOAD_TYPE, msgpack.packb(payload, use_bin_type=True)
    )


def test_advert_round_trip() -> None:
    envelope = Envelope.from_bytes(FULL_ADVERT.seal(ALICE).to_bytes())
    assert envelope.open(Advert.DOMAIN, Advert.PAYLOAD_TYPE) == ALICE.peer_id
    assert Advert.from_envelope(envelope) == FULL_ADVERT


def test_advert_minimal_and_maximal_round_trip() -> None:
    smallest = Advert(ALICE.peer_id, 0, 0, 1)
    assert Advert.from_envelope(smallest.seal(ALICE)) == smallest
    largest = Advert(
        ALICE.peer_id,
        2**64 - 1,
        1e11,
        Advert.MAX_TTL,
        addrs=ADDRS * 8,
        backend="b" * 32,
        models=tuple(ModelInfo(f"m{i}", "t" * 16, "h" * 16, "a" * 32) for i in range(128)),
        loras=tuple(LoraInfo(f"l{i}", "h" * 8) for i in range(512)),
        samplers=tuple(f"s{i}" for i in range(64)),
        vram_total_mb=10**7,
        vram_free_mb=10**7,
        max_pixels=2**32,
        max_steps=10_000,
        slots=1024,
        queue=10**6,
        speed=1e4,
    )
    envelope = largest.seal(ALICE)
    assert len(envelope.to_bytes()) <= MAX_ENVELOPE_SIZE
    assert Advert.from_envelope(Envelope.from_bytes(envelope.to_bytes())) == largest


def test_advert_numbers_come_back_as_floats() -> None:
    advert = Advert(ALICE.peer_id, 1, 1_700_000_000, 180, speed=3)
    decoded = Advert.from_envelope(advert.seal(ALICE))
    assert (type(decoded.issued_at), type(decoded.ttl), type(decoded.speed)) == (float,) * 3
    assert decoded == advert


def test_advert_payload_is_the_documented_map() -> None:
    payload = msgpack.unpackb(FULL_ADVERT.seal(ALICE).payload)
    assert payload == {
        "peer_id": ALICE.peer_id.bytes,
        "seq": FULL_ADVERT.seq,
        "issued_at": NOW,
        "ttl": 180.0,
        "addrs": [str(a) for a in ADDRS],
        "reach": "outbound-only",
        "backend": "webui",
        "models": [
            ["SDXL Base 1.0", "sd_xl_base_1.0.safetensors [31e35c80fc]", "31e35c80fc", "sdxl"],
            ["Realistic Vision", "", "", "sd1"],
        ],
        "loras": [["Detail Tweaker", "abc123"], ["add_detail", ""]],
        "samplers": ["Euler a", "DPM++ 2M Karras"],
        "vram": [24_576, 20_000],
        "limits": [2048 * 2048, 150],
        "load": [2, 3],
        "speed": 7.5,
        "state": "draining",
        "roles": ["provider"],
    }


def test_an_advert_may_carry_the_queue_limit_and_says_when_it_is_full() -> None:
    advert = dataclasses.replace(FULL_ADVERT, state="online", max_queue=4)
    envelope = advert.seal(ALICE)
    assert msgpack.unpackb(envelope.payload)["load"] == [2, 3, 4]
    assert Advert.from_envelope(envelope) == advert
    assert not advert.full
    assert dataclasses.replace(advert, queue=6).full
    assert dataclasses.replace(advert, queue=2, max_queue=0).full
    # Without a limit (an older provider) it never says so: only a busy answer tells.
    assert FULL_ADVERT.max_queue is None and not dataclasses.replace(FULL_ADVERT, queue=99).full
    with pytest.raises(ValueError, match="max_queue"):
        dataclasses.replace(advert, max_queue=-1)
    with pytest.raises(RecordError, match="max_queue"):
        Advert.from_envelope(seal_advert_payload(ALICE, advert_payload(load=[1, 0, True])))


def test_advert_roles_round_trip_and_are_bounded() -> None:
    gateway = Identity.from_seed(bytes(range(42, 74)))
    advert = Advert(gateway.peer_id, 1, 1000.0, 180, roles=("gateway",), state="unavailable")
    assert Advert.from_envelope(advert.seal(gateway)).roles == ("gateway",)
    with pytest.raises(ValueError, match="roles"):
        Advert(gateway.peer_id, 1, 1000.0, 180, roles=tuple(f"r{i}" for i in range(9)))
    with pytest.raises(ValueError, match="role"):
        Advert(gateway.peer_id, 1, 1000.0, 180, roles=("",))


def test_advert_stores_its_own_addresses_without_p2p() -> None:
    advert = Advert(ALICE.peer_id, 1, NOW, 60, addrs=[a.with_peer_id(ALICE.peer_id) for a in ADDRS])
    assert advert.addrs == ADDRS


def test_advert_sealing_with_another_identity_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot seal an advert"):
        FULL_ADVERT.seal(BOB)


_BAD_FIELDS = [
    ("peer_id", str(ALICE.peer_id), "PeerId"),
    ("seq", -1, "seq"),
    ("seq", 2**64, "seq"),
    ("seq", True, "seq"),
    ("seq", 1.0, "seq"),
    ("issued_at", -1.0, "issued_at"),
    ("issued_at", 1e11 + 1, "issued_at"),
    ("issued_at", float("nan"), "issued_at"),
    ("issued_at", "now", "issued_at"),
    ("ttl", 0.5, "ttl"),
    ("ttl", 3600.5, "ttl"),
    ("ttl", float("inf"), "ttl"),
    ("addrs", ADDRS * 8 + ADDRS[:1], "at most 16"),
    ("addrs", ("/ip4/1.2.3.4/tcp/1/ws",), "Multiaddrs"),
    ("addrs", (ADDRS[0].with_peer_id(BOB.peer_id),), "names another peer"),
    ("reachability", "private", "reachability"),
    ("state", "offline", "state"),
    ("backend", "b" * 33, "backend"),
    ("backend", 1, "backend"),
    ("models", (ModelInfo("m"),) * 129, "at most 128"),
    ("models", ("sdxl",), "ModelInfo"),
    ("models", (ModelInfo(""),), "model name"),
    ("models", (ModelInfo(" \t"),), "model name"),
    ("models", (ModelInfo("m" * 257),), "model name"),
    ("models", (ModelInfo("m", title="t" * 513),), "model title"),
    ("models", (ModelInfo("m", hash="h" * 129),), "model hash"),
    ("models", (ModelInfo("m", architecture="a" * 33),), "model architecture"),
    ("models", (ModelInfo(1),), "model name"),  # type: ignore[arg-type]
    ("loras", (LoraInfo("l"),) * 513, "at most 512"),
    ("loras", (ModelInfo("l"),), "LoraInfo"),
    ("loras", (LoraInfo(""),), "LoRA name"),
    ("loras", (LoraInfo("l" * 257),), "LoRA name"),
    ("loras", (LoraInfo("l", "h" * 129),), "LoRA hash"),
    ("samplers", ("s",) * 65, "at most 64"),
    ("samplers", ("",), "sampler"),
    ("samplers", ("s" * 65,), "sampler"),
    ("samplers", (1,), "sampler"),
    ("vram_total_mb", 10**7 + 1, "vram_total_mb"),
    ("vram_total_mb", -1, "vram_total_mb"),
    ("vram_free_mb", 1.5, "vram_free_mb"),
    ("max_pixels", 2**32 + 1, "max_pixels"),
    ("max_steps", 10_001, "max_steps"),
    ("slots", 0, "slots"),
    ("slots", 1025, "slots"),
    ("queue", 10**6 + 1, "queue"),
    ("queue", False, "queue"),
    ("speed", -0.1, "speed"),
    ("speed", 1e4 + 1, "speed"),
    ("speed", float("nan"), "speed"),
]


@pytest.mark.parametrize(("field", "value", "message"), _BAD_FIELDS)
def test_advert_constructor_enforces_every_bound(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(FULL_ADVERT, **{field: value})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"seq": -1}, "seq must be an int"),
        ({"seq": True}, "'seq' has type bool"),
        ({"seq": 1.5}, "'seq' has type float"),
        ({"issued_at": "now"}, "'issued_at' has type str"),
        ({"issued_at": float("nan")}, "issued_at must be a number"),
        ({"ttl": 0}, "ttl must be a number"),
        ({"ttl": 3601}, "ttl must be a number"),
        ({"ttl": None}, "'ttl' has type NoneType"),
        ({"addrs": ["/ip4/1.2.3.4/tcp/1/ws"] * 17}, "at most 16"),
        ({"addrs": ["/ip4/1.2.3.4/tcp/1/ws"] * 100_000}, "at most 16"),
        ({"addrs": ["/ip4/1.2.3.4"]}, "invalid multiaddr"),
        ({"addrs": [1]}, "must be a str"),
        ({"addrs": [f"/ip4/1.2.3.4/tcp/1/ws/p2p/{BOB.peer_id}"]}, "names another peer"),
        ({"addrs": {}}, "'addrs' has type dict"),
        ({"reach": "private"}, "reachability"),
        ({"state": "offline"}, "state"),
        ({"backend": "b" * 33}, "backend"),
        ({"models": [["sdxl"]]}, "list of 4 strings"),
        ({"models": ["sdxl"]}, "list of 4 strings"),
        ({"models": [{"name": "sdxl"}]}, "list of 4 strings"),
        ({"models": [[1, "", "", ""]]}, "model name"),
        ({"models": [[["x"], "", "", ""]]}, "model name"),
        ({"models": [["", "", "", ""]]}, "model name"),
        ({"models": [["m", "", "", ""]] * 129}, "too many models"),
        ({"loras": [["l", "", ""]]}, "list of 2 strings"),
        ({"loras": [["l", b"h"]]}, "LoRA hash"),
        ({"loras": [["l", ""]] * 513}, "too many models or LoRAs"),
        ({"samplers": [1]}, "sampler"),
        ({"samplers": [["Euler"]]}, "sampler"),
        ({"samplers": ["s"] * 65}, "at most 64 samplers"),
        ({"vram": [1, 2, 3]}, "pair of numbers"),
        ({"vram": [1.0, 2]}, "vram_total_mb"),
        ({"vram": [True, 2]}, "vram_total_mb"),
        ({"vram": "12"}, "'vram' has type str"),
        ({"limits": [0, 10_001]}, "max_steps"),
        ({"limits": [[0], 0]}, "max_pixels"),
        ({"load": [0, 0]}, "slots"),
        ({"load": [1]}, "pair of numbers"),
        ({"speed": 2**64 - 1}, "speed"),
        ({"speed": False}, "'speed' has type bool"),
        ({"extra": 1}, "unexpected fields"),
    ],
)
def test_malformed_advert_payload_is_rejected(changes: dict, message: str) -> None:
    with pytest.raises(RecordError, match=message):
        Advert.from_envelope(seal_advert_payload(ALICE, advert_payload(**changes)))


@pytest.mark.parametrize("missing", ["seq", "issued_at", "ttl", "models", "state", "peer_id"])
def test_advert_payload_lacking_a_field_is_rejected(missing: str) -> None:
    payload = advert_payload()
    del payload[missing]
    with pytest.raises(RecordError, match=f"lacks {missing}"):
        Advert.from_envelope(seal_advert_payload(ALICE, payload))


def test_forged_advert_is_rejected() -> None:
    # Bob signs an advert that claims to be Alice's.
    envelope = seal_advert_payload(BOB, advert_payload())
    with pytest.raises(RecordError, match="a key that does not match the peer id"):
        Advert.from_envelope(envelope)
    # Bob puts his key on Alice's signed advert.
    envelope = dataclasses.replace(FULL_ADVERT.seal(ALICE), public_key=BOB.public_key_bytes)
    with pytest.raises(RecordError, match="signature does not verify"):
        Advert.from_envelope(envelope)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda e: dataclasses.replace(
            e, payload=msgpack.packb(advert_payload(queue=0), use_bin_type=True)
        ),
        lambda e: dataclasses.replace(e, payload=e.payload[:-1] + b"\x00"),
        lambda e: dataclasses.replace(e, signature=flip_last_byte(e.signature)),
        lambda e: dataclasses.replace(e, signature=bytes(64)),
    ],
    ids=["payload-field", "payload-byte", "signature", "zero-signature"],
)
def test_tampered_advert_is_rejected(tamper) -> None:
    with pytest.raises(RecordError, match="signature does not verify"):
        Advert.from_envelope(tamper(FULL_ADVERT.seal(ALICE)))


def test_advert_in_another_domain_or_payload_type_is_rejected() -> None:
    payload = FULL_ADVERT.seal(ALICE).payload
    as_peer_record = Envelope.seal(ALICE, PeerRecord.DOMAIN, Advert.PAYLOAD_TYPE, payload)
    with pytest.raises(RecordError, match="does not verify for domain 'sdcn-advert'"):
        Advert.from_envelope(as_peer_record)
    other_type = Envelope.seal(ALICE, Advert.DOMAIN, PeerRecord.PAYLOAD_TYPE, payload)
    with pytest.raises(RecordError, match="payload type"):
        Advert.from_envelope(other_type)
    # And a sealed peer record is not an advert, nor an advert a peer record.
    with pytest.raises(RecordError):
        Advert.from_envelope(sealed_record())
    with pytest.raises(RecordError):
        PeerRecord.from_envelope(FULL_ADVERT.seal(ALICE))


def test_check_fresh_accepts_the_validity_window_only() -> None:
    advert = Advert(ALICE.peer_id, 1, NOW, 180)
    assert advert.expires_at == NOW + 180
    advert.check_fresh(NOW)
    advert.check_fresh(NOW + 179.999)
    with pytest.raises(RecordError, match="expired 0 s ago"):
        advert.check_fresh(NOW + 180)
    with pytest.raises(RecordError, match="expired 3600 s ago"):
        advert.check_fresh(NOW + 3780)


def test_check_fresh_allows_bounded_clock_skew_only() -> None:
    ahead = Advert(ALICE.peer_id, 1, NOW + Advert.MAX_CLOCK_SKEW, 180)
    ahead.check_fresh(NOW)
    too_far = Advert(ALICE.peer_id, 1, NOW + Advert.MAX_CLOCK_SKEW + 0.001, 180)
    with pytest.raises(RecordError, match="issued in the future"):
        too_far.check_fresh(NOW)


def test_has_model_and_has_loras_match_normalized_names() -> None:
    assert FULL_ADVERT.has_model("SDXL Base 1.0")
    assert FULL_ADVERT.has_model("  sdxl   BASE\t1.0 ")
    assert FULL_ADVERT.has_model("realistic vision")
    assert not FULL_ADVERT.has_model("SDXL Base")
    assert not FULL_ADVERT.has_model("sd_xl_base_1.0.safetensors [31e35c80fc]")  # title
    assert FULL_ADVERT.has_loras([])
    assert FULL_ADVERT.has_loras(["detail tweaker", "ADD_DETAIL"])
    assert FULL_ADVERT.has_loras(("Detail  Tweaker",))
    assert not FULL_ADVERT.has_loras(["detail tweaker", "other"])
    german = Advert(ALICE.peer_id, 1, NOW, 60, models=(ModelInfo("Straße"),))
    assert german.has_model("STRASSE")  # casefold, not lower


def test_normalize_model_name() -> None:
    assert normalize_model_name("  SD\u00a0XL\n Base ") == "sd xl base"
    assert normalize_model_name("ÉCLAIR") == "éclair"


def test_advert_dht_keys_are_one_per_distinct_model() -> None:
    assert FULL_ADVERT.dht_keys == (model_key("SDXL Base 1.0"), model_key("Realistic Vision"))
    assert model_key("SDXL Base 1.0") == model_key(" sdxl base  1.0")
    twice = Advert(ALICE.peer_id, 1, NOW, 60, models=(ModelInfo("SDXL"), ModelInfo("sdxl")))
    assert twice.dht_keys == (model_key("sdxl"),)
    assert Advert(ALICE.peer_id, 1, NOW, 60).dht_keys == ()


_ADVERT_FIELD_VALUE = _MSGPACK_VALUE | st.sampled_from(
    [
        [["m", "", "", ""]],
        [["l", ""]],
        [0, 0],
        [1, 0],
        ["/ip4/1.2.3.4/tcp/1/ws"],
        "online",
        "public",
        NOW,
        180.0,
    ]
)
_ADVERT_PAYLOAD = st.builds(
    lambda base, changes, dropped: {
        k: v for k, v in {**base, **changes}.items() if k not in dropped
    },
    st.just(advert_payload()),
    st.dictionaries(st.sampled_from([*advert_payload(), "extra"]), _ADVERT_FIELD_VALUE, max_size=4),
    st.sets(st.sampled_from(list(advert_payload())), max_size=2),
)


@FUZZ
@given(_ADVERT_PAYLOAD)
def test_hostile_advert_payloads_only_raise_record_error(payload: dict) -> None:
    envelope = seal_advert_payload(ALICE, payload)
    try:
        advert = Advert.from_envelope(envelope)
    except RecordError:
        return
    assert Advert.from_envelope(advert.seal(ALICE)) == advert


@FUZZ
@given(_PAYLOAD)
def test_signed_garbage_advert_payloads_only_raise_record_error(payload: bytes) -> None:
    envelope = Envelope.seal(ALICE, Advert.DOMAIN, Advert.PAYLOAD_TYPE, payload)
    with contextlib.suppress(RecordError):
        Advert.from_envelope(envelope)


@FUZZ
@given(
    st.integers(0, 2**64 - 1),
    st.floats(0, 1e11),
    st.floats(1, 3600),
    st.lists(st.text(min_size=1, max_size=20).filter(str.strip), max_size=5),
    st.lists(st.text(min_size=1, max_size=20).filter(str.strip), max_size=5),
    st.floats(0, 1e4),
    st.sampled_from(AdvertState),
)
def test_any_valid_advert_round_trips(seq, issued_at, ttl, models, loras, speed, state) -> None:
    advert = Advert(
        ALICE.peer_id,
        seq,
        issued_at,
        ttl,
        models=tuple(ModelInfo(name) for name in models),
        loras=tuple(LoraInfo(name) for name in loras),
        speed=speed,
        state=state,
    )
    envelope = Envelope.from_bytes(advert.seal(ALICE).to_bytes())
    assert Advert.from_envelope(envelope) == advert
    assert all(advert.has_model(f" {name}\t") for name in models)
    assert advert.has_loras(f"{name} " for name in loras)
