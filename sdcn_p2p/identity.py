"""Ed25519 identities and libp2p-compatible peer ids.

A PeerId is the identity multihash of the protobuf-encoded public key
(``PublicKey{Type=Ed25519, Data=<32 bytes>}``), shown in base58btc (``12D3KooW…``), exactly as
libp2p does; the CIDv1 form (``bafz…``) is accepted when parsing. Key files are PKCS#8 PEM,
written with mode 0600.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

import platformdirs
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sdcn_p2p.errors import ConfigError, ProtocolError, RemoteProtocolError
from sdcn_p2p.wire.varint import decode_varint, encode_varint

__all__ = [
    "Identity",
    "PeerId",
    "b58decode",
    "b58encode",
    "decode_public_key",
    "default_key_path",
    "encode_public_key",
    "load_or_create_identity",
    "verify_signature",
]

_KEY_TYPE_ED25519 = 1
_MH_IDENTITY = 0x00
_MH_SHA256 = 0x12
_CID_VERSION = 0x01
_CODEC_LIBP2P_KEY = 0x72
_MAX_INLINE_KEY = 42  # longer serialized keys are hashed with SHA-256
_B58_ALPHABET = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58_ALPHABET)}


def b58encode(data: bytes) -> str:
    """Encode bytes in base58btc (the Bitcoin alphabet)."""
    zeros = len(data) - len(data.lstrip(b"\0"))
    n = int.from_bytes(data, "big")
    out = bytearray()
    while n:
        n, rem = divmod(n, 58)
        out.append(_B58_ALPHABET[rem])
    return ("1" * zeros) + out[::-1].decode("ascii")


def b58decode(text: str) -> bytes:
    """Decode base58btc; raises ValueError on a character outside the alphabet."""
    n = 0
    for ch in text:
        digit = _B58_INDEX.get(ord(ch))
        if digit is None:
            raise ValueError(f"invalid base58 character {ch!r}")
        n = n * 58 + digit
    zeros = len(text) - len(text.lstrip("1"))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\0" * zeros + body


def _protobuf_key(key_type: int, data: bytes) -> bytes:
    # message { required KeyType Type = 1; required bytes Data = 2; }
    return bytes([0x08, key_type, 0x12]) + encode_varint(len(data)) + data


def _parse_protobuf_key(blob: bytes) -> tuple[int, bytes]:
    """Parse a libp2p PublicKey/PrivateKey protobuf (canonical encoding only)."""
    if len(blob) < 4 or blob[0] != 0x08 or blob[2] != 0x12:
        raise RemoteProtocolError("malformed libp2p key protobuf")
    key_type = blob[1]
    decoded = decode_varint(blob, 3)
    if decoded is None:
        raise RemoteProtocolError("truncated libp2p key protobuf")
    length, offset = decoded
    if offset + length != len(blob):
        raise RemoteProtocolError("libp2p key protobuf has the wrong length")
    return key_type, blob[offset:]


def encode_public_key(key: Ed25519PublicKey) -> bytes:
    """The libp2p protobuf encoding of an Ed25519 public key (36 bytes)."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return _protobuf_key(_KEY_TYPE_ED25519, raw)


def decode_public_key(blob: bytes) -> Ed25519PublicKey:
    """Parse a libp2p protobuf public key; only Ed25519 is supported.

    Raises ProtocolError for anything else.
    """
    key_type, data = _parse_protobuf_key(blob)
    if key_type != _KEY_TYPE_ED25519 or len(data) != 32:
        raise RemoteProtocolError(f"unsupported public key type {key_type} ({len(data)} bytes)")
    return Ed25519PublicKey.from_public_bytes(data)


class PeerId:
    """A peer's identity: the multihash of its public key. Immutable and hashable."""

    __slots__ = ("_bytes", "_text")

    def __init__(self, multihash: bytes) -> None:
        """Wrap raw multihash bytes; raises ValueError if they are not a peer id multihash."""
        multihash = bytes(multihash)
        try:
            decoded = decode_varint(multihash, 1) if multihash else None
        except ProtocolError as exc:
            raise ValueError(f"peer id multihash length: {exc}") from None
        if decoded is None:
            raise ValueError("peer id is not a multihash")
        length, offset = decoded
        code = multihash[0]
        if offset + length != len(multihash):
            raise ValueError("peer id multihash has the wrong length")
        if code == _MH_IDENTITY:
            if length > _MAX_INLINE_KEY:
                raise ValueError("identity multihash peer id longer than 42 bytes")
        elif code == _MH_SHA256:
            if length != 32:
                raise ValueError("sha2-256 peer id must hold 32 bytes")
        else:
            raise ValueError(f"unsupported multihash code {code:#x} in peer id")
        self._bytes = multihash
        self._text: str | None = None  # base58, computed when first shown

    @classmethod
    def from_public_key(cls, key: Ed25519PublicKey) -> PeerId:
        encoded = encode_public_key(key)
        return cls(bytes([_MH_IDENTITY]) + encode_varint(len(encoded)) + encoded)

    @classmethod
    def from_string(cls, text: str) -> PeerId:
        """Parse the base58btc form (``12D3KooW…``, ``Qm…``) or the CIDv1 form (``bafz…``).

        Raises ValueError with a message that says what is wrong.
        """
        if not isinstance(text, str) or not text:
            raise ValueError("empty peer id")
        if len(text) > 128:
            raise ValueError("peer id string too long")
        if text[0] in "1Q":
            return cls(b58decode(text))
        if text[0] == "b":
            padded = text[1:].upper() + "=" * (-len(text[1:]) % 8)
            try:
                cid = base64.b32decode(padded)
            except ValueError as exc:
                raise ValueError(f"invalid base32 in CID peer id: {exc}") from None
            if len(cid) < 2 or cid[0] != _CID_VERSION or cid[1] != _CODEC_LIBP2P_KEY:
                raise ValueError("CID peer id must be CIDv1 with the libp2p-key codec")
            return cls(cid[2:])
        raise ValueError(f"not a peer id: {text!r}")

    @property
    def bytes(self) -> bytes:
        """The multihash bytes, as sent on the wire."""
        return self._bytes

    def to_cid(self) -> str:
        """The CIDv1 form, base32 multibase (``bafz…``)."""
        cid = bytes([_CID_VERSION, _CODEC_LIBP2P_KEY]) + self._bytes
        return "b" + base64.b32encode(cid).decode("ascii").lower().rstrip("=")

    @property
    def public_key(self) -> Ed25519PublicKey | None:
        """The Ed25519 key inlined in the peer id, or None if it is a hash of a key."""
        if self._bytes[0] != _MH_IDENTITY:
            return None
        _, offset = decode_varint(self._bytes, 1)  # type: ignore[misc]  # checked in __init__
        try:
            return decode_public_key(self._bytes[offset:])
        except ProtocolError:
            return None

    def matches_key(self, key: Ed25519PublicKey) -> bool:
        """Whether `key` is the key this peer id was derived from."""
        return PeerId.from_public_key(key) == self

    @property
    def dht_key(self) -> bytes:
        """Position in the DHT keyspace: SHA-256 of the peer id bytes."""
        return hashlib.sha256(self._bytes).digest()

    def short(self) -> str:
        """A short form for logs: the last 8 characters."""
        return "…" + str(self)[-8:]

    def __str__(self) -> str:
        if self._text is None:
            self._text = b58encode(self._bytes)
        return self._text

    def __repr__(self) -> str:
        return f"PeerId({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PeerId) and other._bytes == self._bytes

    def __lt__(self, other: PeerId) -> bool:
        return self._bytes < other._bytes

    def __hash__(self) -> int:
        return hash(self._bytes)


class Identity:
    """An Ed25519 key pair and the PeerId derived from it."""

    __slots__ = ("_private_key", "peer_id", "public_key", "public_key_bytes")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self.public_key = private_key.public_key()
        self.public_key_bytes = encode_public_key(self.public_key)
        self.peer_id = PeerId.from_public_key(self.public_key)

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """A deterministic identity from a 32-byte seed (tests and simulations)."""
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @classmethod
    def from_libp2p_private_key(cls, blob: bytes) -> Identity:
        """Import a libp2p protobuf PrivateKey (Ed25519: 64 bytes of seed + public key)."""
        key_type, data = _parse_protobuf_key(blob)
        if key_type != _KEY_TYPE_ED25519 or len(data) not in (32, 64):
            raise RemoteProtocolError(f"unsupported private key type {key_type}")
        identity = cls.from_seed(data[:32])
        if len(data) == 64 and data[32:] != identity.public_key_bytes[4:]:
            raise RemoteProtocolError("libp2p private key holds a mismatched public key")
        return identity

    def sign(self, data: bytes) -> bytes:
        return self._private_key.sign(data)

    def private_bytes_pem(self) -> bytes:
        return self._private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @classmethod
    def from_pem(cls, pem: bytes) -> Identity:
        """Load a PKCS#8 PEM Ed25519 key; raises ConfigError if it is anything else."""
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise ConfigError(f"not a PKCS#8 PEM private key: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError("key file does not hold an Ed25519 key")
        return cls(key)

    def __repr__(self) -> str:
        return f"Identity({self.peer_id})"


def verify_signature(key: Ed25519PublicKey, signature: bytes, data: bytes) -> bool:
    """Whether `signature` is `key`'s Ed25519 signature of `data`."""
    try:
        key.verify(signature, data)
    except InvalidSignature:
        return False
    return True


def default_key_path() -> Path:
    """``$XDG_CONFIG_HOME/sdcn/identity.key`` (or the platform's config dir)."""
    return Path(platformdirs.user_config_dir("sdcn")) / "identity.key"


def load_or_create_identity(path: Path | None = None, *, create: bool = True) -> Identity:
    """Load the key at `path` (default `default_key_path()`), creating it if missing.

    A created file has mode 0600 and appears whole or not at all (see `_create_key_file`):
    processes creating it at once all end up with the one that got there first. Raises
    ConfigError when the file is unreadable or not a key, or when it is missing and `create`
    is False.
    """
    path = Path(path) if path is not None else default_key_path()
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        if not create:
            raise ConfigError(f"no key file at {path} (run `sdcn keygen` first)") from None
    except OSError as exc:
        raise ConfigError(f"cannot read key file {path}: {exc}") from None
    else:
        try:
            return Identity.from_pem(pem)
        except ConfigError as exc:
            raise ConfigError(f"bad key file {path}: {exc}") from None
    identity = Identity.generate()
    try:
        created = _create_key_file(path, identity.private_bytes_pem())
    except OSError as exc:
        raise ConfigError(f"cannot create key file {path}: {exc}") from None
    if not created:
        # Another process created it between our read and our link: use theirs.
        return load_or_create_identity(path, create=False)
    return identity


def _create_key_file(path: Path, pem: bytes) -> bool:
    """Write `pem` to `path` unless a file is already there; return whether we wrote it.

    The key goes to a temporary file (mode 0600) in the same folder, is fsynced, then
    hard-linked to `path`: a link is atomic and never replaces an existing file, so a reader
    sees a whole key or none, and a crash leaves at most a stray ``.<name>.*.tmp`` file.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(temp, path)
        except FileExistsError:
            return False
    finally:
        os.unlink(temp)
    _fsync_directory(path.parent)
    return True


def _fsync_directory(folder: Path) -> None:
    """Make a new directory entry durable (POSIX; elsewhere a no-op)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
