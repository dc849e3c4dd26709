"""Peer: a Host with the DHT, advert gossip and the advert cache; roles plug into it.

`open_peer` starts everything and joins the network through the bootstrap peers in the
background: while none answers it retries with exponential backoff (1 s doubling to 5 min,
with jitter) and the peer keeps working with the peers it already knows. A peer that cannot
accept connections (no advertised address) runs the DHT in client mode and keeps its
connections to the bootstrap peers alive, since nobody can dial it back.

Each Peer has its own metrics (`Peer.metrics`, see `sdcn_p2p.metrics`); the peer's own are
its connections and streams, ping round trips, its DHT routing table and records, and the
adverts it gossips and holds. Its roles add theirs.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio
from prometheus_client.metrics_core import CounterMetricFamily, Metric

from sdcn_p2p._config import require
from sdcn_p2p._util import open_service_nursery
from sdcn_p2p.adverts import AdvertCache
from sdcn_p2p.dht.service import Dht, DhtConfig
from sdcn_p2p.errors import SdcnError
from sdcn_p2p.gossip import Gossip, GossipConfig
from sdcn_p2p.host import Host, HostConfig, open_host
from sdcn_p2p.identity import Identity, PeerId
from sdcn_p2p.metrics import RTT_BUCKETS, Metrics
from sdcn_p2p.multiaddr import Multiaddr
from sdcn_p2p.records import Advert, Envelope
from sdcn_p2p.transport import Transport

__all__ = ["Peer", "PeerConfig", "open_peer"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """How a Peer listens, joins the network and runs its protocols."""

    host: HostConfig = field(default_factory=HostConfig)
    dht: DhtConfig = field(default_factory=DhtConfig)
    gossip: GossipConfig = field(default_factory=GossipConfig)
    #: Well-known peers to join through; dialled at start and whenever we lose the network.
    bootstrap: tuple[Multiaddr, ...] = ()
    #: First and longest wait between bootstrap attempts while none answers (seconds).
    bootstrap_backoff: tuple[float, float] = (1.0, 300.0)
    #: Collect Prometheus metrics (`Peer.metrics`); off, every instrument does nothing.
    metrics: bool = True

    def __post_init__(self) -> None:
        ok = isinstance(self.bootstrap, tuple) and all(
            isinstance(a, Multiaddr) for a in self.bootstrap
        )
        require(self, "bootstrap", ok, "must be a tuple of Multiaddr")
        backoff = self.bootstrap_backoff
        ok = (
            isinstance(backoff, tuple)
            and len(backoff) == 2
            and all(isinstance(b, int | float) and math.isfinite(b) for b in backoff)
            and 0 < backoff[0] <= backoff[1]
        )
        require(self, "bootstrap_backoff", ok, "must be (first, longest) with 0 < first ≤ longest")


class Peer:
    """One member of the network. Create with `open_peer`."""

    def __init__(
        self,
        host: Host,
        dht: Dht,
        gossip: Gossip,
        adverts: AdvertCache,
        config: PeerConfig,
        nursery: trio.Nursery,
        *,
        wall_clock: Callable[[], float],
        metrics: Metrics | None = None,
    ) -> None:
        self.host = host
        self.dht = dht
        self.gossip = gossip
        self.adverts = adverts
        self.config = config
        self.wall_clock = wall_clock
        #: This peer's metrics registry, which its roles add to.
        self.metrics = metrics or Metrics.off()
        self.bootstrapped = trio.Event()
        self._nursery = nursery
        self._rng = random.Random()
        self._kept_seeds: set[PeerId] = set()

    @property
    def peer_id(self) -> PeerId:
        return self.host.peer_id

    @property
    def identity(self) -> Identity:
        return self.host.identity

    @property
    def reachable(self) -> bool:
        """Whether other peers can dial us (we have an address to advertise)."""
        return bool(self.host.advertised_addrs)

    async def publish_advert(self, advert: Advert, *, flush: bool = False) -> Envelope:
        """Sign `advert`, gossip it to the network and store it in the DHT under its models.

        The DHT store runs in the background; gossip pushes are queued for each mesh peer
        before this returns, or, with `flush`, sent (`Gossip.publish`).
        """
        envelope = advert.seal(self.identity)
        await self.gossip.publish(envelope, flush=flush)
        self._nursery.start_soon(self._store_in_dht, envelope)
        return envelope

    async def _store_in_dht(self, envelope: Envelope) -> None:
        try:
            await self.dht.put(envelope)
        except SdcnError as exc:
            log.info("could not store advert in the DHT: %s", exc)

    async def _join(self) -> None:
        """Bootstrap now, and again whenever the routing table runs empty."""
        seeds = list(self.config.bootstrap)
        if not seeds:
            self.bootstrapped.set()
            return
        first, longest = self.config.bootstrap_backoff
        delay = first
        while True:
            if await self._bootstrap_once(seeds):
                self.bootstrapped.set()
                delay = first
                # A periodic health check: failed peers leave the routing table one by one.
                while len(self.dht.routing_table) or self.host.connected_peers:  # noqa: ASYNC110
                    await trio.sleep(self.config.dht.refresh_interval)
                log.info("lost every peer; bootstrapping again")
                continue
            wait = delay * (0.5 + self._rng.random())
            log.warning("no bootstrap peer answered; retrying in %.0f s", wait)
            await trio.sleep(wait)
            delay = min(delay * 2, longest)

    async def _bootstrap_once(self, seeds: Sequence[Multiaddr]) -> bool:
        ok = await self.dht.bootstrap(seeds)
        if ok and not self.reachable:
            # Nobody can dial us: hold on to the connections we made ourselves.
            for seed in seeds:
                if seed.peer_id is not None and seed.peer_id not in self._kept_seeds:
                    self._kept_seeds.add(seed.peer_id)
                    self.host.keep_alive(seed.peer_id)
        return ok

    def __repr__(self) -> str:
        return f"<Peer {self.peer_id}>"


def _instrument(peer: Peer) -> None:
    """Add the peer's own metrics to `peer.metrics`: gauges and counts read at each scrape,
    and the RTT histogram, fed by the peerstore (its subscription lives as long as the peer).
    """
    metrics, host = peer.metrics, peer.host
    if not metrics.enabled:
        return
    connections = metrics.gauge(
        "sdcn_peer_connections", "Open connections, by who dialled", ["direction"]
    )
    connections.labels("inbound").set_function(lambda: host.num_inbound_connections)
    connections.labels("outbound").set_function(
        lambda: host.num_connections - host.num_inbound_connections
    )
    metrics.gauge("sdcn_peer_streams", "Open streams over all connections").set_function(
        lambda: host.num_streams
    )
    rtt = metrics.histogram(
        "sdcn_peer_rtt_seconds", "Ping round trips to other peers", buckets=RTT_BUCKETS
    )
    host.peerstore.subscribe_rtt(rtt.observe)
    metrics.gauge("sdcn_dht_routing_table_peers", "Peers in the DHT routing table").set_function(
        lambda: len(peer.dht.routing_table)
    )
    metrics.gauge("sdcn_dht_records", "Records this peer stores for the DHT").set_function(
        lambda: len(peer.dht.store)
    )
    metrics.gauge("sdcn_adverts_cached", "Unexpired adverts in the advert cache").set_function(
        lambda: len(peer.adverts)
    )

    def gossip() -> list[Metric]:
        stats = peer.gossip.stats
        family = CounterMetricFamily(
            "sdcn_gossip_adverts",
            "Adverts received by gossip: new to the cache, already held, or refused (forged, "
            "malformed, expired)",
            labels=["result"],
        )
        family.add_metric(["accepted"], stats.adverts_accepted)
        family.add_metric(["duplicate"], stats.duplicates)
        family.add_metric(["rejected"], stats.rejected)
        return [family]

    metrics.add_collector("gossip", gossip)


@asynccontextmanager
async def open_peer(
    identity: Identity,
    config: PeerConfig = PeerConfig(),
    *,
    transport: Transport | None = None,
    wall_clock: Callable[[], float] = time.time,
) -> AsyncIterator[Peer]:
    """Start a Peer; it joins the network in the background (see `Peer.bootstrapped`).

    Everything stops when the block exits. Raises ConfigError if a listen address cannot be
    bound.
    """
    async with (
        open_host(identity, config.host, transport=transport, wall_clock=wall_clock) as host,
        open_service_nursery() as nursery,
    ):
        adverts = AdvertCache(wall_clock=wall_clock)
        dht = Dht(host, config.dht, wall_clock=wall_clock)
        gossip = Gossip(host, adverts, config.gossip, wall_clock=wall_clock)
        await nursery.start(dht.run)
        await nursery.start(gossip.run)
        metrics = Metrics.for_peer() if config.metrics else Metrics.off()
        peer = Peer(
            host, dht, gossip, adverts, config, nursery, wall_clock=wall_clock, metrics=metrics
        )
        _instrument(peer)
        nursery.start_soon(peer._join)
        try:
            yield peer
        finally:
            nursery.cancel_scope.cancel()
