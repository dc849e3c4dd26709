from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from sdcn_p2p.errors import HandshakeError, LocalProtocolError, ProtocolError, RemoteProtocolError
from sdcn_p2p.identity import Identity, PeerId
from sdcn_p2p.wire.libp2p import NoiseHandshakePayload
from sdcn_p2p.wire.noise import (
    MAX_MESSAGE,
    MAX_PLAINTEXT,
    PROTOCOL_NAME,
    FrameDecoder,
    NoiseCredentials,
    NoiseHandshake,
    NoiseTransport,
    _CipherState,
    _HandshakeState,
    _hkdf,
    _public_bytes,
    encode_frame,
)

ALICE = Identity.from_seed(bytes(range(32)))
BOB = Identity.from_seed(bytes(range(1, 33)))
MALLORY = Identity.from_seed(bytes(range(2, 34)))
SIG_PREFIX = b"noise-libp2p-static-key:"


def _encode_payload(identity_key: bytes, identity_sig: bytes) -> bytes:
    return NoiseHandshakePayload(identity_key, identity_sig).encode()


Tamper = Callable[[int, bytes], bytes]


def _untouched(index: int, message: bytes) -> bytes:
    return message


def run_handshake(
    initiator: NoiseHandshake, responder: NoiseHandshake, tamper: Tamper = _untouched
) -> tuple[NoiseTransport, NoiseTransport]:
    """Drive two machines back to back (h11's ConnectionPair); `tamper` sees each message."""
    responder.read_message(tamper(0, initiator.write_message()))
    initiator.read_message(tamper(1, responder.write_message()))
    responder.read_message(tamper(2, initiator.write_message()))
    assert initiator.complete and responder.complete
    return initiator.to_transport(), responder.to_transport()


def pair(expected_peer: PeerId | None = None) -> tuple[NoiseHandshake, NoiseHandshake]:
    """Alice dials Bob."""
    initiator = NoiseHandshake(ALICE, initiator=True, expected_peer=expected_peer)
    return initiator, NoiseHandshake(BOB, initiator=False)


def test_credentials_are_reused_across_handshakes() -> None:
    """One static key per process, signed once: every handshake presents the same one."""
    credentials = NoiseCredentials(BOB)
    seen_statics = set()
    for _ in range(3):
        initiator = NoiseHandshake(ALICE, initiator=True, expected_peer=BOB.peer_id)
        responder = NoiseHandshake(credentials, initiator=False)
        state = initiator._state  # run_handshake releases it once complete
        client, server = run_handshake(initiator, responder)
        assert initiator.remote_peer_id == BOB.peer_id
        assert server.decrypt(client.encrypt(b"hi")) == b"hi"
        seen_statics.add(state.remote_static)
    assert seen_statics == {_public_bytes(credentials.static_key)}


def flip(message: bytes, position: int) -> bytes:
    out = bytearray(message)
    out[position] ^= 0x01
    return bytes(out)


# --- the happy path ------------------------------------------------------------------------


def test_handshake_authenticates_both_peers_and_transport_round_trips() -> None:
    initiator, responder = pair(expected_peer=BOB.peer_id)
    assert not initiator.complete and initiator.remote_peer_id is None

    client, server = run_handshake(initiator, responder)

    assert initiator.remote_peer_id == BOB.peer_id
    assert responder.remote_peer_id == ALICE.peer_id
    for i in range(500):
        data = bytes([i % 256]) * (i * 131 % 2000)
        assert server.decrypt(client.encrypt(data)) == data
        assert client.decrypt(server.encrypt(data[::-1])) == data[::-1]


def test_transport_takes_every_size_and_buffer_type() -> None:
    client, server = run_handshake(*pair())
    for data in (b"", b"x", bytes(MAX_PLAINTEXT)):
        ciphertext = client.encrypt(data)
        assert len(ciphertext) == len(data) + 16
        assert server.decrypt(ciphertext) == data
    big = bytearray(range(256)) * 200
    assert server.decrypt(memoryview(client.encrypt(memoryview(big)[1000:3000]))) == big[1000:3000]
    assert server.decrypt(bytearray(client.encrypt(big[:10]))) == big[:10]
    with pytest.raises(ValueError):
        client.encrypt(bytes(MAX_PLAINTEXT + 1))


def test_messages_are_whole_with_no_length_prefix() -> None:
    initiator, responder = pair()
    first = initiator.write_message()
    assert len(first) == 32  # the bare ephemeral key
    responder.read_message(first)
    second = responder.write_message()
    # e, encrypted s, and the 104-byte identity payload (36-byte key, 64-byte signature)
    assert len(second) == 32 + (32 + 16) + (104 + 16)


def test_initiator_learns_the_responder_before_its_final_message() -> None:
    initiator, responder = pair()
    responder.read_message(initiator.write_message())
    initiator.read_message(responder.write_message())
    assert initiator.remote_peer_id == BOB.peer_id and not initiator.complete
    assert responder.remote_peer_id is None
    responder.read_message(initiator.write_message())
    assert initiator.complete and responder.remote_peer_id == ALICE.peer_id


def test_injected_static_key_is_the_one_signed_and_sent() -> None:
    static = X25519PrivateKey.generate()
    initiator = NoiseHandshake(ALICE, initiator=True, static_key=static)
    responder = NoiseHandshake(BOB, initiator=False)
    responder.read_message(initiator.write_message())
    initiator.read_message(responder.write_message())
    responder.read_message(initiator.write_message())
    assert responder._state is not None
    assert responder._state.remote_static == _public_bytes(static)


# --- against independent computations -------------------------------------------------------

# Noise_XX_25519_ChaChaPoly_SHA256 from the cacophony test vectors (as shipped with snow,
# tests/vectors/cacophony.txt). Messages alternate initiator, responder, initiator, ...;
# the first three are the handshake, the rest transport messages. Its "handshake_hash" field
# is left out: it equals h after the second message, not the final h that both sides agree on.
CACOPHONY_XX = {
    "prologue": "4a6f686e2047616c74",
    "init_static": "e61ef9919cde45dd5f82166404bd08e38bceb5dfdfded0a34c8df7ed542214d1",
    "init_ephemeral": "893e28b9dc6ca8d611ab664754b8ceb7bac5117349a4439a6b0569da977c464a",
    "resp_static": "4a3acbfdb163dec651dfa3194dece676d437029c62a408b4c5ea9114246e4893",
    "resp_ephemeral": "bbdb4cdbd309f1a1f2e1456967fe288cadd6f712d65dc7b7793d5e63da6b375b",
    "messages": [
        (
            "4c756477696720766f6e204d69736573",
            "ca35def5ae56cec33dc2036731ab14896bc4c75dbb07a61f879f8e3afa4c7944"
            "4c756477696720766f6e204d69736573",
        ),
        (
            "4d757272617920526f746862617264",
            "95ebc60d2b1fa672c1f46a8aa265ef51bfe38e7ccb39ec5be34069f14480884381cbad1f276e038c"
            "48378ffce2b65285e08d6b68aaa3629a5a8639392490e5b9bd5269c2f1e4f488ed8831161f19b781"
            "5528f8982ffe09be9b5c412f8a0db50f8814c7194e83f23dbd8d162c9326ad",
        ),
        (
            "462e20412e20486179656b",
            "c7195ffacac1307ff99046f219750fc47693e23c3cb08b89c2af808b444850a80ae475b9df0f169a"
            "e80a89be0865b57f58c9fea0d4ec82a286427402f113e4b6ae769a1d95941d49b25030",
        ),
        ("4361726c204d656e676572", "96763ed773f8e47bb3712f0e29b3060ffc956ffc146cee53d5e1df"),
        (
            "4a65616e2d426170746973746520536179",
            "3e40f15f6f3a46ae446b253bf8b1d9ffb6ed9b174d272328ff91a7e2e5c79c07f5",
        ),
        (
            "457567656e2042f6686d20766f6e2042617765726b",
            "eb3f3515110702e047a6c9da4478b6ead94873c11c0f2d710ddb3f09fce024b3a58502ae3f",
        ),
    ],
}


def test_cacophony_known_answer() -> None:
    v = CACOPHONY_XX

    def key(name: str) -> X25519PrivateKey:
        return X25519PrivateKey.from_private_bytes(bytes.fromhex(v[name]))  # type: ignore[arg-type]

    prologue = bytes.fromhex(v["prologue"])  # type: ignore[arg-type]
    init = _HandshakeState(
        initiator=True,
        static_key=key("init_static"),
        prologue=prologue,
        ephemeral_key=key("init_ephemeral"),
    )
    resp = _HandshakeState(
        initiator=False,
        static_key=key("resp_static"),
        prologue=prologue,
        ephemeral_key=key("resp_ephemeral"),
    )
    messages = [(bytes.fromhex(p), bytes.fromhex(c)) for p, c in v["messages"]]  # type: ignore[union-attr]

    for i, (payload, ciphertext) in enumerate(messages[:3]):
        writer, reader = (init, resp) if i % 2 == 0 else (resp, init)
        assert writer.write_message(payload) == ciphertext
        assert reader.read_message(ciphertext) == payload
    assert init.finished and resp.finished
    assert init.handshake_hash == resp.handshake_hash

    init_channel, resp_channel = NoiseTransport(*init.split()), NoiseTransport(*resp.split())
    for i, (payload, ciphertext) in enumerate(messages[3:], start=3):
        writer, reader = (
            (init_channel, resp_channel) if i % 2 == 0 else (resp_channel, init_channel)
        )
        assert writer.encrypt(payload) == ciphertext
        assert reader.decrypt(ciphertext) == payload


def test_protocol_name_fills_the_initial_hash_exactly() -> None:
    assert len(PROTOCOL_NAME) == 32  # so h starts as the name itself, unhashed and unpadded


@pytest.mark.parametrize("outputs", [2, 3])
def test_noise_hkdf_is_rfc5869_hkdf_with_empty_info(outputs: int) -> None:
    chaining_key, ikm = bytes(range(32)), b"input key material" * 3
    expected = HKDF(hashes.SHA256(), length=32 * outputs, salt=chaining_key, info=b"").derive(ikm)
    assert b"".join(_hkdf(chaining_key, ikm, outputs)) == expected


def test_nonce_is_four_zero_bytes_then_little_endian_counter() -> None:
    key = bytes(range(32))
    cipher = _CipherState(key)
    cipher.nonce = 2**40 + 5
    nonce = bytes(4) + (2**40 + 5).to_bytes(8, "little")
    assert cipher.encrypt(b"ad", b"hello") == ChaCha20Poly1305(key).encrypt(nonce, b"hello", b"ad")
    assert cipher.nonce == 2**40 + 6


def test_nonce_two_to_the_64_minus_one_is_never_used() -> None:
    client, server = run_handshake(*pair())
    client._send.nonce = server._receive.nonce = 2**64 - 2
    assert server.decrypt(client.encrypt(b"last")) == b"last"
    with pytest.raises(ProtocolError) as info:
        client.encrypt(b"one too many")
    assert isinstance(info.value, LocalProtocolError)
    with pytest.raises(ProtocolError):
        server.decrypt(bytes(32))


# --- authentication failures ----------------------------------------------------------------


def test_reaching_another_peer_than_the_one_dialled_fails() -> None:
    initiator, responder = pair(expected_peer=MALLORY.peer_id)
    responder.read_message(initiator.write_message())
    with pytest.raises(HandshakeError) as info:
        initiator.read_message(responder.write_message())
    assert str(info.value) == f"dialled {MALLORY.peer_id} but reached {BOB.peer_id}"
    assert isinstance(info.value, RemoteProtocolError)
    assert not initiator.complete and initiator.remote_peer_id is None
    with pytest.raises(LocalProtocolError, match="already failed"):
        initiator.write_message()


def initiator_reads_payload(payload_for: Callable[[bytes], bytes]) -> None:
    """Run an initiator against a bare responder that sends `payload_for(its static key)`."""
    initiator = NoiseHandshake(ALICE, initiator=True)
    static = X25519PrivateKey.generate()
    responder = _HandshakeState(initiator=False, static_key=static)
    responder.read_message(initiator.write_message())
    initiator.read_message(responder.write_message(payload_for(_public_bytes(static))))


def test_identity_signature_by_another_key_fails() -> None:
    def forged(static: bytes) -> bytes:
        return _encode_payload(BOB.public_key_bytes, MALLORY.sign(SIG_PREFIX + static))

    with pytest.raises(HandshakeError, match="invalid identity signature"):
        initiator_reads_payload(forged)


def test_identity_signature_over_another_static_key_fails() -> None:
    # A man in the middle replays Bob's genuine payload with its own static key.
    bobs_static = _public_bytes(X25519PrivateKey.generate())

    def replayed(static: bytes) -> bytes:
        return _encode_payload(BOB.public_key_bytes, BOB.sign(SIG_PREFIX + bobs_static))

    with pytest.raises(HandshakeError, match="invalid identity signature"):
        initiator_reads_payload(replayed)


def test_payload_with_extensions_and_unknown_fields_is_accepted() -> None:
    def extended(static: bytes) -> bytes:
        extensions = b"\x12\x07/yamux1"  # NoiseExtensions{stream_muxers: "/yamux1"}
        return (
            b"\x22" + bytes([len(extensions)]) + extensions  # field 4, bytes
            + b"\x28\x96\x01"  # field 5, varint 150
            + b"\x31" + bytes(8)  # field 6, fixed64
            + b"\x3d" + bytes(4)  # field 7, fixed32
            + _encode_payload(BOB.public_key_bytes, BOB.sign(SIG_PREFIX + static))
        )  # fmt: skip

    initiator_reads_payload(extended)  # no error


def rsa_key_protobuf() -> bytes:
    return bytes([0x08, 0x00, 0x12, 0x20]) + bytes(32)  # PublicKey{Type=RSA, Data=...}


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\xff", id="truncated-varint"),
        pytest.param(b"\xff" * 12, id="overlong-varint"),
        pytest.param(b"\x0a\x80\x00", id="non-minimal-varint"),
        pytest.param(b"\x0a\x05abc", id="length-past-end"),
        pytest.param(b"\x0a\xff\xff\xff\xff\x0f", id="huge-length"),
        pytest.param(b"\x02\x00", id="field-zero"),
        pytest.param(b"\x0b", id="group-wire-type"),
        pytest.param(b"\x0f", id="wire-type-7"),
        pytest.param(b"\x08\x01\x12\x00", id="key-as-varint"),
        pytest.param(_encode_payload(BOB.public_key_bytes, b"")[:38], id="no-signature"),
        pytest.param(b"\x12\x40" + bytes(64), id="no-key"),
        pytest.param(_encode_payload(b"garbage", bytes(64)), id="garbage-key"),
        pytest.param(b"\x31" + bytes(7), id="truncated-fixed64"),
    ],
)
def test_malformed_payload_fails(payload: bytes) -> None:
    with pytest.raises(HandshakeError):
        initiator_reads_payload(lambda static: payload)


def test_non_ed25519_identity_key_fails_even_with_a_signature() -> None:
    with pytest.raises(HandshakeError, match="identity key"):
        initiator_reads_payload(lambda static: _encode_payload(rsa_key_protobuf(), bytes(64)))


@pytest.mark.parametrize("index", [0, 1, 2])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_flipped_byte_in_any_handshake_message_fails(index: int, where: str) -> None:
    def tamper(i: int, message: bytes) -> bytes:
        if i != index:
            return message
        return flip(message, {"first": 0, "middle": len(message) // 2, "last": -1}[where])

    with pytest.raises(HandshakeError) as info:
        run_handshake(*pair(), tamper=tamper)
    assert isinstance(info.value, RemoteProtocolError)


@pytest.mark.parametrize("size", [0, 31, 95])
def test_truncated_handshake_message_fails(size: int) -> None:
    initiator, responder = pair()
    responder.read_message(initiator.write_message())
    with pytest.raises(HandshakeError, match="too short"):
        initiator.read_message(responder.write_message()[:size])


def test_oversized_handshake_message_fails() -> None:
    with pytest.raises(HandshakeError):
        NoiseHandshake(BOB, initiator=False).read_message(bytes(MAX_MESSAGE + 1))


def test_low_order_ephemeral_key_fails() -> None:
    responder = NoiseHandshake(BOB, initiator=False)
    responder.read_message(bytes(32))  # the all-zero point: every DH with it is zero
    with pytest.raises(HandshakeError, match="X25519"):
        responder.write_message()


# --- transport failures ---------------------------------------------------------------------


def test_flipped_byte_in_transport_message_fails() -> None:
    client, server = run_handshake(*pair())
    ciphertext = client.encrypt(b"payload")
    for position in (0, 3, -1):
        with pytest.raises(ProtocolError, match="decryption failed") as info:
            server.decrypt(flip(ciphertext, position))
        assert isinstance(info.value, RemoteProtocolError)
    assert server.decrypt(ciphertext) == b"payload"  # a rejected forgery does not desync


def test_replayed_transport_message_fails() -> None:
    client, server = run_handshake(*pair())
    ciphertext = client.encrypt(b"pay me once")
    assert server.decrypt(ciphertext) == b"pay me once"
    with pytest.raises(ProtocolError, match="decryption failed"):
        server.decrypt(ciphertext)


def test_reordered_transport_messages_fail() -> None:
    client, server = run_handshake(*pair())
    client.encrypt(b"first")
    with pytest.raises(ProtocolError, match="decryption failed"):
        server.decrypt(client.encrypt(b"second"))


def test_message_sent_to_its_own_sender_fails() -> None:
    client, _server = run_handshake(*pair())
    with pytest.raises(ProtocolError, match="decryption failed"):
        client.decrypt(client.encrypt(b"echo"))  # the two directions have different keys


@pytest.mark.parametrize("size", [0, 15, MAX_MESSAGE + 1])
def test_transport_message_of_impossible_size_fails(size: int) -> None:
    _client, server = run_handshake(*pair())
    with pytest.raises(ProtocolError) as info:
        server.decrypt(bytes(size))
    assert isinstance(info.value, RemoteProtocolError)


# --- misuse ---------------------------------------------------------------------------------


def test_reading_out_of_turn_fails_locally() -> None:
    initiator = NoiseHandshake(ALICE, initiator=True)
    with pytest.raises(LocalProtocolError) as info:
        initiator.read_message(bytes(32))
    assert isinstance(info.value, LocalProtocolError)


def test_writing_out_of_turn_fails_locally() -> None:
    responder = NoiseHandshake(BOB, initiator=False)
    with pytest.raises(LocalProtocolError) as info:
        responder.write_message()
    assert isinstance(info.value, LocalProtocolError)


def test_writing_twice_in_a_row_fails_locally() -> None:
    initiator = NoiseHandshake(ALICE, initiator=True)
    initiator.write_message()
    with pytest.raises(LocalProtocolError) as info:
        initiator.write_message()
    assert isinstance(info.value, LocalProtocolError)


def test_failed_handshake_stays_dead() -> None:
    initiator, responder = pair()
    responder.read_message(initiator.write_message())
    with pytest.raises(HandshakeError):
        initiator.read_message(flip(responder.write_message(), 40))
    for call in (
        initiator.write_message,
        initiator.to_transport,
        lambda: initiator.read_message(b""),
    ):
        with pytest.raises(LocalProtocolError, match="already failed") as info:
            call()
        assert isinstance(info.value, LocalProtocolError)
    assert not initiator.complete


def test_transport_only_when_complete_and_only_once() -> None:
    initiator, responder = pair()
    with pytest.raises(LocalProtocolError, match="not complete"):
        initiator.to_transport()
    run_handshake(initiator, responder)
    assert initiator.complete
    with pytest.raises(LocalProtocolError, match="already"):
        initiator.to_transport()  # a second transport would reuse nonces
    with pytest.raises(LocalProtocolError):
        initiator.write_message()


# --- properties -----------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_fresh_responder_only_raises_handshake_error(message: bytes) -> None:
    responder = NoiseHandshake(BOB, initiator=False)
    with contextlib.suppress(HandshakeError):
        responder.read_message(message)
        responder.write_message()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_initiator_rejects_arbitrary_second_messages(message: bytes) -> None:
    initiator = NoiseHandshake(ALICE, initiator=True)
    initiator.write_message()
    with pytest.raises(HandshakeError):
        initiator.read_message(message)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_payload_decoder_only_raises_remote_protocol_error(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        NoiseHandshakePayload.decode(data)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.binary(max_size=1000)), max_size=30))
def test_transport_round_trips_any_sequence(messages: list[tuple[bool, bytes]]) -> None:
    client, server = run_handshake(*pair())
    for to_server, data in messages:
        sender, receiver = (client, server) if to_server else (server, client)
        assert receiver.decrypt(sender.encrypt(data)) == data


# --- framing and the muxers offered in the handshake ---------------------------------------------


def test_frames_carry_a_two_byte_big_endian_length() -> None:
    assert encode_frame(b"abc") == b"\x00\x03abc"
    assert encode_frame(bytes(MAX_MESSAGE))[:2] == b"\xff\xff"
    with pytest.raises(ValueError):
        encode_frame(bytes(MAX_MESSAGE + 1))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=8), st.integers(1, 50))
def test_frames_round_trip_in_any_pieces(messages: list[bytes], piece: int) -> None:
    stream = b"".join(encode_frame(m) for m in messages)
    decoder = FrameDecoder()
    out = []
    for start in range(0, len(stream), piece):
        decoder.feed(stream[start : start + piece])
        while (frame := decoder.next_frame()) is not None:
            out.append(frame)
    assert out == messages
    assert decoder.buffered == 0


@pytest.mark.parametrize(
    ("ours", "theirs", "agreed"),
    [
        (("/yamux/1.0.0",), ("/yamux/1.0.0",), "/yamux/1.0.0"),
        (("/mplex/6.7.0", "/yamux/1.0.0"), ("/yamux/1.0.0", "/mplex/6.7.0"), "/mplex/6.7.0"),
        (("/yamux/1.0.0",), (), None),
        ((), ("/yamux/1.0.0",), None),
        (("/yamux/1.0.0",), ("/mplex/6.7.0",), None),
    ],
)
def test_the_muxer_is_the_initiators_first_choice_both_offered(
    ours: tuple[str, ...], theirs: tuple[str, ...], agreed: str | None
) -> None:
    initiator = NoiseHandshake(NoiseCredentials(ALICE, stream_muxers=ours), initiator=True)
    responder = NoiseHandshake(NoiseCredentials(BOB, stream_muxers=theirs), initiator=False)
    responder.read_message(initiator.write_message())
    initiator.read_message(responder.write_message())
    responder.read_message(initiator.write_message())
    assert initiator.agreed_muxer == responder.agreed_muxer == agreed
