"""Fraud reports between gateways (in-memory network, MockClock): a true report travels and
is confirmed by a re-run; forged, tampered, false or flooding reports change nothing."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass, replace

import pytest

from gateway.compare import Fingerprint, fingerprint
from gateway.dispatch import DispatchResult
from gateway.fraud import MAX_REPORT_BYTES, FraudReport
from gateway.node import Gateway, open_gateway
from gateway.reports import FRAUD
from sdcn_p2p.backends.testcard import TestcardBackend, TestcardConfig
from sdcn_p2p.errors import NETWORK_ERRORS, RecordError
from sdcn_p2p.jobs.receipts import Receipt, job_digest
from sdcn_p2p.peer import Peer
from sdcn_p2p.provider import Provider, open_provider
from sdcn_p2p.records import Role
from sdcn_p2p.testing import open_memory_peers, small_job, test_identity, wait_advert
from sdcn_p2p.testing.trust import JitterBackend, Lie, LyingBackend, noise_png

CARD = TestcardConfig(models=("card-a",), speed=4.0)


@dataclass
class Net:
    first: Gateway  # the one that catches the liar
    second: Gateway  # the one that hears of it
    stranger: Peer  # a peer that sends reports of its own making
    providers: list[Provider]  # honest ones, then the liar

    def peer(self, index: int):  # type: ignore[no-untyped-def]
        return self.providers[index].peer.peer_id

    async def genuine(self, index: int, seed: int) -> DispatchResult:
        """A signed result of provider `index` for a job of `seed`, through the first gateway."""
        others = {self.peer(i) for i in range(len(self.providers)) if i != index}
        return await self.first.dispatcher.rerun(small_job(seed=seed), avoid=others)


@asynccontextmanager
async def two_gateways(*, liar: bool = True) -> AsyncIterator[Net]:
    backends = [JitterBackend(TestcardBackend(CARD), i) for i in range(3)]
    if liar:
        backends.append(LyingBackend(JitterBackend(TestcardBackend(CARD), 9), Lie.NOISE))
    async with (
        open_memory_peers(3 + len(backends)) as (g1, g2, stranger, *nodes),
        AsyncExitStack() as stack,
    ):
        providers = [
            await stack.enter_async_context(open_provider(node, backend))
            for node, backend in zip(nodes, backends, strict=True)
        ]
        first = await stack.enter_async_context(open_gateway(g1, rng=random.Random(1)))
        second = await stack.enter_async_context(open_gateway(g2, rng=random.Random(2)))
        for gateway in (g1, g2):
            for node in nodes:
                await wait_advert(gateway, node)
        await wait_advert(g1, g2, lambda advert: Role.GATEWAY in advert.roles)
        await wait_advert(g2, g1, lambda advert: Role.GATEWAY in advert.roles)
        for gateway in (first, second):  # they ran jobs there before
            for provider in providers:
                gateway.directory.succeeded(provider.peer.peer_id)
        yield Net(first, second, stranger, providers)


async def send(sender: Peer, to: Peer, data: bytes) -> None:
    stream = await sender.host.new_stream(to.peer_id, FRAUD, max_message_size=MAX_REPORT_BYTES)
    async with stream:
        await stream.send_message({"type": "REPORT", "report": data})


def forge(net: Net, victim: DispatchResult, witness: DispatchResult, **change) -> FraudReport:
    """The stranger's report that `victim`'s provider lied, `witness` standing for a re-run."""
    assert victim.receipt is not None and witness.receipt is not None
    fields = {
        "job": small_job(seed=5),
        "images": victim.images,
        "receipt": Receipt.from_bytes(victim.receipt),
        "reruns": [
            (
                Receipt.from_bytes(witness.receipt),
                [fingerprint(noise_png(64, 64, random.Random(1)))],
            )
        ],
        "reason": "it drew noise",
        "now": net.stranger.wall_clock(),
    }
    fields.update(change)
    return FraudReport.seal(net.stranger.identity, **fields)


async def test_a_true_report_is_confirmed_by_a_rerun_and_strikes_the_liar(autojump_clock) -> None:
    async with two_gateways() as net:
        cheat = net.peer(3)
        seed = 0
        while not net.first.trust.is_excluded(cheat, net.first.peer.wall_clock()):
            seed += 1
            assert seed < 200
            result = await net.first.dispatcher.run(small_job(seed=seed))
            if result.check is not None:
                await result.check.wait()
        assert net.first.reports is not None and net.second.reports is not None
        await net.second.reports.wait_handled(1)
        assert net.first.reports.stats.published == 1
        assert net.second.reports.stats.confirmed == 1
        standing = net.second.trust.standing(cheat, net.second.peer.wall_clock())
        assert standing.strikes == 1
        for index in range(3):
            now = net.second.peer.wall_clock()
            assert net.second.trust.standing(net.peer(index), now).strikes == 0


async def test_a_false_report_on_an_honest_provider_changes_nothing(autojump_clock) -> None:
    async with two_gateways(liar=False) as net:
        assert net.second.reports is not None
        victim = await net.genuine(0, 5)
        witness = await net.genuine(1, 5)
        report = forge(net, victim, witness)
        await send(net.stranger, net.second.peer, report.to_bytes())
        await net.second.reports.wait_handled(1)
        stats = net.second.reports.stats
        assert stats.refuted == 1 and stats.confirmed == 0
        now = net.second.peer.wall_clock()
        assert net.second.trust.standing(net.peer(0), now).strikes == 0
        assert not net.second.trust.is_suspect(net.peer(0))
        # The stranger is not believed again, even with another report.
        again = forge(net, await net.genuine(0, 6), await net.genuine(2, 6), job=small_job(seed=6))
        await send(net.stranger, net.second.peer, again.to_bytes())
        await net.second.reports.wait_handled(2)
        assert stats.ignored == 1 and stats.refuted == 1
        assert net.first.trust.standing(net.peer(0), now).strikes == 0  # it went nowhere


@pytest.mark.parametrize("tamper", ["image", "signature", "job", "rerun-of-itself", "garbage"])
async def test_a_forged_or_tampered_report_is_refused(autojump_clock, tamper: str) -> None:
    async with two_gateways(liar=False) as net:
        assert net.second.reports is not None
        victim = await net.genuine(0, 5)
        witness = await net.genuine(1, 5)
        if tamper == "image":  # not what the provider signed
            data = forge(net, victim, witness, images=[noise_png(64, 64, random.Random(2))])
            data = data.to_bytes()
        elif tamper == "signature":
            envelope = forge(net, victim, witness).envelope
            data = replace(envelope, signature=bytes(64)).to_bytes()
        elif tamper == "job":  # the provider signed another job
            data = forge(net, victim, witness, job=small_job(seed=6)).to_bytes()
        elif tamper == "rerun-of-itself":
            data = forge(net, victim, victim).to_bytes()
        else:
            data = b"\x94garbage"
        await send(net.stranger, net.second.peer, data)
        await net.second.reports.wait_handled(1)
        assert net.second.reports.stats.rejected == 1
        assert net.second.checker is not None and net.second.checker.stats.reruns == 0
        now = net.second.peer.wall_clock()
        assert net.second.trust.standing(net.peer(0), now).strikes == 0


async def test_reports_are_rate_limited_per_sender(autojump_clock) -> None:
    async with two_gateways(liar=False) as net:
        assert net.second.reports is not None
        burst = net.second.reports.config.push_burst
        for _ in range(burst + 3):
            with suppress(*NETWORK_ERRORS):  # a reset stream is what the limit looks like
                await send(net.stranger, net.second.peer, b"\x94garbage")
        await net.second.reports.wait_handled(burst + 3)
        stats = net.second.reports.stats
        assert stats.rate_limited == 3 and stats.rejected == burst


def test_a_stale_or_future_report_is_refused() -> None:
    report_time = 1_700_000_000.0

    job = small_job(seed=5)
    provider, other, reporter = test_identity(1), test_identity(2), test_identity(3)
    image = noise_png(64, 64, random.Random(1))
    receipt = Receipt.sign(provider, job_digest(job), [image])
    rerun = Receipt.sign(other, job_digest(job), [image])
    prints: list[Fingerprint] = [fingerprint(image)]
    report = FraudReport.seal(reporter, job, [image], receipt, [(rerun, prints)], "x", report_time)
    data = report.to_bytes()
    decoded = FraudReport.from_bytes(data, now=report_time + 10, max_age=3600)
    assert decoded.provider == provider.peer_id and decoded.reporter == reporter.peer_id
    assert decoded.rerun_fingerprints == (tuple(prints),)
    for now in (report_time + 3601, report_time - 61):
        with pytest.raises(RecordError, match="too old"):
            FraudReport.from_bytes(data, now=now, max_age=3600)
