"""The DHT keyspace: 256-bit keys, XOR distance, and k-bucket indices."""

from __future__ import annotations

import functools
import random

from sdcn_p2p.identity import PeerId

__all__ = [
    "KEY_BITS",
    "KEY_SIZE",
    "Key",
    "bucket_index",
    "distance",
    "key_int",
    "node_key",
    "node_key_int",
    "random_key_with_prefix",
]

Key = bytes
KEY_SIZE = 32
KEY_BITS = 8 * KEY_SIZE


def key_int(key: Key) -> int:
    """`key` as a big-endian integer: XOR distance is then `a ^ b`."""
    return int.from_bytes(key, "big")


def distance(a: Key, b: Key) -> int:
    """XOR distance between two keys, as an integer."""
    return int.from_bytes(a, "big") ^ int.from_bytes(b, "big")


def node_key(peer_id: PeerId) -> Key:
    """A peer's position in the keyspace: SHA-256 of its peer id bytes."""
    return peer_id.dht_key


@functools.lru_cache(maxsize=65_536)
def node_key_int(peer_id: PeerId) -> int:
    """`node_key(peer_id)` as an integer (cached: lookups compute it for every peer they see)."""
    return int.from_bytes(peer_id.dht_key, "big")


def bucket_index(self_key: Key, other_key: Key) -> int:
    """The number of leading bits `other_key` shares with `self_key` (0..255).

    Bucket 0 holds the farthest half of the keyspace, bucket 255 the single nearest key.
    Raises ValueError for `other_key == self_key`, which belongs to no bucket.
    """
    d = distance(self_key, other_key)
    if d == 0:
        raise ValueError("a key is not in any bucket of its own table")
    return KEY_BITS - d.bit_length()


def random_key_with_prefix(self_key: Key, prefix_len: int, rng: random.Random) -> Key:
    """A random key sharing exactly `prefix_len` leading bits with `self_key` (0..255)."""
    if not 0 <= prefix_len < KEY_BITS:
        raise ValueError(f"prefix length must be in 0..{KEY_BITS - 1}, not {prefix_len}")
    flip = 1 << (KEY_BITS - 1 - prefix_len)
    low = rng.getrandbits(KEY_BITS - 1 - prefix_len) if prefix_len < KEY_BITS - 1 else 0
    self_int = key_int(self_key)
    high = (self_int >> (KEY_BITS - prefix_len)) << (KEY_BITS - prefix_len) if prefix_len else 0
    value = high | ((self_int & flip) ^ flip) | low
    return value.to_bytes(KEY_SIZE, "big")
