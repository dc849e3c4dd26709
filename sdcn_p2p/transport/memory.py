"""An in-process network of transports, with latency, loss, partitions and hosts going down.

Each `MemoryTransport` is one host, a virtual IP on a `MemoryNetwork`; its addresses are
ordinary multiaddrs, ``/ip4/10.0.0.1/tcp/4001/ws``. A message takes the one-way latency to
arrive; a lost message is retransmitted, arriving one retransmission timeout later, and holds
back the messages behind it: delivery stays reliable and in order, as over TCP.

Time is trio's clock, so under `trio.testing.MockClock(autojump_threshold=0)` simulated minutes
take milliseconds; randomness comes from `random.Random(seed)`. No task runs per connection or
per message: each direction of a connection is a bounded queue of (deliver_at, message) that the
receiver waits on until the head is due.
"""

from __future__ import annotations

import ipaddress
import random
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import trio
from trio.lowlevel import ParkingLot

from sdcn_p2p.errors import ConfigError, DialError, LocalProtocolError
from sdcn_p2p.multiaddr import Multiaddr
from sdcn_p2p.transport import (
    MAX_TRANSPORT_MESSAGE,
    ConnectionHandler,
    RawConnection,
    _run_handler,
)

__all__ = ["MIN_RETRANSMISSION_TIMEOUT", "MemoryNetwork", "MemoryTransport"]

#: A lost message arrives max(MIN_RETRANSMISSION_TIMEOUT, 3 * latency) seconds late.
MIN_RETRANSMISSION_TIMEOUT = 0.2

_EPHEMERAL_PORTS = range(49152, 65536)


class MemoryNetwork:
    """A simulated network joining `MemoryTransport` hosts.

    `latency` is the one-way delay in seconds, or a function ``(src_host, dst_host) -> seconds``
    called once per direction when a connection opens. `loss` is the probability that a message
    needs retransmitting. A sender blocks while `queue_limit` of its messages are in flight or
    unread.
    """

    def __init__(
        self,
        *,
        latency: float | Callable[[str, str], float] = 0.0,
        loss: float = 0.0,
        seed: int = 0,
        queue_limit: int = 64,
    ) -> None:
        if not callable(latency) and latency < 0:
            raise ValueError(f"latency must be >= 0, not {latency}")
        if not 0 <= loss < 1:
            raise ValueError(f"loss must be in [0, 1), not {loss}")
        if queue_limit < 1:
            raise ValueError(f"queue_limit must be >= 1, not {queue_limit}")
        self._latency = latency
        self._loss = loss
        self._random = random.Random(seed)
        self._queue_limit = queue_limit
        self._transports: dict[str, MemoryTransport] = {}
        self._hosts_made = 0
        self._listeners: dict[tuple[str, int], _Listener] = {}
        self._links: set[_Link] = set()
        self._group_of: dict[str, int] = {}
        self._down: set[str] = set()

    def transport(self, host: str | None = None) -> MemoryTransport:
        """Add a host (an IPv4 or IPv6 address; by default the next free 10.x.y.z).

        Raises ConfigError if the host already has a transport: reuse it to restart a peer.
        """
        if host is None:
            while True:
                self._hosts_made += 1
                host = str(ipaddress.IPv4Address("10.0.0.0") + self._hosts_made)
                if host not in self._transports:
                    break
        host = _canonical(host)
        if host in self._transports:
            raise ConfigError(f"host {host} already has a transport")
        transport = self._transports[host] = MemoryTransport(self, host)
        return transport

    def partition(self, *groups: Iterable[str]) -> None:
        """Split the network: hosts in different groups cannot reach each other.

        Replaces any earlier partition. Hosts in no group still reach every host. Connections
        across groups break at once; dials across them fail.
        """
        group_of: dict[str, int] = {}
        for index, group in enumerate(groups):
            for host in map(_canonical, group):
                if group_of.setdefault(host, index) != index:
                    raise ValueError(f"host {host} is in two groups")
        self._group_of = group_of
        self._break_unreachable()

    def heal(self) -> None:
        """End the partition (hosts that are down stay down)."""
        self._group_of = {}

    def set_down(self, host: str, down: bool = True) -> None:
        """Take `host` off the network, as if unplugged, or bring it back.

        While down, its connections break and dials to or from it fail. Its listeners stay:
        they answer again once it is back up.
        """
        host = _canonical(host)
        if down:
            self._down.add(host)
            self._break_unreachable()
        else:
            self._down.discard(host)

    def _unreachable(self, src: str, dst: str) -> str | None:
        """Why `src` cannot reach `dst`, or None if it can."""
        for host in (src, dst):
            if host in self._down:
                return f"host {host} is down"
        src_group, dst_group = self._group_of.get(src), self._group_of.get(dst)
        if src_group is not None and dst_group is not None and src_group != dst_group:
            return f"{src} and {dst} are partitioned"
        return None

    def _break_unreachable(self) -> None:
        for link in list(self._links):
            reason = self._unreachable(*link.hosts)
            if reason is not None:
                link.break_(reason)

    def _one_way(self, src: str, dst: str) -> float:
        latency = self._latency(src, dst) if callable(self._latency) else self._latency
        if latency < 0:
            raise ValueError(f"latency from {src} to {dst} is negative: {latency}")
        return latency

    def _connect(
        self, client: MemoryTransport, listener: _Listener, latency: float
    ) -> _MemoryConnection:
        """Open a connection from `client` to `listener` and start its handler.

        `latency` is the one-way latency from the client, measured when the dial began.
        """
        server_host = listener.addr.host
        port = client._allocate_port()
        client_addr = Multiaddr(client._family, client.host, port)
        there = _Pipe(latency)
        back = _Pipe(self._one_way(server_host, client.host))
        link = _Link(self, (client.host, server_host), (there, back), (client, port))
        self._links.add(link)
        server_end = _MemoryConnection(self, link, back, there, listener.addr, client_addr)
        listener.nursery.start_soon(_run_handler, listener.handler, server_end)
        return _MemoryConnection(self, link, there, back, client_addr, listener.addr)

    def _enqueue(self, pipe: _Pipe, message: bytes | None) -> None:
        """Put `message` (None: end of stream) in flight on `pipe`."""
        deliver_at = trio.current_time() + pipe.latency
        if self._loss and self._random.random() < self._loss:
            deliver_at += max(MIN_RETRANSMISSION_TIMEOUT, 3 * pipe.latency)
        pipe.last_delivery = deliver_at = max(deliver_at, pipe.last_delivery)
        if not pipe.messages:
            pipe.readable.unpark_all()  # the head changed: the receiver recomputes its wait
        pipe.messages.append((deliver_at, message))


class MemoryTransport:
    """One host of a `MemoryNetwork`: dials and serves ``/ip4|ip6/<host>/tcp/<port>/ws``.

    Get one from `MemoryNetwork.transport`. Opening a connection takes one round trip.
    """

    def __init__(self, network: MemoryNetwork, host: str) -> None:
        self._network = network
        self._host = host
        self._family = "ip4" if ipaddress.ip_address(host).version == 4 else "ip6"
        self._ports: set[int] = set()
        self._next_ephemeral = _EPHEMERAL_PORTS.start

    @property
    def host(self) -> str:
        """This host's virtual IP address."""
        return self._host

    def can_dial(self, addr: Multiaddr) -> bool:
        return addr.family in ("ip4", "ip6") and not addr.secure and addr.port != 0

    async def dial(self, addr: Multiaddr) -> RawConnection:
        """Connect to `addr`, taking one round trip.

        Raises DialError, after that round trip, if nothing listens there or the host cannot
        be reached (partitioned, or either host down).
        """
        if not self.can_dial(addr):
            raise DialError(f"cannot dial {addr}: the memory network has only /ip4 and /ip6 /ws")
        network = self._network
        target = addr.without_peer_id()
        latency = network._one_way(self._host, addr.host)
        await trio.sleep(latency)
        reason = network._unreachable(self._host, addr.host)
        listener = network._listeners.get((addr.host, addr.port))
        if reason is None and listener is None:
            reason = "connection refused"
        if reason is not None or listener is None:
            await trio.sleep(network._one_way(addr.host, self._host))
            raise DialError(f"cannot connect to {target}: {reason}")
        connection = network._connect(self, listener, latency)
        try:
            await trio.sleep(connection._in.latency)
        except BaseException:
            connection._link.break_("dial cancelled")
            raise
        if connection._link.broken is not None:
            raise DialError(f"cannot connect to {target}: {connection._link.broken}")
        return connection

    async def serve(
        self,
        addr: Multiaddr,
        handler: ConnectionHandler,
        *,
        task_status: trio.TaskStatus[list[Multiaddr]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on `addr` (this host, or the unspecified address) until cancelled.

        Port 0 picks a free port. Raises ConfigError for another host's address, ``/wss``, DNS
        names, or a port in use.
        """
        if addr.family not in ("ip4", "ip6") or addr.secure:
            raise ConfigError(f"cannot listen on {addr}: the memory network has only /ip4|ip6 /ws")
        if addr.host != self._host and not addr.is_unspecified:
            raise ConfigError(f"cannot listen on {addr}: this host is {self._host}")
        port = addr.port or self._free_port()
        if port in self._ports:
            raise ConfigError(f"cannot listen on {addr}: port {port} is in use")
        self._ports.add(port)
        key = (self._host, port)
        bound = Multiaddr(self._family, self._host, port)
        try:
            async with trio.open_nursery() as nursery:
                self._network._listeners[key] = _Listener(bound, handler, nursery)
                try:
                    task_status.started([bound])
                    await trio.sleep_forever()
                finally:
                    del self._network._listeners[key]
        finally:
            self._ports.discard(port)

    def _free_port(self) -> int:
        for _ in _EPHEMERAL_PORTS:
            port = self._next_ephemeral
            self._next_ephemeral = port + 1 if port + 1 in _EPHEMERAL_PORTS else _EPHEMERAL_PORTS[0]
            if port not in self._ports:
                return port
        raise ConfigError(f"host {self._host} has no free port")

    def _allocate_port(self) -> int:
        port = self._free_port()
        self._ports.add(port)
        return port

    def __repr__(self) -> str:
        return f"<MemoryTransport {self._host}>"


@dataclass(frozen=True, slots=True)
class _Listener:
    addr: Multiaddr
    handler: ConnectionHandler
    nursery: trio.Nursery


class _Pipe:
    """One direction of a connection: messages in flight or unread, oldest first."""

    __slots__ = ("last_delivery", "latency", "messages", "readable", "reader_gone", "writable")

    def __init__(self, latency: float) -> None:
        self.latency = latency
        self.messages: deque[tuple[float, bytes | None]] = deque()  # None marks end of stream
        self.last_delivery = float("-inf")
        self.reader_gone = False  # the receiving end closed: sending fails
        self.readable = ParkingLot()  # the receiver, waiting for the head to arrive
        self.writable = ParkingLot()  # senders, waiting for room in the queue


class _Link:
    """Both directions of one connection, which the network can break."""

    __slots__ = ("broken", "hosts", "network", "open_ends", "pipes", "port_owner")

    def __init__(
        self,
        network: MemoryNetwork,
        hosts: tuple[str, str],
        pipes: tuple[_Pipe, _Pipe],
        port_owner: tuple[MemoryTransport, int],
    ) -> None:
        self.network = network
        self.hosts = hosts
        self.pipes = pipes
        self.port_owner = port_owner  # the dialler's ephemeral port, freed when the link ends
        self.open_ends = 2
        self.broken: str | None = None

    def break_(self, reason: str) -> None:
        """Break the connection: both ends raise BrokenResourceError from now on."""
        if self.broken is None:
            self.broken = reason
            for pipe in self.pipes:
                pipe.messages.clear()
                pipe.readable.unpark_all()
                pipe.writable.unpark_all()
            self._release()

    def end_closed(self) -> None:
        self.open_ends -= 1
        if self.open_ends == 0:
            self._release()

    def _release(self) -> None:
        if self in self.network._links:
            self.network._links.remove(self)
            transport, port = self.port_owner
            transport._ports.discard(port)


class _MemoryConnection:
    """One end of a connection on a MemoryNetwork."""

    __slots__ = ("_closed", "_in", "_link", "_network", "_out", "local_addr", "remote_addr")

    def __init__(
        self,
        network: MemoryNetwork,
        link: _Link,
        out: _Pipe,
        in_: _Pipe,
        local_addr: Multiaddr,
        remote_addr: Multiaddr,
    ) -> None:
        self._network = network
        self._link = link
        self._out = out
        self._in = in_
        self._closed = False
        self.local_addr: Multiaddr | None = local_addr
        self.remote_addr: Multiaddr | None = remote_addr

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("connection was closed")
        if self._link.broken is not None:
            raise trio.BrokenResourceError(f"connection broken: {self._link.broken}")

    async def send_message(self, data: bytes | bytearray | memoryview) -> None:
        if len(data) > MAX_TRANSPORT_MESSAGE:
            raise LocalProtocolError(
                f"message of {len(data)} bytes exceeds {MAX_TRANSPORT_MESSAGE}"
            )
        await trio.lowlevel.checkpoint_if_cancelled()
        pipe = self._out
        while True:
            self._check_open()
            if pipe.reader_gone:
                raise trio.BrokenResourceError("the peer closed the connection")
            if len(pipe.messages) < self._network._queue_limit:
                break
            await pipe.writable.park()
        self._network._enqueue(pipe, bytes(data))
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def receive_message(self) -> bytes:
        await trio.lowlevel.checkpoint_if_cancelled()
        pipe = self._in
        while True:
            self._check_open()
            if not pipe.messages:
                await pipe.readable.park()
                continue
            deliver_at, message = pipe.messages[0]
            if deliver_at <= trio.current_time():
                break
            with trio.move_on_at(deliver_at):
                await pipe.readable.park()
        if message is None:  # stays queued: every later call raises too
            raise trio.EndOfChannel
        pipe.messages.popleft()
        pipe.writable.unpark()
        await trio.lowlevel.cancel_shielded_checkpoint()
        return message

    async def aclose(self) -> None:
        """Close our end: the peer receives what we sent, then EndOfChannel."""
        if not self._closed:
            self._closed = True
            if self._link.broken is None:
                if not self._out.reader_gone:
                    self._network._enqueue(self._out, None)
                self._in.reader_gone = True
                self._in.messages.clear()
                self._in.writable.unpark_all()  # the peer's senders: BrokenResourceError
            self._in.readable.unpark_all()  # our own waiters: ClosedResourceError
            self._out.writable.unpark_all()
            self._link.end_closed()
        await trio.lowlevel.checkpoint()

    def __repr__(self) -> str:
        return f"<memory connection {self.local_addr} -> {self.remote_addr}>"


def _canonical(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        raise ConfigError(f"memory network hosts are IP addresses, not {host!r}") from None
