"""The perceptual comparison: device jitter passes, every kind of lie does not."""

from __future__ import annotations

import random

import pytest
import trio

from gateway.compare import (
    Distance,
    Fingerprint,
    Thresholds,
    compare_results,
    distance,
    fingerprint,
)
from sdcn_p2p.backends.testcard import TestcardBackend, TestcardConfig
from sdcn_p2p.testing import small_job
from sdcn_p2p.testing.trust import JitterBackend, Lie, LyingBackend, jitter, noise_png

CARD = TestcardBackend(TestcardConfig(models=("card-a", "cheap")))
SAME = Thresholds()


def prints(images: list[bytes]) -> list[Fingerprint]:
    return [fingerprint(image) for image in images]


async def draw(backend, job) -> list[Fingerprint]:  # type: ignore[no-untyped-def]
    return prints((await backend.generate(job, lambda step, total: None)).images)


def test_a_picture_is_its_own_twin_and_noise_is_far() -> None:
    card = trio.run(draw, CARD, small_job())
    assert distance(card[0], card[0]) == Distance(0, 0.0)
    far = distance(card[0], fingerprint(noise_png(64, 64, random.Random(1))))
    assert not SAME.same(far) and far.pixel > 0.1


def test_pictures_of_other_sizes_or_counts_are_infinitely_far() -> None:
    a = fingerprint(noise_png(64, 64, random.Random(1)))
    b = fingerprint(noise_png(64, 72, random.Random(1)))
    assert distance(a, b) == Distance.far()
    assert compare_results([a], [a, a]) == Distance.far()
    assert compare_results([], []) == Distance.far()
    assert not SAME.same(Distance.far())


def test_a_fingerprint_round_trips_on_the_wire_and_garbage_is_refused() -> None:
    a = fingerprint(noise_png(64, 64, random.Random(1)))
    assert Fingerprint.from_wire(a.to_wire()) == a
    for bad in ([], [64, 64, b"x", b""], [64, True, bytes(8), bytes(3072)], "x", None):
        with pytest.raises(ValueError):
            Fingerprint.from_wire(bad)


async def test_device_jitter_is_judged_the_same_picture() -> None:
    devices = [JitterBackend(CARD, seed) for seed in range(6)]
    for seed in range(20):
        job = small_job(seed=seed, steps=4 + seed % 7, width=64 + 8 * (seed % 3))
        first, *others = [await draw(device, job) for device in devices]
        for other in others:
            apart = compare_results(first, other)
            assert SAME.same(apart), (seed, apart)


@pytest.mark.parametrize("lie", list(Lie))
async def test_every_kind_of_lie_is_judged_another_picture(lie: Lie) -> None:
    honest = JitterBackend(CARD, 1)
    liar = LyingBackend(JitterBackend(CARD, 2), lie, seed=3, other_model="cheap")
    caught = 0
    for seed in range(1, 21):  # seed 0 is what the seed-ignoring liar always draws
        job = small_job(seed=seed)
        apart = compare_results(await draw(honest, job), await draw(liar, job))
        caught += not SAME.same(apart)
    if lie is Lie.SOMETIMES:
        assert caught == liar.lies > 0
    else:  # the first picture of a liar sending a fixed one is a true one
        assert caught == liar.lies == (19 if lie is Lie.FIXED else 20)


def test_jitter_is_small_and_deterministic() -> None:
    card = trio.run(lambda: CARD.generate(small_job(), lambda s, t: None)).images[0]
    assert jitter(card, 1) == jitter(card, 1) != jitter(card, 2)
    apart = distance(fingerprint(card), fingerprint(jitter(card, 1)))
    assert 0 < apart.pixel < SAME.max_pixel / 2
