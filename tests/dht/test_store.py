from __future__ import annotations

import contextlib
import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdcn_p2p.dht.store import LOCAL, PEER_RECORD_TTL, RecordStore, Source, validate
from sdcn_p2p.errors import RecordError, ResourceLimitExceeded
from sdcn_p2p.identity import Identity
from sdcn_p2p.multiaddr import Multiaddr
from sdcn_p2p.records import Advert, Envelope, ModelInfo, PeerRecord, model_key, peer_key
from sdcn_p2p.testing import test_identity

NOW = 1_700_000_000.0
ALICE, BOB = test_identity(1), test_identity(2)
ADDRS = (Multiaddr.parse("/ip4/10.0.0.1/tcp/4001/ws"),)


def record(identity: Identity = ALICE, seq: int = 1) -> Envelope:
    return PeerRecord(identity.peer_id, seq, ADDRS).seal(identity)


def advert(
    identity: Identity = ALICE,
    seq: int = 1,
    *,
    models: tuple[str, ...] = ("sd-1.5",),
    issued_at: float = NOW,
    ttl: float = 180.0,
) -> Envelope:
    return Advert(
        identity.peer_id,
        seq,
        issued_at,
        ttl,
        models=tuple(ModelInfo(name) for name in models),
    ).seal(identity)


def test_peer_records_are_stored_under_their_peer_key() -> None:
    store = RecordStore()
    key = peer_key(ALICE.peer_id)
    assert store.put(key, record(), NOW)
    assert store.get(key, NOW) == [record()]
    (value,) = store.values(key, NOW)
    assert (value.publisher, value.seq, value.expires_at) == (ALICE.peer_id, 1, NOW + 3600)
    assert value.data == record().to_bytes()
    assert len(store) == 1 and store.size_bytes == len(value.data)


def test_an_advert_is_a_provider_entry_under_each_model_key() -> None:
    store = RecordStore()
    env = advert(models=("SD 1.5", "sdxl"))
    for name in ("sd 1.5", "SDXL"):
        assert store.put(model_key(name), env, NOW)
    assert store.put(model_key("sdxl"), advert(BOB, models=("sdxl",)), NOW)
    assert len(store.get(model_key("sdxl"), NOW)) == 2  # two providers of sdxl
    assert store.get(model_key("sd 1.5"), NOW) == [env]


def tampered(envelope: Envelope) -> Envelope:
    payload = envelope.payload.replace(b"10.0.0.1", b"10.6.6.6")
    assert payload != envelope.payload
    return dataclasses.replace(envelope, payload=payload)


def forged(envelope: Envelope) -> Envelope:
    """Alice's payload, signed by Bob."""
    other = Envelope.seal(BOB, PeerRecord.DOMAIN, envelope.payload_type, envelope.payload)
    return dataclasses.replace(envelope, signature=other.signature)


@pytest.mark.parametrize(
    ("key", "envelope", "reason"),
    [
        (peer_key(ALICE.peer_id), tampered(record()), "signature does not verify"),
        (peer_key(ALICE.peer_id), forged(record()), "signature does not verify"),
        (peer_key(BOB.peer_id), record(), "not stored under this key"),
        (model_key("sd-1.5"), record(), "not stored under this key"),
        (model_key("sdxl"), advert(), "names no model with this key"),
        (model_key("sd-1.5"), advert(issued_at=NOW - 181), "expired"),
        (model_key("sd-1.5"), advert(issued_at=NOW + 3600), "in the future"),
        (peer_key(ALICE.peer_id), Envelope.seal(ALICE, "x", b"/other/1", b"{}"), "not stored"),
    ],
    ids=[
        "tampered",
        "forged",
        "other-peer",
        "model-key",
        "other-model",
        "expired",
        "future",
        "kind",
    ],
)
def test_invalid_records_are_refused(key: bytes, envelope: Envelope, reason: str) -> None:
    store = RecordStore()
    with pytest.raises(RecordError, match=reason):
        store.put(key, envelope, NOW)
    assert len(store) == 0


def test_oversized_records_are_refused() -> None:
    big = advert(models=tuple(f"model {i} " + "x" * 200 for i in range(100)))
    assert len(big.to_bytes()) > 16 * 1024
    with pytest.raises(RecordError, match="over the 16384-byte cap"):
        RecordStore(max_record_size=16 * 1024).put(model_key("model 0 " + "x" * 200), big, NOW)
    with pytest.raises(RecordError, match="cap"):
        validate(model_key("model 0 " + "x" * 200), big, NOW, max_size=1024)


def test_seq_must_grow_per_key_and_publisher() -> None:
    store = RecordStore()
    key = peer_key(ALICE.peer_id)
    assert store.put(key, record(seq=5), NOW)
    assert not store.put(key, record(seq=5), NOW)  # the same again: nothing to do
    with pytest.raises(RecordError, match="stale"):
        store.put(key, record(seq=4), NOW)
    assert store.put(key, record(seq=6), NOW)
    assert [v.seq for v in store.values(key, NOW)] == [6]
    assert len(store) == 1


def test_values_expire() -> None:
    store = RecordStore()
    store.put(peer_key(ALICE.peer_id), record(), NOW)
    store.put(model_key("sd-1.5"), advert(ttl=60), NOW)
    store.put(model_key("sd-1.5"), advert(BOB, ttl=120), NOW)
    assert store.expire(NOW + 59) == 0
    assert [v.publisher for v in store.values(model_key("sd-1.5"), NOW + 60)] == [BOB.peer_id]
    assert len(store) == 2  # read past its expiry, Alice's advert is gone
    assert store.expire(NOW + 120) == 1
    assert store.get(peer_key(ALICE.peer_id), NOW + PEER_RECORD_TTL - 1) == [record()]
    assert store.expire(NOW + PEER_RECORD_TTL) == 1
    assert len(store) == 0 and store.size_bytes == 0
    # Once the held value expired, any seq is welcome again.
    store.put(peer_key(ALICE.peer_id), record(seq=9), NOW)
    assert store.put(peer_key(ALICE.peer_id), record(seq=2), NOW + PEER_RECORD_TTL)


def test_one_publisher_flooding_10000_records_keeps_its_quota() -> None:
    store = RecordStore(max_per_publisher=256)
    stored = refused = 0
    for batch in range(79):  # 79 adverts of 128 models each: 10,112 (key, record) pairs
        names = tuple(f"model-{batch}-{i}" for i in range(128))
        env = advert(seq=batch, models=names)
        for name in names:
            try:
                stored += store.put(model_key(name), env, NOW)
            except ResourceLimitExceeded:
                refused += 1
    assert (stored, refused) == (256, 10_112 - 256)
    assert len(store) == 256
    # Others are unaffected, and so is the publisher's update of what it holds.
    assert store.put(peer_key(BOB.peer_id), record(BOB), NOW)
    assert store.put(model_key("model-0-0"), advert(seq=100, models=("model-0-0",)), NOW)


def test_many_publishers_on_one_key_keep_the_latest_expiring() -> None:
    store = RecordStore(max_values_per_key=8)
    key = model_key("sd-1.5")
    publishers = [test_identity(100 + i) for i in range(20)]
    for i, identity in enumerate(publishers[:8]):
        store.put(key, advert(identity, ttl=100 + i), NOW)
    with pytest.raises(ResourceLimitExceeded, match="expiring later"):
        store.put(key, advert(publishers[8], ttl=50), NOW)
    for i, identity in enumerate(publishers[8:]):
        store.put(key, advert(identity, ttl=200 + i), NOW)  # each evicts the soonest to expire
    held = {v.publisher for v in store.values(key, NOW)}
    assert held == {identity.peer_id for identity in publishers[12:]}
    assert len(store) == 8


def test_the_store_never_exceeds_its_total_bounds() -> None:
    store = RecordStore(max_records=10, max_bytes=10_000)
    identities = [test_identity(200 + i) for i in range(30)]
    for i, identity in enumerate(identities):
        with contextlib.suppress(ResourceLimitExceeded):
            store.put(peer_key(identity.peer_id), record(identity), NOW + i)
        assert len(store) <= 10 and store.size_bytes <= 10_000
    # PeerRecords all live an hour from receipt: the oldest were evicted for newer ones.
    assert {
        v.publisher
        for key in [peer_key(i.peer_id) for i in identities[20:]]
        for v in store.values(key, NOW + 30)
    } == {i.peer_id for i in identities[20:]}
    # An advert expiring sooner than everything held is refused, changing nothing.
    with pytest.raises(ResourceLimitExceeded, match="full"):
        store.put(model_key("sd-1.5"), advert(ttl=60), NOW + 30)
    assert len(store) == 10
    small = RecordStore(max_bytes=len(record().to_bytes()) * 3)
    for i, identity in enumerate(identities[:5]):
        small.put(peer_key(identity.peer_id), record(identity), NOW + i)
    assert len(small) == 3


def source(index: int, ip: str) -> Source:
    return Source(test_identity(index, seed=7).peer_id, ip)


HONEST = [test_identity(400 + i) for i in range(50)]
HOSTILE = [test_identity(500 + i, seed=5) for i in range(500)]


@pytest.mark.parametrize("senders", [1, 500], ids=["one-sender", "500-senders-on-one-ip"])
def test_one_peer_with_500_identities_cannot_displace_50_honest_publishers(senders: int) -> None:
    """50 honest publishers, each on its own address, store a PeerRecord and an advert; then
    one machine stores the same, signed by 500 identities, expiring later than the honest
    adverts, as one peer or as 500 peers on one IP address. Store and key are full long
    before the flood ends: only the flood's own records give way, and honest publishers still
    update and join afterwards. (By expiry alone, the flood displaced every honest advert.)
    """
    store = RecordStore(max_records=600, max_values_per_key=128)
    sd15 = model_key("sd-1.5")

    def honest_put(i: int, identity: Identity, seq: int = 1) -> None:
        sender = Source(identity.peer_id, f"10.0.1.{i}")
        assert store.put(peer_key(identity.peer_id), record(identity, seq), NOW, sender)
        assert store.put(sd15, advert(identity, seq, ttl=180), NOW, sender)

    for i, identity in enumerate(HONEST):
        honest_put(i, identity)
    flood = [source(i % senders, "10.6.6.6") for i in range(len(HOSTILE))]
    stored = 0
    for identity, sender in zip(HOSTILE, flood, strict=True):
        for key, envelope in [
            (peer_key(identity.peer_id), record(identity)),
            (sd15, advert(identity, ttl=3600)),
        ]:
            with contextlib.suppress(ResourceLimitExceeded):
                stored += store.put(key, envelope, NOW, sender)
    assert stored >= 500  # it filled the store, then could only churn in its own share
    assert len(store) == 600 and store.held_by_address("10.6.6.6") == 500
    assert len(store.values(sd15, NOW)) == 128
    honest_ids = {identity.peer_id for identity in HONEST}
    assert honest_ids <= {v.publisher for v in store.values(sd15, NOW)}
    assert all(store.get(peer_key(identity.peer_id), NOW) for identity in HONEST)
    # Honest publishers keep updating, and a newcomer takes the flood's room.
    for i, identity in enumerate(HONEST):
        honest_put(i, identity, seq=2)
    honest_put(99, test_identity(499))
    assert store.held_by_address("10.6.6.6") == 498
    assert len(store) == 600


def test_quotas_per_sender_and_per_address() -> None:
    store = RecordStore(max_per_sender=4, max_per_address=10)
    mallory = source(0, "10.6.6.6")
    publishers = [test_identity(600 + i) for i in range(20)]

    def put(identity: Identity, sender: Source, seq: int = 1) -> bool:
        return store.put(peer_key(identity.peer_id), record(identity, seq), NOW, sender)

    for identity in publishers[:4]:
        assert put(identity, mallory)
    with pytest.raises(ResourceLimitExceeded, match="already stored 4 records here"):
        put(publishers[4], mallory)
    assert put(publishers[0], mallory, seq=2)  # an update of its own is no more
    # Peers on one address share its quota; another address, and our own puts, do not.
    for index, identity in enumerate(publishers[4:10]):
        assert put(identity, source(1 + index % 2, "10.6.6.6"))
    with pytest.raises(ResourceLimitExceeded, match=r"peers at 10\.6\.6\.6 already stored 10"):
        put(publishers[10], source(3, "10.6.6.6"))
    assert store.held_by(mallory) == 4 and store.held_by_address("10.6.6.6") == 10
    assert put(publishers[10], source(3, "10.7.7.7"))
    assert put(publishers[11], LOCAL) and put(publishers[12], Source(HONEST[0].peer_id))
    assert len(store) == 13
    # Another sender replacing a record moves it to that sender's account.
    assert put(publishers[1], source(4, "10.8.8.8"), seq=2)
    assert store.held_by(mallory) == 3 and store.held_by_address("10.6.6.6") == 9


@pytest.mark.parametrize(
    ("addr", "address"),
    [
        ("/ip4/10.1.2.3/tcp/4001/ws", "10.1.2.3"),
        ("/ip6/2001:db8:1:2:3:4:5:6/tcp/4001/ws", "2001:db8:1:2::/64"),
        ("/ip4/127.0.0.1/tcp/4001/ws", None),
        ("/ip6/::1/tcp/4001/ws", None),
        ("/dns4/example.com/tcp/443/wss", None),
        (None, None),
    ],
)
def test_a_source_groups_by_ip_address_or_ipv6_prefix(addr: str | None, address: str | None):
    multiaddr = Multiaddr.parse(addr) if addr else None
    sender = Source.of(ALICE.peer_id, multiaddr)
    assert sender == Source(ALICE.peer_id, address)
    assert sender.group == (("ip", address) if address else ("peer", ALICE.peer_id))


# Random operations never break the bounds.

POOL_IDS = [test_identity(300 + i) for i in range(5)]
POOL = (
    [
        (model_key(model), advert(identity, seq, models=(model, "shared"), ttl=ttl))
        for identity in POOL_IDS
        for seq, model, ttl in [(1, "a", 60), (2, "b", 600), (3, "a", 300), (4, "c", 30)]
    ]
    + [
        (model_key("shared"), advert(identity, 5, models=("shared",), ttl=900))
        for identity in POOL_IDS
    ]
    + [
        (peer_key(identity.peer_id), record(identity, seq))
        for identity in POOL_IDS
        for seq in (1, 2)
    ]
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(range(len(POOL))), st.floats(0, 200)), max_size=40))
def test_random_puts_respect_every_bound(ops: list[tuple[int, float]]) -> None:
    store = RecordStore(max_per_publisher=3, max_records=7, max_values_per_key=3, max_bytes=4000)
    now = NOW
    for index, step in ops:
        now += step
        key, envelope = POOL[index]
        with contextlib.suppress(RecordError, ResourceLimitExceeded):
            store.put(key, envelope, now)
        assert len(store) <= 7 and store.size_bytes <= 4000
        keys = {key for key, _ in POOL}
        values = [v for key in keys for v in store.values(key, now)]
        assert all(v.expires_at > now for v in values)
        assert all(len(store.values(key, now)) <= 3 for key in keys)
        per_publisher = [sum(v.publisher == i.peer_id for v in values) for i in POOL_IDS]
        assert max(per_publisher) <= 3
        assert len(values) == len(store) and sum(len(v.data) for v in values) == store.size_bytes
        store.expire(now)


SOURCES = [LOCAL, source(0, "10.6.6.6"), source(1, "10.6.6.6"), source(2, "10.7.7.7")]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(range(len(POOL))),
            st.sampled_from(range(len(SOURCES))),
            st.floats(0, 200),
        ),
        max_size=40,
    )
)
def test_random_puts_from_several_senders_respect_every_quota(
    ops: list[tuple[int, int, float]],
) -> None:
    store = RecordStore(
        max_per_sender=3, max_per_address=4, max_records=6, max_values_per_key=3, max_bytes=4000
    )
    now = NOW
    keys = {key for key, _ in POOL}
    for index, sender, step in ops:
        now += step
        key, envelope = POOL[index]
        with contextlib.suppress(RecordError, ResourceLimitExceeded):
            store.put(key, envelope, now, SOURCES[sender])
        values = [v for key in keys for v in store.values(key, now)]
        assert len(values) == len(store) <= 6 and store.size_bytes <= 4000
        held = {s: sum(v.source == s for v in values) for s in SOURCES}
        assert all(held[s] == store.held_by(s) <= 3 for s in SOURCES[1:])
        assert held[SOURCES[1]] + held[SOURCES[2]] == store.held_by_address("10.6.6.6") <= 4
