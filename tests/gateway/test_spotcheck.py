"""Spot checks through the real Dispatcher on the in-memory network (MockClock): every kind of
lie is caught, device jitter never strikes anyone, and ``verify`` holds the answer."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio

from gateway.dispatch import DispatchResult
from gateway.node import Gateway
from gateway.spotcheck import CheckStatus, SpotChecker, open_spot_checker
from gateway.trust import TrustConfig
from sdcn_p2p.backends import Backend
from sdcn_p2p.backends.testcard import TestcardBackend, TestcardConfig
from sdcn_p2p.jobs import JobRequest
from sdcn_p2p.provider import Provider
from sdcn_p2p.testing import (
    all_tasks,
    open_memory_providers,
    small_job,
)
from sdcn_p2p.testing.trust import JitterBackend, Lie, LyingBackend

#: A job takes 10 * 64 * 64 / 512**2 / 4 = 0.039 s on these cards.
CARD = TestcardConfig(models=("card-a", "cheap"), speed=4.0)


def honest(seed: int) -> Backend:
    return JitterBackend(TestcardBackend(CARD), seed)


def liar(lie: Lie, seed: int = 99) -> LyingBackend:
    return LyingBackend(honest(seed), lie, seed=seed, other_model="cheap")


@dataclass
class Net:
    gateway: Gateway
    checker: SpotChecker
    providers: list[Provider]

    def peer(self, index: int):  # type: ignore[no-untyped-def]
        return self.providers[index].peer.peer_id

    async def run(self, count: int, *, at_once: int = 4, seed: int = 0) -> list[DispatchResult]:
        """`count` jobs, `at_once` at a time; returns once their checks are done too."""
        results: list[DispatchResult] = []
        for start in range(0, count, at_once):
            async with trio.open_nursery() as nursery:
                for index in range(start, min(start + at_once, count)):
                    nursery.start_soon(self._one, small_job(seed=seed + index), results)
        for result in results:
            assert result.check is not None
            await result.check.wait()
        return results

    async def _one(self, job: JobRequest, results: list[DispatchResult]) -> None:
        results.append(await self.gateway.dispatcher.run(job))


@asynccontextmanager
async def trust_network(
    backends: Sequence[Backend], *, trust: TrustConfig = TrustConfig()
) -> AsyncIterator[Net]:
    """Peer 0 is the gateway, checking its jobs; a provider per backend after it."""
    async with open_memory_providers(backends) as (peer, _, providers):
        gateway = Gateway(peer, rng=random.Random(1), trust=trust)
        async with open_spot_checker(
            gateway.dispatcher, gateway.trust, rng=random.Random(2)
        ) as checker:
            yield Net(gateway, checker, providers)


@pytest.mark.parametrize("lie", list(Lie))
async def test_each_lie_is_caught_and_its_liar_excluded(autojump_clock, lie: Lie) -> None:
    async with trust_network([honest(i) for i in range(4)] + [liar(lie)]) as net:
        cheat = net.peer(4)
        for wave in range(40):
            await net.run(5, at_once=5, seed=100 * wave + 1)
            if net.gateway.trust.is_excluded(cheat, net.gateway.peer.wall_clock()):
                break
        now = net.gateway.peer.wall_clock()
        exclusion = net.gateway.trust.exclusion(cheat, now)
        assert exclusion is not None, (lie, net.providers[4].jobs_done, net.checker.stats)
        assert "differed from the same picture" in exclusion.reason
        for index in range(4):
            assert net.gateway.trust.standing(net.peer(index), now).strikes == 0
        # Excluded: it gets no more jobs.
        before = net.providers[4].jobs_done
        await net.run(20, at_once=5, seed=10_000)
        assert net.providers[4].jobs_done == before


async def test_device_jitter_never_strikes_an_honest_provider(autojump_clock) -> None:
    async with trust_network([honest(i) for i in range(6)]) as net:
        results = await net.run(120, at_once=6)
        stats = net.checker.stats
        assert stats.strikes == 0 and stats.failed == stats.upheld == 0
        assert stats.passed >= 30
        statuses = {result.check.status for result in results if result.check is not None}
        assert statuses <= {CheckStatus.NOT_SAMPLED, CheckStatus.PASSED, CheckStatus.UNAVAILABLE}
        # Clean records are checked less and less: the last jobs cost little.
        now = net.gateway.peer.wall_clock()
        assert all(net.gateway.trust.standing(net.peer(i), now).probability < 0.5 for i in range(6))


async def test_info_says_whether_a_job_is_checked_and_the_check_reports_later(
    autojump_clock,
) -> None:
    background = TrustConfig(verify_first=0)  # no newcomer's job waits for its check
    async with trust_network([honest(i) for i in range(3)], trust=background) as net:
        results = await net.run(30)
        said = {result.info["spot_check"] for result in results}
        assert said <= {"not sampled", "scheduled", "unavailable"} and "scheduled" in said
        while True:
            (result,) = await net.run(1, seed=77)
            if result.info["spot_check"] == "scheduled":
                break
        check = result.check
        assert check is not None and check.status is CheckStatus.PASSED  # run() waited


async def test_a_scheduled_check_calls_back_when_it_ends(autojump_clock) -> None:
    trust = TrustConfig(first_probability=1.0, min_probability=1.0, verify_first=0)
    async with trust_network([honest(i) for i in range(3)], trust=trust) as net:
        await net.run(6)  # everyone proven
        result = await net.gateway.dispatcher.run(small_job(seed=5))
        assert result.info["spot_check"] == "scheduled"
        assert result.check is not None
        heard: list[CheckStatus] = []
        result.check.subscribe(lambda check: heard.append(check.status))
        await result.check.wait()
        assert heard == [CheckStatus.PASSED]


async def test_with_no_other_provider_no_check_is_made_and_it_is_counted(autojump_clock) -> None:
    async with trust_network([honest(0)]) as net:
        results = await net.run(12)
        assert net.checker.stats.unchecked >= 1
        assert net.checker.stats.reruns == 0
        assert "unavailable" in {result.info["spot_check"] for result in results}
        verified = await net.gateway.dispatcher.run(small_job(seed=3), verify=True)
        assert verified.info["verified"] is False
        assert "no other provider" in verified.info["verification"]


async def test_verify_holds_the_answer_until_a_second_provider_agrees(autojump_clock) -> None:
    async with trust_network([honest(i) for i in range(3)]) as net:
        await net.run(6)  # every provider proven
        done_before = sum(p.jobs_done for p in net.providers)
        start = trio.current_time()
        job = small_job(seed=42)
        result = await net.gateway.dispatcher.run(job, verify=True)
        took = trio.current_time() - start
        assert sum(p.jobs_done for p in net.providers) == done_before + 2
        assert took >= 2 * job.cost / 4.0  # two jobs, one after the other
        assert result.info["verified"] is True
        assert "drew the same picture" in result.info["verification"]
        assert result.info["spot_check"] == "passed"


async def test_verify_answers_with_the_majority_when_the_first_provider_lied(
    autojump_clock,
) -> None:
    async with trust_network([honest(0), honest(1), liar(Lie.NOISE)]) as net:
        for index in range(3):
            net.gateway.directory.succeeded(net.peer(index))  # all proven
        job = small_job(seed=8)
        cheat = net.peer(2)
        lie = await net.gateway.dispatcher.rerun(job, avoid={net.peer(0), net.peer(1)})
        assert lie.provider == cheat
        answer = await net.checker(job, lie, verify=True)
        assert answer.provider != cheat and answer.info["provider"] != str(cheat)
        assert answer.info["verified"] is True and answer.info["spot_check"] == "failed"
        assert net.gateway.trust.standing(cheat, net.gateway.peer.wall_clock()).strikes == 1


async def test_a_suspects_jobs_are_verified_before_the_answer(autojump_clock) -> None:
    async with trust_network([honest(0), honest(1), liar(Lie.NOISE)]) as net:
        cheat = net.peer(2)
        net.gateway.trust.struck(cheat, "a test strike", net.gateway.peer.wall_clock())
        for index in range(3):
            net.gateway.directory.succeeded(net.peer(index))
        job = small_job(seed=9)
        lie = await net.gateway.dispatcher.rerun(job, avoid={net.peer(0), net.peer(1)})
        answer = await net.checker(job, lie, verify=False)
        assert answer.provider != cheat and "verified" not in answer.info
        assert net.gateway.trust.is_excluded(cheat, net.gateway.peer.wall_clock())


async def test_a_newcomers_first_jobs_are_verified_before_the_answer(autojump_clock) -> None:
    async with trust_network([honest(i) for i in range(3)]) as net:
        results = await net.run(12, at_once=1)
        first = [r.info["spot_check"] for r in results]
        assert first[:3] == ["passed"] * 3 and "verified" not in results[0].info
        assert "scheduled" in first[3:]  # later ones are checked in the background


async def test_closing_the_checker_leaves_no_task(autojump_clock) -> None:
    before = all_tasks()
    async with trust_network([honest(i) for i in range(3)]) as net:
        await net.run(8)
        assert net.gateway.dispatcher.checker is net.checker
    assert net.gateway.dispatcher.checker is None
    assert all_tasks() <= before


async def test_a_trusted_provider_is_not_struck_on_the_word_of_newcomers(autojump_clock) -> None:
    # Two new identities that draw the same wrong picture (a Sybil pair) against one
    # provider with a clean record: no verdict, no strike.
    sybils = [liar(Lie.IGNORES_SEED, seed=1), liar(Lie.IGNORES_SEED, seed=2)]
    async with trust_network([honest(0), *sybils]) as net:
        trusted = net.peer(0)
        for _ in range(3):
            net.gateway.trust.passed(trusted)
        for index in range(3):
            net.gateway.directory.succeeded(net.peer(index))
        job = small_job(seed=21)
        first = await net.gateway.dispatcher.rerun(job, avoid={net.peer(1), net.peer(2)})
        assert first.provider == trusted
        answer = await net.checker(job, first, verify=True)
        assert answer.info["spot_check"] == "unsettled" and answer.info["verified"] is False
        assert answer.provider == trusted
        now = net.gateway.peer.wall_clock()
        assert net.gateway.trust.standing(trusted, now).strikes == 0
        assert net.checker.stats.strikes == 0


async def test_a_provider_checked_gets_no_jobs_while_a_third_settles_the_check(
    autojump_clock,
) -> None:
    async with trust_network([honest(0), honest(1), liar(Lie.NOISE)]) as net:
        cheat = net.peer(2)
        for index in range(3):
            net.gateway.directory.succeeded(net.peer(index))
        held: list[bool] = []
        second_opinion = net.checker.second_opinion

        async def watched(job: JobRequest, involved: list, *, arbiter: bool = False):  # type: ignore[no-untyped-def]
            if arbiter:
                now = net.gateway.peer.wall_clock()
                held.append(net.gateway.trust.is_excluded(cheat, now))
                candidates = net.gateway.directory.candidates(job, now)
                assert cheat not in {candidate.peer_id for candidate in candidates}
            return await second_opinion(job, involved, arbiter=arbiter)

        net.checker.second_opinion = watched  # type: ignore[method-assign]
        job = small_job(seed=4)
        lie = await net.gateway.dispatcher.rerun(job, avoid={net.peer(0), net.peer(1)})
        await net.checker(job, lie, verify=False)
        assert held == [True]
        now = net.gateway.peer.wall_clock()
        assert not net.gateway.trust.is_excluded(cheat, now)  # one strike: settled, not out
        assert net.gateway.trust.standing(cheat, now).strikes == 1


@pytest.mark.parametrize(("providers", "most"), [(2, 1), (1, 4)])
async def test_an_unproven_provider_gets_one_job_at_a_time_unless_nobody_else_could_check(
    autojump_clock, providers: int, most: int
) -> None:
    async with trust_network([honest(i) for i in range(providers)]) as net:
        directory = net.gateway.directory
        seen: list[int] = []
        started = directory.started

        def watch(peer):  # type: ignore[no-untyped-def]
            started(peer)
            seen.append(directory.in_flight(peer))

        directory.started = watch  # type: ignore[method-assign]
        await net.run(4, at_once=4)
        assert max(seen) == most
