"""The secure channel: ``Noise_XX_25519_ChaChaPoly_SHA256`` with the libp2p handshake payload.

Sans-IO (bytes in, bytes out). As libp2p frames Noise over a byte stream, every handshake and
transport message travels behind a 2-byte big-endian length (`encode_frame`, `FrameDecoder`).
The XX pattern (Noise rev 34, empty prologue)::

    -> e
    <- e, ee, s, es, payload        the responder's identity
    -> s, se, payload               the initiator's identity

A payload is the libp2p ``NoiseHandshakePayload`` protobuf (`wire.libp2p`): the peer's libp2p
public key, its Ed25519 signature over ``b"noise-libp2p-static-key:" + <its X25519 static
key>``, which binds the Noise static key to the peer id, and ``extensions.stream_muxers``, the
muxers it offers: where both sides offer one, the first of the initiator's that the responder
also offers is used without a multistream-select round (`NoiseHandshake.agreed_muxer`).

Driving it (initiator; the responder reads first)::

    hs = NoiseHandshake(credentials, initiator=True, expected_peer=peer)
    send(encode_frame(hs.write_message()))
    hs.read_message(<next frame>)
    send(encode_frame(hs.write_message()))
    channel = hs.to_transport()          # hs.complete is now True
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from sdcn_p2p.errors import HandshakeError, LocalProtocolError, ProtocolError, RemoteProtocolError
from sdcn_p2p.identity import (
    Identity,
    PeerId,
    decode_public_key,
    verify_signature,
)
from sdcn_p2p.wire.libp2p import NoiseHandshakePayload

__all__ = [
    "FRAME_HEADER",
    "MAX_MESSAGE",
    "MAX_PLAINTEXT",
    "PROTOCOL_ID",
    "PROTOCOL_NAME",
    "FrameDecoder",
    "NoiseCredentials",
    "NoiseHandshake",
    "NoiseTransport",
    "encode_frame",
]

#: The multistream-select protocol id of libp2p's Noise channel.
PROTOCOL_ID = "/noise"

PROTOCOL_NAME = b"Noise_XX_25519_ChaChaPoly_SHA256"
#: Noise caps every message, handshake or transport, at 65535 bytes.
MAX_MESSAGE = 65535
_TAG_LEN = 16
MAX_PLAINTEXT = MAX_MESSAGE - _TAG_LEN
#: Bytes of the big-endian length in front of every Noise message on the wire.
FRAME_HEADER = 2

_DH_LEN = 32
_HASH_LEN = 32
_MAX_NONCE = 2**64 - 1  # reserved by the Noise spec: never used to encrypt
_NONCE = struct.Struct("<4xQ")  # 32 zero bits, then the 64-bit counter, little-endian
_STATIC_KEY_PREFIX = b"noise-libp2p-static-key:"

# Handshake pattern XX, one tuple per message; initiator writes the even ones.
_XX = (("e",), ("e", "ee", "s", "es"), ("s", "se"))

_FRAME = struct.Struct(">H")


def _hkdf(chaining_key: bytes, ikm: bytes, outputs: int) -> list[bytes]:
    """HKDF as the Noise spec defines it (HMAC-SHA256, empty info, 2 or 3 outputs)."""
    temp_key = hmac.digest(chaining_key, ikm, "sha256")
    out = [hmac.digest(temp_key, b"\x01", "sha256")]
    for i in range(2, outputs + 1):
        out.append(hmac.digest(temp_key, out[-1] + bytes([i]), "sha256"))
    return out


def _public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _dh(key: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return key.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:  # a low-order point: the shared secret would be all zeros
        raise HandshakeError("invalid X25519 public key") from None


class _CipherState:
    """A ChaCha20-Poly1305 key and its 64-bit nonce counter (no key: pass-through)."""

    __slots__ = ("_aead", "nonce")

    def __init__(self, key: bytes | None = None) -> None:
        self._aead = ChaCha20Poly1305(key) if key is not None else None
        self.nonce = 0

    @property
    def has_key(self) -> bool:
        return self._aead is not None

    def encrypt(self, ad: bytes | None, plaintext: bytes | bytearray | memoryview) -> bytes:
        if self._aead is None:
            return bytes(plaintext)
        if self.nonce == _MAX_NONCE:
            raise LocalProtocolError("Noise nonce exhausted: open a new connection")
        ciphertext = self._aead.encrypt(_NONCE.pack(self.nonce), plaintext, ad)
        self.nonce += 1
        return ciphertext

    def decrypt(self, ad: bytes | None, ciphertext: bytes | bytearray | memoryview) -> bytes:
        """Raises InvalidTag on authentication failure; the nonce then stays where it was."""
        if self._aead is None:
            return bytes(ciphertext)
        if self.nonce == _MAX_NONCE:
            raise RemoteProtocolError("Noise nonce exhausted")
        plaintext = self._aead.decrypt(_NONCE.pack(self.nonce), ciphertext, ad)
        self.nonce += 1
        return plaintext


class _SymmetricState:
    """The chaining key, the handshake hash and the current handshake cipher."""

    __slots__ = ("_ck", "cipher", "h")

    def __init__(self, protocol_name: bytes, prologue: bytes) -> None:
        if len(protocol_name) <= _HASH_LEN:
            self.h = protocol_name.ljust(_HASH_LEN, b"\0")
        else:
            self.h = hashlib.sha256(protocol_name).digest()
        self._ck = self.h
        self.cipher = _CipherState()
        self.mix_hash(prologue)

    def mix_hash(self, data: bytes) -> None:
        self.h = hashlib.sha256(self.h + data).digest()

    def mix_key(self, ikm: bytes) -> None:
        self._ck, temp_key = _hkdf(self._ck, ikm, 2)
        self.cipher = _CipherState(temp_key)

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = self.cipher.encrypt(self.h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        try:
            plaintext = self.cipher.decrypt(self.h, ciphertext)
        except InvalidTag:
            raise HandshakeError("handshake message failed authentication") from None
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[_CipherState, _CipherState]:
        k1, k2 = _hkdf(self._ck, b"", 2)
        return _CipherState(k1), _CipherState(k2)


class _HandshakeState:
    """The bare Noise XX handshake: raw payloads in and out, no libp2p semantics.

    `ephemeral_key` fixes the ephemeral key (test vectors only).
    """

    def __init__(
        self,
        *,
        initiator: bool,
        static_key: X25519PrivateKey,
        prologue: bytes = b"",
        ephemeral_key: X25519PrivateKey | None = None,
    ) -> None:
        self.initiator = initiator
        self.message_index = 0
        self.remote_static: bytes | None = None
        self._symmetric = _SymmetricState(PROTOCOL_NAME, prologue)
        self._s = static_key
        self._e = ephemeral_key
        self._re: bytes | None = None

    @property
    def finished(self) -> bool:
        return self.message_index == len(_XX)

    @property
    def handshake_hash(self) -> bytes:
        return self._symmetric.h

    def _our_turn(self) -> bool:
        return not self.finished and (self.message_index % 2 == 0) == self.initiator

    def write_message(self, payload: bytes) -> bytes:
        if not self._our_turn():
            raise LocalProtocolError("not our turn to write a handshake message")
        sym = self._symmetric
        out = bytearray()
        for token in _XX[self.message_index]:
            if token == "e":
                if self._e is None:
                    self._e = X25519PrivateKey.generate()
                e_pub = _public_bytes(self._e)
                out += e_pub
                sym.mix_hash(e_pub)
            elif token == "s":
                out += sym.encrypt_and_hash(_public_bytes(self._s))
            else:
                sym.mix_key(self._token_dh(token))
        out += sym.encrypt_and_hash(payload)
        self.message_index += 1
        return bytes(out)

    def read_message(self, message: bytes) -> bytes:
        """Process the peer's next message and return its payload."""
        if self._our_turn() or self.finished:
            raise LocalProtocolError("not our turn to read a handshake message")
        if len(message) > MAX_MESSAGE:
            raise HandshakeError(f"handshake message of {len(message)} bytes exceeds {MAX_MESSAGE}")
        sym = self._symmetric
        offset = 0
        for token in _XX[self.message_index]:
            if token in ("e", "s"):
                size = _DH_LEN + (_TAG_LEN if token == "s" and sym.cipher.has_key else 0)
                if len(message) - offset < size:
                    raise HandshakeError("handshake message too short")
                field = message[offset : offset + size]
                offset += size
                if token == "e":
                    self._re = field
                    sym.mix_hash(field)
                else:
                    self.remote_static = sym.decrypt_and_hash(field)
            else:
                sym.mix_key(self._token_dh(token))
        rest = message[offset:]
        if sym.cipher.has_key and len(rest) < _TAG_LEN:
            raise HandshakeError("handshake message too short")
        payload = sym.decrypt_and_hash(rest)
        self.message_index += 1
        return payload

    def _token_dh(self, token: str) -> bytes:
        assert self._e is not None and self._re is not None  # "e" precedes every DH in XX
        if token == "ee":
            return _dh(self._e, self._re)
        # "es" pairs the initiator's ephemeral with the responder's static, "se" the reverse.
        if (token == "es") == self.initiator:
            assert self.remote_static is not None
            return _dh(self._e, self.remote_static)
        return _dh(self._s, self._re)

    def split(self) -> tuple[_CipherState, _CipherState]:
        """The (send, receive) transport ciphers for our role."""
        c1, c2 = self._symmetric.split()
        return (c1, c2) if self.initiator else (c2, c1)


def encode_frame(message: bytes | bytearray | memoryview) -> bytes:
    """`message` behind its 2-byte big-endian length; ValueError past MAX_MESSAGE bytes."""
    size = memoryview(message).nbytes
    if size > MAX_MESSAGE:
        raise ValueError(f"Noise message of {size} bytes exceeds {MAX_MESSAGE}")
    return _FRAME.pack(size) + message


class FrameDecoder:
    """Split the byte stream from the peer into Noise messages (each at most MAX_MESSAGE)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned in a frame."""
        return len(self._buf)

    def split(self, data: bytes) -> list[bytes | memoryview]:
        """Feed `data` and return every whole message now received, in order.

        When nothing was buffered, the messages are slices of `data`, not copies.
        """
        if self._buf:
            self._buf += data
            return list(iter(self.next_frame, None))
        view = memoryview(data)
        frames: list[bytes | memoryview] = []
        offset, end = 0, len(view)
        while end - offset >= FRAME_HEADER:
            stop = offset + FRAME_HEADER + (view[offset] << 8 | view[offset + 1])
            if stop > end:
                break
            frames.append(view[offset + FRAME_HEADER : stop])
            offset = stop
        if offset < end:
            self._buf += view[offset:]
        return frames

    def next_frame(self) -> bytes | None:
        """The next whole message, or None while more bytes are needed."""
        if len(self._buf) < FRAME_HEADER:
            return None
        (size,) = _FRAME.unpack_from(self._buf)
        end = FRAME_HEADER + size
        if len(self._buf) < end:
            return None
        frame = bytes(self._buf[FRAME_HEADER:end])
        del self._buf[:end]
        return frame


class NoiseCredentials:
    """A Noise static key, the identity's signature over it, and the muxers we offer.

    libp2p keeps one static key per process: build this once per Host and hand it to every
    handshake, which then neither generates a key nor signs anything.
    """

    __slots__ = ("identity", "payload", "static_key", "stream_muxers")

    def __init__(
        self,
        identity: Identity,
        static_key: X25519PrivateKey | None = None,
        *,
        stream_muxers: tuple[str, ...] = (),
    ) -> None:
        self.identity = identity
        self.static_key = static_key or X25519PrivateKey.generate()
        self.stream_muxers = stream_muxers
        signature = identity.sign(_STATIC_KEY_PREFIX + _public_bytes(self.static_key))
        self.payload = NoiseHandshakePayload(
            identity.public_key_bytes, signature, stream_muxers
        ).encode()


class NoiseHandshake:
    """One side of a Noise XX handshake that authenticates the peers' libp2p identities.

    Any error leaves the handshake dead: every later call raises LocalProtocolError.
    """

    def __init__(
        self,
        identity: Identity | NoiseCredentials,
        *,
        initiator: bool,
        expected_peer: PeerId | None = None,
        static_key: X25519PrivateKey | None = None,
    ) -> None:
        """`expected_peer`: the peer we dialled; reaching any other fails the handshake.

        Given an Identity, the Noise static key is `static_key`, or a fresh one; given
        NoiseCredentials, theirs.
        """
        if isinstance(identity, NoiseCredentials):
            credentials = identity
        else:
            credentials = NoiseCredentials(identity, static_key)
        self._payload = credentials.payload
        self._initiator = initiator
        self._muxers = credentials.stream_muxers
        self._remote_muxers: tuple[str, ...] = ()
        self._expected_peer = expected_peer
        self._state: _HandshakeState | None = _HandshakeState(
            initiator=initiator, static_key=credentials.static_key
        )
        self._failure: ProtocolError | None = None
        self._remote_peer_id: PeerId | None = None

    @property
    def complete(self) -> bool:
        """Whether both sides have sent their messages and the peer is authenticated."""
        return self._failure is None and (self._state is None or self._state.finished)

    @property
    def remote_peer_id(self) -> PeerId | None:
        """The peer's authenticated id, once its payload has been verified."""
        return self._remote_peer_id

    @property
    def agreed_muxer(self) -> str | None:
        """The muxer both sides offered in their payloads (the first of the initiator's that
        the responder offers too), or None: then they select one with multistream-select.
        """
        if self._initiator:
            preferred, other = self._muxers, self._remote_muxers
        else:
            preferred, other = self._remote_muxers, self._muxers
        return next((muxer for muxer in preferred if muxer in other), None)

    def write_message(self) -> bytes:
        """The next handshake message to send.

        Raises LocalProtocolError when it is the peer's turn.
        """
        state = self._live_state()
        # The first message travels in clear before any key exists: it carries no identity.
        payload = self._payload if state.message_index > 0 else b""
        try:
            return state.write_message(payload)
        except ProtocolError as exc:
            self._failure = exc
            raise

    def read_message(self, message: bytes | bytearray | memoryview) -> None:
        """Process the peer's next handshake message.

        Raises HandshakeError when the message is malformed or forged, when the peer's
        identity does not sign its static key, or when it is not `expected_peer`.
        """
        state = self._live_state()
        try:
            payload = state.read_message(bytes(message))
            if state.message_index > 1:  # the peer's identity rides in messages 2 and 3
                self._remote_peer_id = self._verify(payload, state.remote_static)
        except ProtocolError as exc:
            self._failure = exc
            raise

    def to_transport(self) -> NoiseTransport:
        """The encrypted channel; once the handshake is complete, and only once."""
        state = self._live_state()
        if not state.finished:
            raise LocalProtocolError("the handshake is not complete")
        self._state = None  # the cipher states must never be shared by two transports
        return NoiseTransport(*state.split())

    def _live_state(self) -> _HandshakeState:
        if self._failure is not None:
            raise LocalProtocolError(f"the handshake already failed: {self._failure}")
        if self._state is None:
            raise LocalProtocolError("the handshake was already turned into a transport")
        return self._state

    def _verify(self, payload: bytes, remote_static: bytes | None) -> PeerId:
        assert remote_static is not None  # "s" precedes the payload in messages 2 and 3
        try:
            decoded = NoiseHandshakePayload.decode(payload)
        except RemoteProtocolError as exc:
            raise HandshakeError(f"malformed handshake payload: {exc}") from None
        signature = decoded.identity_sig
        self._remote_muxers = decoded.stream_muxers
        try:
            key = decode_public_key(decoded.identity_key)
        except ProtocolError as exc:
            raise HandshakeError(f"unusable identity key: {exc}") from None
        if not verify_signature(key, signature, _STATIC_KEY_PREFIX + remote_static):
            raise HandshakeError("invalid identity signature")
        peer = PeerId.from_public_key(key)
        if self._expected_peer is not None and peer != self._expected_peer:
            raise HandshakeError(f"dialled {self._expected_peer} but reached {peer}")
        return peer


class NoiseTransport:
    """The encrypted channel after the handshake: one ciphertext per Noise message.

    Messages must be decrypted in the order they were encrypted: a lost, replayed or
    reordered message fails decryption, and the caller should end the connection.
    """

    __slots__ = ("_receive", "_send")

    def __init__(self, send: _CipherState, receive: _CipherState) -> None:
        """Made by `NoiseHandshake.to_transport()`."""
        self._send = send
        self._receive = receive

    def encrypt(self, plaintext: bytes | bytearray | memoryview) -> bytes:
        """Encrypt one message; raises ValueError if longer than MAX_PLAINTEXT bytes."""
        size = memoryview(plaintext).nbytes
        if size > MAX_PLAINTEXT:
            raise ValueError(f"Noise plaintext of {size} bytes exceeds {MAX_PLAINTEXT}")
        return self._send.encrypt(None, plaintext)

    def decrypt(self, ciphertext: bytes | bytearray | memoryview) -> bytes:
        """Decrypt the peer's next message.

        Raises ProtocolError when it is forged, corrupted, replayed, out of order or of an
        impossible size.
        """
        size = memoryview(ciphertext).nbytes
        if not _TAG_LEN <= size <= MAX_MESSAGE:
            raise RemoteProtocolError(
                f"Noise message of {size} bytes (must be {_TAG_LEN} to {MAX_MESSAGE})"
            )
        try:
            return self._receive.decrypt(None, ciphertext)
        except InvalidTag:
            raise RemoteProtocolError("decryption failed") from None
