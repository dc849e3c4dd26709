"""Run a bootstrap peer: a DHT server that relays gossip, with an optional HTTP status API."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace

import trio

from bootstrap.http import create_app
from sdcn_p2p._util import open_service_nursery
from sdcn_p2p.httpserver import serve_http
from sdcn_p2p.identity import Identity
from sdcn_p2p.metrics import open_metrics_server
from sdcn_p2p.peer import Peer, PeerConfig, open_peer
from sdcn_p2p.records import Role
from sdcn_p2p.transport import Transport

__all__ = ["Bootstrap", "open_bootstrap", "run_bootstrap"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Bootstrap:
    peer: Peer
    #: The status API's URLs (``http://127.0.0.1:8000``), empty without ``--http``.
    http_urls: tuple[str, ...] = ()
    #: Where its metrics are served (``http://127.0.0.1:9100/metrics``), empty without
    #: ``--metrics``.
    metrics_urls: tuple[str, ...] = ()


@asynccontextmanager
async def open_bootstrap(
    identity: Identity,
    config: PeerConfig,
    *,
    http: str | None = None,
    metrics: str | None = None,
    transport: Transport | None = None,
    wall_clock: Callable[[], float] = time.time,
) -> AsyncIterator[Bootstrap]:
    """Start a bootstrap peer (always a DHT server) and, with `http` (``HOST:PORT``), its API;
    with `metrics` (``HOST:PORT``), its Prometheus metrics."""
    config = replace(
        config,
        host=replace(config.host, roles=tuple(dict.fromkeys((*config.host.roles, Role.BOOTSTRAP)))),
        dht=replace(config.dht, server=True),
    )
    async with (
        open_peer(identity, config, transport=transport, wall_clock=wall_clock) as peer,
        open_service_nursery() as nursery,
        AsyncExitStack() as stack,
    ):
        urls: list[str] = []
        if http is not None:
            urls = await nursery.start(serve_http, create_app(peer), http)
            for url in urls:
                log.info("status API on %s/v1/network", url)
        metrics_urls: list[str] = []
        if metrics is not None:
            metrics_urls = await stack.enter_async_context(
                open_metrics_server(peer.metrics, metrics)
            )
        try:
            yield Bootstrap(peer, tuple(urls), tuple(metrics_urls))
        finally:
            nursery.cancel_scope.cancel()


async def run_bootstrap(
    identity: Identity,
    config: PeerConfig,
    *,
    http: str | None = None,
    metrics: str | None = None,
    task_status: trio.TaskStatus[Bootstrap] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a bootstrap peer until cancelled (``sdcn bootstrap``)."""
    async with open_bootstrap(identity, config, http=http, metrics=metrics) as node:
        task_status.started(node)
        await trio.sleep_forever()
