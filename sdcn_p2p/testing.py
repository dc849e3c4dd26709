"""In-memory networks of Hosts for tests and simulations (use under MockClock)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace

from sdcn_p2p.host import Host, HostConfig, open_host
from sdcn_p2p.identity import Identity
from sdcn_p2p.multiaddr import Multiaddr
from sdcn_p2p.transport.memory import MemoryNetwork

__all__ = ["open_memory_hosts", "test_identity"]


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
