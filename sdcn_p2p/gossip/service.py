"""`Gossip`: the advert gossip service over a Host, the only part of gossip that awaits.

It serves `GOSSIP`, keeps the mesh (GRAFT, PRUNE, a heartbeat every `GossipConfig.heartbeat`
seconds), pushes each advert new to the AdvertCache to every mesh peer but the one it came from
(each through a bounded queue and a sender task of its own), and runs digest exchanges: with
each gossip peer it dials, and every `anti_entropy_interval` with one random mesh peer. The
policies live in `state`, the wire format in `messages`.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import trio

from sdcn_p2p.adverts import AdvertCache
from sdcn_p2p.connection import Stream
from sdcn_p2p.errors import NETWORK_ERRORS, RecordError, RemoteProtocolError
from sdcn_p2p.gossip.config import GossipConfig
from sdcn_p2p.gossip.messages import (
    BIN_OVERHEAD,
    DIGEST_EXTENSION,
    ENTRY_SIZE,
    GOSSIP,
    MESSAGE_OVERHEAD,
    AdvertBatch,
    Digest,
    GossipMessage,
    Graft,
    Prune,
    max_entries,
    parse_message,
)
from sdcn_p2p.gossip.state import MeshState, PushBudget, SeenCache
from sdcn_p2p.host import Host
from sdcn_p2p.identity import PeerId
from sdcn_p2p.records import Advert, Envelope

__all__ = ["Gossip", "GossipStats"]

log = logging.getLogger(__name__)

# Honest peers verify before they forward, so a message with this many bad adverts is hostile:
# the rest of it is dropped unverified, which caps the signature checks one message can cost.
_MAX_REJECTS_PER_MESSAGE = 8


@dataclass(slots=True)
class GossipStats:
    """Counters for tests and benchmarks; they only grow."""

    messages_sent: int = 0  # every gossip message: pushes, digests, GRAFT, PRUNE, ...
    messages_received: int = 0
    pushes: int = 0  # ADVERTS pushes to mesh peers
    adverts_received: int = 0  # envelopes in any ADVERTS message
    adverts_accepted: int = 0  # new to the cache
    duplicates: int = 0  # already held, or not newer than the one held
    rejected: int = 0  # forged, malformed, oversized, expired or from the future
    forwarded: int = 0  # adverts pushed on to the mesh: at most once per (peer, seq)
    dropped: int = 0  # adverts not pushed to a mesh peer: its queue was full or a push failed
    syncs: int = 0  # digest exchanges completed, either side
    syncs_skipped: int = 0  # exchanges a dialler skipped: identify said the caches match
    rate_limited: int = 0  # pushed adverts dropped unread: the sender was over its budget


@dataclass(eq=False, slots=True)
class _Link:
    """A mesh peer and the queue its sender task pushes from."""

    peer: PeerId
    queue: trio.MemorySendChannel[bytes]


class Gossip:
    """Spreads adverts over a mesh of gossip peers and keeps `adverts` in sync with theirs.

    Start with ``await nursery.start(gossip.run)``; it serves until cancelled.
    """

    def __init__(
        self,
        host: Host,
        adverts: AdvertCache,
        config: GossipConfig = GossipConfig(),
        *,
        wall_clock: Callable[[], float],
        rng: random.Random | None = None,
    ) -> None:
        self.host = host
        self.adverts = adverts
        self.config = config
        self.stats = GossipStats()
        self._wall_clock = wall_clock
        self._rng = rng or random.Random()
        self._max_entries = max_entries(config.max_message_size)
        self._seen = SeenCache(config.seen_size)
        self._mesh = MeshState(config)
        self._links: dict[PeerId, _Link] = {}
        self._mesh_changed = trio.lowlevel.ParkingLot()
        self._syncing: set[PeerId] = set()  # digest exchanges we started, queued or running
        self._answering: set[PeerId] = set()  # digest exchanges peers started with us
        self._sync_limiter = trio.CapacityLimiter(config.max_concurrent_syncs)
        self._push_budget = PushBudget(config.push_rate, config.push_burst)
        self._nursery: trio.Nursery | None = None

    @property
    def mesh(self) -> frozenset[PeerId]:
        """The peers we push adverts to."""
        return frozenset(self._links)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve GOSSIP, keep the mesh and sync with peers until cancelled."""
        if self._nursery is not None:
            raise RuntimeError("Gossip is already running")
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                self.host.set_handler(
                    GOSSIP, self._handle_stream, max_message_size=self.config.max_message_size
                )
                self.host.set_identify_extension(DIGEST_EXTENSION, lambda: self.adverts.digest_hash)
                with self.host.subscribe(
                    on_identified=self._on_identified, on_disconnected=self._on_disconnected
                ):
                    for peer in self.host.connected_peers:
                        self._on_identified(peer)
                    nursery.start_soon(self._heartbeat_loop)
                    nursery.start_soon(self._anti_entropy_loop)
                    task_status.started()
                    await trio.sleep_forever()
            finally:
                # Before the nursery closes: nothing may be started in it from here on.
                self._nursery = None
                self.host.remove_handler(GOSSIP)
                for peer in list(self._links):
                    self._remove_from_mesh(peer)

    async def publish(self, envelope: Envelope, *, flush: bool = False) -> Advert:
        """Add a sealed advert to the cache and push it to every mesh peer at once.

        While the mesh is below `degree_low` (a peer just started), connected gossip peers
        outside it get the advert too, up to `degree` peers in all. The pushes go out from
        each mesh peer's queue; with `flush`, straight away, and this returns once each has
        been sent or has failed (within `rpc_timeout`): for a last advert before leaving.
        Raises RecordError if the cache refuses it: forged, oversized, expired, or not newer
        than the one it holds.
        """
        await trio.lowlevel.checkpoint()
        advert = self.adverts.add(envelope)
        if advert is None:
            raise RecordError("advert not kept: the cache holds a newer or equal seq of that peer")
        data = envelope.to_bytes()
        extra: list[PeerId] = []
        if len(self._links) < self.config.degree_low:
            others = [
                p
                for p in self.host.connected_peers
                if p not in self._links and self._speaks_gossip(p)
            ]
            count = min(self.config.degree - len(self._links), len(others))
            extra = self._rng.sample(others, count)
        if flush:
            self._seen.add((advert.peer_id, advert.seq), advert.expires_at)
            self.stats.forwarded += 1
            async with trio.open_nursery() as nursery:
                for peer in [*self._links, *extra]:
                    nursery.start_soon(self._push, peer, [data])
            return advert
        self._forward(advert, data, source=None)
        if self._nursery is not None:
            for peer in extra:
                self._nursery.start_soon(self._push, peer, [data])
        return advert

    async def wait_mesh(self, size: int | None = None) -> None:
        """Wait until at least `size` peers (default `config.degree_low`) are in the mesh."""
        target = self.config.degree_low if size is None else size
        while len(self._links) < target:
            await self._mesh_changed.park()

    # --- receiving and forwarding ----------------------------------------------------------------

    def _receive(self, source: PeerId, adverts: Sequence[bytes]) -> None:
        """Offer received envelopes to the cache and forward the new ones.

        Raises ProtocolError, after pruning `source`, once a message holds too many bad adverts.
        """
        rejected = 0
        for data in adverts:
            self.stats.adverts_received += 1
            try:
                advert = self.adverts.add(Envelope.from_bytes(data))
            except RecordError as exc:
                self.stats.rejected += 1
                rejected += 1
                log.debug("dropped an advert from %s: %s", source.short(), exc)
                if rejected >= _MAX_REJECTS_PER_MESSAGE:
                    self._remove_from_mesh(source, backoff=True)
                    raise RemoteProtocolError(f"{rejected} bad adverts in one message") from None
                continue
            if advert is None:
                self.stats.duplicates += 1
                continue
            self.stats.adverts_accepted += 1
            self._forward(advert, data, source)

    def _forward(self, advert: Advert, data: bytes, source: PeerId | None) -> None:
        if not self._seen.add((advert.peer_id, advert.seq), advert.expires_at):
            return
        self.stats.forwarded += 1
        for peer, link in self._links.items():
            if peer == source or peer == advert.peer_id:
                continue
            try:
                link.queue.send_nowait(data)
            except (trio.WouldBlock, trio.BrokenResourceError):
                self.stats.dropped += 1

    async def _sender(self, link: _Link, queue: trio.MemoryReceiveChannel[bytes]) -> None:
        """Push what is queued for one mesh peer, batching only what is already waiting."""
        budget = self.config.max_message_size - MESSAGE_OVERHEAD
        carry: bytes | None = None
        async with queue:
            while True:
                if carry is None:
                    try:
                        carry = await queue.receive()
                    except trio.EndOfChannel:
                        return
                batch, size, carry = [carry], len(carry) + BIN_OVERHEAD, None
                while True:
                    try:
                        data = queue.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    if size + len(data) + BIN_OVERHEAD > budget:
                        carry = data
                        break
                    batch.append(data)
                    size += len(data) + BIN_OVERHEAD
                if not await self._push(link.peer, batch):
                    self.stats.dropped += len(batch)
                    if self._links.get(link.peer) is link:
                        self._remove_from_mesh(link.peer, backoff=True)
                    return

    async def _push(self, peer: PeerId, batch: list[bytes]) -> bool:
        """Send one ADVERTS message over a new stream, without dialling; False if it failed."""
        conn = self.host.connection(peer)
        if conn is None:
            return False
        with trio.move_on_after(self.config.rpc_timeout):
            try:
                stream = await conn.open_stream(
                    GOSSIP, max_message_size=self.config.max_message_size
                )
                try:
                    await self._send(stream, AdvertBatch(tuple(batch)))
                except BaseException:
                    stream.reset()
                    raise
                await stream.aclose()
            except NETWORK_ERRORS as exc:
                log.debug("push to %s failed: %r", peer.short(), exc)
                return False
            self.stats.pushes += 1
            return True
        log.debug("push to %s timed out", peer.short())
        return False

    # --- inbound streams -------------------------------------------------------------------------

    async def _handle_stream(self, stream: Stream) -> None:
        # Errors reset the stream (the Host does it); none of them ends the peer.
        peer = stream.peer_id
        message = await self._receive_message(stream)
        if isinstance(message, AdvertBatch):
            if message.want is not None:
                raise RemoteProtocolError("'want' outside a digest exchange")
            adverts = message.adverts
            allowed = self._push_budget.take(peer, len(adverts), trio.current_time())
            if allowed < len(adverts):
                self.stats.rate_limited += len(adverts) - allowed
                log.debug(
                    "%s pushes too fast: %d advert(s) dropped", peer.short(), len(adverts) - allowed
                )
            self._receive(peer, adverts[:allowed])
        elif isinstance(message, Digest):
            await self._answer_digest(stream, message)
        elif isinstance(message, Graft):
            joined = self._nursery is not None and self._mesh.accepts_graft(
                peer, self._links, trio.current_time()
            )
            if joined:
                self._add_to_mesh(peer)
            await self._send(stream, Graft() if joined else Prune())
        else:
            self._remove_from_mesh(peer, backoff=True)

    async def _receive_message(self, stream: Stream) -> GossipMessage:
        """Next message, within `rpc_timeout`. Raises trio.EndOfChannel at a clean end."""
        with trio.fail_after(self.config.rpc_timeout):
            obj = await stream.receive_message()
        self.stats.messages_received += 1
        return parse_message(obj, max_entries=self._max_entries)

    async def _send(self, stream: Stream, message: GossipMessage) -> None:
        await stream.send_message(message.to_wire())
        self.stats.messages_sent += 1

    # --- digest exchange -------------------------------------------------------------------------

    def _digest(self) -> Digest:
        seqs = self.adverts.digest()
        if len(seqs) > self._max_entries:
            seqs = dict(itertools.islice(seqs.items(), self._max_entries))
        return Digest(seqs)

    async def _sync_with(self, peer: PeerId) -> None:
        """Run one digest exchange with `peer` as the asker; failures are logged only."""
        try:
            async with self._sync_limiter:
                conn = self.host.connection(peer)
                if conn is None:
                    return
                stream = await conn.open_stream(
                    GOSSIP, max_message_size=self.config.max_message_size
                )
                try:
                    await self._ask_digest(stream)
                except BaseException:
                    stream.reset()
                    raise
                await stream.aclose()
                self.stats.syncs += 1
        except NETWORK_ERRORS as exc:
            log.debug("digest exchange with %s failed: %r", peer.short(), exc)
        finally:
            self._syncing.discard(peer)

    async def _ask_digest(self, stream: Stream) -> None:
        await self._send(stream, self._digest())
        received = 0
        while True:
            message = await self._receive_message(stream)
            if not isinstance(message, AdvertBatch):
                raise RemoteProtocolError("a DIGEST must be answered with ADVERTS")
            received += len(message.adverts)
            if received > self._max_entries:
                raise RemoteProtocolError("digest answer holds too many adverts")
            self._receive(stream.peer_id, message.adverts)
            if message.want is not None:
                break
        for batch, _ in self._batches(message.want):
            await self._send(stream, AdvertBatch(tuple(batch)))

    async def _answer_digest(self, stream: Stream, digest: Digest) -> None:
        peer = stream.peer_id
        if peer in self._answering:
            raise RemoteProtocolError("a digest exchange with this peer is already running")
        self._answering.add(peer)
        try:
            ours = self.adverts.digest()
            theirs = digest.seqs
            give = [p for p, seq in ours.items() if theirs.get(p, -1) < seq]
            want = tuple(
                itertools.islice(
                    (p for p, seq in theirs.items() if ours.get(p, -1) < seq), self._max_entries
                )
            )
            budget = self.config.max_message_size - MESSAGE_OVERHEAD
            want_size = len(want) * ENTRY_SIZE
            last: list[bytes] = []
            last_size = 0
            for batch, size in self._batches(give):
                if last:
                    await self._send(stream, AdvertBatch(tuple(last)))
                last, last_size = batch, size
            if last and last_size + want_size > budget:
                await self._send(stream, AdvertBatch(tuple(last)))
                last = []
            await self._send(stream, AdvertBatch(tuple(last), want))
            received = 0
            while True:
                try:
                    message = await self._receive_message(stream)
                except trio.EndOfChannel:
                    break
                if not isinstance(message, AdvertBatch) or message.want is not None:
                    raise RemoteProtocolError("expected the wanted ADVERTS")
                received += len(message.adverts)
                if received > len(want):
                    raise RemoteProtocolError("sent more adverts than were wanted")
                self._receive(peer, message.adverts)
            self.stats.syncs += 1
        finally:
            self._answering.discard(peer)

    def _batches(self, peers: Iterable[PeerId]) -> Iterator[tuple[list[bytes], int]]:
        """The held envelopes of `peers`, encoded, in batches that fit one message."""
        budget = self.config.max_message_size - MESSAGE_OVERHEAD
        batch: list[bytes] = []
        size = 0
        for peer in peers:
            envelope = self.adverts.envelope(peer)
            if envelope is None:
                continue
            data = envelope.to_bytes()
            if batch and size + len(data) + BIN_OVERHEAD > budget:
                yield batch, size
                batch, size = [], 0
            batch.append(data)
            size += len(data) + BIN_OVERHEAD
        if batch:
            yield batch, size

    # --- the mesh --------------------------------------------------------------------------------

    def _speaks_gossip(self, peer: PeerId) -> bool:
        info = self.host.peerstore.get(peer)
        return info is not None and GOSSIP in info.protocols

    def _on_identified(self, peer: PeerId) -> None:
        nursery = self._nursery
        if nursery is None or not self._speaks_gossip(peer):
            return
        conn = self.host.connection(peer)
        # The dialler starts the digest exchange; one exchange syncs both sides. It is skipped
        # when the peer's identify said its cache holds exactly what ours holds.
        if (
            conn is not None
            and conn.outbound
            and peer not in self._syncing
            and not self._same_digest(peer)
        ):
            self._syncing.add(peer)
            nursery.start_soon(self._sync_with, peer)
        if self._mesh.wants(peer, self._links, trio.current_time()):
            self._mesh.pending.add(peer)
            nursery.start_soon(self._graft, peer)

    def _same_digest(self, peer: PeerId) -> bool:
        info = self.host.peerstore.get(peer)
        theirs = info.extensions.get(DIGEST_EXTENSION) if info is not None else None
        if theirs is None or theirs != self.adverts.digest_hash:
            return False
        self.stats.syncs_skipped += 1
        return True

    def _on_disconnected(self, peer: PeerId) -> None:
        self._remove_from_mesh(peer)

    def _add_to_mesh(self, peer: PeerId) -> None:
        nursery = self._nursery
        if nursery is None or peer in self._links:
            return
        send, receive = trio.open_memory_channel[bytes](self.config.queue_size)
        link = self._links[peer] = _Link(peer, send)
        self.host.keep_alive(peer)
        nursery.start_soon(self._sender, link, receive)
        self._mesh_changed.unpark_all()

    def _remove_from_mesh(self, peer: PeerId, *, backoff: bool = False) -> None:
        if backoff:
            self._mesh.backoff(peer, trio.current_time())
        link = self._links.pop(peer, None)
        if link is None:
            return
        link.queue.close()  # its sender pushes what is queued, then ends
        self.host.keep_alive(peer, False)
        self._mesh_changed.unpark_all()

    async def _graft(self, peer: PeerId) -> None:
        """Ask `peer` (dialling it if needed) to join our mesh; `peer` is already pending."""
        joined = False
        try:
            with trio.move_on_after(self.config.rpc_timeout):
                conn = await self.host.connect(peer)
                stream = await conn.open_stream(
                    GOSSIP, max_message_size=self.config.max_message_size
                )
                async with stream:
                    await self._send(stream, Graft())
                    joined = isinstance(await self._receive_message(stream), Graft)
        except NETWORK_ERRORS as exc:
            log.debug("graft of %s failed: %r", peer.short(), exc)
        finally:
            self._mesh.pending.discard(peer)
        if joined and self.host.is_connected(peer):
            self._add_to_mesh(peer)
        elif not joined:
            self._mesh.backoff(peer, trio.current_time())

    async def _prune(self, peer: PeerId) -> None:
        """Tell `peer` it left our mesh; best effort."""
        conn = self.host.connection(peer)
        if conn is None:
            return
        with trio.move_on_after(self.config.rpc_timeout):
            try:
                stream = await conn.open_stream(
                    GOSSIP, max_message_size=self.config.max_message_size
                )
                async with stream:
                    await self._send(stream, Prune())
            except NETWORK_ERRORS as exc:
                log.debug("prune of %s failed: %r", peer.short(), exc)

    async def _heartbeat_loop(self) -> None:
        while True:
            await trio.sleep(self.config.heartbeat)
            self._heartbeat()

    def _heartbeat(self) -> None:
        nursery = self._nursery
        if nursery is None:  # stopping: the sleep ended as run() was cancelled
            return
        for peer in [p for p in self._links if not self.host.is_connected(p)]:
            self._remove_from_mesh(peer)
        graft, prune = self._mesh.heartbeat(
            self._links, self._candidates(), trio.current_time(), self._rng
        )
        for peer in graft:
            nursery.start_soon(self._graft, peer)
        for peer in prune:
            self._remove_from_mesh(peer, backoff=True)
            nursery.start_soon(self._prune, peer)
        self.adverts.expire()
        self._seen.expire(self._wall_clock())

    def _candidates(self) -> Iterator[PeerId]:
        """Gossip peers to graft, connected ones first, each group shuffled; lazily."""
        connected = [p for p in self.host.connected_peers if self._speaks_gossip(p)]
        self._rng.shuffle(connected)
        yield from connected
        known = [
            p
            for p in self.host.peerstore.peers()
            if p != self.host.peer_id
            and not self.host.is_connected(p)
            and self._speaks_gossip(p)
            and self.host.peerstore.addrs(p)
        ]
        self._rng.shuffle(known)
        yield from known

    async def _anti_entropy_loop(self) -> None:
        while True:
            await trio.sleep(self.config.anti_entropy_interval)
            peers = sorted(self._links) or sorted(
                p for p in self.host.connected_peers if self._speaks_gossip(p)
            )
            if peers:
                peer = self._rng.choice(peers)
                if peer not in self._syncing:
                    self._syncing.add(peer)
                    await self._sync_with(peer)
