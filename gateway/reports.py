"""``/sdcn/fraud/1.0.0``: gateways tell each other of providers caught lying, and check before
they believe it.

When this gateway's spot checks exclude a provider, `FraudReports.publish` seals a report
(`gateway.fraud.FraudReport`: the job, the provider's signed images, the re-runs' receipts and
fingerprints) and pushes it to `ReportConfig.fanout` gateways it knows from their adverts. A
gateway that receives one:

1. takes it only within the sender's budget (a token bucket per sending peer, as gossip does
   for adverts: `push_rate` reports a second, bursts of `push_burst`); beyond it, the stream is
   reset unread;
2. verifies it (signatures, job, receipts; `FraudReport.from_bytes`, in a worker thread) and
   drops it if it is invalid, stale, seen before, or from a reporter it found lying;
3. re-runs the job once itself, on a provider away from the reported one (as a spot check
   chooses it), and compares its picture with the provider's signed one. If they differ, the
   report is confirmed: the provider gets a strike here (the second, from a report or from
   this gateway's own checks, excludes it), and the report goes on to `fanout` gateways. If
   they match, the report was false: the reporter's reports are ignored for `distrust`
   seconds, and the provider is left alone.

So a report spreads only as far as gateways confirm it, and a lying gateway gets its direct
neighbours to spend one job each, once. At most `max_pending` reports wait for their re-run;
more are dropped.

Why not the advert gossip: a report is an event, not state that the newest version replaces
(no seq, no digest to sync), it carries images of up to megabytes that providers and bootstrap
peers have no use for, each costs a re-run rather than a signature check (so it needs a budget
of reports per minute, not adverts per second), and it concerns gateways only.
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from gateway.compare import compare_results
from gateway.fraud import MAX_REPORT_BYTES, FraudReport
from gateway.spotcheck import Evidence, SpotChecker, fingerprints
from sdcn_p2p._config import require_at_least, require_positive
from sdcn_p2p._util import open_service_nursery
from sdcn_p2p.connection import Stream
from sdcn_p2p.errors import NETWORK_ERRORS, RecordError, RemoteProtocolError
from sdcn_p2p.gossip.state import PushBudget
from sdcn_p2p.identity import PeerId
from sdcn_p2p.jobs.receipts import Receipt
from sdcn_p2p.peer import Peer
from sdcn_p2p.records import Role

__all__ = ["FRAUD", "FraudReports", "ReportConfig", "ReportStats", "open_fraud_reports"]

log = logging.getLogger(__name__)

FRAUD = "/sdcn/fraud/1.0.0"
_MESSAGE_OVERHEAD = 1024


@dataclass(frozen=True, slots=True)
class ReportConfig:
    """Spreading and budgets of fraud reports (seconds)."""

    fanout: int = 6
    #: Reports one peer may push to us per second, and at once.
    push_rate: float = 1 / 60
    push_burst: int = 10
    max_age: float = 86_400.0
    max_pending: int = 16
    #: Reports remembered, to take each once.
    seen_size: int = 10_000
    #: How long the reports of a gateway whose report proved false are ignored.
    distrust: float = 86_400.0
    #: Sending or receiving one report.
    rpc_timeout: float = 30.0

    def __post_init__(self) -> None:
        require_at_least(self, 0, "fanout")
        require_at_least(self, 1, "push_burst", "max_pending", "seen_size")
        require_positive(self, "push_rate", "max_age", "distrust", "rpc_timeout")


@dataclass(slots=True)
class ReportStats:
    """Counters for tests and benchmarks; they only grow."""

    published: int = 0  # reports of our own
    sent: int = 0  # pushes that went through, ours and forwarded
    received: int = 0
    rate_limited: int = 0  # reset unread: the sender was over its budget
    rejected: int = 0  # did not verify
    ignored: int = 0  # seen before, from a distrusted reporter, or no room to re-run
    confirmed: int = 0  # our re-run differed from the provider's picture
    refuted: int = 0  # our re-run matched it: the report was false
    unconfirmed: int = 0  # nobody could re-run the job

    def counts(self) -> dict[str, int]:
        """Each counter by name (`gateway.metrics.REPORT_EVENTS`)."""
        return {name: getattr(self, name) for name in self.__slots__}  # type: ignore[attr-defined]

    @property
    def handled(self) -> int:
        """Reports received and done with, whichever way."""
        return (
            self.rate_limited
            + self.rejected
            + self.ignored
            + self.confirmed
            + self.refuted
            + self.unconfirmed
        )


class FraudReports:
    """Publishes, receives, checks and forwards fraud reports. Create with
    `open_fraud_reports`."""

    def __init__(
        self,
        peer: Peer,
        checker: SpotChecker,
        config: ReportConfig,
        nursery: trio.Nursery,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.peer = peer
        self.checker = checker
        self.config = config
        self.stats = ReportStats()
        self._nursery = nursery
        self._rng = rng or random.Random()
        self._budget = PushBudget(config.push_rate, config.push_burst)
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._distrusted: dict[PeerId, float] = {}  # reporter -> wall time it ends
        self._pending = 0
        self._handled = trio.lowlevel.ParkingLot()

    async def wait_handled(self, count: int) -> None:
        """Return once `count` reports were received and done with (`ReportStats.handled`)."""
        while self.stats.handled < count:
            await self._handled.park()

    # --- sending ---------------------------------------------------------------------------

    def publish(self, evidence: Evidence) -> None:
        """Seal a report of `evidence` and push it to `fanout` gateways (in the background).
        A report that would be over MAX_REPORT_BYTES, or lacks receipts, is not sent."""
        result = evidence.result
        if result.receipt is None or any(o.receipt is None for o in evidence.others):
            log.info("no report on %s: a result lacks its receipt", evidence.provider)
            return
        size = sum(map(len, result.images)) + len(evidence.job.init_image or b"")
        if size + _MESSAGE_OVERHEAD * 8 > MAX_REPORT_BYTES:
            log.info("no report on %s: its evidence is too large to send", evidence.provider)
            return
        self._nursery.start_soon(self._publish, evidence)

    async def _publish(self, evidence: Evidence) -> None:
        reruns = []
        for other in evidence.others:
            assert other.receipt is not None
            reruns.append((Receipt.from_bytes(other.receipt), await fingerprints(other.images)))
        assert evidence.result.receipt is not None
        report = FraudReport.seal(
            self.peer.identity,
            evidence.job,
            evidence.result.images,
            Receipt.from_bytes(evidence.result.receipt),
            reruns,
            evidence.exclusion.reason,
            self.peer.wall_clock(),
        )
        self._remember(report.key)
        self.stats.published += 1
        log.info("reporting %s to other gateways: %s", report.provider, report.reason)
        await self._spread(report, came_from=None)

    async def _spread(self, report: FraudReport, *, came_from: PeerId | None) -> None:
        """Push `report` to up to `fanout` gateways we know, connected ones first."""
        skip = {self.peer.peer_id, report.reporter, report.provider, came_from}
        gateways = [
            advert
            for advert in self.peer.adverts
            if Role.GATEWAY in advert.roles and advert.peer_id not in skip
        ]
        self._rng.shuffle(gateways)
        host = self.peer.host
        gateways.sort(key=lambda advert: not host.is_connected(advert.peer_id))
        data = report.to_bytes()
        async with trio.open_nursery() as nursery:
            for advert in gateways[: self.config.fanout]:
                if advert.addrs and not host.is_connected(advert.peer_id):
                    host.peerstore.add_addrs(advert.peer_id, advert.addrs)
                nursery.start_soon(self._push, advert.peer_id, data)

    async def _push(self, peer: PeerId, data: bytes) -> None:
        with trio.move_on_after(self.config.rpc_timeout):
            try:
                stream = await self.peer.host.new_stream(
                    peer, FRAUD, max_message_size=MAX_REPORT_BYTES + _MESSAGE_OVERHEAD
                )
                async with stream:
                    await stream.send_message({"type": "REPORT", "report": data})
                self.stats.sent += 1
                return
            except NETWORK_ERRORS as exc:
                log.debug("could not send a fraud report to %s: %r", peer.short(), exc)
                return
        log.debug("sending a fraud report to %s timed out", peer.short())

    # --- receiving -------------------------------------------------------------------------

    async def handle(self, stream: Stream) -> None:
        """The FRAUD handler: one report per stream."""
        try:
            await self._handle(stream)
        finally:
            self._handled.unpark_all()

    async def _handle(self, stream: Stream) -> None:
        sender = stream.peer_id
        if not self._budget.take(sender, 1, trio.current_time()):
            self.stats.rate_limited += 1
            log.debug("%s sends fraud reports too fast: reset unread", sender.short())
            stream.reset()
            return
        with trio.fail_after(self.config.rpc_timeout):
            message = await stream.receive_message()
        if (
            type(message) is not dict
            or message.get("type") != "REPORT"
            or type(message.get("report")) is not bytes
        ):
            self.stats.rejected += 1
            raise RemoteProtocolError("a fraud report message is {type: REPORT, report: bin}")
        self.stats.received += 1
        now = self.peer.wall_clock()
        try:
            report = await trio.to_thread.run_sync(
                lambda: FraudReport.from_bytes(
                    message["report"], now=now, max_age=self.config.max_age
                )
            )
        except RecordError as exc:
            self.stats.rejected += 1
            log.info("dropped a fraud report from %s: %s", sender.short(), exc)
            return
        if not self._take(report, now):
            self.stats.ignored += 1
            return
        self._pending += 1
        self._nursery.start_soon(self._confirm, report, sender)

    def _take(self, report: FraudReport, now: float) -> bool:
        """Whether to re-run `report`'s job: new, from a reporter we trust, with room."""
        for reporter in [r for r, until in self._distrusted.items() if until <= now]:
            del self._distrusted[reporter]
        if report.key in self._seen or report.reporter in self._distrusted:
            return False
        if report.provider == self.peer.peer_id or self._pending >= self.config.max_pending:
            return False
        self._remember(report.key)
        return True

    def _remember(self, key: bytes) -> None:
        self._seen[key] = None
        if len(self._seen) > self.config.seen_size:
            self._seen.popitem(last=False)

    async def _confirm(self, report: FraudReport, sender: PeerId) -> None:
        try:
            await self._check(report, sender)
        finally:
            self._handled.unpark_all()

    async def _check(self, report: FraudReport, sender: PeerId) -> None:
        """Re-run the reported job away from the provider and act on what it shows."""
        involved = [report.provider, report.reporter, sender]
        try:
            ours = await self.checker.second_opinion(report.job, involved)
        finally:
            self._pending -= 1
        provider = report.provider
        if isinstance(ours, str):
            self.stats.unconfirmed += 1
            log.info("could not check the report on %s from %s: %s", provider, sender, ours)
            return
        assert ours.provider is not None
        theirs = await fingerprints(report.images)
        apart = compare_results(theirs, await fingerprints(ours.images))
        ledger = self.checker.ledger
        now = self.peer.wall_clock()
        if ledger.config.thresholds.same(apart):
            self.stats.refuted += 1
            self._distrusted[report.reporter] = now + self.config.distrust
            log.warning(
                "a fraud report from %s on %s is false: %s drew the same picture; ignoring "
                "that gateway's reports",
                report.reporter,
                provider,
                ours.provider.short(),
            )
            return
        self.stats.confirmed += 1
        reason = (
            f"a fraud report from gateway {report.reporter.short()}, confirmed by a re-run "
            f"on {ours.provider.short()} here: {report.reason}"
        )
        log.warning("strike for %s: %s", provider, reason)
        if ledger.struck(provider, reason, now) is not None:
            log.warning("excluding %s: %s", provider, reason)
        await self._spread(report, came_from=sender)


@asynccontextmanager
async def open_fraud_reports(
    peer: Peer,
    checker: SpotChecker,
    config: ReportConfig = ReportConfig(),
    *,
    rng: random.Random | None = None,
) -> AsyncIterator[FraudReports]:
    """Serve FRAUD on `peer`, and publish the exclusions `checker` makes, until the block
    exits."""
    async with open_service_nursery() as nursery:
        reports = FraudReports(peer, checker, config, nursery, rng=rng)
        peer.host.set_handler(
            FRAUD, reports.handle, max_message_size=MAX_REPORT_BYTES + _MESSAGE_OVERHEAD
        )
        checker.on_exclusion = reports.publish
        try:
            yield reports
        finally:
            checker.on_exclusion = None
            peer.host.remove_handler(FRAUD)
            nursery.cancel_scope.cancel()
