from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdcn_p2p.errors import RemoteProtocolError
from sdcn_p2p.wire.libp2p import (
    EnvelopeMessage,
    IdentifyMessage,
    NoiseHandshakePayload,
    PeerRecordMessage,
)

texts = st.text(max_size=40)
blobs = st.binary(max_size=80)

noise_payloads = st.builds(
    NoiseHandshakePayload, blobs, blobs, st.lists(texts, max_size=4).map(tuple)
)
identify_messages = st.builds(
    IdentifyMessage,
    protocol_version=st.none() | texts,
    agent_version=st.none() | texts,
    public_key=st.none() | blobs,
    listen_addrs=st.lists(blobs, max_size=4).map(tuple),
    observed_addr=st.none() | blobs,
    protocols=st.lists(texts, max_size=6).map(tuple),
    signed_peer_record=st.none() | blobs,
)
envelopes = st.builds(EnvelopeMessage, blobs, blobs, blobs, blobs)
peer_records = st.builds(
    PeerRecordMessage, blobs, st.integers(0, 2**64 - 1), st.lists(blobs, max_size=4).map(tuple)
)
MESSAGES = [
    (NoiseHandshakePayload, noise_payloads),
    (IdentifyMessage, identify_messages),
    (EnvelopeMessage, envelopes),
    (PeerRecordMessage, peer_records),
]


@pytest.mark.parametrize(("kind", "strategy"), MESSAGES, ids=lambda m: getattr(m, "__name__", ""))
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_round_trip(kind: type, strategy: st.SearchStrategy, data: st.DataObject) -> None:
    message = data.draw(strategy)
    assert kind.decode(message.encode()) == message


@pytest.mark.parametrize("kind", [m for m, _ in MESSAGES], ids=lambda m: m.__name__)
@settings(max_examples=200, deadline=None)
@given(garbage=st.binary(max_size=200))
def test_garbage_is_a_remote_protocol_error_or_a_message(kind: type, garbage: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        assert isinstance(kind.decode(garbage), kind)


def test_noise_payload_needs_key_and_signature() -> None:
    with pytest.raises(RemoteProtocolError, match="identity key or signature"):
        NoiseHandshakePayload.decode(b"\x0a\x01k")


def test_peer_record_needs_a_peer_id_and_address_entries_a_multiaddr() -> None:
    with pytest.raises(RemoteProtocolError, match="peer id"):
        PeerRecordMessage.decode(b"\x10\x01")
    with pytest.raises(RemoteProtocolError, match="multiaddr"):
        PeerRecordMessage.decode(b"\x0a\x01p\x1a\x00")


def test_a_missing_envelope_field_reads_as_empty() -> None:
    assert EnvelopeMessage.decode(b"\x12\x02\x03\x01") == EnvelopeMessage(
        b"", b"\x03\x01", b"", b""
    )


def test_encodings_match_libp2p_generated_code() -> None:
    """Byte for byte what py-libp2p's generated protobuf code writes (where installed)."""
    pytest.importorskip("libp2p", reason="py-libp2p is not installed")
    from libp2p.identity.identify.pb import identify_pb2
    from libp2p.peer.pb import envelope_pb2, peer_record_pb2
    from libp2p.security.noise.pb import noise_pb2

    theirs = noise_pb2.NoiseHandshakePayload(identity_key=b"key", identity_sig=b"sig")
    theirs.extensions.stream_muxers.extend(["/yamux/1.0.0"])
    ours = NoiseHandshakePayload(b"key", b"sig", ("/yamux/1.0.0",))
    assert ours.encode() == theirs.SerializeToString()

    identify = identify_pb2.Identify(
        protocol_version="v",
        agent_version="a",
        public_key=b"pk",
        listen_addrs=[b"l1", b"l2"],
        observed_addr=b"o",
        protocols=["/p1", "/p2"],
        signedPeerRecord=b"rec",
    )
    message = IdentifyMessage("v", "a", b"pk", (b"l1", b"l2"), b"o", ("/p1", "/p2"), b"rec")
    assert IdentifyMessage.decode(identify.SerializeToString()) == message
    assert identify_pb2.Identify.FromString(message.encode()) == identify

    envelope = envelope_pb2.Envelope(payload_type=b"\x03\x01", payload=b"p", signature=b"s")
    envelope.public_key.Type = 1
    envelope.public_key.Data = b"d" * 32
    public_key = envelope.public_key.SerializeToString()
    assert EnvelopeMessage.decode(envelope.SerializeToString()) == EnvelopeMessage(
        public_key, b"\x03\x01", b"p", b"s"
    )

    record = peer_record_pb2.PeerRecord(peer_id=b"id", seq=7)
    record.addresses.add(multiaddr=b"a1")
    assert PeerRecordMessage(b"id", 7, (b"a1",)).encode() == record.SerializeToString()
