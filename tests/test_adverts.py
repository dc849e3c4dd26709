from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdcn_p2p.adverts import AdvertCache, ModelSummary
from sdcn_p2p.errors import RecordError
from sdcn_p2p.identity import Identity
from sdcn_p2p.records import Advert, Envelope, LoraInfo, ModelInfo, PeerRecord
from sdcn_p2p.testing import test_identity

START = 1_700_000_000.0
PEERS = [test_identity(i, seed=7) for i in range(6)]


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def sealed(
    identity: Identity,
    seq: int = 1,
    *,
    issued_at: float = START,
    ttl: float = 180.0,
    models: tuple[str, ...] = ("SDXL Base",),
    loras: tuple[str, ...] = (),
    state: str = "online",
) -> Envelope:
    advert = Advert(
        identity.peer_id,
        seq,
        issued_at,
        ttl,
        models=tuple(ModelInfo(name) for name in models),
        loras=tuple(LoraInfo(name) for name in loras),
        state=state,
    )
    return advert.seal(identity)


def new_cache(clock: Clock | None = None, **kwargs: int) -> AdvertCache:
    return AdvertCache(wall_clock=clock or Clock(), **kwargs)


def test_add_keeps_a_verified_advert() -> None:
    cache = new_cache()
    envelope = sealed(PEERS[0])
    advert = cache.add(envelope)
    assert advert == Advert.from_envelope(envelope)
    peer = PEERS[0].peer_id
    assert cache.get(peer) == advert
    assert cache.envelope(peer) == envelope
    assert cache.digest() == {peer: 1}
    assert len(cache) == 1
    assert peer in cache
    assert list(cache) == [advert]
    assert cache.get(PEERS[1].peer_id) is None
    assert cache.envelope(PEERS[1].peer_id) is None


def test_only_a_higher_seq_replaces_the_held_advert() -> None:
    cache = new_cache()
    peer = PEERS[0].peer_id
    assert cache.add(sealed(PEERS[0], 5, models=("old",))) is not None
    assert cache.add(sealed(PEERS[0], 5, models=("old",))) is None  # the same advert again
    assert cache.add(sealed(PEERS[0], 5, models=("other",))) is None  # same seq, other content
    assert cache.add(sealed(PEERS[0], 4, models=("older",))) is None
    newer = cache.add(sealed(PEERS[0], 6, models=("new",)))
    assert newer is not None and cache.get(peer) == newer
    assert cache.digest() == {peer: 6}
    assert cache.find("old") == [] and cache.find("new") == [newer]
    assert cache.add(sealed(PEERS[0], 5, models=("old",))) is None  # replayed after replacement
    assert len(cache) == 1


def test_a_duplicate_is_recognised_without_verifying_again(monkeypatch) -> None:
    cache = new_cache()
    envelope = sealed(PEERS[0])
    cache.add(envelope)

    def refuse(envelope: Envelope) -> Advert:
        raise AssertionError("verified a duplicate")

    monkeypatch.setattr(Advert, "from_envelope", refuse)
    assert cache.add(Envelope.from_bytes(envelope.to_bytes())) is None


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: sealed(PEERS[0], issued_at=START - 180), "expired"),
        (lambda: sealed(PEERS[0], issued_at=START - 3600, ttl=10), "expired"),
        (lambda: sealed(PEERS[0], issued_at=START + 61), "future"),
        (
            lambda: dataclasses.replace(sealed(PEERS[0]), public_key=PEERS[1].public_key_bytes),
            "signature",
        ),
        (
            lambda: dataclasses.replace(sealed(PEERS[0]), payload=sealed(PEERS[0], 9).payload),
            "signature",
        ),
        (
            lambda: Envelope.seal(
                PEERS[0], PeerRecord.DOMAIN, Advert.PAYLOAD_TYPE, sealed(PEERS[0]).payload
            ),
            "domain",
        ),
        (
            lambda: sealed(PEERS[0], loras=tuple(f"lora-{i:03}-" + "x" * 200 for i in range(400))),
            "over 65536",
        ),
    ],
    ids=["expired", "long-expired", "future", "other-key", "tampered", "domain", "oversized"],
)
def test_bad_adverts_raise_and_are_not_kept(make, message: str) -> None:
    cache = new_cache()
    listened: list[Advert] = []
    with cache.subscribe(listened.append), pytest.raises(RecordError, match=message):
        cache.add(make())
    assert len(cache) == 0 and listened == []


def test_an_expired_advert_is_refused_even_when_a_lower_seq_is_held() -> None:
    cache = new_cache()
    cache.add(sealed(PEERS[0], 1))
    with pytest.raises(RecordError, match="expired"):
        cache.add(sealed(PEERS[0], 2, issued_at=START - 200))
    assert cache.digest() == {PEERS[0].peer_id: 1}


def test_adverts_expire_lazily_and_by_expire() -> None:
    clock = Clock()
    cache = new_cache(clock)
    cache.add(sealed(PEERS[0], ttl=60))
    cache.add(sealed(PEERS[1], ttl=120))
    cache.add(sealed(PEERS[2], ttl=180))
    clock.now = START + 59.9
    assert len(cache) == 3
    clock.now = START + 60
    assert cache.get(PEERS[0].peer_id) is None
    assert len(cache) == 2
    assert [a.peer_id for a in cache.find("sdxl base")] == [PEERS[1].peer_id, PEERS[2].peer_id]
    clock.now = START + 130
    assert cache.expire() == 1
    assert cache.expire() == 0
    assert cache.digest() == {PEERS[2].peer_id: 1}
    clock.now = START + 1000
    assert list(cache) == [] and cache.models() == {}
    assert cache.envelope(PEERS[2].peer_id) is None


def test_an_expired_advert_leaves_room_for_a_fresh_one_of_its_peer() -> None:
    clock = Clock()
    cache = new_cache(clock)
    cache.add(sealed(PEERS[0], 10, ttl=60))
    clock.now = START + 100
    # The held seq 10 has expired: a restarted provider may start again from seq 1.
    assert cache.add(sealed(PEERS[0], 1, issued_at=clock.now)) is not None
    assert cache.digest() == {PEERS[0].peer_id: 1}


def test_find_matches_normalized_model_and_every_lora() -> None:
    cache = new_cache()
    a = cache.add(sealed(PEERS[0], models=("SDXL Base", "SD 1.5"), loras=("Detail", "Noise")))
    b = cache.add(sealed(PEERS[1], models=("sdxl  base",), loras=("detail",)))
    c = cache.add(sealed(PEERS[2], models=("SDXL Base",), state="draining"))
    cache.add(sealed(PEERS[3], models=("Other",), loras=("Detail", "Noise")))
    assert cache.find("SDXL BASE") == [a, b]
    assert cache.find(" sdxl\tbase ", ["DETAIL"]) == [a, b]
    assert cache.find("sdxl base", ["detail", "noise"]) == [a]
    assert cache.find("sdxl base", ["missing"]) == []
    assert cache.find("sdxl base", include_draining=True) == [a, b, c]
    assert cache.find("sd 1.5") == [a]
    assert cache.find("nothing") == []


def test_find_follows_replacement_and_removal() -> None:
    cache = new_cache()
    cache.add(sealed(PEERS[0], 1, models=("A", "B")))
    replaced = cache.add(sealed(PEERS[0], 2, models=("B", "C")))
    assert cache.find("a") == []
    assert cache.find("b") == [replaced] and cache.find("c") == [replaced]
    assert cache.remove(PEERS[0].peer_id) == replaced
    assert cache.remove(PEERS[0].peer_id) is None
    assert cache.find("b") == [] and len(cache) == 0 and cache.models() == {}


def test_models_is_a_catalog_of_online_providers() -> None:
    cache = new_cache()
    cache.add(sealed(PEERS[0], models=("SDXL Base", "SD 1.5"), loras=("Detail",)))
    cache.add(sealed(PEERS[1], models=("sdxl base",), loras=("Noise", "Detail")))
    cache.add(sealed(PEERS[2], models=("SDXL Base", "Draining Only"), state="draining"))
    assert cache.models() == {
        "sdxl base": ModelSummary("SDXL Base", 2, ("Detail", "Noise")),
        "sd 1.5": ModelSummary("SD 1.5", 1, ("Detail",)),
    }


def test_a_model_listed_twice_counts_its_provider_once() -> None:
    cache = new_cache()
    advert = cache.add(sealed(PEERS[0], models=("SDXL", "sdxl")))
    assert cache.find("SDXL") == [advert]
    assert cache.models()["sdxl"].providers == 1
    cache.remove(PEERS[0].peer_id)
    assert cache.models() == {}


def test_subscribers_hear_of_each_new_advert_once() -> None:
    cache = new_cache()
    heard: list[tuple[str, int]] = []
    with cache.subscribe(lambda advert: heard.append((advert.models[0].name, advert.seq))):
        cache.add(sealed(PEERS[0], 1, models=("a",)))
        cache.add(sealed(PEERS[0], 1, models=("a",)))
        cache.add(sealed(PEERS[0], 0, models=("b",)))
        cache.add(sealed(PEERS[0], 2, models=("c",)))
        cache.add(sealed(PEERS[1], 1, models=("d",)))
    assert heard == [("a", 1), ("c", 2), ("d", 1)]


def test_a_subscription_ends_with_its_block() -> None:
    cache = new_cache()
    heard: list[tuple[str, int]] = []
    outer = cache.subscribe(lambda advert: heard.append(("outer", advert.seq)))
    with cache.subscribe(lambda advert: heard.append(("inner", advert.seq))) as inner:
        cache.add(sealed(PEERS[0], 1))
        assert not inner.closed
    assert inner.closed
    cache.add(sealed(PEERS[0], 2))
    outer.close()
    outer.close()  # closing twice does nothing
    cache.add(sealed(PEERS[0], 3))
    assert heard == [("outer", 1), ("inner", 1), ("outer", 2)]


def test_a_full_cache_evicts_the_advert_that_expires_soonest() -> None:
    cache = new_cache(max_adverts=3)
    for index, ttl in enumerate((100, 50, 150)):
        cache.add(sealed(PEERS[index], ttl=ttl))
    assert cache.add(sealed(PEERS[3], ttl=120)) is not None
    assert set(cache.digest()) == {PEERS[0].peer_id, PEERS[2].peer_id, PEERS[3].peer_id}
    # A newcomer that would expire before everything held is not kept.
    assert cache.add(sealed(PEERS[4], ttl=90)) is None
    assert PEERS[4].peer_id not in cache and len(cache) == 3
    # A newer advert of a held peer never needs room.
    assert cache.add(sealed(PEERS[0], 2, ttl=10)) is not None
    assert len(cache) == 3
    assert cache.add(sealed(PEERS[5], ttl=20)) is not None
    assert PEERS[0].peer_id not in cache  # its new advert now expires soonest


def test_max_adverts_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_adverts"):
        AdvertCache(wall_clock=Clock(), max_adverts=0)


def test_many_replacements_keep_the_expiry_heap_small() -> None:
    cache = new_cache()
    for seq in range(1, 500):
        cache.add(sealed(PEERS[seq % 2], seq))
    assert len(cache) == 2
    assert len(cache._expiry) <= 2 * len(cache) + 65


_SIGNED = {
    (peer, seq, ttl): sealed(PEERS[peer], seq, ttl=ttl)
    for peer in range(4)
    for seq in range(3)
    for ttl in (30, 60, 120)
}


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 2), st.sampled_from([30, 60, 120]))
        | st.floats(0, 50),
        max_size=30,
    ),
    st.integers(1, 3),
)
def test_cache_invariants_hold_for_any_sequence(steps: list, max_adverts: int) -> None:
    clock = Clock()
    cache = new_cache(clock, max_adverts=max_adverts)
    for step in steps:
        if isinstance(step, float):
            clock.now += step
            continue
        peer, seq, ttl = step
        before = cache.digest()
        try:
            advert = cache.add(_SIGNED[step])
        except RecordError:
            assert clock.now >= START + ttl  # only expiry can make these fail
            continue
        held = before.get(PEERS[peer].peer_id)
        if advert is not None:
            assert held is None or seq > held
        else:
            full = len(before) >= max_adverts
            assert (held is not None and seq <= held) or (held is None and full)
        digest = cache.digest()
        assert len(digest) <= max_adverts
        for held_peer, held_seq in digest.items():
            held_advert = cache.get(held_peer)
            assert held_advert is not None and held_advert.seq == held_seq
            assert held_advert.expires_at > clock.now
        assert [a.peer_id for a in cache.find("sdxl base")] == list(digest)


def test_digest_hash_summarises_the_held_peer_seq_pairs() -> None:
    clock = Clock()
    a, b = new_cache(clock), new_cache(clock)
    assert a.digest_hash == b.digest_hash  # both empty
    a.add(sealed(PEERS[0], 1))
    a.add(sealed(PEERS[1], 1))
    assert a.digest_hash != b.digest_hash
    b.add(sealed(PEERS[1], 1))  # another order
    b.add(sealed(PEERS[0], 1))
    assert a.digest_hash == b.digest_hash
    b.add(sealed(PEERS[0], 2))
    assert a.digest_hash != b.digest_hash
    b.remove(PEERS[1].peer_id)
    a.remove(PEERS[1].peer_id)
    a.add(sealed(PEERS[0], 2))
    assert a.digest_hash == b.digest_hash
    clock.now += 1000  # everything expires
    assert a.digest_hash == new_cache(clock).digest_hash
