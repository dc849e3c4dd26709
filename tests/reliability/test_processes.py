"""Real processes: a provider (`python -m sdcn_p2p node`) killed with SIGKILL mid-job, joined
to a gateway in this test over real WebSockets on loopback. The job fails over to another
provider process; the gateway is left with no connection and no task for the dead one.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from gateway.dispatch import JobProgress
from gateway.node import Gateway
from sdcn_p2p.host import HostConfig
from sdcn_p2p.identity import PeerId
from sdcn_p2p.jobs import JobRequest
from sdcn_p2p.multiaddr import Multiaddr
from sdcn_p2p.peer import Peer, PeerConfig, open_peer
from sdcn_p2p.testing import all_tasks, test_identity

LOOPBACK = Multiaddr.parse("/ip4/127.0.0.1/tcp/0/ws")


@asynccontextmanager
async def node_process(
    tmp_path: Path, name: str, seed: Multiaddr, speed: float
) -> AsyncIterator[trio.Process]:
    """`sdcn node --backend testcard` offering model "card-x" at `speed` it/s; killed on exit."""
    process = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "sdcn_p2p",
            "node",
            "--key",
            str(tmp_path / name),
            "--backend",
            "testcard",
            "--testcard-models",
            "card-x",
            "--testcard-speed",
            str(speed),
            "--bootstrap",
            str(seed),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield process
    finally:
        process.kill()
        await process.wait()


async def wait_provider(peer: Peer, known: set[PeerId]) -> PeerId:
    """Wait for an online advert of "card-x" from a peer not in `known`."""
    arrived = trio.lowlevel.ParkingLot()
    with peer.adverts.subscribe(lambda advert: arrived.unpark_all()), trio.fail_after(60):
        while True:
            for advert in peer.adverts.find("card-x"):
                if advert.peer_id not in known:
                    return advert.peer_id
            await arrived.park()


async def test_a_provider_process_killed_mid_job_fails_over_to_another(tmp_path: Path) -> None:
    before = all_tasks()
    config = PeerConfig(host=HostConfig(listen=(LOOPBACK,)))
    async with open_peer(test_identity(0), config) as peer:
        gateway = Gateway(peer, rng=random.Random(1))
        seed = peer.host.listen_addrs[0].with_peer_id(peer.peer_id)
        job = JobRequest("txt2img", "card-x", "a cat", seed=5, steps=150, width=64, height=64)
        # 150 steps of 64x64 take 23 s on the victim (0.1 it/s): plenty of time to kill it.
        async with node_process(tmp_path, "victim", seed, 0.1) as victim:
            victim_id = await wait_provider(peer, set())
            progressed = trio.Event()
            outcome: list = []

            async def run() -> None:
                outcome.append(
                    await gateway.dispatcher.run(
                        job,
                        deadline=60,
                        on_event=lambda event: isinstance(event, JobProgress) and progressed.set(),
                    )
                )

            async with (
                node_process(tmp_path, "survivor", seed, 50.0),
                trio.open_nursery() as nursery,
            ):
                nursery.start_soon(run)
                with trio.fail_after(30):
                    await progressed.wait()  # the victim is running the job
                survivor_id = await wait_provider(peer, {victim_id})
                victim.send_signal(signal.SIGKILL)
                assert await victim.wait() == -signal.SIGKILL
            [result] = outcome
            assert result.info["provider"] == str(survivor_id)
            assert result.info["attempts"] == 2 and result.info["seed"] == 5
            assert len(result.images) == 1
            assert gateway.directory.is_banned(victim_id, peer.wall_clock())
            assert not peer.host.is_connected(victim_id)
    assert all_tasks() == before
