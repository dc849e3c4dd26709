"""Real processes: a provider (`python -m sdcn_p2p node`) killed with SIGKILL mid-job, joined
to a gateway in this test over real WebSockets on loopback. The job fails over to another
provider process; the gateway is left with no connection and no task for the dead one.

And a gateway (`python -m sdcn_p2p gateway`) killed with SIGKILL and started again on the same
data dir: its finished results and its unfinished jobs survive.
"""

from __future__ import annotations

import json
import random
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import trio

from gateway.dispatch import JobProgress
from gateway.node import Gateway
from sdcn_p2p.host import HostConfig
from sdcn_p2p.identity import PeerId, load_or_create_identity
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


# --- a gateway killed and started again --------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@asynccontextmanager
async def gateway_process(args: list[str]) -> AsyncIterator[trio.Process]:
    """`sdcn gateway ARGS`, once it serves HTTP (it says so in its log); killed on exit."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "sdcn_p2p", "gateway", *args], stderr=subprocess.PIPE
    )
    try:
        assert process.stderr is not None
        log = b""
        with trio.fail_after(60):
            while b"gateway HTTP API on" not in log:
                chunk = await process.stderr.receive_some()
                assert chunk, f"the gateway exited: {log.decode(errors='replace')}"
                log += chunk
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_drain, process.stderr)  # keep its pipe from filling up
            yield process
            nursery.cancel_scope.cancel()
    finally:
        process.kill()
        await process.wait()


async def _drain(stream: trio.abc.ReceiveStream) -> None:
    while await stream.receive_some():
        pass


async def until_event(port: int, job_id: str, name: bytes) -> None:
    """Follow `job_id`'s events over a plain socket until one named `name` (the connection
    is then dropped: the gateway is about to be killed)."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        request = f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: gateway\r\n\r\n"
        await stream.send_all(request.encode())
        received = b""
        while b"event: " + name + b"\n" not in received:
            chunk = await stream.receive_some()
            assert chunk, received
            received += chunk


async def events_to_the_end(http: httpx.AsyncClient, job_id: str) -> list[tuple[str, str, Any]]:
    """(id, name, data) of each of `job_id`'s events, until the stream ends."""
    events = []
    async with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        assert response.status_code == 200
        fields: dict[str, str] = {}
        async for line in response.aiter_lines():
            if not line:
                if "event" in fields:
                    events.append((fields["id"], fields["event"], json.loads(fields["data"])))
                fields = {}
            elif not line.startswith(":"):
                key, _, value = line.partition(": ")
                fields[key] = value
    return events


def stored_seed(data: Path, job_id: str) -> tuple[str, int]:
    with sqlite3.connect(data / "jobs.db") as db:
        status, parts = db.execute(
            "SELECT status, parts FROM jobs WHERE id = ?", (job_id,)
        ).fetchone()
    return status, json.loads(parts)[0]["seed"]


async def test_a_gateway_killed_with_sigkill_keeps_its_results_and_reruns_its_jobs(
    tmp_path: Path,
) -> None:
    """A real `sdcn gateway` with a data dir: one job done, one running when the gateway is
    killed with SIGKILL. Started again on the same data dir, it serves the finished result
    and runs the other job again, with the seed it drew at submit."""
    key, data = tmp_path / "gateway.key", tmp_path / "data"
    gateway_id = load_or_create_identity(key).peer_id
    listen = f"/ip4/127.0.0.1/tcp/{free_port()}/ws"
    port = free_port()
    args = ["--key", str(key), "--listen", listen, "--http", f"127.0.0.1:{port}"]
    args += ["--data-dir", str(data), "--no-limits"]  # it polls /v1/models
    job = {"kind": "txt2img", "model": "card-x", "prompt": "a cat", "width": 64, "height": 64}
    seed = Multiaddr.parse(f"{listen}/p2p/{gateway_id}")
    async with (
        gateway_process(args) as gateway,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http,
        node_process(tmp_path, "provider", seed, 1.0),  # 150 steps at 64x64: 2.3 s
    ):
        with trio.fail_after(60):
            # Another process's advert: polled, as there is nothing to wait on instead.
            while not (await http.get("/v1/models")).json():  # noqa: ASYNC110
                await trio.sleep(0.1)
        finished = (await http.post("/v1/jobs", json=job | {"steps": 5})).json()["id"]
        *_, (_, name, done) = await events_to_the_end(http, finished)
        assert name == "done"
        running = (await http.post("/v1/jobs", json=job | {"steps": 150})).json()["id"]
        await until_event(port, running, b"progress")
        gateway.send_signal(signal.SIGKILL)
        assert await gateway.wait() == -signal.SIGKILL
        status, seed_drawn = stored_seed(data, running)
        assert status == "running" and seed_drawn != -1

        async with gateway_process(args):
            again = (await http.get(f"/v1/jobs/{finished}")).json()
            assert again["status"] == "done" and again["images"] == done["images"]
            # The provider comes back (it dials the gateway again), and the job runs again.
            with trio.fail_after(90):
                events = await events_to_the_end(http, running)
            event_id, name, result = events[-1]
            assert name == "done" and event_id.startswith("2.")  # its second run
            assert result["info"]["seed"] == seed_drawn
            assert stored_seed(data, running) == ("done", seed_drawn)
