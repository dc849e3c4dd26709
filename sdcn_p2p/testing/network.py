"""In-memory networks of Hosts and Peers for tests and simulations (use under MockClock).

`TamperingTransport` corrupts, drops or replays what a transport's connections send, to test
how a Host copes with a hostile or broken peer. `open_loopback_providers` is the real thing:
providers dialling a peer over WebSockets on 127.0.0.1 (real time).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import replace
from typing import Any

import trio

from sdcn_p2p.backends import Backend
from sdcn_p2p.host import Host, HostConfig, open_host
from sdcn_p2p.identity import Identity
from sdcn_p2p.jobs import JobRequest
from sdcn_p2p.multiaddr import Multiaddr
from sdcn_p2p.peer import Peer, PeerConfig, open_peer
from sdcn_p2p.provider import Provider, ProviderConfig, open_provider
from sdcn_p2p.records import Advert, AdvertState
from sdcn_p2p.transport import ConnectionHandler, RawConnection, Transport
from sdcn_p2p.transport.memory import MemoryNetwork

__all__ = [
    "MOCK_EPOCH",
    "Tamper",
    "TamperingTransport",
    "all_tasks",
    "inline_threads",
    "mock_wall_clock",
    "open_loopback_providers",
    "open_memory_hosts",
    "open_memory_peers",
    "open_memory_providers",
    "small_job",
    "test_identity",
    "wait_advert",
]

#: ``tamper(index, message)``: the messages to send instead of the `index`-th one (from 0).
Tamper = Callable[[int, bytes], Sequence[bytes]]


def small_job(**fields: object) -> JobRequest:
    """A cheap job for tests: txt2img of model "card-a", 10 steps at 64x64, seed 7, `fields`
    changed."""
    values: dict[str, object] = {
        "kind": "txt2img",
        "model": "card-a",
        "prompt": "a dog",
        "seed": 7,
        "steps": 10,
        "width": 64,
        "height": 64,
    }
    values.update(fields)
    return JobRequest(**values)  # type: ignore[arg-type]


def test_identity(index: int, *, seed: int = 0) -> Identity:
    """A deterministic identity: the same (index, seed) always gives the same peer id."""
    return Identity.from_seed(hashlib.sha256(f"sdcn-test:{seed}:{index}".encode()).digest())


test_identity.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


@asynccontextmanager
async def open_memory_hosts(
    count: int,
    *,
    network: MemoryNetwork | None = None,
    config: HostConfig = HostConfig(),
    seed: int = 0,
    port: int = 4001,
) -> AsyncIterator[list[Host]]:
    """Start `count` Hosts on `network` (a new one by default), each on its own virtual IP.

    Host i listens on ``/ip4/<ip>/tcp/<port>/ws`` and knows nobody; all stop on exit.
    """
    network = network or MemoryNetwork(seed=seed)
    async with AsyncExitStack() as stack:
        hosts = []
        for index in range(count):
            transport = network.transport()
            listen = (Multiaddr.parse(f"/ip4/{transport.host}/tcp/{port}/ws"),)
            host = await stack.enter_async_context(
                open_host(
                    test_identity(index, seed=seed),
                    replace(config, listen=listen),
                    transport=transport,
                )
            )
            hosts.append(host)
        yield hosts


@asynccontextmanager
async def open_memory_peers(
    count: int,
    *,
    network: MemoryNetwork | None = None,
    config: PeerConfig = PeerConfig(),
    seed: int = 0,
    port: int = 4001,
    listen: bool | Sequence[bool] = True,
) -> AsyncIterator[list[Peer]]:
    """Start `count` Peers on `network`; peer 0 is everyone else's bootstrap peer.

    Peer i listens on ``/ip4/<ip>/tcp/<port>/ws`` unless `listen` (one flag, or one per peer)
    says no: such a peer is outbound-only. Wall time follows trio's clock
    (`mock_wall_clock`). Returns once every peer has joined; all stop on exit.
    """
    network = network or MemoryNetwork(seed=seed)
    flags = [listen] * count if isinstance(listen, bool) else list(listen)
    async with AsyncExitStack() as stack:
        peers: list[Peer] = []
        for index in range(count):
            transport = network.transport()
            addrs = (Multiaddr.parse(f"/ip4/{transport.host}/tcp/{port}/ws"),)
            seeds = (peers[0].host.listen_addrs[0].with_peer_id(peers[0].peer_id),) if peers else ()
            peer_config = replace(
                config,
                host=replace(config.host, listen=addrs if flags[index] else ()),
                bootstrap=config.bootstrap or seeds,
            )
            peer = await stack.enter_async_context(
                open_peer(
                    test_identity(index, seed=seed),
                    peer_config,
                    transport=transport,
                    wall_clock=mock_wall_clock,
                )
            )
            peers.append(peer)
        for peer in peers:
            await peer.bootstrapped.wait()
        yield peers


@asynccontextmanager
async def open_memory_providers(
    backends: Sequence[Backend],
    configs: Sequence[ProviderConfig] | None = None,
    *,
    network: MemoryNetwork | None = None,
    config: PeerConfig = PeerConfig(),
) -> AsyncIterator[tuple[Peer, list[Peer], list[Provider]]]:
    """`open_memory_peers` for peer 0 (everyone's bootstrap: run a gateway on it) and one
    peer per backend after it, each running a provider on its backend (with ``configs[i]``,
    default `ProviderConfig()`): (peer 0, the providers' peers, the providers), once peer 0
    holds every provider's online advert. All stop on exit.
    """
    configs = configs or [ProviderConfig()] * len(backends)
    async with (
        open_memory_peers(1 + len(backends), network=network, config=config) as (peer, *nodes),
        AsyncExitStack() as stack,
    ):
        providers = [
            await stack.enter_async_context(open_provider(node, backend, provider_config))
            for node, backend, provider_config in zip(nodes, backends, configs, strict=True)
        ]
        for node in nodes:
            await wait_advert(peer, node)
        yield peer, nodes, providers


@asynccontextmanager
async def open_loopback_providers(
    *backends: Backend, config: ProviderConfig = ProviderConfig()
) -> AsyncIterator[tuple[Peer, list[Provider]]]:
    """A peer listening on 127.0.0.1 over real WebSockets, and a provider per backend (with
    `config`) that dials it, as one behind NAT would; returns once the peer holds every
    provider's advert. Run a gateway on the peer to route jobs to them. All stop on exit.
    """
    loopback = Multiaddr.parse("/ip4/127.0.0.1/tcp/0/ws")
    async with AsyncExitStack() as stack:
        listen = PeerConfig(host=HostConfig(listen=(loopback,)))
        peer = await stack.enter_async_context(open_peer(Identity.generate(), listen))
        seed = peer.host.listen_addrs[0].with_peer_id(peer.peer_id)
        providers = []
        for backend in backends:
            node = await stack.enter_async_context(
                open_peer(Identity.generate(), PeerConfig(bootstrap=(seed,)))
            )
            providers.append(await stack.enter_async_context(open_provider(node, backend, config)))
            await wait_advert(peer, node)
        yield peer, providers


class TamperingTransport:
    """Wraps a Transport: each connection it dials sends its messages through `tamper`.

    `tamper` sees every message a dialled connection sends, numbered from 0 per connection
    (a Noise dialler sends 2 handshake messages first), and returns what to send instead:
    ``[message]`` to pass it on, ``[]`` to drop it, a changed copy to corrupt it, an old message
    to replay it. Connections it accepts are not touched.
    """

    def __init__(self, inner: Transport, tamper: Tamper) -> None:
        self._inner = inner
        self._tamper = tamper

    def can_dial(self, addr: Multiaddr) -> bool:
        return self._inner.can_dial(addr)

    async def dial(self, addr: Multiaddr) -> RawConnection:
        return _TamperedConnection(await self._inner.dial(addr), self._tamper)

    async def serve(
        self,
        addr: Multiaddr,
        handler: ConnectionHandler,
        *,
        task_status: trio.TaskStatus[list[Multiaddr]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        await self._inner.serve(addr, handler, task_status=task_status)


class _TamperedConnection:
    def __init__(self, inner: RawConnection, tamper: Tamper) -> None:
        self._inner = inner
        self._tamper = tamper
        self._sent = 0
        self.local_addr = inner.local_addr
        self.remote_addr = inner.remote_addr

    async def send_message(self, data: bytes | bytearray | memoryview) -> None:
        index, self._sent = self._sent, self._sent + 1
        for message in self._tamper(index, bytes(data)):
            await self._inner.send_message(message)

    async def receive_message(self) -> bytes:
        return await self._inner.receive_message()

    async def aclose(self) -> None:
        await self._inner.aclose()


#: Wall time (seconds) that `mock_wall_clock` reads at trio time 0.
MOCK_EPOCH = 1_700_000_000.0


def mock_wall_clock() -> float:
    """Wall time that follows trio's clock, so MockClock jumps move record expiry too."""
    return MOCK_EPOCH + trio.current_time()


@contextmanager
def inline_threads() -> Iterator[None]:
    """Run `trio.to_thread.run_sync` in the calling task while the block runs.

    Under an autojumping MockClock, nothing in trio is runnable while a worker thread works,
    so the clock jumps to the next timer: the job store's SQLite writes or a PNG check would
    let simulated time pass by how busy the machine is. Inline, they take none.
    """
    threads = trio.to_thread.run_sync

    async def inline(fn: Callable[..., Any], *args: Any, **_: Any) -> Any:
        await trio.lowlevel.checkpoint()
        return fn(*args)

    trio.to_thread.run_sync = inline  # type: ignore[assignment]
    try:
        yield
    finally:
        trio.to_thread.run_sync = threads


#: Seconds `wait_advert` waits before failing the test.
WAIT_TIMEOUT = 60.0


def all_tasks() -> set[trio.lowlevel.Task]:
    """Every task of the current trio run (to check that closing left none behind)."""
    tasks: set[trio.lowlevel.Task] = set()
    todo = [trio.lowlevel.current_root_task()]
    while todo:
        task = todo.pop()
        tasks.add(task)
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)
    return tasks


async def wait_advert(
    peer: Peer,
    of: Peer,
    check: Callable[[Advert], bool] = lambda advert: advert.state is AdvertState.ONLINE,
) -> Advert:
    """Wait until `peer`'s cache holds an advert of `of` that passes `check` (default: online).

    Raises trio.TooSlowError after WAIT_TIMEOUT seconds.
    """
    arrived = trio.lowlevel.ParkingLot()
    with peer.adverts.subscribe(lambda advert: arrived.unpark_all()), trio.fail_after(WAIT_TIMEOUT):
        while (held := peer.adverts.get(of.peer_id)) is None or not check(held):
            await arrived.park()
    return held
