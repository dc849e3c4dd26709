from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdcn_p2p.dht.keys import (
    KEY_BITS,
    bucket_index,
    distance,
    key_int,
    node_key,
    node_key_int,
    random_key_with_prefix,
)
from sdcn_p2p.testing import test_identity

FUZZ = settings(max_examples=200, deadline=None)
keys = st.binary(min_size=32, max_size=32)


def shared_prefix(a: bytes, b: bytes) -> int:
    bits_a, bits_b = f"{key_int(a):0256b}", f"{key_int(b):0256b}"
    return next(i for i in range(KEY_BITS) if bits_a[i] != bits_b[i])


@FUZZ
@given(keys, keys, keys)
def test_xor_distance_is_a_metric(a: bytes, b: bytes, c: bytes) -> None:
    assert distance(a, b) == distance(b, a)
    assert (distance(a, b) == 0) == (a == b)
    assert distance(a, c) <= distance(a, b) + distance(b, c)
    assert distance(a, b) == key_int(a) ^ key_int(b)


@FUZZ
@given(keys, keys)
def test_bucket_index_is_the_shared_prefix_length(a: bytes, b: bytes) -> None:
    if a == b:
        with pytest.raises(ValueError):
            bucket_index(a, b)
    else:
        assert bucket_index(a, b) == shared_prefix(a, b)


def test_random_key_with_prefix_lands_in_every_bucket() -> None:
    rng = random.Random(7)
    own = rng.randbytes(32)
    for prefix in range(KEY_BITS):
        key = random_key_with_prefix(own, prefix, rng)
        assert bucket_index(own, key) == prefix
    with pytest.raises(ValueError):
        random_key_with_prefix(own, KEY_BITS, rng)


def test_node_key_is_the_sha256_of_the_peer_id() -> None:
    peer = test_identity(1).peer_id
    assert node_key(peer) == peer.dht_key
    assert node_key_int(peer) == key_int(peer.dht_key)
