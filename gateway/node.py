"""The gateway role on a Peer: route jobs to providers and serve the HTTP APIs.

A gateway advertises itself (an advert with the role "gateway" and no models) so providers
that cannot accept connections learn of it and dial it; it then sends them jobs over the
connections they opened. A peer that is both a provider and a gateway advertises both roles
in its provider's advert instead.

`open_gateway` also spot-checks the jobs it runs (`gateway.spotcheck`), keeps each provider's
record and excludes those caught lying (`gateway.trust`), and exchanges fraud reports with
other gateways (`gateway.reports`). A `Gateway` made directly runs no checks.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import trio

from gateway.access import AccessConfig
from gateway.api import create_app
from gateway.catalog import Catalog
from gateway.directory import ProviderDirectory
from gateway.dispatch import Dispatcher, GatewayConfig, LocalRunner
from gateway.jobservice import JobsConfig, JobService, open_job_service
from gateway.metrics import RefusalCounter, instrument_gateway, instrument_trust
from gateway.reports import FraudReports, ReportConfig, open_fraud_reports
from gateway.spotcheck import SpotChecker, open_spot_checker
from gateway.trust import TrustConfig, TrustLedger
from sdcn_p2p._util import open_service_nursery
from sdcn_p2p._version import __version__
from sdcn_p2p.errors import SdcnError
from sdcn_p2p.httpserver import serve_http
from sdcn_p2p.identity import PeerId
from sdcn_p2p.peer import Peer
from sdcn_p2p.provider import Provider
from sdcn_p2p.records import Advert, Reachability, Role

__all__ = ["ADVERT_INTERVAL", "Gateway", "open_gateway"]

log = logging.getLogger(__name__)

#: Seconds between re-publications of the gateway's own advert (its TTL is three times that).
ADVERT_INTERVAL = 60.0


class Gateway:
    """The gateway role on `peer`: its provider directory, dispatcher and catalog, and the
    default model; what the HTTP API serves (`gateway.http.GatewayServices`).

    Its job service, `jobs`, runs while `open_gateway` does (it owns a data dir and tasks).
    """

    #: Every job, sync or async (set by `open_gateway`).
    jobs: JobService

    def __init__(
        self,
        peer: Peer,
        config: GatewayConfig = GatewayConfig(),
        *,
        default_model: str | None = None,
        rng: random.Random | None = None,
        local: LocalRunner | None = None,
        trust: TrustConfig = TrustConfig(),
        access: AccessConfig | None = None,
    ) -> None:
        self.peer = peer
        #: Who may ask, and their limits (default: everyone, unlimited); `reload_access`
        #: replaces it.
        self.access = access or AccessConfig.unlimited()
        self.config = config
        #: Each provider's record of spot checks, and who is excluded.
        self.trust = TrustLedger(trust)
        self.directory = ProviderDirectory(
            peer.adverts,
            peer.host.peerstore.rtt,
            rng=rng,
            excluded=self.trust.is_excluded,
        )
        self.dispatcher = Dispatcher(peer, self.directory, config, rng=rng, local=local)
        self.catalog = Catalog(
            peer.adverts,
            self.directory,
            rtt=peer.host.peerstore.rtt,
            wall_clock=peer.wall_clock,
            trust=self.trust,
        )
        #: Set while `open_gateway` runs them.
        self.checker: SpotChecker | None = None
        self.reports: FraudReports | None = None
        #: The peer's metrics, which ``GET /metrics`` serves.
        self.metrics = peer.metrics
        instrument_gateway(self.metrics, self.dispatcher, peer.wall_clock)
        self.refusals = RefusalCounter(self.metrics)
        self._started = trio.current_time()
        #: The model a request that names none runs on (A1111's sd_model_checkpoint option).
        self.default_model = default_model
        #: The HTTP API's base URLs once served (``http://127.0.0.1:8080``).
        self.urls: list[str] = []

    @property
    def peer_id(self) -> PeerId:
        return self.peer.peer_id

    def wall_clock(self) -> float:
        """Unix seconds, from the peer's clock."""
        return self.peer.wall_clock()

    def reload_access(self) -> bool:
        """Read the keys file again (SIGHUP); on an error keep the keys loaded and log it.
        Returns whether the new keys are in use."""
        try:
            self.access = self.access.reload()
        except SdcnError as exc:
            log.error("keys not reloaded, the old ones stay in use: %s", exc)
            return False
        log.info("keys reloaded: %d key(s) from %s", len(self.access.keys), self.access.path)
        return True

    def status(self) -> dict[str, Any]:
        """``GET /v1/status``: what this gateway and the providers it sees are doing now."""
        now = trio.current_time()
        dispatcher = self.dispatcher
        images, work = dispatcher.metrics.recent.totals(now)
        slots = busy = 0
        for advert in self.peer.adverts:
            if advert.is_online_provider:
                slots += advert.slots
                busy += min(self.directory.in_flight(advert.peer_id), advert.slots)
        return {
            "peer_id": str(self.peer_id),
            "version": __version__,
            "uptime_s": round(now - self._started, 3),
            "providers_online": len(self.catalog.online_providers()),
            "models_online": len(self.peer.adverts.models()),
            "jobs_waiting": dispatcher.waiting,
            "jobs_running": dispatcher.running,
            "megapixel_steps_queued": round(dispatcher.queued_megapixel_steps, 3),
            "megapixel_steps_last_minute": round(work, 3),
            "images_last_minute": images,
            "jobs_queued": self.jobs.queued,
            "clients_active": self.jobs.quotas.active,
            "load": _load(busy + dispatcher.waiting + self.jobs.queued, slots),
            "keys_required": self.access.require_key,
            "trust": self.trust_status(),
        }

    def trust_status(self) -> dict[str, Any] | None:
        """What the spot checks cost and found, and who is excluded; None when this gateway
        checks nothing."""
        checker = self.checker
        if checker is None:
            return None
        stats = checker.stats
        return {
            "providers_excluded": self.trust.excluded(self.wall_clock()),
            "checks_running": checker.running,
            "jobs_seen": stats.jobs,
            "checks": stats.outcomes(),
            "strikes": stats.strikes,
            "exclusions": stats.exclusions,
            "extra_compute": round(stats.extra_compute, 4),
            "fraud_reports": None if self.reports is None else self.reports.stats.counts(),
        }

    async def advertise(self) -> None:
        """Publish our gateway advert now and every ADVERT_INTERVAL seconds."""
        seq = 0
        while True:
            now = self.peer.wall_clock()
            seq = max(seq + 1, int(now * 1000))
            advert = Advert(
                self.peer.peer_id,
                seq=seq,
                issued_at=now,
                ttl=3 * ADVERT_INTERVAL,
                addrs=tuple(self.peer.host.advertised_addrs),
                reachability=(
                    Reachability.PUBLIC if self.peer.reachable else Reachability.OUTBOUND_ONLY
                ),
                roles=(Role.GATEWAY,),
            )
            try:
                await self.peer.publish_advert(advert)
            except SdcnError as exc:
                log.warning("could not publish the gateway advert: %s", exc)
            await trio.sleep(ADVERT_INTERVAL)


def _load(jobs: int, slots: int) -> float | None:
    """Jobs running or waiting per provider slot (1: every slot busy); None: no slots."""
    return round(jobs / slots, 3) if slots else None


@asynccontextmanager
async def open_gateway(
    peer: Peer,
    config: GatewayConfig = GatewayConfig(),
    *,
    http: str | None = None,
    default_model: str | None = None,
    provider: Provider | None = None,
    rng: random.Random | None = None,
    trust: TrustConfig | None = TrustConfig(),
    reports: ReportConfig = ReportConfig(),
    jobs: JobsConfig = JobsConfig(),
    access: AccessConfig | None = None,
) -> AsyncIterator[Gateway]:
    """Run the gateway role on `peer`, serving the HTTP API on `http` (``HOST:PORT``) if given,
    spot-checking its jobs (`trust`) and exchanging fraud reports (`reports`); with `trust`
    None it checks nothing (and takes no reports): each job runs once.

    With `provider` (the peer is a provider too) jobs may run on it in-process, and its
    advert carries the gateway role, so the gateway publishes none of its own. `jobs` says
    where the job service keeps jobs (by default a temporary dir, gone on exit); `access`
    who may ask and their limits (by default everyone, without limits). Raises
    ConfigError if the HTTP address cannot be bound or the data dir cannot be used.
    """
    local = provider.run_job if provider is not None else None
    gateway = Gateway(
        peer,
        config,
        default_model=default_model,
        rng=rng,
        local=local,
        trust=trust or TrustConfig(),
        access=access,
    )
    async with AsyncExitStack() as stack:
        if trust is not None:
            checker = await stack.enter_async_context(
                open_spot_checker(gateway.dispatcher, gateway.trust, rng=rng)
            )
            gateway.checker = checker
            gateway.reports = await stack.enter_async_context(
                open_fraud_reports(peer, checker, reports, rng=rng)
            )
            instrument_trust(gateway.metrics, checker, gateway.reports, peer.wall_clock)
        gateway.jobs = await stack.enter_async_context(
            open_job_service(
                gateway.dispatcher, gateway.directory, jobs, wall_clock=peer.wall_clock, rng=rng
            )
        )
        nursery = await stack.enter_async_context(open_service_nursery())
        if provider is None:
            nursery.start_soon(gateway.advertise)
        if http is not None:
            gateway.urls = await nursery.start(serve_http, create_app(gateway), http)
            for url in gateway.urls:
                log.info("gateway HTTP API on %s (docs at %s/docs)", url, url)
        try:
            yield gateway
        finally:
            nursery.cancel_scope.cancel()
