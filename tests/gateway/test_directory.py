from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

import pytest

from gateway.directory import (
    BAN_MAX,
    BUSY_HOLD,
    DEFAULT_RTT,
    MAX_IN_FLIGHT,
    ProviderDirectory,
)
from sdcn_p2p.adverts import AdvertCache
from sdcn_p2p.identity import PeerId
from sdcn_p2p.jobs import JobRequest
from sdcn_p2p.records import Advert, LoraInfo, ModelInfo
from sdcn_p2p.testing import test_identity

NOW = 1_700_000_000.0
IDS = [test_identity(i, seed=5) for i in range(8)]
PEERS = [identity.peer_id for identity in IDS]


def advert(
    index: int,
    *,
    models: tuple[ModelInfo, ...] = (ModelInfo("SD 1.5", "v1-5-pruned.safetensors [6ce0161689]"),),
    loras: tuple[str, ...] = (),
    samplers: tuple[str, ...] = ("Euler a", "DPM++ 2M"),
    speed: float = 2.0,
    slots: int = 1,
    queue: int = 0,
    max_queue: int | None = None,
    max_pixels: int = 0,
    max_steps: int = 0,
    state: str = "online",
    roles: tuple[str, ...] = ("provider",),
) -> Advert:
    return Advert(
        PEERS[index],
        seq=1,
        issued_at=NOW,
        ttl=180,
        models=models,
        loras=tuple(LoraInfo(name) for name in loras),
        samplers=samplers,
        speed=speed,
        slots=slots,
        queue=queue,
        max_queue=max_queue,
        max_pixels=max_pixels,
        max_steps=max_steps,
        state=state,
        roles=roles,
    )


def job(**fields: object) -> JobRequest:
    """20 steps at 512x512: a cost of 20 units, so 10 s at 2 it/s."""
    values: dict[str, object] = {"kind": "txt2img", "model": "SD 1.5", "prompt": "a cat"}
    values.update(fields)
    return JobRequest(**values)  # type: ignore[arg-type]


def directory(
    *adverts: Advert, rtts: dict[PeerId, float] | None = None, seed: int = 0
) -> ProviderDirectory:
    cache = AdvertCache(wall_clock=lambda: NOW)
    for index, held in enumerate(adverts):
        identity = next(i for i in IDS if i.peer_id == held.peer_id)
        assert cache.add(held.seal(identity)) is not None, index
    known = rtts if rtts is not None else {p: 0.0 for p in PEERS}
    return ProviderDirectory(cache, known.get, rng=random.Random(seed))


def chosen(found: ProviderDirectory, request: JobRequest, **kwargs: object) -> list[PeerId]:
    return [c.peer_id for c in found.candidates(request, NOW, **kwargs)]  # type: ignore[arg-type]


# --- who can run a job -------------------------------------------------------------------------


def test_candidates_match_model_by_name_or_title_and_every_lora() -> None:
    found = directory(
        advert(0, loras=("pixel", "ink")),
        advert(1, loras=("pixel",)),
        advert(2, models=(ModelInfo("SDXL"),)),
    )
    assert set(chosen(found, job(model="  sd   1.5 "))) == {PEERS[0], PEERS[1]}
    assert chosen(found, job(loras=(("PIXEL", 1.0), ("ink", 0.5)))) == [PEERS[0]]
    assert chosen(found, job(loras=(("nope", 1.0),))) == []
    assert chosen(found, job(model="sdxl")) == [PEERS[2]]
    # A1111 clients name a checkpoint by its title.
    by_title = set(chosen(found, job(model="v1-5-pruned.safetensors [6ce0161689]")))
    assert by_title == {PEERS[0], PEERS[1]}
    assert chosen(found, job(model="unknown")) == []


def test_candidates_need_the_sampler_pixels_and_steps() -> None:
    found = directory(
        advert(0, samplers=("Euler a",), max_pixels=512 * 512, max_steps=30),
        advert(1, samplers=("DPM++ 2M", "Euler a")),  # 0: no limit
    )
    assert set(chosen(found, job(sampler_name="euler A"))) == {PEERS[0], PEERS[1]}
    # A scheduler suffix: the base sampler must be offered.
    assert chosen(found, job(sampler_name="DPM++ 2M Karras")) == [PEERS[1]]
    assert chosen(found, job(sampler_name="Heun")) == []
    assert chosen(found, job(width=1024)) == [PEERS[1]]
    assert chosen(found, job(steps=31)) == [PEERS[1]]
    assert set(chosen(found, job(steps=30, width=512))) == {PEERS[0], PEERS[1]}


def test_only_online_providers_not_excluded_nor_banned() -> None:
    found = directory(
        advert(0),
        advert(1, state="draining"),
        advert(2, state="unavailable"),
        advert(3, roles=("gateway",)),
        advert(4),
        advert(5),
    )
    found.ban(PEERS[5], NOW - 1)
    assert set(chosen(found, job())) == {PEERS[0], PEERS[4]}
    assert chosen(found, job(), exclude={PEERS[4]}) == [PEERS[0]]
    assert found.has_model("sd 1.5") and not found.has_model("sd 1.5", ["pixel"])
    assert not found.has_model("sdxl")


def test_has_model_and_can_run_ignore_state_and_bans() -> None:
    found = directory(advert(0, state="draining", loras=("pixel",), max_steps=30))
    found.ban(PEERS[0], NOW)
    assert found.has_model("SD 1.5", ["pixel"])
    assert found.can_run(job(loras=(("pixel", 1.0),)))
    assert not found.can_run(job(steps=50))
    assert found.candidates(job(), NOW) == []


# --- scoring -----------------------------------------------------------------------------------


def test_eta_is_rtt_plus_queue_plus_run() -> None:
    found = directory(
        advert(0, speed=2.0, slots=2, queue=3),
        advert(1, speed=0.0),  # no measured speed: 0.5 it/s
        rtts={PEERS[0]: 0.05},
    )
    first, second = found.candidates(job(), NOW)
    # run = 20 / 2 = 10 s; queue = 3 / 2 slots
    assert first.peer_id == PEERS[0]
    assert first.eta == pytest.approx(0.05 + 1.5 * 10 + 10)
    assert first.rtt == 0.05 and first.in_flight == 0
    # Unknown RTT counts as 150 ms.
    assert second.rtt == DEFAULT_RTT
    assert second.eta == pytest.approx(DEFAULT_RTT + 20 / 0.5)
    assert found.eta(second.advert, job(batch_size=2, width=256)) == pytest.approx(
        DEFAULT_RTT + 20 * 2 * (256 * 512 / 512**2) / 0.5
    )


def test_jobs_in_flight_raise_the_eta_before_the_advert_shows_them() -> None:
    found = directory(advert(0, queue=0), advert(1, queue=2))
    idle, loaded = advert(0, queue=0), advert(1, queue=2)
    assert found.eta(idle, job()) == pytest.approx(10)
    found.started(PEERS[0])
    found.started(PEERS[0])
    assert found.in_flight(PEERS[0]) == 2
    assert found.eta(idle, job()) == pytest.approx(2 * 10 + 10)
    # Once the advert counts them, they are not counted twice.
    found.started(PEERS[1])
    assert found.eta(loaded, job()) == pytest.approx(2 * 10 + 10)
    found.finished(PEERS[0])
    found.finished(PEERS[0])
    found.finished(PEERS[1])
    assert found.in_flight(PEERS[0]) == 0
    assert found.eta(idle, job()) == pytest.approx(10)


def test_in_flight_jobs_move_the_choice_to_another_provider() -> None:
    found = directory(advert(0, speed=4.0), advert(1, speed=2.0))
    assert found.choose(job(), NOW).peer_id == PEERS[0]  # 5 s against 10 s
    found.started(PEERS[0])  # 5 + 5 = 10 s: within the band of provider 1's 10 s
    found.started(PEERS[0])  # 15 s
    assert found.choose(job(), NOW).peer_id == PEERS[1]


def test_the_provider_that_finishes_sooner_wins_queue_or_not() -> None:
    fast_busy = advert(0, speed=10.0, queue=3)  # 3 * 2 + 2 = 8 s
    slow_idle = advert(1, speed=1.0)  # 20 s
    assert directory(fast_busy, slow_idle).choose(job(), NOW).peer_id == PEERS[0]
    fast_swamped = advert(0, speed=10.0, queue=15)  # 15 * 2 + 2 = 32 s
    assert directory(fast_swamped, slow_idle).choose(job(), NOW).peer_id == PEERS[1]


def test_choice_is_random_among_candidates_within_ten_percent_of_the_best() -> None:
    found = directory(
        advert(0, speed=2.0),  # 10 s
        advert(1, speed=20 / 10.8),  # 10.8 s: within 10 %
        advert(2, speed=20 / 11.5),  # 11.5 s: outside
        advert(3, speed=1.0),  # 20 s
    )
    counts = Counter(found.choose(job(), NOW).peer_id for _ in range(1000))
    assert set(counts) == {PEERS[0], PEERS[1]}
    assert 400 < counts[PEERS[0]] < 600


def test_choose_returns_none_without_candidates() -> None:
    assert directory(advert(0)).choose(job(model="SDXL"), NOW) is None


# --- bans --------------------------------------------------------------------------------------


def test_ban_doubles_with_each_failure_caps_at_five_minutes_and_resets_on_success() -> None:
    found = directory(advert(0), advert(1, speed=1.0))
    peer = PEERS[0]
    now = NOW
    lengths = []
    for _ in range(9):
        until = found.ban(peer, now)
        assert found.banned_until(peer) == until
        assert found.is_banned(peer, until - 0.001) and not found.is_banned(peer, until)
        assert found.choose(job(), now).peer_id == PEERS[1]
        lengths.append(until - now)
        now = until  # fails again as soon as its ban ends
    assert lengths == [5, 10, 20, 40, 80, 160, 300, 300, 300]
    assert found.choose(job(), now).peer_id == peer  # the ban is over: the faster one again
    found.succeeded(peer)
    assert found.banned_until(peer) is None
    assert found.ban(peer, now) == now + 5


def test_failures_during_a_ban_do_not_lengthen_it() -> None:
    found = directory(advert(0))
    assert found.ban(PEERS[0], NOW) == NOW + 5
    # The other jobs that were running there fail a moment later.
    assert found.ban(PEERS[0], NOW + 0.1) == NOW + 5
    assert found.ban(PEERS[0], NOW + 5) == NOW + 15


def test_a_ban_long_past_is_forgotten() -> None:
    found = directory(advert(0), advert(1))
    found.ban(PEERS[0], NOW)
    found.ban(PEERS[0], NOW + 5)  # 10 s, until NOW + 15
    later = NOW + 15 + BAN_MAX
    found.ban(PEERS[1], later)  # any ban prunes the table
    assert found.banned_until(PEERS[0]) is None
    assert found.ban(PEERS[0], later) == later + 5


# --- busy and proven providers -----------------------------------------------------------------


def test_busy_holds_a_provider_back_until_its_next_advert_or_the_hold_ends() -> None:
    found = directory(advert(0), advert(1, speed=1.0))
    found.hold_busy(PEERS[0], NOW, seq=1)
    assert found.choose(job(), NOW).peer_id == PEERS[1]
    assert found.is_busy(PEERS[0], NOW) and not found.is_banned(PEERS[0], NOW)
    assert found.choose(job(), NOW + BUSY_HOLD).peer_id == PEERS[0]  # the hold is over
    # A new advert (its queue drained) lifts the hold at once.
    found.hold_busy(PEERS[0], NOW, seq=1)
    found.adverts.add(replace(advert(0), seq=2).seal(IDS[0]))
    assert found.choose(job(), NOW).peer_id == PEERS[0]


def test_unproven_providers_are_credited_no_more_speed_than_the_fastest_proven() -> None:
    claims = advert(0, speed=100.0)
    found = directory(claims, advert(1, speed=2.0))
    assert found.choose(job(), NOW).peer_id == PEERS[0]  # nobody proven: claims are taken
    found.succeeded(PEERS[1])
    [first, second] = found.candidates(job(), NOW)
    assert first.eta == second.eta  # 100 it/s claimed, 2 credited
    assert all(found.choose(job(), NOW).peer_id == PEERS[1] for _ in range(20))  # proven wins
    assert found.choose(job(), NOW, proven_only=True).peer_id == PEERS[1]
    assert PEERS[1] in found.adverts.protected


def test_a_provider_with_max_in_flight_of_our_jobs_is_no_candidate() -> None:
    found = directory(advert(0), advert(1, speed=0.1))
    for _ in range(MAX_IN_FLIGHT):
        found.started(PEERS[0])
    assert chosen(found, job()) == [PEERS[1]]
    found.finished(PEERS[0])
    assert PEERS[0] in chosen(found, job())


def test_a_provider_holding_all_it_advertises_of_our_jobs_is_full() -> None:
    found = directory(advert(0, slots=2, max_queue=1), advert(1, speed=0.1))
    for _ in range(3):  # its two slots and its queue
        found.started(PEERS[0])
    assert chosen(found, job()) == [PEERS[1]]
    assert found.only_full(job(), NOW, exclude=[PEERS[1]])
    found.finished(PEERS[0])
    assert PEERS[0] in chosen(found, job())


def test_one_of_our_jobs_ending_lifts_a_busy_hold() -> None:
    found = directory(advert(0))
    found.started(PEERS[0])
    found.hold_busy(PEERS[0], NOW, seq=1)
    assert found.choose(job(), NOW) is None
    found.finished(PEERS[0])
    assert found.choose(job(), NOW).peer_id == PEERS[0]


# --- observed speed ----------------------------------------------------------------------------


def test_a_provider_slower_than_it_advertises_is_ranked_by_what_it_delivered() -> None:
    """Both advertise 2 it/s; provider 0 took 40 s (10 of them queued) for a 20-unit job,
    so it ran at 20 / 30 s, and its ETA follows that until it does better.
    """
    found = directory(advert(0), advert(1))
    assert chosen(found, job()) in ([PEERS[0], PEERS[1]], [PEERS[1], PEERS[0]])
    found.observe(PEERS[0], 20.0, 40.0, queued=10.0)
    assert found.observed_speed(PEERS[0]) == pytest.approx(20 / 30)
    assert chosen(found, job()) == [PEERS[1], PEERS[0]]
    assert found.eta(found.adverts.get(PEERS[0]), job()) == pytest.approx(30.0)
    found.observe(PEERS[0], 20.0, 5.0)  # 4 it/s now: the EWMA moves a third of the way
    assert found.observed_speed(PEERS[0]) == pytest.approx(0.7 * 20 / 30 + 0.3 * 4)
    for _ in range(10):
        found.observe(PEERS[0], 20.0, 5.0)
    # Faster than it advertises: the advert caps the speed the ETA uses.
    assert found.eta(found.adverts.get(PEERS[0]), job()) == pytest.approx(10.0)


def test_observed_speed_ignores_a_queue_longer_than_the_whole_job() -> None:
    found = directory(advert(0), rtts={PEERS[0]: 1.0})
    found.observe(PEERS[0], 20.0, 11.0, queued=50.0)  # nonsense: no time left to run in
    assert found.observed_speed(PEERS[0]) == pytest.approx(20 / 1e-3)
    found = directory(advert(0), rtts={PEERS[0]: 1.0})
    found.observe(PEERS[0], 20.0, 11.0)
    assert found.observed_speed(PEERS[0]) == pytest.approx(2.0)


def test_only_the_latest_proven_providers_are_remembered_and_protected(monkeypatch) -> None:
    monkeypatch.setattr("gateway.directory.MAX_PROVEN", 2)
    found = directory(advert(0), advert(1), advert(2))
    for index in (0, 1, 2):
        found.succeeded(PEERS[index])
    assert found.adverts.protected == {PEERS[1], PEERS[2]}
    assert [c.proven for c in found.candidates(job(), NOW)].count(True) == 2


def test_jobs_sent_and_done_are_counted_per_provider(monkeypatch) -> None:
    found = directory(advert(0), advert(1))
    assert found.jobs_sent(PEERS[0]) == (0, 0)
    for ok in (True, False, True):
        found.started(PEERS[0])
        found.finished(PEERS[0])
        if ok:
            found.succeeded(PEERS[0])
    assert found.jobs_sent(PEERS[0]) == (3, 2) and found.jobs_sent(PEERS[1]) == (0, 0)
    # Bounded: once many are counted, providers whose advert is gone are forgotten.
    monkeypatch.setattr("gateway.directory._MAX_OBSERVED", 2)
    found.started(PEERS[5])  # no advert
    found.started(PEERS[1])
    assert found.jobs_sent(PEERS[5]) == (0, 0) and found.jobs_sent(PEERS[1]) == (1, 0)
    assert found.jobs_sent(PEERS[0]) == (3, 2)


def test_capacity_counts_what_capable_providers_get_through_and_their_queues() -> None:
    found = directory(
        advert(0, speed=2.0, slots=2, queue=5),  # 2 slots of 10 s: 0.2 jobs/s, 3 queued
        advert(1, speed=4.0),  # 0.2 jobs/s, idle
        advert(2, speed=8.0, models=(ModelInfo("sdxl"),)),  # another model
        advert(3, speed=8.0, state="draining"),
    )
    assert found.capacity(job(), NOW) == (pytest.approx(0.4), 3)
    for _ in range(4):  # our jobs count where the advert lags behind
        found.started(PEERS[1])
    assert found.capacity(job(), NOW) == (pytest.approx(0.4), 6)
    found.ban(PEERS[0], NOW)
    assert found.capacity(job(), NOW) == (pytest.approx(0.2), 3)
    assert found.capacity(job(), NOW, exclude=[PEERS[1]]) == (0.0, 0)
    # Measured speed replaces a claim; while one is proven, claims are no capacity.
    found.observe(PEERS[1], 20.0, 20.0)
    found.succeeded(PEERS[1])
    assert found.capacity(job(), NOW + BAN_MAX * 2) == (pytest.approx(0.05), 3)
