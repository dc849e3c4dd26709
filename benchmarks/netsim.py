"""Simulate SDCN at internet scale: the real DHT and gossip cores, messages as timed events.

`dht_sim.py` runs real peers (Noise, yamux and all), which stops at a few thousand. This runs
the project's own pure cores instead — `RoutingTable`, `Lookup` and `RecordStore` of
`sdcn_p2p.dht`, gossip's `SeenCache`, `MeshState` and `PushBudget` — one set per peer, driven
the way `Dht`, `Gossip` and `Peer` drive them: a lookup is polled on each answer and every
`slow_after`, a failed query drops the peer from the routing table, an identified server is
added (pinging the oldest entry of a full bucket), a join dials two bootstrap peers, looks up
its own key and refreshes the farther buckets (and retries with backoff when no bootstrap peer
answers), buckets are refreshed every `refresh_interval`, a Host refuses inbound connections
past `max_inbound_connections`;
the mesh grafts on connect and on heartbeats, forwards each new (peer, seq) once, and runs a
digest exchange on every new connection and every `anti_entropy_interval`; a published advert
is pushed to the mesh and stored in the DHT under each of its models. Messages are events in
one priority queue keyed by simulated time: no sockets, no cryptography (checking a signature
costs `--verify-ms` of simulated time), no trio task per peer.

The network:

- latency: each peer lives in one of five regions (North America 35 %, Europe 30 %, Asia
  25 %, South America 5 %, Oceania 5 %); a pair's RTT is the regions' RTT (rounded from public
  city-to-city ping tables) plus each side's access delay (0-10 ms) plus a fixed per-pair
  jitter (0-10 ms), within 20-300 ms. A new connection costs `--dial-rtts` round trips (TCP,
  WebSocket upgrade, Noise XX) before its first request. A message is lost with probability
  `--loss` and, the transport being TCP, arrives one retransmission timeout late
  (max(200 ms, 3 x latency), as `MemoryNetwork` does);
- NAT: `--nat` of the peers accept no inbound connection. They run the DHT in client mode
  (never in a routing table), keep their two bootstrap connections alive, and are reached
  only over connections they dialled;
- churn: sessions are exponential with a median of `--session` seconds, so leaves are a
  Poisson process, and joins are one at the same rate, which keeps the size steady. A leaving
  peer says nothing: queries to it time out, its mesh peers notice when a push or a keep-alive
  ping fails. A joining peer pulls every advert in its first digest exchange;
- load: `--providers` of the peers are providers, each publishing an advert (of 1-3 models
  from a catalog of 50 with Zipf popularity) every `--advert-interval` seconds.

What is an event and what is counted. Every DHT message (joins, refreshes, pings, the measured
lookups), every mesh message, every connection, and every push, digest exchange and DHT store
of the tracked adverts (`--adverts`, published at random moments) is an event. The background
adverts — 333 a second at 100,000 peers — are not: their pushes, stores and the connections
those open are counted as the tracked adverts' times the advert rate, and their effect on the
receivers' push budgets is the share of pushes a real `PushBudget` lets through at their
arrival rate. Each digest exchange is counted at the size of a digest of every provider's
advert (plus every advert, for a newcomer). The measured lookups' own traffic is left out of
the per-peer figures.

By default the network starts in steady state: every routing table holds what a long-lived
peer's would (up to k random live servers per bucket, refreshed at a random point of the last
refresh interval), every provider's advert sits on the k closest servers of each of its
models, each peer has grafted up to `degree` peers that accepted (`MeshState.accepts_graft`),
and peers behind NAT hold their bootstrap connections while the bootstraps have room;
`--join protocol` builds it by real joins instead, one every `--join-interval` seconds. Then:

1. a steady window of `--duration` seconds with churn: `--lookups` lookups, half for random
   keys and half for live servers' keys, checked against the true k closest servers, and the
   tracked adverts, timed until 99 % of the peers alive all along hold them;
2. `--leave` of the peers leave at once, without notice;
3. a window of `--after` seconds measured the same way (figures prefixed ``after_leave_``).

`--no-eviction-ping` and `--no-keep-bootstraps` are what-ifs: they change what the code does
(see `NetConfig`) to measure what such a change would buy.

Usage: python benchmarks/netsim.py --peers 100000 [--json]
       python benchmarks/netsim.py --profile dht-sim --peers 1000   (dht_sim.py's network)
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import dataclasses
import gc
import heapq
import itertools
import json
import math
import random
import resource
import sys
import time
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, Protocol

from sdcn_p2p.dht import lookup as lookup_module
from sdcn_p2p.dht import routing as routing_module
from sdcn_p2p.dht import store as store_module
from sdcn_p2p.dht.keys import KEY_BITS, key_int
from sdcn_p2p.dht.lookup import Lookup
from sdcn_p2p.dht.messages import Contact, FindNode, PutValue, encode_request, nodes_response
from sdcn_p2p.dht.routing import AddStatus, RoutingTable
from sdcn_p2p.dht.service import _MAINTENANCE_PERIOD, _PARALLEL_LOOKUPS, DhtConfig
from sdcn_p2p.dht.store import RecordStore, StoredValue
from sdcn_p2p.errors import RecordError, ResourceLimitExceeded
from sdcn_p2p.gossip import (
    GOSSIP,
    AdvertBatch,
    Digest,
    GossipConfig,
    Graft,
    MeshState,
    PushBudget,
    SeenCache,
    max_entries,
)
from sdcn_p2p.host import HostConfig
from sdcn_p2p.identity import Identity, PeerId
from sdcn_p2p.multiaddr import Multiaddr
from sdcn_p2p.peer import PeerConfig
from sdcn_p2p.provider import ProviderConfig
from sdcn_p2p.records import Advert, LoraInfo, ModelInfo, model_key
from sdcn_p2p.wire.messages import pack

INF = math.inf

REGION_WEIGHTS = (0.35, 0.30, 0.25, 0.05, 0.05)  # NA, EU, AS, SA, OC
REGION_RTT = (  # seconds
    (0.035, 0.090, 0.160, 0.130, 0.170),
    (0.090, 0.025, 0.180, 0.200, 0.260),
    (0.160, 0.180, 0.050, 0.280, 0.120),
    (0.130, 0.200, 0.280, 0.040, 0.290),
    (0.170, 0.260, 0.120, 0.290, 0.030),
)
ACCESS_DELAY = 0.010  # per peer, uniform 0..this
PAIR_JITTER = 0.010  # per pair, uniform 0..this
BOOTSTRAPS = 8
MODEL_CATALOG = 50
#: yamux SYN, data and FIN headers, the protocol id and its status byte, and a Noise tag and a
#: WebSocket header each way: what a message on a new stream costs beyond its msgpack body.
STREAM_OVERHEAD = 3 * 12 + len(GOSSIP) + 2 + 12 + 1 + 2 * (16 + 4)
#: Traffic that a running network makes by itself; the measured lookups' ("lookup") is left
#: out, and the tracked adverts' ("put") is scaled to the advert rate.
BACKGROUND = ("join", "refresh", "ping", "graft", "anti-entropy")

_IDENTITY_KEY_PREFIX = bytes([0x00, 36, 0x08, 0x01, 0x12, 0x20])  # identity multihash, Ed25519


@dataclass(frozen=True, slots=True)
class NetConfig:
    """The simulated network; times in seconds."""

    peers: int = 1000
    nat: float = 0.4
    loss: float = 0.01
    session: float = 3600.0  # median; INF: no churn
    providers: float = 0.2
    advert_interval: float = ProviderConfig().advert_interval
    advert_ttl: float = ProviderConfig().advert_ttl
    latency: str = "regions"  # or "uniform": 20-200 ms per pair, as dht_sim.py
    dial_rtts: float = 3.0
    verify_cost: float = 0.0002
    join: str = "oracle"  # or "protocol"
    join_interval: float = 0.05
    warmup: float = 0.0
    duration: float = 30.0
    after: float = 30.0
    leave: float = 0.3
    lookups: int = 1000
    adverts: int = 0  # 0: 20, fewer above 40,000 peers (each costs ~5 events per peer)
    seed: int = 1
    idle_timeout: float = HostConfig().idle_timeout
    max_inbound: int = HostConfig().max_inbound_connections
    bootstrap_backoff: tuple[float, float] = PeerConfig().bootstrap_backoff
    #: What-ifs, True as the code is. False: a newcomer to a full bucket waits in the
    #: replacement cache without `Dht._on_identified` pinging (dialling) the bucket's oldest.
    eviction_ping: bool = True
    #: False: a peer behind NAT does not keep its bootstrap connections alive (`Peer._join`).
    keep_bootstraps: bool = True
    dht: DhtConfig = field(default_factory=DhtConfig)
    gossip: GossipConfig = field(default_factory=GossipConfig)


# --- stand-ins for what the cores would compute with cryptography ---------------------------------


class SimPeerId(PeerId):
    """A peer id like an Ed25519 one (the key bytes need not be a curve point here) that
    compares and hashes by identity: the simulator makes exactly one per peer, and
    `PeerId.__hash__` and `__eq__`, Python calls in every dict, set and list operation of the
    cores, took a quarter of its time.
    """

    __slots__ = ()
    __hash__ = object.__hash__
    __eq__ = object.__eq__
    __ne__ = object.__ne__


def _peer_id(key: bytes) -> PeerId:
    return SimPeerId(_IDENTITY_KEY_PREFIX + key)


@dataclass(frozen=True, slots=True)
class SimRecord:
    """What the simulator stores in place of a signed advert envelope."""

    publisher: PeerId
    seq: int
    expires_at: float
    keys: tuple[bytes, ...]
    data: bytes  # only its length matters


def _validate(key: bytes, record: SimRecord, now: float, *, max_size: int) -> StoredValue:
    """`store.validate` for SimRecords: the same checks but the signature's."""
    if len(record.data) > max_size:
        raise RecordError(f"record of {len(record.data)} bytes is over the {max_size}-byte cap")
    if record.expires_at <= now:
        raise RecordError("advert expired")
    if key not in record.keys:
        raise RecordError("the advert names no model with this key")
    return StoredValue(record.publisher, record.seq, record.expires_at, record, record.data)  # type: ignore[arg-type]


@contextlib.contextmanager
def simulated_keys_and_signatures(keys: dict[PeerId, int]) -> Iterator[None]:
    """While the simulation runs, swap the two things the cores compute by hashing or
    cryptography: a peer's node key (`node_key_int`, an LRU cache of 65,536 that 100,000 peers
    would thrash) comes from `keys`, and the store checks SimRecords (`_validate`).
    """
    saved = (
        routing_module.node_key_int,
        lookup_module.node_key_int,
        store_module.validate,
        store_module._signer,
    )
    routing_module.node_key_int = lookup_module.node_key_int = keys.__getitem__  # type: ignore[assignment]
    store_module.validate = _validate  # type: ignore[assignment]
    store_module._signer = attrgetter("publisher")  # type: ignore[assignment]
    try:
        yield
    finally:
        (
            routing_module.node_key_int,
            lookup_module.node_key_int,
            store_module.validate,
            store_module._signer,
        ) = saved


class Sizes:
    """Wire sizes in bytes, from the real encoders."""

    def __init__(self, gossip: GossipConfig) -> None:
        identity = Identity.from_seed(bytes(32))
        addr = Multiaddr.parse("/ip4/203.0.113.7/tcp/4001/ws")
        advert = Advert(
            identity.peer_id,
            seq=1_700_000_000_000,
            issued_at=1_700_000_000.0,
            ttl=180,
            addrs=(addr,),
            backend="webui",
            models=(
                ModelInfo("v1-5-pruned-emaonly", "v1-5-pruned-emaonly.safetensors", "6ce0161689"),
                ModelInfo("sd_xl_base_1.0", "sd_xl_base_1.0.safetensors", "31e35c80fc", "sdxl"),
            ),
            loras=(LoraInfo("add_detail", "7c6bad76eb"), LoraInfo("lcm-lora-sdv1-5", "3d1d3d3f")),
            samplers=("Euler a", "Euler", "DPM++ 2M", "DPM++ 2M Karras", "DDIM", "UniPC"),
            vram_total_mb=12288,
            vram_free_mb=9000,
            max_pixels=2048 * 2048,
            max_steps=150,
            speed=7.5,
        )
        envelope = advert.seal(identity).to_bytes()
        peers = [_peer_id(i.to_bytes(32, "big")) for i in range(100)]
        digest = len(pack(Digest({p: advert.seq for p in peers}).to_wire()))
        contacts = [Contact(p, (addr,)) for p in peers[:20]]
        #: An advert envelope, as held in a cache or a store.
        self.advert = len(envelope)
        #: A push of one advert.
        self.push = len(pack(AdvertBatch((envelope,)).to_wire())) + STREAM_OVERHEAD
        #: One digest entry ([peer id, seq]), and the most a digest holds.
        self.digest_entry = digest / len(peers)
        self.max_digest_entries = max_entries(gossip.max_message_size)
        #: A gossip message with no adverts, and a GRAFT with its answer.
        self.message = len(pack(AdvertBatch((), ()).to_wire())) + STREAM_OVERHEAD
        self.rpc = {
            "find_node": len(pack(encode_request(FindNode(bytes(32)))))
            + len(pack(nodes_response(contacts)))
            + STREAM_OVERHEAD,
            "put": len(pack(encode_request(PutValue(bytes(32), envelope)))) + 16 + STREAM_OVERHEAD,
            "ping": 2 * 32 + STREAM_OVERHEAD,
            "graft": 2 * len(pack(Graft().to_wire())) + STREAM_OVERHEAD,
        }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# --- the peers ------------------------------------------------------------------------------------


class SimPeer:
    """One peer: the real cores, and what the simulator keeps to drive them."""

    __slots__ = (
        "access",
        "adverts",
        "ae_phase",
        "cache_full",
        "conns",
        "first_refresh",
        "hb_due",
        "hb_phase",
        "inbound",
        "index",
        "joined_at",
        "key",
        "left_at",
        "members",
        "mesh",
        "models",
        "peer_id",
        "pinging",
        "provider",
        "ready_at",
        "refreshing",
        "region",
        "seen",
        "server",
        "store",
        "table",
    )

    def __init__(self, index: int, peer_id: PeerId, key: int, server: bool, net: Network) -> None:
        cfg = net.cfg
        self.index = index
        self.peer_id = peer_id
        self.key = key
        self.server = server
        self.region = 0
        self.access = 0.0
        self.joined_at = net.now
        self.left_at = INF
        self.provider = False
        self.models: tuple[bytes, ...] = ()
        # The cores, as `Dht` and `Gossip` hold them.
        self.table = RoutingTable(key.to_bytes(32, "big"), k=cfg.dht.k)
        self.store: RecordStore | None = None  # made when first used (servers only)
        self.mesh = MeshState(cfg.gossip)
        self.seen = SeenCache(cfg.gossip.seen_size)
        # What their drivers keep.
        self.pinging: set[int] = set()  # buckets with an eviction ping in flight
        self.refreshing = False
        self.ready_at = INF  # when its join ended
        self.first_refresh = INF
        self.members: dict[PeerId, None] = {}  # the mesh, in the order joined
        self.adverts: dict[PeerId, int] = {}  # tracked adverts held: publisher -> seq
        self.cache_full = True  # holds the background adverts (a newcomer: not until it syncs)
        self.conns: dict[PeerId, float] = {}  # connected peer -> last use (INF: kept alive)
        self.inbound: dict[PeerId, float] = {}  # who dialled us -> when that connection opens
        self.hb_due = False
        self.hb_phase = 0.0
        self.ae_phase = 0.0

    @property
    def alive(self) -> bool:
        return self.left_at == INF

    @property
    def joined(self) -> bool:
        return self.ready_at < INF


class LiveServers:
    """The live server peers sorted by node key: the oracle's view of the keyspace."""

    def __init__(self) -> None:
        self.keys: list[int] = []
        self.peers: list[SimPeer] = []

    def add(self, peer: SimPeer) -> None:
        i = bisect.bisect_left(self.keys, peer.key)
        self.keys.insert(i, peer.key)
        self.peers.insert(i, peer)

    def remove(self, peer: SimPeer) -> None:
        i = bisect.bisect_left(self.keys, peer.key)
        del self.keys[i], self.peers[i]

    def count(self, low: int, high: int) -> tuple[int, int]:
        """Index range of the keys in [low, high)."""
        return bisect.bisect_left(self.keys, low), bisect.bisect_left(self.keys, high)

    def buckets(self, own: int, *, server: bool) -> Iterator[tuple[int, int, int]]:
        """(bucket, first index, end index) of the servers in each bucket of the table of key
        `own`, up to the last bucket with anyone in it.
        """
        for index in range(KEY_BITS):
            shift = KEY_BITS - 1 - index
            low = ((own >> shift) ^ 1) << shift
            lo, hi = self.count(low, low + (1 << shift))
            yield index, lo, hi
            near_lo, near_hi = self.count((own >> shift) << shift, ((own >> shift) + 1) << shift)
            if near_hi - near_lo <= server:  # nobody nearer (but ourselves)
                return

    def closest(self, target: int, count: int) -> list[SimPeer]:
        """The `count` peers closest to `target`."""
        prefix = KEY_BITS
        while prefix > 0:  # the smallest subtree around `target` holding enough peers
            span = 1 << (KEY_BITS - prefix)
            low = target & ~(span - 1)
            lo, hi = self.count(low, low + span)
            if hi - lo >= 2 * count + 8:
                break
            prefix -= 1
        else:
            lo, hi = 0, len(self.keys)
        return heapq.nsmallest(count, self.peers[lo:hi], key=lambda p: p.key ^ target)


@dataclass(slots=True)
class Tracked:
    """A tracked advert and when each peer first held it."""

    publisher: SimPeer
    seq: int
    published_at: float
    expires_at: float
    seen_key: tuple[PeerId, int]
    arrivals: array  # by peer index, for the peers there at publication; INF until held
    pushes: int = 0


@dataclass(slots=True)
class Window:
    """What one measurement window collected."""

    name: str
    start: float
    end: float = 0.0
    hops: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    exact: list[bool] = field(default_factory=list)
    owners: list[bool] = field(default_factory=list)
    adverts: list[Tracked] = field(default_factory=list)
    runs: list[LookupRun] = field(default_factory=list)
    counts: dict[str, float] = field(default_factory=dict)
    peer_seconds: float = 0.0


# --- the drivers: what `Dht`, `Gossip` and `Peer` do around the cores -----------------------------


class Caller(Protocol):
    """Who made a request, and why (`cause` sorts the traffic)."""

    cause: str

    def on_reply(self, peer: SimPeer, answer: Any) -> None: ...
    def on_fail(self, peer: SimPeer) -> None: ...


class _Connect:
    """A bare dial (a join reaching its bootstrap peers)."""

    __slots__ = ("cause", "done")

    def __init__(self, done: Callable[[SimPeer | None], None]) -> None:
        self.cause = "join"
        self.done = done

    def on_reply(self, peer: SimPeer, answer: object) -> None:
        self.done(peer)

    def on_fail(self, peer: SimPeer) -> None:
        self.done(None)


class _Ping:
    """`Dht._check_oldest`: ping the oldest entry of a full bucket; evict it if it is gone."""

    __slots__ = ("bucket", "cause", "net", "newcomer", "source")

    def __init__(self, net: Network, source: SimPeer, bucket: int, newcomer: PeerId) -> None:
        self.cause = "ping"
        self.net = net
        self.source = source
        self.bucket = bucket
        self.newcomer = newcomer

    def on_reply(self, peer: SimPeer, answer: object) -> None:
        self.source.pinging.discard(self.bucket)
        self.source.table.touch(peer.peer_id, self.net.now)

    def on_fail(self, peer: SimPeer) -> None:
        self.source.pinging.discard(self.bucket)
        self.source.table.replace(peer.peer_id, self.newcomer, self.net.now)


class _Graft:
    """`Gossip._graft`: ask a peer (dialling it if needed) to join our mesh."""

    __slots__ = ("cause", "net", "source")

    def __init__(self, net: Network, source: SimPeer) -> None:
        self.cause = "graft"
        self.net = net
        self.source = source

    def on_reply(self, peer: SimPeer, joined: bool) -> None:
        net, source = self.net, self.source
        source.mesh.pending.discard(peer.peer_id)
        if joined:
            if net.connected(source, peer):
                net.add_member(source, peer)
        else:
            source.mesh.backoff(peer.peer_id, net.now)
        net.arm_heartbeat(source)

    def on_fail(self, peer: SimPeer) -> None:
        source = self.source
        source.mesh.pending.discard(peer.peer_id)
        source.mesh.backoff(peer.peer_id, self.net.now)
        self.net.arm_heartbeat(source)


class _Put:
    """A PUT_VALUE of `Dht.put`; its answer changes nothing."""

    __slots__ = ("cause",)

    def __init__(self) -> None:
        self.cause = "put"

    def on_reply(self, peer: SimPeer, answer: object) -> None:
        pass

    def on_fail(self, peer: SimPeer) -> None:
        pass


class LookupRun:
    """`Dht._lookup`: drive one `Lookup`, polling it on each outcome and every `slow_after`."""

    __slots__ = (
        "cause",
        "done",
        "gen",
        "key",
        "lookup",
        "net",
        "on_finish",
        "responders",
        "source",
        "start",
        "target",
    )

    def __init__(
        self,
        net: Network,
        source: SimPeer,
        key: bytes,
        cause: str,
        *,
        width: int,
        extra_seeds: tuple[PeerId, ...] = (),
        on_finish: Callable[[LookupRun], None] | None = None,
    ) -> None:
        cfg = net.cfg.dht
        seeds = source.table.closest(key, cfg.k)
        seeds += [peer for peer in extra_seeds if peer not in seeds]
        self.net = net
        self.source = source
        self.key = key
        self.cause = cause
        self.target = key_int(key)
        self.start = net.now
        self.gen = 0
        self.done = False
        self.responders = 0
        self.on_finish = on_finish
        self.lookup = Lookup(
            key, seeds, k=width, alpha=cfg.alpha, self_id=source.peer_id, slow_after=cfg.slow_after
        )
        self.poll()

    def poll(self) -> None:
        if self.done:
            return
        net = self.net
        if not self.source.alive:
            self.done = True
            return
        lookup = self.lookup
        if lookup.finished:
            self.done = True
            self.source.table.mark_refreshed(self.key, net.now)
            if self.on_finish is not None:
                self.on_finish(self)
            return
        for peer in lookup.next_queries(net.now):
            net.request(self.source, net.by_id[peer], "find_node", self.key, self)
        self.gen += 1
        net.at(net.now + net.cfg.dht.slow_after, self._tick, self.gen)

    def _tick(self, gen: int) -> None:
        if gen == self.gen:  # nothing happened for `slow_after`
            self.poll()

    def on_reply(self, peer: SimPeer, closer: list[PeerId]) -> None:
        if self.done:
            return
        self.lookup.on_response(peer.peer_id, closer)
        self.responders += 1
        self.source.table.touch(peer.peer_id, self.net.now)
        self.poll()

    def on_fail(self, peer: SimPeer) -> None:
        if self.done:
            return
        self.lookup.on_failure(peer.peer_id)
        self.source.table.remove(peer.peer_id)
        self.poll()


class Refresh:
    """`Dht._refresh`: a width-alpha lookup of a random key in each bucket due, 4 at a time."""

    __slots__ = ("cause", "due", "finished", "net", "on_done", "peer", "running")

    def __init__(
        self,
        net: Network,
        peer: SimPeer,
        cause: str,
        *,
        below: int = KEY_BITS,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        interval = net.cfg.dht.refresh_interval
        self.net = net
        self.peer = peer
        self.cause = cause
        self.on_done = on_done
        self.due = deque(i for i in peer.table.buckets_to_refresh(net.now, interval) if i < below)
        self.running = 0
        self.finished = False
        peer.refreshing = True
        for _ in range(_PARALLEL_LOOKUPS):
            self._next()
        self._finish()

    def _next(self) -> None:
        if not self.due:
            return
        key = self.peer.table.random_key_in_bucket(self.due.popleft(), self.net.rng)
        self.running += 1
        width = self.net.cfg.dht.alpha
        LookupRun(self.net, self.peer, key, self.cause, width=width, on_finish=self._one_done)

    def _one_done(self, run: LookupRun) -> None:
        self.running -= 1
        self._next()
        self._finish()

    def _finish(self) -> None:
        if self.running or self.due or self.finished:
            return
        self.finished = True
        self.peer.refreshing = False
        if self.on_done is not None:
            self.on_done()


class Network:
    """The simulated network: peers, the event queue, and the protocols' drivers."""

    def __init__(self, cfg: NetConfig) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.sizes = Sizes(cfg.gossip)
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = itertools.count()
        self.events = 0
        self.peers: list[SimPeer] = []
        self.by_id: dict[PeerId, SimPeer] = {}
        self.keys: dict[PeerId, int] = {}
        self.servers = LiveServers()
        self.bootstraps: list[SimPeer] = []
        self.counts: Counter[str] = Counter()
        self.tracked: dict[PeerId, Tracked] = {}
        self.live = 0
        self._live_since = 0.0
        self._peer_seconds = 0.0
        self._admitted: dict[float, float] = {}
        self.leave_rate = math.log(2) / cfg.session if cfg.session < INF else 0.0
        self.model_weights = [1 / (rank + 1) for rank in range(MODEL_CATALOG)]
        self.model_keys = [model_key(f"model-{rank}") for rank in range(MODEL_CATALOG)]
        self.advert_data = bytes(self.sizes.advert)
        self._serve = {
            "find_node": self.serve_find_node,
            "ping": self.serve_ping,
            "graft": self.serve_graft,
            "put": self.serve_put,
        }

    # --- the event queue -------------------------------------------------------------------------

    def at(self, when: float, fn: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self._queue, (when, next(self._seq), fn, args))

    def run_until(self, end: float) -> None:
        queue = self._queue
        pop = heapq.heappop
        while queue and queue[0][0] <= end:
            when, _, fn, args = pop(queue)
            self.now = when
            self.events += 1
            fn(*args)
        self.now = end

    def _next_tick(self, phase: float, period: float) -> float:
        """The first time after now on the grid phase + n * period."""
        tick = phase + (math.floor((self.now - phase) / period) + 1) * period
        return tick if tick > self.now + 1e-9 else tick + period  # rounding put it on now

    # --- peers coming and going ------------------------------------------------------------------

    def new_peer(self, *, server: bool) -> SimPeer:
        cfg = self.cfg
        rng = self.rng
        peer_id = _peer_id(rng.randbytes(32))
        key = key_int(peer_id.dht_key)
        peer = SimPeer(len(self.peers), peer_id, key, server, self)
        peer.region = rng.choices(range(len(REGION_WEIGHTS)), REGION_WEIGHTS)[0]
        peer.access = rng.uniform(0, ACCESS_DELAY)
        peer.hb_phase = rng.uniform(0, cfg.gossip.heartbeat)
        peer.ae_phase = rng.uniform(0, cfg.gossip.anti_entropy_interval)
        if rng.random() < cfg.providers:
            peer.provider = True
            ranks: set[int] = set()
            for _ in range(rng.choice((1, 1, 2, 2, 3))):
                ranks.add(rng.choices(range(MODEL_CATALOG), self.model_weights)[0])
            peer.models = tuple(self.model_keys[r] for r in sorted(ranks))
        self.peers.append(peer)
        self.by_id[peer_id] = peer
        self.keys[peer_id] = key
        self._count_live(+1)
        if server:
            self.servers.add(peer)
        return peer

    def _count_live(self, delta: int) -> None:
        self._peer_seconds += self.live * (self.now - self._live_since)
        self._live_since = self.now
        self.live += delta

    def peer_seconds(self) -> float:
        """Live peers integrated over time, so far."""
        return self._peer_seconds + self.live * (self.now - self._live_since)

    def start(self, peer: SimPeer) -> None:
        """Start a peer's periodic work: DHT maintenance, anti-entropy, heartbeats; and
        schedule its departure.
        """
        cfg = self.cfg
        self.at(self.now + self.rng.uniform(0, _MAINTENANCE_PERIOD), self._maintain, peer)
        ae = self._next_tick(peer.ae_phase, cfg.gossip.anti_entropy_interval)
        self.at(ae, self._anti_entropy, peer)
        if self.leave_rate and peer not in self.bootstraps:
            self.at(self.now + self.rng.expovariate(self.leave_rate), self.leave, peer)
        self.arm_heartbeat(peer)

    def join(self, peer: SimPeer) -> None:
        """`Peer._join`: bootstrap through two of the bootstrap peers, and again after a
        growing, jittered delay while no seed answers.
        """
        self.counts["joins"] += 1
        live = [b for b in self.bootstraps if b.alive and b is not peer]
        seeds = self.rng.sample(live, min(2, len(live)))
        if seeds:
            self._bootstrap(peer, seeds, self.cfg.bootstrap_backoff[0])
        else:
            self._joined(peer)

    def _bootstrap(self, peer: SimPeer, seeds: list[SimPeer], delay: float) -> None:
        """`Dht.bootstrap`: dial the seeds, look up our own key, refresh the buckets farther
        than the k peers found; `Peer._bootstrap_once` keeps the seeds if we are behind NAT.
        """
        reached: list[PeerId] = []
        waiting = len(seeds)

        def dialled(seed: SimPeer | None) -> None:
            nonlocal waiting
            waiting -= 1
            if seed is not None:
                reached.append(seed.peer_id)
            if waiting or not peer.alive:
                return
            if reached:
                own = peer.key.to_bytes(32, "big")
                width = self.cfg.dht.k
                LookupRun(
                    self,
                    peer,
                    own,
                    "join",
                    width=width,
                    extra_seeds=tuple(reached),
                    on_finish=found,
                )
            else:
                retry()

        def found(run: LookupRun) -> None:
            if not run.responders:
                retry()
                return
            if not peer.server and self.cfg.keep_bootstraps:  # hold on to what we dialled
                for seed in seeds:
                    if self.connected(peer, seed):
                        peer.conns[seed.peer_id] = seed.conns[peer.peer_id] = INF
            closest = run.lookup.result()
            if len(closest) < self.cfg.dht.k:  # we met everybody
                self._joined(peer)
                return
            below = KEY_BITS + 1 - (self.keys[closest[-1]] ^ peer.key).bit_length()
            Refresh(self, peer, "join", below=below, on_done=lambda: self._joined(peer))

        def retry() -> None:
            self.counts["join_retries"] += 1
            wait = delay * (0.5 + self.rng.random())
            longest = self.cfg.bootstrap_backoff[1]
            self.at(self.now + wait, self._bootstrap, peer, seeds, min(2 * delay, longest))

        for seed in seeds:
            self.connect(peer, seed, _Connect(dialled))

    def _joined(self, peer: SimPeer) -> None:
        self.counts["joined"] += 1
        peer.ready_at = self.now
        peer.first_refresh = self.now + self.cfg.dht.refresh_interval

    def churn_join(self) -> None:
        """A Poisson arrival: a new peer joins, and the next arrival is scheduled."""
        peer = self.new_peer(server=self.rng.random() >= self.cfg.nat)
        peer.cache_full = False
        self.start(peer)
        self.join(peer)
        self.at(self.now + self.rng.expovariate(self.leave_rate * self.cfg.peers), self.churn_join)

    def leave(self, peer: SimPeer) -> None:
        """`peer` goes away without a word."""
        if not peer.alive:
            return
        peer.left_at = self.now
        self._count_live(-1)
        self.counts["leaves"] += 1
        if peer.server:
            self.servers.remove(peer)
        # Its mesh peers notice when their next push fails, or an idle keep-alive ping does.
        rate = self.link_rate(peer)
        for member in peer.members:
            gap = min(
                self.rng.expovariate(rate) if rate else INF,
                self.rng.uniform(0, self.cfg.idle_timeout / 3),
            )
            when = self.now + gap + self.cfg.gossip.rpc_timeout
            self.at(when, self._link_lost, self.by_id[member], peer)
        peer.members.clear()
        peer.conns.clear()
        peer.inbound.clear()
        peer.adverts.clear()

    def _link_lost(self, peer: SimPeer, gone: SimPeer) -> None:
        if peer.alive and gone.peer_id in peer.members:
            self.remove_member(peer, gone.peer_id)  # `Gossip._on_disconnected`
        peer.conns.pop(gone.peer_id, None)

    # --- latency and connections -----------------------------------------------------------------

    def rtt(self, a: SimPeer, b: SimPeer) -> float:
        # A fixed draw per pair: a multiplicative hash of the pair, the same both ways.
        pair = ((a.index * b.index + a.index + b.index + self.cfg.seed) * 0x9E3779B1 >> 7) % 65_536
        pair /= 65_536
        if self.cfg.latency == "uniform":
            return 0.020 + 0.180 * pair
        rtt = REGION_RTT[a.region][b.region] + a.access + b.access + PAIR_JITTER * pair
        return min(0.300, max(0.020, rtt))

    def delay(self, a: SimPeer, b: SimPeer) -> float:
        """One-way delay of one message from a to b."""
        one_way = self.rtt(a, b) / 2
        if self.cfg.loss and self.rng.random() < self.cfg.loss:
            self.counts["retransmits"] += 1
            return one_way + max(0.2, 3 * one_way)
        return one_way

    def connected(self, a: SimPeer, b: SimPeer) -> bool:
        if b.left_at != INF or a.left_at != INF:
            return False
        if b.peer_id in a.members or a.peer_id in b.members:  # kept alive
            return True
        used = a.conns.get(b.peer_id)
        return used is not None and self.now - used < self.cfg.idle_timeout

    def _use(self, a: SimPeer, b: SimPeer) -> None:
        if a.conns.get(b.peer_id) != INF:
            a.conns[b.peer_id] = self.now
        if b.conns.get(a.peer_id) != INF:
            b.conns[a.peer_id] = self.now

    def open_connection(self, a: SimPeer, b: SimPeer, cause: str) -> float | None:
        """Seconds before `a` can send to `b`: 0 over an open connection, a dial otherwise;
        None if `b` cannot be dialled (behind NAT, with no connection it opened).
        """
        if self.connected(a, b):
            self._use(a, b)
            return 0.0
        if not b.server or self._inbound_full(b):
            return None
        setup = self.cfg.dial_rtts * self.rtt(a, b)
        b.inbound[a.peer_id] = self.now + setup
        self.at(self.now + setup, self._established, a, b, cause)
        return setup

    def _inbound_full(self, peer: SimPeer) -> bool:
        """`Host._handle_inbound`'s limit: at `max_inbound` connections dialled by others
        (open or opening), a new one is refused.
        """
        inbound = peer.inbound
        if len(inbound) < self.cfg.max_inbound:
            return False
        by_id, now = self.by_id, self.now
        for other in [p for p, at in inbound.items() if at <= now]:
            if not self.connected(peer, by_id[other]):
                del inbound[other]
        if len(inbound) < self.cfg.max_inbound:
            return False
        self.counts["refused"] += 1
        return True

    def accepts_inbound(self, peer: SimPeer) -> bool:
        """Whether `peer` would take a new connection now."""
        before = self.counts["refused"]
        full = self._inbound_full(peer)
        self.counts["refused"] = before
        return not full

    def _established(self, a: SimPeer, b: SimPeer, cause: str) -> None:
        if not (a.alive and b.alive):
            return
        if self.connected(a, b):  # another dial got there first
            self._use(a, b)
            return
        self._use(a, b)
        self.counts["conn:" + cause] += 1
        self.identified(a, b, cause, outbound=True)
        self.identified(b, a, cause, outbound=False)

    def identified(self, peer: SimPeer, other: SimPeer, cause: str, *, outbound: bool) -> None:
        """The Host's identify listeners: `Dht._on_identified`, `Gossip._on_identified`."""
        now = self.now
        if other.server:
            result = peer.table.add(other.peer_id, now)
            full = result.status is AddStatus.FULL and self.cfg.eviction_ping
            if full and result.bucket not in peer.pinging:
                assert result.oldest is not None
                peer.pinging.add(result.bucket)
                ping = _Ping(self, peer, result.bucket, other.peer_id)
                self.request(peer, self.by_id[result.oldest], "ping", None, ping)
        if outbound:
            self.sync(peer, other, cause)
        if peer.mesh.wants(other.peer_id, peer.members, now):
            peer.mesh.pending.add(other.peer_id)
            self.request(peer, other, "graft", None, _Graft(self, peer))

    def connect(self, src: SimPeer, dst: SimPeer, caller: Caller) -> None:
        """`Host.connect`: a dial and nothing more."""
        if not dst.alive:
            self.at(self.now + self.cfg.dht.rpc_timeout, caller.on_fail, dst)
            return
        setup = self.open_connection(src, dst, caller.cause)
        if setup is None:
            self.at(self.now, caller.on_fail, dst)
        else:
            self.at(self.now + setup, caller.on_reply, dst, None)

    # --- requests --------------------------------------------------------------------------------

    def request(self, src: SimPeer, dst: SimPeer, kind: str, arg: Any, caller: Caller) -> None:
        """A request of `kind` and its answer within `rpc_timeout`, over a connection dialled if
        needed: the `kind` server runs at `dst` when the request arrives, then
        `caller.on_reply(dst, answer)` at `src`, or `caller.on_fail(dst)` at the timeout.
        """
        timeout = self.cfg.dht.rpc_timeout
        if not dst.alive:
            self.at(self.now + timeout, caller.on_fail, dst)
            return
        setup = self.open_connection(src, dst, caller.cause)
        if setup is None:
            self.at(self.now, caller.on_fail, dst)
            return
        when = self.now + setup + self.delay(src, dst)
        self.at(when, self._arrive, src, dst, kind, arg, caller, self.now)

    def _arrive(
        self, src: SimPeer, dst: SimPeer, kind: str, arg: Any, caller: Caller, start: float
    ) -> None:
        deadline = start + self.cfg.dht.rpc_timeout
        if not dst.alive:
            self.at(deadline, caller.on_fail, dst)
            return
        counts = self.counts
        counts[f"rpc:{kind}:{caller.cause}"] += 1
        counts[f"rpc_bytes:{kind}:{caller.cause}"] += self.sizes.rpc[kind]
        answer = self._serve[kind](dst, src, arg)
        back = self.now + self.delay(dst, src)
        if back > deadline:
            self.at(deadline, caller.on_fail, dst)
        else:
            self.at(back, self._answer, src, dst, caller, answer)

    def _answer(self, src: SimPeer, dst: SimPeer, caller: Caller, answer: Any) -> None:
        if src.alive:
            caller.on_reply(dst, answer)

    def serve_find_node(self, peer: SimPeer, requester: SimPeer, key: bytes) -> list[PeerId]:
        """`Dht._handle` of FIND_NODE."""
        table = peer.table
        table.touch(requester.peer_id, self.now)
        k = self.cfg.dht.k
        return [p for p in table.closest(key, k + 1) if p != requester.peer_id][:k]

    def serve_ping(self, peer: SimPeer, requester: SimPeer, _: object) -> bool:
        return True

    def serve_graft(self, peer: SimPeer, requester: SimPeer, _: object) -> bool:
        """`Gossip._handle_stream` of GRAFT."""
        joined = peer.mesh.accepts_graft(requester.peer_id, peer.members, self.now)
        if joined:
            self.add_member(peer, requester)
        return joined

    def serve_put(self, peer: SimPeer, requester: SimPeer, item: tuple[bytes, SimRecord]) -> bool:
        """`Dht._handle` of PUT_VALUE."""
        return self.store(peer, *item)

    def store(self, peer: SimPeer, key: bytes, record: SimRecord) -> bool:
        if peer.store is None:
            dht = self.cfg.dht
            peer.store = RecordStore(
                max_record_size=dht.max_record_size,
                max_per_publisher=dht.max_per_publisher,
                max_records=dht.max_records,
                max_values_per_key=dht.max_values_per_key,
            )
        try:
            return peer.store.put(key, record, self.now)  # type: ignore[arg-type]
        except (RecordError, ResourceLimitExceeded):
            self.counts["store_refused"] += 1
            return False

    # --- DHT upkeep ------------------------------------------------------------------------------

    def _maintain(self, peer: SimPeer) -> None:
        """`Dht._maintain`, and the expiry sweeps of the gossip heartbeat and the Host."""
        if not peer.alive:
            return
        now = self.now
        if peer.store is not None:
            peer.store.expire(now)
        peer.seen.expire(now)
        idle = [p for p, used in peer.conns.items() if now - used >= self.cfg.idle_timeout]
        for p in idle:
            del peer.conns[p]
        if now >= peer.first_refresh and not peer.refreshing:
            Refresh(self, peer, "refresh")
        self.at(now + _MAINTENANCE_PERIOD, self._maintain, peer)

    def put(self, peer: SimPeer, record: SimRecord) -> None:
        """`Dht.put`: under each key, a lookup, then a PUT_VALUE to each of the k closest."""

        def stored(run: LookupRun) -> None:
            if peer.server:
                self.store(peer, run.key, record)
            for holder in run.lookup.result():
                self.request(peer, self.by_id[holder], "put", (run.key, record), _Put())

        for key in record.keys:  # 1-3 keys: under the limit of lookups run at once
            LookupRun(self, peer, key, "put", width=self.cfg.dht.k, on_finish=stored)

    # --- the gossip mesh -------------------------------------------------------------------------

    def add_member(self, peer: SimPeer, other: SimPeer) -> None:
        if other.peer_id not in peer.members and other.alive:
            peer.members[other.peer_id] = None
            self.arm_heartbeat(peer)

    def remove_member(self, peer: SimPeer, other: PeerId, *, backoff: bool = False) -> None:
        """`Gossip._remove_from_mesh`."""
        if backoff:
            peer.mesh.backoff(other, self.now)
        if peer.members.pop(other, INF) is None:
            if other in peer.conns:
                peer.conns[other] = self.now  # no longer kept alive: it idles out
            self.arm_heartbeat(peer)

    def arm_heartbeat(self, peer: SimPeer) -> None:
        """Schedule the next heartbeat if it has work: one of a mesh within [degree_low,
        degree_high] does nothing, so it is not run.
        """
        if peer.hb_due or not peer.alive:
            return
        size = len(peer.members)
        config = self.cfg.gossip
        if size + len(peer.mesh.pending) < config.degree_low or size > config.degree_high:
            peer.hb_due = True
            self.at(self._next_tick(peer.hb_phase, config.heartbeat), self._heartbeat, peer)

    def _heartbeat(self, peer: SimPeer) -> None:
        """`Gossip._heartbeat`."""
        peer.hb_due = False
        if not peer.alive:
            return
        now = self.now
        graft, prune = peer.mesh.heartbeat(peer.members, self._candidates(peer), now, self.rng)
        for other in graft:
            self.request(peer, self.by_id[other], "graft", None, _Graft(self, peer))
        for other in prune:
            self.remove_member(peer, other, backoff=True)
            target = self.by_id[other]
            self.counts["prunes"] += 1
            if target.alive:
                self.at(now + self.delay(peer, target), self._pruned, target, peer)
        self.arm_heartbeat(peer)

    def _pruned(self, peer: SimPeer, by: SimPeer) -> None:
        if peer.alive:
            self.remove_member(peer, by.peer_id, backoff=True)

    def _candidates(self, peer: SimPeer) -> Iterator[PeerId]:
        """`Gossip._candidates`: connected peers, then known ones (the routing table's), each
        group shuffled.
        """
        by_id = self.by_id
        connected = [p for p in peer.conns if self.connected(peer, by_id[p])]
        self.rng.shuffle(connected)
        yield from connected
        known = [p for p in peer.table if p not in peer.conns]
        self.rng.shuffle(known)
        yield from known

    # --- adverts ---------------------------------------------------------------------------------

    def advert_rate(self) -> float:
        """Background adverts published per second in the whole network."""
        return self.live * self.cfg.providers / self.cfg.advert_interval

    def link_rate(self, peer: SimPeer) -> float:
        """Background adverts `peer` pushes to each mesh peer per second: all but those that
        came from that peer.
        """
        degree = max(1, len(peer.members))
        return self.advert_rate() * (degree - 1) / degree

    def admitted(self, rate: float) -> float:
        """The share of pushes a receiver's `PushBudget` lets through from a sender pushing
        `rate` adverts a second (Poisson): measured on a real PushBudget.
        """
        config = self.cfg.gossip
        if rate < 0.5 * config.push_rate:
            return 1.0
        rate = float(f"{rate:.2g}")
        share = self._admitted.get(rate)
        if share is None:
            budget = PushBudget(config.push_rate, config.push_burst)
            rng = random.Random(1)
            sender = _peer_id(bytes(32))
            warm = 5 * config.push_burst / max(rate - config.push_rate, 1.0)
            t = 0.0
            granted = total = 0
            while t < warm + 60:
                t += rng.expovariate(rate)
                got = budget.take(sender, 1, t)
                if t > warm:
                    granted += got
                    total += 1
            share = self._admitted[rate] = granted / total
        return share

    def publish(self, peer: SimPeer, window: Window) -> None:
        """`Peer.publish_advert` of a tracked advert: `Gossip.publish`, then `Dht.put`."""
        cfg = self.cfg
        seq = 2 if peer.provider else 1  # a provider's background advert is seq 1
        advert = Tracked(
            peer,
            seq,
            self.now,
            self.now + cfg.advert_ttl,
            (peer.peer_id, seq),
            array("d", [INF]) * len(self.peers),
        )
        self.tracked[peer.peer_id] = advert
        window.adverts.append(advert)
        peer.adverts[peer.peer_id] = seq
        self.forward(peer, advert, None)
        members = peer.members
        if len(members) < cfg.gossip.degree_low:
            by_id = self.by_id
            others = [p for p in peer.conns if p not in members and self.connected(peer, by_id[p])]
            count = min(cfg.gossip.degree - len(members), len(others))
            for other in self.rng.sample(others, count):
                self.push(peer, by_id[other], advert)
        keys = peer.models or (model_key(f"model-of-{peer.index}"),)
        self.put(peer, SimRecord(peer.peer_id, seq, advert.expires_at, keys, self.advert_data))

    def forward(self, peer: SimPeer, advert: Tracked, source: PeerId | None) -> None:
        """`Gossip._forward`: push a new advert to every mesh peer but its source, once."""
        if not peer.seen.add(advert.seen_key, advert.expires_at):
            return
        publisher = advert.publisher.peer_id
        by_id = self.by_id
        for member in peer.members:
            if member != source and member != publisher:
                self.push(peer, by_id[member], advert)

    def push(self, peer: SimPeer, other: SimPeer, advert: Tracked) -> None:
        self.counts["pushes"] += 1
        advert.pushes += 1
        if not other.alive:
            self.counts["push_failed"] += 1
            self.at(self.now + self.cfg.gossip.rpc_timeout, self._push_failed, peer, other)
            return
        arrive = self.now + self.delay(peer, other) + self.cfg.verify_cost
        if self.rng.random() >= self.admitted(self.link_rate(peer)):
            self.counts["rate_limited"] += 1
            return
        self.at(arrive, self.receive, other, peer.peer_id, advert)

    def _push_failed(self, peer: SimPeer, other: SimPeer) -> None:
        if peer.alive and other.peer_id in peer.members:
            self.remove_member(peer, other.peer_id, backoff=True)

    def receive(self, peer: SimPeer, source: PeerId, advert: Tracked) -> None:
        """`Gossip._receive` of one advert: into the cache, and forwarded if new."""
        if peer.left_at != INF:
            return
        publisher = advert.publisher.peer_id
        held = peer.adverts.get(publisher)
        if (held is not None and held >= advert.seq) or self.now >= advert.expires_at:
            return
        peer.adverts[publisher] = advert.seq
        if peer.index < len(advert.arrivals):
            advert.arrivals[peer.index] = self.now
        self.forward(peer, advert, source)

    def _anti_entropy(self, peer: SimPeer) -> None:
        """`Gossip._anti_entropy_loop`: a digest exchange with a random mesh peer."""
        if not peer.alive:
            return
        by_id = self.by_id
        peers = sorted(peer.members) or sorted(
            p for p in peer.conns if self.connected(peer, by_id[p])
        )
        if peers:
            self.sync(peer, by_id[self.rng.choice(peers)], "anti-entropy")
        self.at(self.now + self.cfg.gossip.anti_entropy_interval, self._anti_entropy, peer)

    def sync(self, asker: SimPeer, answerer: SimPeer, cause: str) -> None:
        """A digest exchange: counted, and carrying the tracked adverts as events."""
        same = asker.adverts == answerer.adverts and asker.cache_full == answerer.cache_full
        if same and not self.cfg.providers:
            return  # identify's digest hash says the caches match
        self.counts["sync:" + cause] += 1
        if asker.cache_full != answerer.cache_full:
            self.counts["sync_full:" + cause] += 1
            asker.cache_full = answerer.cache_full = True
        if not same:
            when = self.now + self.delay(asker, answerer)
            self.at(when, self._sync_answer, asker, answerer, dict(asker.adverts))

    def _sync_answer(self, asker: SimPeer, answerer: SimPeer, theirs: dict[PeerId, int]) -> None:
        if not answerer.alive:
            return
        ours = answerer.adverts
        give = [p for p, seq in ours.items() if theirs.get(p, -1) < seq]
        want = [p for p, seq in theirs.items() if ours.get(p, -1) < seq]
        if give or want:
            when = self.now + self.delay(answerer, asker)
            self.at(when, self._sync_give, asker, answerer, give, want)

    def _sync_give(
        self, asker: SimPeer, answerer: SimPeer, give: list[PeerId], want: list[PeerId]
    ) -> None:
        if not asker.alive:
            return
        for publisher in give:
            self.receive(asker, answerer.peer_id, self.tracked[publisher])
        if want:
            self.at(self.now + self.delay(asker, answerer), self._sync_take, answerer, asker, want)

    def _sync_take(self, answerer: SimPeer, asker: SimPeer, want: list[PeerId]) -> None:
        for publisher in want:
            self.receive(answerer, asker.peer_id, self.tracked[publisher])

    # --- building the network --------------------------------------------------------------------

    def build_steady(self) -> None:
        """Start in steady state: tables as long-lived peers', adverts stored, the mesh
        grafted.
        """
        cfg = self.cfg
        for _ in range(BOOTSTRAPS):
            self.bootstraps.append(self.new_peer(server=True))
        for _ in range(cfg.peers - BOOTSTRAPS):
            self.new_peer(server=self.rng.random() >= cfg.nat)
        for peer in self.peers:
            self.fill_table(peer)
            peer.ready_at = peer.first_refresh = -INF  # up for a while
            if not peer.server and cfg.keep_bootstraps:  # it keeps its two bootstrap peers
                for seed in self.rng.sample(self.bootstraps, 2):
                    if len(seed.inbound) < cfg.max_inbound:  # else it was refused
                        seed.inbound[peer.peer_id] = -INF
                        peer.conns[seed.peer_id] = seed.conns[peer.peer_id] = INF
        self.fill_stores()
        self.fill_mesh()
        for peer in self.peers:
            self.start(peer)

    def fill_table(self, peer: SimPeer) -> None:
        """Up to k random live servers in each bucket, refreshed at one random moment of the
        last refresh interval.
        """
        table = peer.table
        servers = self.servers
        k = self.cfg.dht.k
        last = 0
        for index, lo, hi in servers.buckets(peer.key, server=peer.server):
            if hi > lo:
                last = index
                for i in self.rng.sample(range(lo, hi), min(k, hi - lo)):
                    table.add(servers.peers[i].peer_id, 0.0)
        ticks = int(self.cfg.dht.refresh_interval // _MAINTENANCE_PERIOD)
        refreshed = -_MAINTENANCE_PERIOD * (self.rng.randrange(ticks) + self.rng.random())
        for index in range(last + 1):
            table.mark_refreshed(table.random_key_in_bucket(index, self.rng), refreshed)

    def fill_mesh(self) -> None:
        """The mesh as grafting leaves it: each peer in turn grafts up to `degree` peers —
        those it keeps connections to first, then those in its table — that accept
        (`MeshState.accepts_graft`) and have room for one more inbound connection.
        """
        degree = self.cfg.gossip.degree
        order = self.peers[:]
        self.rng.shuffle(order)
        for peer in order:
            members = peer.members
            if len(members) >= degree:
                continue
            kept = list(peer.conns)
            self.rng.shuffle(kept)
            known = list(peer.table)
            for other_id in itertools.chain(kept, self._shuffled(known, 3 * degree)):
                other = self.by_id[other_id]
                if other_id in members or not other.mesh.accepts_graft(
                    peer.peer_id, other.members, self.now
                ):
                    continue
                if other_id not in peer.conns:  # a dial
                    if len(other.inbound) >= self.cfg.max_inbound:
                        continue
                    other.inbound[peer.peer_id] = -INF
                members[other_id] = None
                other.members[peer.peer_id] = None
                if len(members) >= degree:
                    break

    def _shuffled(self, items: list[PeerId], first: int) -> Iterator[PeerId]:
        """`items` in random order, drawing `first` of them before shuffling the rest."""
        head = self.rng.sample(items, min(len(items), first))
        yield from head
        if len(head) < len(items):
            taken = set(head)
            yield from (p for p in self.rng.sample(items, len(items)) if p not in taken)

    def fill_stores(self) -> None:
        """Each provider's advert under each of its models on the k closest servers, as
        `Dht.put` leaves it.
        """
        ttl = self.cfg.advert_ttl
        for peer in self.peers:
            if peer.alive and peer.provider:
                record = SimRecord(peer.peer_id, 1, self.now + ttl, peer.models, self.advert_data)
                for key in peer.models:
                    for holder in self.servers.closest(key_int(key), self.cfg.dht.k):
                        self.store(holder, key, record)

    def build_by_joining(self) -> None:
        """Peers join one by one through the real join, as in dht_sim.py."""
        cfg = self.cfg
        for i in range(cfg.peers):
            self.run_until(i * cfg.join_interval)
            if i < BOOTSTRAPS:
                peer = self.new_peer(server=True)
                self.bootstraps.append(peer)
            else:
                peer = self.new_peer(server=self.rng.random() >= cfg.nat)
            peer.cache_full = i == 0
            self.start(peer)
            self.join(peer)

    # --- measuring -------------------------------------------------------------------------------

    def measure(self, name: str, duration: float, lookups: int, adverts: int) -> Window:
        """Run `duration` seconds with lookups in the first half and tracked adverts in the
        first third, at random moments; then until the lookups are done.
        """
        window = Window(name, self.now)
        start = self.now
        rng = self.rng
        for _ in range(lookups):
            self.at(start + rng.uniform(0, duration / 2), self._measured_lookup, window)
        for _ in range(adverts):
            self.at(start + rng.uniform(0, duration / 3), self._tracked_advert, window)
        before = Counter(self.counts)
        seconds_before = self.peer_seconds()
        self.run_until(start + duration)
        while any(not r.done and r.source.alive for r in window.runs):
            self.run_until(self.now + 1)
        window.end = self.now
        window.counts = dict(self.counts - before)
        window.peer_seconds = self.peer_seconds() - seconds_before
        return window

    def _random_joined(self, peers: list[SimPeer]) -> SimPeer:
        while True:
            peer = self.rng.choice(peers)
            if peer.alive and peer.joined:
                return peer

    def _measured_lookup(self, window: Window) -> None:
        """A lookup from a random peer for a random key or a live server's key; it succeeds if
        it finds every one of the true k closest servers that are up and take connections at
        its end and had joined at its start.
        """
        source = self._random_joined(self.peers)
        owner = None
        if self.rng.random() < 0.5:
            owner = self._random_joined(self.servers.peers)
            target = owner.key.to_bytes(32, "big")
        else:
            target = self.rng.randbytes(32)

        def done(run: LookupRun) -> None:
            window.hops.append(run.lookup.hops)
            window.times.append(self.now - run.start)
            result = [self.by_id[p] for p in run.lookup.result()]
            found = {source, *result}  # a lookup never returns its own peer
            # Peers still joining, and those that answered and left, may hold one of the k
            # places, but need not be found.
            gone = [p for p in result if not p.alive]
            true = heapq.nsmallest(
                self.cfg.dht.k,
                self.servers.closest(run.target, self.cfg.dht.k) + gone,
                key=lambda p: p.key ^ run.target,
            )
            # Peers at their inbound limit cannot be reached: they are out of the DHT.
            window.exact.append(
                all(
                    p in found
                    for p in true
                    if p.alive and p.ready_at <= run.start and self.accepts_inbound(p)
                )
            )
            if owner is not None and owner.alive and self.accepts_inbound(owner):
                window.owners.append(owner in found)

        run = LookupRun(self, source, target, "lookup", width=self.cfg.dht.k, on_finish=done)
        window.runs.append(run)

    def _tracked_advert(self, window: Window) -> None:
        """A provider (any peer, in a network without load) publishes a tracked advert."""
        publishers = [
            p
            for p in self.peers
            if p.alive
            and p.joined
            and (p.provider or not self.cfg.providers)
            and p.peer_id not in self.tracked
        ]
        if publishers:
            self.publish(self.rng.choice(publishers), window)


# --- figures --------------------------------------------------------------------------------------


def propagation(net: Network, advert: Tracked, horizon: float) -> tuple[float, float, float]:
    """(time to 50 %, time to 99 %, share reached within `horizon`) of the peers up from
    publication to `horizon`, publisher excepted; INF when never reached.
    """
    end = advert.published_at + horizon
    last = min(end, net.now)
    times = []
    for index, arrived in enumerate(advert.arrivals):
        peer = net.peers[index]
        if peer is not advert.publisher and peer.left_at > last:
            times.append(arrived - advert.published_at)
    if not times:
        return INF, INF, 1.0
    times.sort()
    reached = bisect.bisect_right(times, horizon) / len(times)
    return times[math.ceil(0.5 * len(times)) - 1], times[math.ceil(0.99 * len(times)) - 1], reached


def window_figures(net: Network, window: Window) -> dict[str, float]:
    """Lookups, advert propagation and traffic per peer of one window."""
    cfg = net.cfg
    sizes = net.sizes
    figures: dict[str, float] = {}
    if window.hops:
        figures["hops_p50"] = percentile(window.hops, 0.5)
        figures["hops_p95"] = percentile(window.hops, 0.95)
        figures["hops_mean"] = round(sum(window.hops) / len(window.hops), 3)
        figures["lookup_success"] = round(sum(window.exact) / len(window.exact), 4)
        if window.owners:
            figures["lookup_owner_found"] = round(sum(window.owners) / len(window.owners), 4)
        figures["lookup_ms_p50"] = round(percentile(window.times, 0.5) * 1000, 1)
        figures["lookup_ms_p95"] = round(percentile(window.times, 0.95) * 1000, 1)
        figures["lookups"] = len(window.hops)
    seconds = window.end - window.start
    live = window.peer_seconds / seconds
    c = Counter(window.counts)
    tracked = len(window.adverts)
    # The tracked adverts' puts stand for every advert published in the window.
    scale = net.advert_rate() * seconds / tracked if tracked else 0.0

    def background(prefix: str, suffix: str = "") -> float:
        own = sum(c[f"{prefix}{cause}{suffix}"] for cause in BACKGROUND)
        return own + scale * c[f"{prefix}put{suffix}"]

    if window.adverts:
        horizon = min(60.0, window.end - max(a.published_at for a in window.adverts))
        rows = [propagation(net, a, horizon) for a in window.adverts]
        p99 = [r[1] for r in rows]
        figures["propagation_ms_p99"] = round(min(max(p99), horizon) * 1000, 1)
        figures["propagation_ms_p99_median"] = round(min(percentile(p99, 0.5), horizon) * 1000, 1)
        figures["propagation_ms_p99_mean"] = round(
            sum(min(t, horizon) for t in p99) / len(p99) * 1000, 1
        )
        figures["propagation_ms_p50"] = round(percentile([r[0] for r in rows], 0.5) * 1000, 1)
        figures["advert_reach"] = round(min(r[2] for r in rows), 4)
        pushes = sum(a.pushes for a in window.adverts) / tracked
        figures["msgs_per_peer_per_advert"] = round(pushes / live, 2)
        figures["push_share_admitted"] = round(1 - c["rate_limited"] / max(1, c["pushes"]), 4)
    else:
        pushes = 0.0
    providers = live * cfg.providers
    push_msgs = net.advert_rate() * seconds * pushes
    digest = sizes.digest_entry * min(providers, sizes.max_digest_entries)
    syncs = background("sync:")
    sync_bytes = syncs * (digest + 2 * sizes.message)
    sync_bytes += background("sync_full:") * providers * (sizes.advert + 5)
    grafts = c["rpc:graft:graft"]
    control = c["rpc_bytes:graft:graft"] + c["prunes"] * sizes.message
    per_peer = window.peer_seconds
    figures["gossip_msgs_per_peer_s"] = round(
        (push_msgs + 3 * syncs + 2 * grafts + c["prunes"]) / per_peer, 2
    )
    figures["gossip_push_bytes_per_peer_s"] = round(push_msgs * sizes.push / per_peer)
    figures["gossip_sync_bytes_per_peer_s"] = round(sync_bytes / per_peer)
    on_connect = (syncs - c["sync:anti-entropy"]) / syncs if syncs else 0.0
    figures["gossip_sync_on_connect_share"] = round(on_connect, 3)
    figures["gossip_bytes_per_peer_s"] = round(
        (push_msgs * sizes.push + sync_bytes + control) / per_peer
    )
    dht_rpcs = sum(background(f"rpc:{kind}:") for kind in ("find_node", "ping", "put"))
    dht_bytes = sum(background(f"rpc_bytes:{kind}:") for kind in ("find_node", "ping", "put"))
    figures["dht_rpcs_per_peer_s"] = round(dht_rpcs / per_peer, 3)
    figures["dht_bytes_per_peer_s"] = round(dht_bytes / per_peer)
    figures["connections_per_peer_min"] = round(60 * background("conn:") / per_peer, 2)
    figures["grafts_per_peer_min"] = round(60 * grafts / per_peer, 2)
    return figures


def network_figures(net: Network) -> dict[str, float]:
    """Routing tables, mesh and stores of the live peers, now."""
    cfg = net.cfg
    live = [p for p in net.peers if p.alive]
    sample = net.rng.sample(live, min(1000, len(live)))
    sizes, live_share, fill = [], [], []
    for peer in sample:
        entries = list(peer.table)
        sizes.append(len(entries))
        alive = sum(net.by_id[p].alive for p in entries)
        live_share.append(alive / len(entries) if entries else 1.0)
        ideal = sum(
            min(cfg.dht.k, hi - lo)
            for _, lo, hi in net.servers.buckets(peer.key, server=peer.server)
        )
        fill.append(alive / ideal if ideal else 1.0)
    degrees = [len(p.members) for p in live]
    nat_degrees = [len(p.members) for p in live if not p.server] or [0]
    records = [len(p.store) if p.store is not None else 0 for p in live if p.server]
    return {
        "table_size_mean": round(sum(sizes) / len(sizes), 1),
        "table_live": round(sum(live_share) / len(live_share), 4),
        "table_fill": round(sum(fill) / len(fill), 4),
        "mesh_degree_mean": round(sum(degrees) / len(degrees), 2),
        "mesh_degree_nat_mean": round(sum(nat_degrees) / len(nat_degrees), 2),
        "mesh_below_low": round(sum(d < cfg.gossip.degree_low for d in degrees) / len(degrees), 4),
        "store_records_mean": round(sum(records) / max(1, len(records)), 2),
        "store_records_max": max(records, default=0),
    }


def run(cfg: NetConfig) -> dict[str, float]:
    """Build the network, measure a steady window, make peers leave, measure again."""
    wall_start = time.perf_counter()
    net = Network(cfg)
    results: dict[str, float] = {"peers": cfg.peers}
    with simulated_keys_and_signatures(net.keys):
        if cfg.join == "protocol":
            net.build_by_joining()
            while net.now < 3600 and not all(p.joined for p in net.peers if p.alive):
                net.run_until(net.now + 1)
            net.run_until(net.now + 30)  # let the last joins and the mesh settle
        else:
            net.build_steady()
            net.run_until(5)  # heartbeats top up the meshes still short
        gc.freeze()  # the network is long-lived: spare it from every collection
        results["build_wall_s"] = round(time.perf_counter() - wall_start, 1)
        print(f"{cfg.peers} peers built in {results['build_wall_s']} s", file=sys.stderr)
        if net.leave_rate:
            net.at(net.now + net.rng.expovariate(net.leave_rate * cfg.peers), net.churn_join)
        if cfg.warmup:
            net.run_until(net.now + cfg.warmup)
        results["servers"] = len(net.servers.keys)
        results.update(network_figures(net))
        results["store_refused"] = net.counts["store_refused"]
        adverts = cfg.adverts or max(6, min(20, 800_000 // cfg.peers))
        steady = net.measure("steady", cfg.duration, cfg.lookups, adverts)
        results.update(window_figures(net, steady))
        wall = time.perf_counter() - wall_start
        print(f"steady window measured at {wall:.1f} s", file=sys.stderr)
        if cfg.leave > 0:
            candidates = [p for p in net.peers if p.alive and p not in net.bootstraps]
            for peer in net.rng.sample(candidates, int(cfg.leave * net.live)):
                net.leave(peer)
            after = net.measure("after", cfg.after, cfg.lookups // 2, max(1, adverts // 2))
            figures = {**window_figures(net, after), **network_figures(net)}
            for name, value in figures.items():
                if not name.startswith("store"):
                    results[f"after_leave_{name}"] = value
    results["joins"] = net.counts["joins"]
    results["joins_completed"] = net.counts["joined"]
    results["bootstraps_full"] = sum(not net.accepts_inbound(b) for b in net.bootstraps)
    results["leaves"] = net.counts["leaves"]
    results["events"] = net.events
    results["simulated_s"] = round(net.now, 1)
    results["wall_s"] = round(time.perf_counter() - wall_start, 1)
    results["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return results


PROFILES: dict[str, dict[str, Any]] = {
    # dht_sim.py's network: real joins every 50 ms, no NAT, no loss, no churn, no load, RTTs
    # uniform in 20-200 ms, the in-memory transport's dial (two round trips), 20 % killed.
    "dht-sim": {
        "latency": "uniform",
        "nat": 0.0,
        "loss": 0.0,
        "session": INF,
        "providers": 0.0,
        "join": "protocol",
        "dial_rtts": 2.0,
        "verify_cost": 0.0,
        "idle_timeout": 600.0,
        "lookups": 200,
        "adverts": 5,
        "leave": 0.2,
        "duration": 330.0,
        "after": 60.0,
    },
}

_NETWORK_OPTIONS = (
    "peers",
    "nat",
    "loss",
    "session",
    "providers",
    "latency",
    "dial_rtts",
    "join",
    "join_interval",
    "warmup",
    "duration",
    "after",
    "leave",
    "lookups",
    "adverts",
    "seed",
    "advert_interval",
    "eviction_ping",
    "keep_bootstraps",
)


def parse_config(argv: list[str] | None) -> tuple[NetConfig, bool]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--profile", choices=sorted(PROFILES), help="start from a preset")
    add("--peers", type=int, help="peers at the start (default 1000)")
    add("--nat", type=float, help="share of peers behind NAT (default 0.4)")
    add("--loss", type=float, help="share of messages retransmitted (default 0.01)")
    add("--session", type=float, help="median session, seconds (default 3600; inf: no churn)")
    add("--providers", type=float, help="share of peers that are providers (default 0.2)")
    add("--latency", choices=("regions", "uniform"), help="RTT model (default regions)")
    add("--dial-rtts", type=float, help="round trips before a new connection's first request")
    add("--verify-ms", type=float, help="simulated cost of one signature check (default 0.2)")
    add("--join", choices=("oracle", "protocol"), help="how the network is built")
    add("--join-interval", type=float, help="seconds between joins with --join protocol")
    add("--warmup", type=float, help="seconds of churn before measuring (default 0)")
    add("--duration", type=float, help="steady window, seconds (default 30)")
    add("--after", type=float, help="window after the mass departure, seconds (default 30)")
    add("--leave", type=float, help="share of peers leaving at once (default 0.3)")
    add("--lookups", type=int, help="lookups in the steady window (half as many after)")
    add(
        "--adverts",
        type=int,
        help="tracked adverts in the steady window, half as many after (default 20; 8 at 100,000)",
    )
    add("--seed", type=int, help="random seed (default 1)")
    # What the issue names for tuning, and what those choices touch; defaults: the runtime's.
    add("--degree", type=int, help="gossip mesh degree (low = degree - 1, high = degree + 1)")
    add("--degree-low", type=int, help="mesh size below which a peer grafts")
    add("--degree-high", type=int, help="mesh size above which a peer prunes")
    add("--anti-entropy", type=float, help="seconds between digest exchanges")
    add("--push-rate", type=float, help="adverts a peer may push to us per second")
    add("--advert-interval", type=float, help="seconds between a provider's adverts")
    add("--alpha", type=int, help="parallel queries of a lookup")
    add(
        "--no-keep-bootstraps",
        dest="keep_bootstraps",
        action="store_false",
        default=None,
        help="what-if: peers behind NAT do not keep their bootstrap connections alive",
    )
    add(
        "--no-eviction-ping",
        dest="eviction_ping",
        action="store_false",
        default=None,
        help="what-if: a full bucket does not ping (dial) its oldest entry",
    )
    add("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    values = dict(PROFILES[args.profile]) if args.profile else {}
    values.update({n: getattr(args, n) for n in _NETWORK_OPTIONS if getattr(args, n) is not None})
    if args.verify_ms is not None:
        values["verify_cost"] = args.verify_ms / 1000
    gossip = GossipConfig()
    if args.degree is not None:
        gossip = dataclasses.replace(
            gossip, degree=args.degree, degree_low=args.degree - 1, degree_high=args.degree + 1
        )
    tuned = {
        "degree_low": args.degree_low,
        "degree_high": args.degree_high,
        "anti_entropy_interval": args.anti_entropy,
        "push_rate": args.push_rate,
    }
    gossip = dataclasses.replace(gossip, **{k: v for k, v in tuned.items() if v is not None})
    dht = DhtConfig() if args.alpha is None else DhtConfig(alpha=args.alpha)
    return NetConfig(**values, gossip=gossip, dht=dht), args.json


def main(argv: list[str] | None = None) -> int:
    cfg, as_json = parse_config(argv)
    # Millions of long-lived objects: collecting the young generation less often keeps the
    # collector from dominating the run (it is not what is measured).
    gc.set_threshold(100_000, 50, 100)
    results = run(cfg)
    if as_json:
        print(json.dumps(results))
    else:
        for name, value in results.items():
            print(f"{name:40}{value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
