"""Host: listen and dial, secure and multiplex connections, route streams to handlers.

One connection per peer: concurrent local dials to a peer share one attempt, and when two
peers dial each other at once both keep the connection dialled by the smaller peer id and
drain the other. Connections without streams close after `idle_timeout` unless the peer is
kept alive. Every Host serves `/ipfs/ping/1.0.0`, `/sdcn/identify/2.0.0` and libp2p's
`/ipfs/id/1.0.0`; identify runs on every connection we dial (libp2p's, with a peer that does
not speak ours).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

import trio

from sdcn_p2p._config import require, require_at_least, require_positive
from sdcn_p2p._subscriptions import Callbacks, Subscription
from sdcn_p2p._util import open_service_nursery
from sdcn_p2p._version import AGENT_VERSION
from sdcn_p2p.connection import (
    DEFAULT_MAX_MESSAGE,
    Connection,
    Stream,
    noise_credentials,
    secure_inbound,
    secure_outbound,
)
from sdcn_p2p.errors import (
    NETWORK_ERRORS,
    DialError,
    HandshakeError,
    ProtocolError,
    RecordError,
    ResourceLimitExceeded,
    UnsupportedProtocol,
)
from sdcn_p2p.identity import Identity, PeerId
from sdcn_p2p.multiaddr import Multiaddr
from sdcn_p2p.peerstore import PeerStore
from sdcn_p2p.protocols import identify, libp2p_identify, ping
from sdcn_p2p.records import Envelope, PeerRecord
from sdcn_p2p.transport import RawConnection, Transport

__all__ = ["AGENT_VERSION", "Handler", "Host", "HostConfig", "local_ips", "open_host"]

log = logging.getLogger(__name__)

PROTOCOL_HEADER_TIMEOUT = 10.0
#: Seconds a closing Host gives its connections to close cleanly before cutting them.
CLOSE_GRACE = 1.0
# The addresses peers saw us at, newest first.
_MAX_OBSERVED_ADDRS = 8

Handler = Callable[[Stream], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class HostConfig:
    """Listen addresses, limits and timeouts of a Host (seconds)."""

    listen: tuple[Multiaddr, ...] = ()
    #: Addresses to advertise instead of the bound ones (e.g. a public DNS name).
    announce: tuple[Multiaddr, ...] = ()
    max_connections: int = 512
    #: Inbound connections stop here, so that peers dialling us (or a flood of fresh
    #: identities) can never take the connections we need to dial providers ourselves.
    max_inbound_connections: int = 384
    #: Inbound connections from one IP address (loopback exempt), so that one machine
    #: cannot take them all with fresh identities (go-libp2p allows 8 per IPv4 address).
    max_inbound_per_ip: int = 16
    max_pending_inbound: int = 64
    max_inbound_streams: int = 128
    dial_timeout: float = 10.0
    handshake_timeout: float = 10.0
    idle_timeout: float = 120.0
    roles: tuple[str, ...] = ()
    agent_version: str = AGENT_VERSION

    def __post_init__(self) -> None:
        for name in ("listen", "announce"):
            addrs = getattr(self, name)
            ok = isinstance(addrs, tuple) and all(isinstance(a, Multiaddr) for a in addrs)
            require(self, name, ok, "must be a tuple of Multiaddr")
        require_at_least(
            self,
            1,
            "max_connections",
            "max_inbound_connections",
            "max_inbound_per_ip",
            "max_pending_inbound",
            "max_inbound_streams",
        )
        require_positive(self, "dial_timeout", "handshake_timeout", "idle_timeout")
        ok = isinstance(self.roles, tuple) and all(
            isinstance(r, str) and 0 < len(r) <= identify.MAX_TEXT for r in self.roles
        )
        require(
            self, "roles", ok, f"must be a tuple of names of 1 to {identify.MAX_TEXT} characters"
        )
        ok = (
            isinstance(self.agent_version, str) and 0 < len(self.agent_version) <= identify.MAX_TEXT
        )
        require(self, "agent_version", ok, f"must be 1 to {identify.MAX_TEXT} characters")


@dataclass(slots=True)
class _HandlerEntry:
    handler: Handler
    max_message_size: int


class _PendingDial:
    def __init__(self) -> None:
        self.done = trio.Event()
        self.connection: Connection | None = None
        self.error: BaseException | None = None

    async def wait(self) -> Connection:
        await self.done.wait()
        if self.connection is not None:
            return self.connection
        if self.error is not None:
            raise DialError(str(self.error)) from self.error
        raise DialError("dial abandoned: host closing")


class Host:
    """A peer's network endpoint. Create with `open_host`; closed when its context exits."""

    def __init__(
        self,
        identity: Identity,
        config: HostConfig,
        transport: Transport,
        nursery: trio.Nursery,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.identity = identity
        self._noise = noise_credentials(identity)  # one static key per Host, signed once
        self.config = config
        self.transport = transport
        self.peerstore = PeerStore()
        self.wall_clock = wall_clock
        self.listen_addrs: list[Multiaddr] = []
        self.observed_addrs: list[Multiaddr] = []
        self._nursery = nursery
        self._handlers: dict[str, _HandlerEntry] = {}
        self._conns: dict[PeerId, list[Connection]] = {}
        self._pending_dials: dict[PeerId, _PendingDial] = {}
        self._pending_inbound = 0
        self._pending_outbound = 0
        self._inbound = 0  # inbound connections registered
        self._inbound_by_ip: dict[str, int] = {}  # pending and registered, loopback not counted
        self._keep_alive: dict[PeerId, int] = {}  # peer -> how many asked to keep it
        self._on_connected: Callbacks[Connection] = Callbacks()
        self._on_disconnected: Callbacks[PeerId] = Callbacks()
        self._on_identified: Callbacks[PeerId] = Callbacks()
        self._identify_ext: dict[str, Callable[[], bytes]] = {}
        self._record: PeerRecord | None = None
        self._record_envelope: Envelope | None = None
        self._libp2p_record: tuple[Envelope, Envelope] | None = None  # (ours, libp2p's)
        self._local_ip_cache: dict[str, list[str]] = {}
        self._advertised: tuple[tuple[Multiaddr, ...], list[Multiaddr]] | None = None
        self.set_handler(ping.PING, ping.handle_ping, max_message_size=ping.MAX_MESSAGE)
        self.set_handler(
            identify.IDENTIFY, self._handle_identify, max_message_size=identify.MAX_MESSAGE
        )
        self.set_handler(
            libp2p_identify.LIBP2P_IDENTIFY,
            self._handle_libp2p_identify,
            max_message_size=libp2p_identify.MAX_MESSAGE,
        )

    # --- identity and addresses ------------------------------------------------------------------

    @property
    def peer_id(self) -> PeerId:
        return self.identity.peer_id

    @property
    def advertised_addrs(self) -> list[Multiaddr]:
        """Addresses other peers should dial: `announce` if set, else the bound ones, with a
        wildcard (0.0.0.0, ::) replaced by this machine's addresses.
        """
        key = tuple(self.listen_addrs)
        if self._advertised is None or self._advertised[0] != key:
            self._advertised = (key, self._compute_advertised())
        return list(self._advertised[1])

    def _compute_advertised(self) -> list[Multiaddr]:
        if self.config.announce:
            return [a.without_peer_id() for a in self.config.announce]
        addrs: list[Multiaddr] = []
        for addr in self.listen_addrs:
            if not addr.is_unspecified:
                addrs.append(addr.without_peer_id())
                continue
            for ip in self._local_ips(addr.family):
                expanded = replace(addr, host=ip, peer_id=None)
                if expanded not in addrs:
                    addrs.append(expanded)
        return addrs

    def _local_ips(self, family: str) -> list[str]:
        if family not in self._local_ip_cache:
            self._local_ip_cache[family] = local_ips(family)
        return self._local_ip_cache[family]

    @property
    def signed_record(self) -> Envelope:
        """Our signed PeerRecord, re-sealed with a higher seq when our addresses change."""
        addrs = tuple(self.advertised_addrs)
        held = self._record
        if held is None or held.addrs != addrs or self._record_envelope is None:
            seq = int(self.wall_clock() * 1000)
            if held is not None:
                seq = max(seq, held.seq + 1)
            self._record = PeerRecord(self.peer_id, seq, addrs)
            self._record_envelope = self._record.seal(self.identity)
        return self._record_envelope

    @property
    def libp2p_signed_record(self) -> Envelope:
        """The same record sealed as libp2p seals one (RFC 0003), for ``/ipfs/id/1.0.0``."""
        ours = self.signed_record  # re-sealed first if our addresses changed
        if self._libp2p_record is None or self._libp2p_record[0] is not ours:
            assert self._record is not None
            self._libp2p_record = (ours, self._record.seal_libp2p(self.identity))
        return self._libp2p_record[1]

    # --- handlers and notifications --------------------------------------------------------------

    def set_handler(
        self, protocol: str, handler: Handler, *, max_message_size: int = DEFAULT_MAX_MESSAGE
    ) -> None:
        """Serve `protocol`: each inbound stream runs `handler(stream)` in its connection's
        nursery; the stream is closed when the handler returns and reset if it raises.
        """
        self._handlers[protocol] = _HandlerEntry(handler, max_message_size)

    def remove_handler(self, protocol: str) -> None:
        self._handlers.pop(protocol, None)

    @property
    def protocols(self) -> list[str]:
        return sorted(self._handlers)

    def set_identify_extension(self, name: str, value: Callable[[], bytes]) -> None:
        """Send `value()` (≤ 64 bytes) under `name` in every identify message, so peers learn
        a protocol's state at connect time (gossip sends a summary of its advert cache);
        a peer's extensions land in `peerstore.get(peer).extensions`.
        """
        if name not in self._identify_ext and len(self._identify_ext) >= identify.MAX_EXTENSIONS:
            raise ValueError(f"at most {identify.MAX_EXTENSIONS} identify extensions")
        self._identify_ext[name] = value

    def identify_snapshot(self) -> identify.IdentifySnapshot:
        """What identify announces about us right now (called as each message goes out)."""
        return identify.IdentifySnapshot(
            envelope=self.signed_record,
            libp2p_record=self.libp2p_signed_record,
            listen_addrs=tuple(self.advertised_addrs),
            protocols=tuple(self.protocols),
            roles=self.config.roles,
            agent_version=self.config.agent_version,
            extensions={name: value() for name, value in self._identify_ext.items()},
        )

    def subscribe(
        self,
        *,
        on_connected: Callable[[Connection], None] | None = None,
        on_disconnected: Callable[[PeerId], None] | None = None,
        on_identified: Callable[[PeerId], None] | None = None,
    ) -> Subscription:
        """Call these synchronous callbacks on connection events until the subscription
        closes: use it as ``with host.subscribe(...):``, or call its `close()`.

        `on_connected(conn)` runs once a connection is registered, `on_identified(peer)` once
        identify has filled the peerstore, `on_disconnected(peer)` once the last connection
        to `peer` closed. They must not raise; one that needs to await starts a task in a
        nursery of its own.
        """
        subscriptions = []
        if on_connected:
            subscriptions.append(self._on_connected.subscribe(on_connected))
        if on_disconnected:
            subscriptions.append(self._on_disconnected.subscribe(on_disconnected))
        if on_identified:
            subscriptions.append(self._on_identified.subscribe(on_identified))
        return Subscription.joined(subscriptions)

    # --- connections -----------------------------------------------------------------------------

    def connection(self, peer: PeerId) -> Connection | None:
        """The open connection new streams to `peer` go over, if any."""
        for conn in self._conns.get(peer, ()):
            if not conn.closed and not conn.draining:
                return conn
        return None

    def is_connected(self, peer: PeerId) -> bool:
        return self.connection(peer) is not None

    @property
    def connected_peers(self) -> list[PeerId]:
        return [peer for peer in self._conns if self.connection(peer) is not None]

    @property
    def num_connections(self) -> int:
        return sum(len(conns) for conns in self._conns.values())

    @property
    def num_inbound_connections(self) -> int:
        """Open connections the remote side dialled."""
        return self._inbound

    @property
    def num_streams(self) -> int:
        """Open streams over all connections."""
        return sum(conn.num_streams for conns in self._conns.values() for conn in conns)

    def keep_alive(self, peer: PeerId, keep: bool = True) -> None:
        """Exempt connections to `peer` from idle close (bootstrap peers, gateways, mesh
        peers), or withdraw one such request: the peer stays kept while any request stands.
        """
        count = self._keep_alive.get(peer, 0) + (1 if keep else -1)
        if count > 0:
            self._keep_alive[peer] = count
        else:
            self._keep_alive.pop(peer, None)
        for conn in self._conns.get(peer, ()):
            conn.interrupt_idle_wait()

    async def connect(self, target: PeerId | Multiaddr) -> Connection:
        """Return a connection to `target`, reusing an open one or dialling.

        A Multiaddr with /p2p/<id> must reach that peer; a PeerId is dialled at its known
        addresses. Raises DialError when no address answers within `config.dial_timeout`.
        """
        if isinstance(target, Multiaddr):
            peer, addrs = target.peer_id, [target.without_peer_id()]
        else:
            peer, addrs = target, self.peerstore.addrs(target)
        if peer is None:
            return await self._dial(None, addrs)
        if peer == self.peer_id:
            raise DialError("refusing to dial ourselves")
        if (conn := self.connection(peer)) is not None:
            return conn
        pending = self._pending_dials.get(peer)
        if pending is None:
            pending = self._pending_dials[peer] = _PendingDial()
            self._nursery.start_soon(self._dial_shared, peer, addrs, pending)
        return await pending.wait()

    async def _dial_shared(
        self, peer: PeerId, addrs: list[Multiaddr], pending: _PendingDial
    ) -> None:
        try:
            pending.connection = await self._dial(peer, addrs)
        except (DialError, ResourceLimitExceeded) as exc:
            pending.error = exc
        finally:
            del self._pending_dials[peer]
            pending.done.set()

    async def _dial(self, peer: PeerId | None, addrs: list[Multiaddr]) -> Connection:
        if not addrs:
            raise DialError(f"no known address for {peer}")
        failures: list[str] = []
        with trio.move_on_after(self.config.dial_timeout):
            for addr in addrs:
                if not self.transport.can_dial(addr):
                    failures.append(f"{addr}: no transport for this address")
                    continue
                try:
                    return await self._dial_addr(addr, peer)
                except (DialError, ProtocolError, trio.BrokenResourceError) as exc:
                    failures.append(f"{addr}: {exc}")
        if not failures:
            failures.append(f"timed out after {self.config.dial_timeout:g} s")
        raise DialError(f"could not reach {peer or addrs[0]}: " + "; ".join(failures))

    async def _dial_addr(self, addr: Multiaddr, peer: PeerId | None) -> Connection:
        if self.num_connections + self._pending_outbound >= self.config.max_connections:
            raise DialError(f"connection limit ({self.config.max_connections}) reached")
        self._pending_outbound += 1
        try:
            raw = await self.transport.dial(addr)
            try:
                with trio.fail_after(self.config.handshake_timeout):
                    channel, remote = await secure_outbound(raw, self._noise, peer)
            except BaseException as exc:
                with trio.CancelScope(shield=True):
                    await raw.aclose()
                if isinstance(exc, trio.TooSlowError):
                    raise DialError("handshake timed out") from exc
                if isinstance(exc, HandshakeError):
                    raise DialError(f"handshake failed: {exc}") from exc
                raise
        finally:
            self._pending_outbound -= 1
        conn = self._new_connection(channel, remote, outbound=True)
        await self._nursery.start(self._serve_connection, conn)
        return self.connection(remote) or conn

    def _new_connection(self, channel, remote: PeerId, *, outbound: bool) -> Connection:  # type: ignore[no-untyped-def]
        return Connection(
            channel,
            remote,
            outbound=outbound,
            max_inbound_streams=self.config.max_inbound_streams,
            on_stream=self._handle_stream,
        )

    async def _handle_inbound(self, raw: RawConnection) -> None:
        """Called by the transport for each accepted connection; returns when it is over."""
        if (
            self._pending_inbound >= self.config.max_pending_inbound
            or self.num_connections >= self.config.max_connections
            or self._inbound + self._pending_inbound >= self.config.max_inbound_connections
        ):
            log.debug("refusing inbound connection from %s: limit reached", raw.remote_addr)
            return
        ip = _counted_ip(raw.remote_addr)
        if ip is not None and self._inbound_by_ip.get(ip, 0) >= self.config.max_inbound_per_ip:
            log.debug("refusing inbound connection from %s: per-IP limit reached", ip)
            return
        if ip is not None:
            self._inbound_by_ip[ip] = self._inbound_by_ip.get(ip, 0) + 1
        try:
            self._pending_inbound += 1
            try:
                with trio.fail_after(self.config.handshake_timeout):
                    channel, remote = await secure_inbound(raw, self._noise)
            except (
                HandshakeError,
                ProtocolError,
                trio.TooSlowError,
                trio.BrokenResourceError,
            ) as exc:
                log.debug("inbound handshake from %s failed: %r", raw.remote_addr, exc)
                return
            finally:
                self._pending_inbound -= 1
            await self._serve_connection(self._new_connection(channel, remote, outbound=False))
        finally:
            if ip is not None:
                left = self._inbound_by_ip[ip] - 1
                if left:
                    self._inbound_by_ip[ip] = left
                else:
                    del self._inbound_by_ip[ip]

    async def _serve_connection(
        self, conn: Connection, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        peer = conn.peer_id
        try:
            async with trio.open_nursery() as nursery:

                async def run() -> None:
                    try:
                        await conn.run(task_status=trio.TASK_STATUS_IGNORED)
                    finally:
                        nursery.cancel_scope.cancel()

                nursery.start_soon(run)
                self._register(conn)
                task_status.started()
                nursery.start_soon(self._close_when_idle, conn)
                if conn.outbound:  # the dialler starts the identify exchange
                    nursery.start_soon(self._identify, conn)
                self._on_connected.emit(conn)
        finally:
            with trio.CancelScope(shield=True):
                await conn.aclose()
            self._unregister(conn)
            if self.connection(peer) is None and not self._conns.get(peer):
                self._on_disconnected.emit(peer)

    def _register(self, conn: Connection) -> None:
        peer = conn.peer_id
        conns = self._conns.setdefault(peer, [])
        self.peerstore.pinned.add(peer)
        if conn.remote_addr is not None and conn.outbound:
            self.peerstore.add_addrs(peer, [conn.remote_addr])
        current = self.connection(peer)
        conns.append(conn)
        self._inbound += not conn.outbound
        if current is None:
            return
        # Two connections to one peer: both sides keep the one dialled by the smaller id.
        dialer_current = self.peer_id if current.outbound else peer
        dialer_new = self.peer_id if conn.outbound else peer
        if dialer_current != dialer_new:
            loser = conn if dialer_current < dialer_new else current
            log.debug("duplicate connection to %s: draining %r", peer.short(), loser)
            loser.drain()
        elif dialer_new == self.peer_id:
            conn.drain()  # we dialled twice: the remote waits for us to pick the older

    def _unregister(self, conn: Connection) -> None:
        conns = self._conns.get(conn.peer_id, [])
        if conn in conns:
            conns.remove(conn)
            self._inbound -= not conn.outbound
        if not conns:
            self._conns.pop(conn.peer_id, None)
            self.peerstore.pinned.discard(conn.peer_id)

    async def _close_when_idle(self, conn: Connection) -> None:
        idle_timeout = self.config.idle_timeout
        while True:
            keep = conn.peer_id in self._keep_alive
            # Kept-alive peers are pinged when idle for a third of the timeout: that keeps the
            # remote's idle timer from closing the connection, and measures RTT.
            if not await conn.wait_idle(idle_timeout / 3 if keep else idle_timeout):
                continue  # keep_alive() changed the policy
            if conn.draining or not keep or not await self._keep_alive_ping(conn):
                break
        reason = "drained" if conn.draining else "idle"
        log.debug("closing %s connection to %s", reason, conn.peer_id.short())
        await conn.aclose(reason)

    async def _keep_alive_ping(self, conn: Connection) -> bool:
        """Ping over `conn`; False if the peer did not answer in time."""
        with trio.move_on_after(self.config.dial_timeout):
            try:
                stream = await conn.open_stream(ping.PING, max_message_size=ping.MAX_MESSAGE)
                async with stream:
                    self.peerstore.record_rtt(conn.peer_id, await ping.ping_once(stream))
                return True
            except NETWORK_ERRORS as exc:
                log.debug("keep-alive ping to %s failed: %r", conn.peer_id.short(), exc)
        return False

    async def disconnect(self, peer: PeerId) -> None:
        """Close every connection to `peer` at once; returns when they are closed, so a
        `new_stream` to `peer` right after dials afresh.
        """
        async with trio.open_nursery() as nursery:
            for conn in list(self._conns.get(peer, ())):
                nursery.start_soon(conn.aclose, "disconnected locally")

    # --- streams ---------------------------------------------------------------------------------

    async def new_stream(
        self,
        target: PeerId | Multiaddr,
        protocol: str,
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE,
    ) -> Stream:
        """Open a stream to `target` speaking `protocol`, dialling if needed.

        Raises DialError if the peer cannot be reached; UnsupportedProtocol surfaces on the
        stream's first receive.
        """
        conn = await self.connect(target)
        try:
            return await conn.open_stream(protocol, max_message_size=max_message_size)
        except trio.BrokenResourceError as exc:
            raise DialError(f"connection to {conn.peer_id} lost: {exc}") from exc

    async def _handle_stream(self, stream: Stream) -> None:
        try:
            with trio.fail_after(PROTOCOL_HEADER_TIMEOUT):
                protocol = await stream._negotiate(self._handlers)
            entry = self._handlers[protocol]  # no checkpoint since it was selected
            stream._accept(protocol, entry.max_message_size)
            await entry.handler(stream)
        except NETWORK_ERRORS as exc:
            log.debug("stream %r ended with %r", stream, exc)
            stream.reset()
        except Exception:
            # A handler bug must not take the peer down with it.
            log.exception("handler for %s failed", stream.protocol)
            stream.reset()
        finally:
            await stream.aclose()

    # --- identify --------------------------------------------------------------------------------

    async def _handle_identify(self, stream: Stream) -> None:
        with trio.fail_after(self.config.handshake_timeout):
            info = await identify.answer(stream, self.identify_snapshot)
        self._identified(stream.connection, info)

    async def _handle_libp2p_identify(self, stream: Stream) -> None:
        await libp2p_identify.answer(stream, self.identify_snapshot)

    async def _identify(self, conn: Connection) -> None:
        info: identify.IdentifyInfo | libp2p_identify.Libp2pIdentifyInfo
        try:
            with trio.fail_after(self.config.handshake_timeout):
                try:
                    info = await identify.exchange(conn, self.identify_snapshot)
                except UnsupportedProtocol:  # a libp2p peer that is no SDCN peer
                    info = await libp2p_identify.query(conn)
        except NETWORK_ERRORS as exc:
            log.debug("identify with %s failed: %r", conn.peer_id.short(), exc)
            return
        self._identified(conn, info)

    def _identified(
        self,
        conn: Connection,
        info: identify.IdentifyInfo | libp2p_identify.Libp2pIdentifyInfo,
    ) -> None:
        """Store what identify told us in the peerstore, then tell the subscribers."""
        store = self.peerstore
        if isinstance(info, identify.IdentifyInfo):
            with contextlib.suppress(RecordError):  # we hold this record or a newer one
                store.add_record(info.record, info.envelope)
            roles, extensions = info.roles, info.extensions
        else:
            record = info.record
            store.add_addrs(conn.peer_id, record.addrs if record else info.listen_addrs)
            roles, extensions = (), {}
        store.set_identify(
            conn.peer_id,
            protocols=info.protocols,
            roles=roles,
            agent_version=info.agent_version,
            extensions=extensions,
        )
        observed = info.observed_addr
        if observed is not None and observed not in self.observed_addrs:
            self.observed_addrs = [observed, *self.observed_addrs][:_MAX_OBSERVED_ADDRS]
        self._on_identified.emit(conn.peer_id)

    async def ping(self, peer: PeerId | Multiaddr) -> float:
        """Round-trip time to `peer` in seconds, folded into the peerstore's RTT EWMA."""
        stream = await self.new_stream(peer, ping.PING, max_message_size=ping.MAX_MESSAGE)
        async with stream:
            rtt = await ping.ping_once(stream)
        self.peerstore.record_rtt(stream.peer_id, rtt)
        return rtt

    # --- lifecycle -------------------------------------------------------------------------------

    async def _listen(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        for addr in self.config.listen:
            bound = await self._nursery.start(self.transport.serve, addr, self._handle_inbound)
            self.listen_addrs.extend(bound)
        for addr in self.listen_addrs:
            log.info("listening on %s", addr.with_peer_id(self.peer_id))
        task_status.started()

    async def _close_connections(self) -> None:
        """Close every connection at once, letting each say goodbye to its peer."""
        async with trio.open_nursery() as nursery:
            for conns in self._conns.values():
                for conn in conns:
                    nursery.start_soon(conn.aclose, "host closing")

    def __repr__(self) -> str:
        return f"<Host {self.peer_id} connections={self.num_connections}>"


def _counted_ip(addr: Multiaddr | None) -> str | None:
    """The IP address an inbound connection counts against, or None (loopback, unknown)."""
    if addr is None or addr.family not in ("ip4", "ip6") or addr.is_loopback:
        return None
    return addr.host


def local_ips(family: str) -> list[str]:
    """This machine's addresses for `family` ("ip4" or "ip6"): the one its default route
    uses (found without sending a packet), then loopback.
    """
    if family == "ip4":
        inet, probe, loopback = socket.AF_INET, ("192.0.2.1", 9), "127.0.0.1"
    else:
        inet, probe, loopback = socket.AF_INET6, ("2001:db8::1", 9), "::1"
    ips = []
    with contextlib.suppress(OSError), socket.socket(inet, socket.SOCK_DGRAM) as probe_socket:
        probe_socket.connect(probe)  # UDP connect only picks a route and a source address
        ips.append(probe_socket.getsockname()[0])
    if loopback not in ips:
        ips.append(loopback)
    return ips


@asynccontextmanager
async def open_host(
    identity: Identity,
    config: HostConfig = HostConfig(),
    *,
    transport: Transport | None = None,
    wall_clock: Callable[[], float] = time.time,
) -> AsyncIterator[Host]:
    """Start a Host listening on `config.listen`; everything stops when the block exits.

    `transport` defaults to WebSockets. Raises ConfigError if an address cannot be bound.
    """
    async with open_service_nursery() as nursery:
        if transport is None:
            from sdcn_p2p.transport.websocket import WebSocketTransport

            transport = WebSocketTransport(nursery)
        host = Host(identity, config, transport, nursery, wall_clock=wall_clock)
        await host._listen()
        try:
            yield host
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_GRACE):
                await host._close_connections()
            nursery.cancel_scope.cancel()
