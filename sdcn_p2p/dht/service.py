"""The DHT service: serves ``/sdcn/kad/2.0.0`` and drives lookups, puts and gets over a Host.

Only server-mode peers (reachable: they advertise addresses and serve KAD) enter routing
tables; a client-mode Dht looks up, puts and gets, but serves nothing and is never added.
A peer whose query fails or times out is dropped from the routing table at once (it comes
back when it next connects and identifies as a server).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from sdcn_p2p._config import require, require_at_least, require_positive
from sdcn_p2p.connection import Stream
from sdcn_p2p.dht.keys import KEY_BITS, key_int, node_key, node_key_int
from sdcn_p2p.dht.lookup import Lookup
from sdcn_p2p.dht.messages import (
    KAD,
    MAX_MESSAGE_SIZE,
    Contact,
    FindNode,
    GetValue,
    PutValue,
    Request,
    decode_nodes,
    decode_put,
    decode_request,
    decode_values,
    encode_request,
    nodes_response,
    put_response,
    values_response,
)
from sdcn_p2p.dht.routing import AddStatus, RoutingTable
from sdcn_p2p.dht.store import RecordStore, Source, StoredValue, validate
from sdcn_p2p.errors import NETWORK_ERRORS, DialError, RecordError, ResourceLimitExceeded, SdcnError
from sdcn_p2p.host import Host
from sdcn_p2p.identity import PeerId
from sdcn_p2p.multiaddr import Multiaddr
from sdcn_p2p.records import MAX_ENVELOPE_SIZE, Advert, Envelope, PeerRecord, peer_key

__all__ = ["KAD", "Dht", "DhtConfig", "LookupResult"]

log = logging.getLogger(__name__)

#: Seconds between sweeps of expired records (and checks for buckets due a refresh).
_MAINTENANCE_PERIOD = 60.0
#: Refresh lookups, and keys of one put, run at most this many at a time.
_PARALLEL_LOOKUPS = 4
#: Stale holders corrected after one get, and correction batches running at once.
_MAX_CORRECTIONS = 64
_MAX_CORRECTION_BATCHES = 4
#: Room left in a GET_VALUE answer for the contacts next to the values.
_CONTACTS_ROOM = 64 * 1024


@dataclass(frozen=True, slots=True)
class DhtConfig:
    """Kademlia parameters (seconds), mode and store limits of a Dht.

    `server`: None means server mode iff the host advertises addresses. `slow_after`: a
    query unanswered that long stops counting against `alpha`.
    """

    k: int = 20
    #: Queries a lookup keeps in flight. 5 rather than Kademlia's 3: in benchmarks/netsim.py at
    #: 10,000 peers, lookups took 2.85 s at the median instead of 4.11 s (most of it dialling
    #: peers met on the way), for 4 % more DHT traffic; the hops and results are the same.
    alpha: int = 5
    rpc_timeout: float = 5.0
    slow_after: float = 2.0
    refresh_interval: float = 600.0
    server: bool | None = None
    max_record_size: int = MAX_ENVELOPE_SIZE
    max_per_publisher: int = 256
    #: Values one connected peer, and all the peers on one IP address (IPv6: one /64;
    #: loopback exempt), may have stored here, whatever identities signed them.
    max_per_sender: int = 1024
    max_per_address: int = 4096
    max_records: int = 20_000
    max_values_per_key: int = 256
    max_message_size: int = MAX_MESSAGE_SIZE

    def __post_init__(self) -> None:
        require_at_least(
            self,
            1,
            "k",
            "alpha",
            "max_record_size",
            "max_per_publisher",
            "max_per_sender",
            "max_per_address",
            "max_records",
            "max_values_per_key",
            "max_message_size",
        )
        require_positive(self, "rpc_timeout", "slow_after", "refresh_interval")
        require(self, "server", self.server in (None, True, False), "must be None, True or False")


@dataclass(frozen=True, slots=True)
class LookupResult:
    """The outcome of an iterative lookup.

    `hops`: depth at which the closest peer was learned (0: it was in our table, 1: a peer
    we knew named it, ...). `queried`/`failed`: queries sent / failed. `duration`: trio seconds.
    """

    key: bytes
    closest: list[PeerId]
    hops: int
    queried: int
    failed: int
    duration: float


@dataclass(slots=True)
class _Values:
    """What a GET_VALUE lookup collects: the newest valid value per publisher, and which
    seq of each publisher every responder held.
    """

    best: dict[PeerId, StoredValue] = field(default_factory=dict)
    held: dict[PeerId, dict[PeerId, int]] = field(default_factory=dict)
    checked: dict[bytes, StoredValue | None] = field(default_factory=dict)


@dataclass(slots=True)
class _Run:
    """A finished lookup with what it learned on the way."""

    result: LookupResult
    contacts: dict[PeerId, tuple[Multiaddr, ...]]  # every peer named, with its addresses
    responders: set[PeerId]
    values: _Values


class Dht:
    """Kademlia over a Host. Start `run` in a nursery before calling the other methods."""

    def __init__(
        self,
        host: Host,
        config: DhtConfig,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.host = host
        self.config = config
        self.wall_clock = wall_clock
        self.server = bool(host.advertised_addrs) if config.server is None else config.server
        self.routing_table = RoutingTable(host.peer_id.dht_key, k=config.k)
        self.store = RecordStore(
            max_record_size=config.max_record_size,
            max_per_publisher=config.max_per_publisher,
            max_per_sender=config.max_per_sender,
            max_per_address=config.max_per_address,
            max_records=config.max_records,
            max_values_per_key=config.max_values_per_key,
        )
        self._rng = random.Random(host.peer_id.bytes)
        self._nursery: trio.Nursery | None = None
        self._pinging: set[int] = set()  # buckets with an eviction ping in flight
        self._correction_batches = 0

    # --- lifecycle -------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve KAD (server mode), fill the routing table from identified peers, refresh
        buckets every `refresh_interval` and expire stored records; runs until cancelled.
        """
        if self._nursery is not None:
            raise RuntimeError("this Dht is already running")
        try:
            with self.host.subscribe(on_identified=self._on_identified):
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    if self.server:
                        self.host.set_handler(
                            KAD, self._handle, max_message_size=self.config.max_message_size
                        )
                    for peer in self.host.connected_peers:
                        self._on_identified(peer)
                    task_status.started()
                    await self._maintain()
        finally:
            self._nursery = None
            if self.server:
                self.host.remove_handler(KAD)

    async def _maintain(self) -> None:
        # Joining refreshes the buckets (`bootstrap`): the periodic refresh starts one
        # interval later, so that peers started together do not all refresh at once.
        first_refresh = trio.current_time() + self.config.refresh_interval
        while True:
            await trio.sleep(min(_MAINTENANCE_PERIOD, self.config.refresh_interval))
            self.store.expire(self.wall_clock())
            if trio.current_time() >= first_refresh:
                await self._refresh()

    async def _refresh(self, *, below: int = KEY_BITS) -> None:
        """Look up a random key in every bucket (numbered below `below`) not refreshed within
        `refresh_interval`.

        A refresh lookup ends once the `alpha` (not k) closest peers it knows have answered:
        it is there to meet a few live peers in the bucket's range, who join the table as they
        are connected, and this makes joining far cheaper (fewer peers dialled).
        """
        table = self.routing_table
        due = table.buckets_to_refresh(trio.current_time(), self.config.refresh_interval)
        due = [index for index in due if index < below]
        limiter = trio.CapacityLimiter(_PARALLEL_LOOKUPS)

        async def refresh(index: int) -> None:
            async with limiter:
                key = table.random_key_in_bucket(index, self._rng)
                await self._lookup(key, FindNode(key), width=self.config.alpha)

        async with trio.open_nursery() as nursery:
            for index in due:
                nursery.start_soon(refresh, index)

    async def bootstrap(self, seeds: Sequence[Multiaddr]) -> bool:
        """Join the network through `seeds`: connect, look up our own key, then refresh the
        buckets farther than the k peers found (the lookup met every peer nearer than those).

        Returns True if a seed was reached and the lookup got answers; a seed that is down or
        not a DHT server is skipped.
        """
        reached: list[PeerId] = []

        async def connect(addr: Multiaddr) -> None:
            try:
                reached.append((await self.host.connect(addr)).peer_id)
            except NETWORK_ERRORS as exc:
                log.info("bootstrap peer %s unreachable: %s", addr, exc)

        async with trio.open_nursery() as nursery:
            for addr in seeds:
                nursery.start_soon(connect, addr)
        if not reached:
            return False
        own_key = self.host.peer_id.dht_key
        run = await self._lookup(own_key, FindNode(own_key), extra_seeds=reached)
        closest = run.result.closest
        if len(closest) == self.config.k:  # else we met every peer there is
            farthest = node_key_int(closest[-1]) ^ key_int(own_key)
            # Buckets from this one on lie wholly nearer than `farthest`.
            await self._refresh(below=KEY_BITS + 1 - farthest.bit_length())
        # A seed need not answer the lookup itself: once inbound queries have filled our
        # table, the lookup may never get to ask it. Any answer means we are in.
        return bool(run.responders)

    # --- routing table ---------------------------------------------------------------------------

    def _on_identified(self, peer: PeerId) -> None:
        """Host subscriber: add an identified server peer; ping the oldest of a full bucket."""
        if self._nursery is None:
            return
        info = self.host.peerstore.get(peer)
        if info is None:
            return
        if KAD not in info.protocols or info.record is None or not info.record.addrs:
            self.routing_table.remove(peer)  # a client (or no DHT peer at all), maybe since now
            return
        result = self.routing_table.add(peer, trio.current_time(), info.record.addrs)
        if result.status is AddStatus.FULL and result.bucket not in self._pinging:
            assert result.oldest is not None
            self._pinging.add(result.bucket)
            self._nursery.start_soon(self._check_oldest, result.bucket, result.oldest, peer)

    async def _check_oldest(self, bucket: int, oldest: PeerId, newcomer: PeerId) -> None:
        try:
            alive = await self._ping(oldest)
        finally:
            self._pinging.discard(bucket)
        if alive:
            self.routing_table.touch(oldest, trio.current_time())
        else:
            log.debug("evicting %s: it did not answer a ping", oldest.short())
            self.routing_table.replace(oldest, newcomer, trio.current_time())

    async def _ping(self, peer: PeerId) -> bool:
        self._remember_addrs(peer, ())
        with trio.move_on_after(self.config.rpc_timeout):
            try:
                await self.host.ping(peer)
                return True
            except NETWORK_ERRORS as exc:
                log.debug("ping to %s failed: %r", peer.short(), exc)
        return False

    def _remember_addrs(self, peer: PeerId, addrs: Sequence[Multiaddr]) -> None:
        """Make sure the host can dial `peer`: its addresses go to the peerstore if needed."""
        if self.host.is_connected(peer):
            return
        entry = self.routing_table.get(peer)
        addrs = addrs or (entry.addrs if entry else ())
        if addrs:
            self.host.peerstore.add_addrs(peer, list(addrs))

    # --- serving ---------------------------------------------------------------------------------

    async def _handle(self, stream: Stream) -> None:
        """Answer one request. Malformed requests raise ProtocolError: the Host resets."""
        with trio.fail_after(self.config.rpc_timeout):
            message = await stream.receive_message()
            request = decode_request(message, max_value_size=self.config.max_record_size)
            self.routing_table.touch(stream.peer_id, trio.current_time())
            source = Source.of(stream.peer_id, stream.connection.remote_addr)
            await stream.send_message(self._answer(request, stream.peer_id, source))

    def _answer(self, request: Request, requester: PeerId, source: Source) -> dict[str, Any]:
        if isinstance(request, FindNode):
            return nodes_response(self._contacts(request.key, requester))
        if isinstance(request, GetValue):
            budget = self.config.max_message_size - _CONTACTS_ROOM
            values = []
            for value in self.store.values(request.key, self.wall_clock()):
                budget -= len(value.data) + 8
                if budget < 0:
                    break
                values.append(value.data)
            return values_response(values, self._contacts(request.key, requester))
        try:
            envelope = Envelope.from_bytes(request.value, max_size=self.config.max_record_size)
            self.store.put(request.key, envelope, self.wall_clock(), source)
        except (RecordError, ResourceLimitExceeded) as exc:
            log.debug("refused a record from %s: %s", requester.short(), exc)
            return put_response(False, str(exc))
        return put_response(True)

    def _contacts(self, key: bytes, requester: PeerId) -> list[Contact]:
        table = self.routing_table
        peers = table.closest(key, self.config.k + 1)
        return [
            Contact(peer, table.get(peer).addrs)  # type: ignore[union-attr]
            for peer in peers
            if peer != requester
        ][: self.config.k]

    # --- queries ---------------------------------------------------------------------------------

    async def _rpc(self, peer: PeerId, request: Request, addrs: Sequence[Multiaddr] = ()) -> Any:
        """Send `request` to `peer` and return its raw answer, or None if the query failed."""
        self._remember_addrs(peer, addrs)
        try:
            with trio.fail_after(self.config.rpc_timeout):
                try:
                    return await self._exchange(peer, request)
                except (trio.BrokenResourceError, DialError, ResourceLimitExceeded):
                    # When both peers dial each other at once, one connection is drained and
                    # closed: a query that raced onto it retries once on the survivor.
                    if not self.host.is_connected(peer):
                        raise
                    return await self._exchange(peer, request)
        except NETWORK_ERRORS as exc:
            log.debug("%s query to %s failed: %r", type(request).__name__, peer.short(), exc)
            return None

    async def _exchange(self, peer: PeerId, request: Request) -> Any:
        stream = await self.host.new_stream(
            peer, KAD, max_message_size=self.config.max_message_size
        )
        async with stream:
            await stream.send_message(encode_request(request))
            await stream.send_eof()  # travels with the request: one frame batch per side
            return await stream.receive_message()

    async def lookup(self, key: bytes) -> LookupResult:
        """Find the k server peers closest to `key` (ourselves excluded)."""
        return (await self._lookup(key, FindNode(key))).result

    async def _lookup(
        self,
        key: bytes,
        request: FindNode | GetValue,
        *,
        extra_seeds: Sequence[PeerId] = (),
        width: int | None = None,
    ) -> _Run:
        """Run an iterative lookup for the `width` (default k) closest peers; GET_VALUE
        lookups also collect values.
        """
        config = self.config
        start = trio.current_time()
        seeds = self.routing_table.closest(key, config.k)
        seeds += [peer for peer in extra_seeds if peer not in seeds]
        lookup = Lookup(
            key,
            seeds,
            k=width or config.k,
            alpha=config.alpha,
            self_id=self.host.peer_id,
            slow_after=config.slow_after,
        )
        contacts: dict[PeerId, tuple[Multiaddr, ...]] = {}
        responders: set[PeerId] = set()
        values = _Values()
        changed = trio.Event()

        async def query(peer: PeerId) -> None:
            nonlocal changed
            answer = await self._rpc(peer, request, contacts.get(peer, ()))
            closer = None
            if answer is not None:
                try:
                    if isinstance(request, GetValue):
                        raw_values, closer = decode_values(
                            answer,
                            max_values=config.max_values_per_key,
                            max_value_size=config.max_record_size,
                        )
                        self._collect(values, peer, key, raw_values)
                    else:
                        closer = decode_nodes(answer)
                except SdcnError as exc:
                    log.debug("bad answer from %s: %s", peer.short(), exc)
                    closer = None
            if closer is None:
                lookup.on_failure(peer)
                self.routing_table.remove(peer)
            else:
                for contact in closer:
                    contacts.setdefault(contact.peer_id, contact.addrs)
                lookup.on_response(peer, [contact.peer_id for contact in closer])
                responders.add(peer)
                self.routing_table.touch(peer, trio.current_time())
            changed.set()

        async with trio.open_nursery() as nursery:
            while not lookup.finished:
                for peer in lookup.next_queries(trio.current_time()):
                    nursery.start_soon(query, peer)
                with trio.move_on_after(config.slow_after):
                    await changed.wait()
                changed = trio.Event()
            nursery.cancel_scope.cancel()
        now = trio.current_time()
        self.routing_table.mark_refreshed(key, now)
        result = LookupResult(
            key, lookup.result(), lookup.hops, lookup.queried, lookup.failed, now - start
        )
        return _Run(result, contacts, responders, values)

    def _collect(self, values: _Values, peer: PeerId, key: bytes, raw: list[bytes]) -> None:
        """Validate the values `peer` answered with; keep the newest per publisher."""
        held = values.held[peer] = {}
        now = self.wall_clock()
        for data in raw:
            if data in values.checked:  # several peers hold the same envelope: verify it once
                value = values.checked[data]
            else:
                try:
                    envelope = Envelope.from_bytes(data, max_size=self.config.max_record_size)
                    value = validate(key, envelope, now, max_size=self.config.max_record_size)
                except RecordError as exc:
                    log.debug("%s answered with an invalid record: %s", peer.short(), exc)
                    value = None
                if len(values.checked) < 4 * self.config.max_values_per_key:
                    values.checked[data] = value
            if value is None:
                continue
            held[value.publisher] = max(value.seq, held.get(value.publisher, -1))
            best = values.best.get(value.publisher)
            if best is None or value.seq > best.seq:
                values.best[value.publisher] = value

    # --- records ---------------------------------------------------------------------------------

    async def find_closest(self, key: bytes) -> list[PeerId]:
        """The k server peers closest to `key`, nearest first (ourselves excluded)."""
        return (await self.lookup(key)).closest

    async def find_peer(self, peer_id: PeerId) -> list[Multiaddr]:
        """Addresses of `peer_id`: from our table, a lookup of its key, or its PeerRecord in
        the DHT. Empty if it cannot be found.
        """
        entry = self.routing_table.get(peer_id)
        if entry is not None and entry.addrs:
            return list(entry.addrs)
        run = await self._lookup(node_key(peer_id), FindNode(node_key(peer_id)))
        if run.contacts.get(peer_id):
            return list(run.contacts[peer_id])
        records = [PeerRecord.from_envelope(e) for e in await self.get(peer_key(peer_id))]
        return list(records[0].addrs) if records else []

    async def put(self, envelope: Envelope) -> int:
        """Store a PeerRecord or Advert under every key it names, on the k closest peers of
        each key (and in our own store in server mode).

        Returns how many stores hold it. Raises RecordError if it is invalid or expired.
        """
        now = self.wall_clock()
        keys = _record_keys(envelope)
        if not keys:
            return 0  # an advert of no model
        validate(keys[0], envelope, now, max_size=self.config.max_record_size)
        data = envelope.to_bytes()
        stored = 0
        limiter = trio.CapacityLimiter(_PARALLEL_LOOKUPS)

        async def put_to(peer: PeerId, key: bytes) -> None:
            nonlocal stored
            if await self._put_to(peer, key, data):
                stored += 1

        async def put_key(key: bytes) -> None:
            nonlocal stored
            async with limiter:
                closest = (await self.lookup(key)).closest
            if self.server:
                try:
                    self.store.put(key, envelope, self.wall_clock())
                    stored += 1
                except (RecordError, ResourceLimitExceeded) as exc:
                    log.info("not storing our own record locally: %s", exc)
            async with trio.open_nursery() as nursery:
                for peer in closest:
                    nursery.start_soon(put_to, peer, key)

        async with trio.open_nursery() as nursery:
            for key in keys:
                nursery.start_soon(put_key, key)
        return stored

    async def _put_to(self, peer: PeerId, key: bytes, data: bytes) -> bool:
        answer = await self._rpc(peer, PutValue(key, data))
        if answer is None:
            return False
        try:
            ok, error = decode_put(answer)
        except SdcnError as exc:
            log.debug("bad PUT_VALUE answer from %s: %s", peer.short(), exc)
            return False
        if not ok:
            log.debug("%s refused a record: %s", peer.short(), error)
        return ok

    async def get(self, key: bytes) -> list[Envelope]:
        """The newest valid, unexpired record of each publisher under `key`, from the k
        closest peers and our own store, ordered by publisher.

        Stale records in our own store are replaced; afterwards, in the background, peers
        among the closest that answered with an older record or none are sent the newest (at
        most 64 of them per get).
        """
        run = await self._lookup(key, GetValue(key))
        values = run.values
        now = self.wall_clock()
        for held in self.store.values(key, now):
            best = values.best.get(held.publisher)
            if best is None or held.seq >= best.seq:
                values.best[held.publisher] = held
            else:  # we are a stale holder too
                try:
                    self.store.put(key, best.envelope, now)
                except (RecordError, ResourceLimitExceeded) as exc:
                    log.debug("could not update a stale record: %s", exc)
        self._correct_stale_holders(key, values, run.result.closest)
        return [values.best[publisher].envelope for publisher in sorted(values.best)]

    def _correct_stale_holders(self, key: bytes, values: _Values, closest: list[PeerId]) -> None:
        stale = [
            (peer, value)
            for peer in closest
            for value in values.best.values()
            if values.held.get(peer, {}).get(value.publisher, -1) < value.seq
        ][:_MAX_CORRECTIONS]
        if not stale or self._nursery is None:
            return
        if self._correction_batches >= _MAX_CORRECTION_BATCHES:
            log.debug("skipping %d corrections: too many already running", len(stale))
            return
        self._correction_batches += 1
        self._nursery.start_soon(self._correct, key, stale)

    async def _correct(self, key: bytes, stale: list[tuple[PeerId, StoredValue]]) -> None:
        limiter = trio.CapacityLimiter(self.config.alpha)

        async def correct(peer: PeerId, value: StoredValue) -> None:
            async with limiter:
                await self._put_to(peer, key, value.data)

        try:
            async with trio.open_nursery() as nursery:
                for peer, value in stale:
                    nursery.start_soon(correct, peer, value)
        finally:
            self._correction_batches -= 1

    def __repr__(self) -> str:
        mode = "server" if self.server else "client"
        return f"<Dht {mode} {self.host.peer_id.short()} table={len(self.routing_table)}>"


def _record_keys(envelope: Envelope) -> list[bytes]:
    """The DHT keys a record is stored under. Raises RecordError for other records."""
    if envelope.payload_type == PeerRecord.PAYLOAD_TYPE:
        return [PeerRecord.from_envelope(envelope).dht_key]
    if envelope.payload_type == Advert.PAYLOAD_TYPE:
        return list(dict.fromkeys(Advert.from_envelope(envelope).dht_keys))
    raise RecordError(f"records of type {envelope.payload_type!r} are not stored in the DHT")
