from __future__ import annotations

import base64
import os
import select
import signal
import stat
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from hypothesis import given, settings
from hypothesis import strategies as st

from sdcn_p2p.errors import ConfigError, ProtocolError
from sdcn_p2p.identity import (
    Identity,
    PeerId,
    b58decode,
    b58encode,
    decode_public_key,
    encode_public_key,
    load_or_create_identity,
    verify_signature,
)

# Test vectors from the libp2p peer-id spec (specs/peer-ids/peer-ids.md).
SPEC_PRIVATE_KEY = bytes.fromhex(
    "080112407e0830617c4a7de83925dfb2694556b12936c477a0e1feb2e148ec9da60fee7d1e"
    "d1e8fae2c4a144b8be8fd4b47bf3d3b34b871c3cacf6010f0e42d474fce27e"
)
SPEC_PUBLIC_KEY = bytes.fromhex(
    "080112201ed1e8fae2c4a144b8be8fd4b47bf3d3b34b871c3cacf6010f0e42d474fce27e"
)
SPEC_PEER_ID = "12D3KooWBtg3aaRMjxwedh83aGiUkwSxDwUZkzuJcfaqUmo7R3pq"
SPEC_CID = "bafzbeie5745rpv2m6tjyuugywy4d5ewrqgqqhfnf445he3omzpjbx5xqxe"
SPEC_CID_AS_BASE58 = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"

FUZZ = settings(max_examples=200, deadline=None)


def test_spec_private_key_gives_spec_public_key_and_peer_id() -> None:
    identity = Identity.from_libp2p_private_key(SPEC_PRIVATE_KEY)
    assert identity.public_key_bytes == SPEC_PUBLIC_KEY
    assert encode_public_key(identity.public_key) == SPEC_PUBLIC_KEY
    assert str(identity.peer_id) == SPEC_PEER_ID
    assert PeerId.from_string(SPEC_PEER_ID) == identity.peer_id


def test_spec_cid_is_the_same_peer_as_its_base58_form() -> None:
    from_cid = PeerId.from_string(SPEC_CID)
    assert from_cid == PeerId.from_string(SPEC_CID_AS_BASE58)
    assert str(from_cid) == SPEC_CID_AS_BASE58
    assert from_cid.to_cid() == SPEC_CID
    assert from_cid.public_key is None  # a SHA-256 peer id does not inline its key


def test_ed25519_peer_id_round_trips_through_its_cid() -> None:
    peer_id = PeerId.from_string(SPEC_PEER_ID)
    cid = peer_id.to_cid()
    assert cid.startswith("bafz")
    assert PeerId.from_string(cid) == peer_id


def test_peer_id_inlines_its_public_key() -> None:
    identity = Identity.from_seed(bytes(range(32)))
    assert identity.peer_id.public_key is not None
    assert encode_public_key(identity.peer_id.public_key) == identity.public_key_bytes
    assert identity.peer_id.matches_key(identity.public_key)
    assert not identity.peer_id.matches_key(Identity.from_seed(bytes(32)).public_key)


def test_from_seed_is_deterministic_and_peer_ids_compare_by_value() -> None:
    a, b = Identity.from_seed(b"\x01" * 32), Identity.from_seed(b"\x01" * 32)
    assert a.peer_id == b.peer_id
    assert hash(a.peer_id) == hash(b.peer_id)
    assert a.peer_id != Identity.from_seed(b"\x02" * 32).peer_id


def test_public_key_protobuf_round_trips() -> None:
    key = Identity.generate().public_key
    assert encode_public_key(decode_public_key(encode_public_key(key))) == encode_public_key(key)


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"\x08\x01\x12",
        SPEC_PUBLIC_KEY[:-1],  # truncated
        SPEC_PUBLIC_KEY + b"\x00",  # trailing byte
        b"\x08\x02\x12\x21" + bytes(33),  # secp256k1
        b"\x08\x01\x12\x10" + bytes(16),  # Ed25519 type with 16 bytes
    ],
)
def test_decode_public_key_rejects_malformed_keys(blob: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_public_key(blob)


def test_private_key_with_mismatched_public_half_is_rejected() -> None:
    tampered = SPEC_PRIVATE_KEY[:-1] + bytes([SPEC_PRIVATE_KEY[-1] ^ 1])
    with pytest.raises(ProtocolError, match="mismatched public key"):
        Identity.from_libp2p_private_key(tampered)


def test_signatures_verify_only_for_the_signed_data_and_key() -> None:
    identity = Identity.from_seed(bytes(32))
    signature = identity.sign(b"hello")
    assert verify_signature(identity.public_key, signature, b"hello")
    assert not verify_signature(identity.public_key, signature, b"hellO")
    assert not verify_signature(Identity.from_seed(b"\x01" * 32).public_key, signature, b"hello")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("x" * 129, "too long"),
        ("hello", "not a peer id"),
        ("12D3KooW0", "invalid base58 character '0'"),
        ("12D3KooWé", "invalid base58 character 'é'"),
        ("1", "not a multihash"),
        (SPEC_PEER_ID[:-1], "wrong length"),
        (b58encode(b"\x00\x80\x00"), "not minimally encoded"),  # non-minimal length varint
        (b58encode(b"\x00\x2b" + bytes(43)), "longer than 42 bytes"),
        ("bafz", "invalid base32"),
        ("b" + base64.b32encode(b"\x01\x55\x12\x20" + bytes(32)).decode().lower(), "libp2p-key"),
    ],
)
def test_invalid_peer_id_strings_raise_value_error(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PeerId.from_string(text)


@pytest.mark.parametrize(
    ("multihash", "message"),
    [
        (b"", "not a multihash"),
        (b"\x12", "not a multihash"),
        (b"\x13\x40" + bytes(64), "unsupported multihash code"),  # sha2-512
        (b"\x12\x10" + bytes(16), "must hold 32 bytes"),
        (b"\x12\x20" + bytes(31), "wrong length"),
    ],
)
def test_invalid_multihashes_raise_value_error(multihash: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PeerId(multihash)


@FUZZ
@given(st.text(max_size=140))
def test_peer_id_parsing_raises_only_value_error(text: str) -> None:
    try:
        peer_id = PeerId.from_string(text)
    except ValueError:
        return
    assert PeerId.from_string(str(peer_id)) == peer_id


@FUZZ
@given(st.integers(min_value=0, max_value=5), st.binary(max_size=64))
def test_base58_round_trips_with_leading_zero_bytes(zeros: int, data: bytes) -> None:
    raw = b"\0" * zeros + data
    encoded = b58encode(raw)
    assert b58decode(encoded) == raw
    assert encoded.startswith("1" * zeros)


def test_base58_known_vector() -> None:
    assert b58encode(b"hello world") == "StV1DL6CwTryKyV"
    assert b58encode(b"\0\0\x01") == "112"
    assert b58decode("") == b""


def test_key_file_is_created_0600_and_reloaded(tmp_path) -> None:
    path = tmp_path / "config" / "sdcn" / "identity.key"
    created = load_or_create_identity(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_identity(path).peer_id == created.peer_id
    assert load_or_create_identity(path, create=False).peer_id == created.peer_id


# A process creating the key file, with `os.link` (the step that publishes the written,
# fsynced temporary file) replaced by what the test needs.
KILLED_BEFORE_LINK = """
import os, signal, sys
from sdcn_p2p.identity import load_or_create_identity
os.link = lambda source, target: os.kill(os.getpid(), signal.SIGKILL)
load_or_create_identity(sys.argv[1])
"""
LINK_TOGETHER = """
import os, sys
from sdcn_p2p.identity import load_or_create_identity
ready, go = int(sys.argv[2]), int(sys.argv[3])
link = os.link
def link_together(source, target):
    os.write(ready, b"x")  # our key is written: wait until every process has written its own
    os.read(go, 1)
    link(source, target)
os.link = link_together
print(load_or_create_identity(sys.argv[1]).peer_id)
"""


def test_a_writer_killed_before_the_link_leaves_no_key_file(tmp_path) -> None:
    path = tmp_path / "identity.key"
    killed = subprocess.run([sys.executable, "-c", KILLED_BEFORE_LINK, str(path)], check=False)
    assert killed.returncode == -signal.SIGKILL
    assert not path.exists()
    (stray,) = tmp_path.iterdir()  # what it wrote, whole, under a name nobody loads
    assert stray.name.startswith(".identity.key.") and stray.name.endswith(".tmp")
    assert stat.S_IMODE(stray.stat().st_mode) == 0o600
    assert Identity.from_pem(stray.read_bytes())
    created = load_or_create_identity(path)
    assert load_or_create_identity(path, create=False).peer_id == created.peer_id
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_processes_creating_the_key_at_once_all_use_one_key(tmp_path) -> None:
    """Four processes each write a key of their own and then link at the same moment:
    one link wins, and every process uses the key it put there.
    """
    path = tmp_path / "sdcn" / "identity.key"
    ready_read, ready_write = os.pipe()
    go_read, go_write = os.pipe()
    fds = (ready_write, go_read)
    command = [sys.executable, "-c", LINK_TOGETHER, str(path), *map(str, fds)]
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, text=True, pass_fds=fds) for _ in range(4)
    ]
    try:
        for _ in processes:
            assert select.select([ready_read], [], [], 60)[0], "a process never reached link"
            assert os.read(ready_read, 1) == b"x"
        os.write(go_write, b"x" * len(processes))
        outputs = [process.communicate(timeout=60)[0].strip() for process in processes]
    finally:
        for fd in (ready_read, ready_write, go_read, go_write):
            os.close(fd)
        for process in processes:
            process.kill()
            process.wait()
    assert all(process.returncode == 0 for process in processes)
    assert set(outputs) == {str(load_or_create_identity(path, create=False).peer_id)}
    assert [p.name for p in path.parent.iterdir()] == ["identity.key"]


def test_missing_key_file_without_create_is_a_config_error(tmp_path) -> None:
    path = tmp_path / "identity.key"
    with pytest.raises(ConfigError, match="no key file"):
        load_or_create_identity(path, create=False)
    assert not path.exists()


def test_corrupt_key_file_is_a_config_error_and_is_kept(tmp_path) -> None:
    path = tmp_path / "identity.key"
    path.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigError, match="bad key file"):
        load_or_create_identity(path)
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\nnot")


@pytest.mark.parametrize(
    "private_key",
    [
        x25519.X25519PrivateKey.from_private_bytes(bytes(32)),
        ec.derive_private_key(1, ec.SECP256R1()),
    ],
    ids=["x25519", "ec-p256"],
)
def test_non_ed25519_pem_is_a_config_error(tmp_path, private_key) -> None:
    path = tmp_path / "identity.key"
    path.write_bytes(
        private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ConfigError, match="not hold an Ed25519 key"):
        load_or_create_identity(path)


def test_pem_with_unknown_key_algorithm_is_a_config_error() -> None:
    pem = Identity.from_seed(bytes(32)).private_bytes_pem()
    der = base64.b64decode(b"".join(pem.splitlines()[1:-1]))
    # Swap the Ed25519 OID (1.3.101.112) for an unassigned one (1.3.101.99).
    der = der.replace(bytes.fromhex("06032b6570"), bytes.fromhex("06032b6563"))
    unknown = (
        b"-----BEGIN PRIVATE KEY-----\n" + base64.b64encode(der) + b"\n-----END PRIVATE KEY-----\n"
    )
    with pytest.raises(ConfigError, match="not a PKCS#8 PEM private key"):
        Identity.from_pem(unknown)


def test_pem_round_trips() -> None:
    identity = Identity.from_seed(bytes(range(32)))
    assert Identity.from_pem(identity.private_bytes_pem()).peer_id == identity.peer_id
