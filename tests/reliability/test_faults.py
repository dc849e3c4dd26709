"""Faults: providers that die, hang, send garbage or trickle bytes; a bootstrap peer that
restarts; a network split in two and healed. In-memory network under MockClock.

What must hold in each: every request ends in images or a clear error within its deadline,
no job is answered twice, and once everything is closed no task is left behind.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

import httpx
import pytest
import trio

from bootstrap.node import open_bootstrap
from gateway.api import create_app
from gateway.dispatch import Dispatcher, DispatchResult, GatewayConfig
from gateway.errors import AllBusy, DeadlinePassed, DispatchError
from gateway.node import Gateway, open_gateway
from sdcn_p2p.backends import Backend, JobOutput
from sdcn_p2p.backends.testcard import TestcardBackend, TestcardConfig
from sdcn_p2p.connection import Stream
from sdcn_p2p.host import HostConfig
from sdcn_p2p.jobs import JobRequest
from sdcn_p2p.jobs.protocol import JOB, MAX_JOB_MESSAGE, result_message
from sdcn_p2p.multiaddr import Multiaddr
from sdcn_p2p.peer import Peer, PeerConfig, open_peer
from sdcn_p2p.provider import Provider, ProviderConfig, open_provider
from sdcn_p2p.records import Advert, ModelInfo
from sdcn_p2p.testing import (
    all_tasks,
    mock_wall_clock,
    open_memory_hosts,
    small_job,
    test_identity,
    wait_advert,
)
from sdcn_p2p.transport.memory import MemoryNetwork
from sdcn_p2p.wire.messages import encode_message

#: 10 steps of 64x64 take 10 * (64 * 64 / 512**2) / 2 = 0.08 s on this card.
CARD = TestcardConfig(models=("card",), speed=2.0)
PORT = 4001


job = partial(small_job, model="card", prompt="a lighthouse")


@dataclass
class Node:
    """A peer started in its own task: `kill()` cancels it, as a crash inside the process."""

    peer: Peer
    provider: Provider | None
    scope: trio.CancelScope
    stopped: trio.Event

    async def kill(self) -> None:
        self.scope.cancel()
        await self.stopped.wait()


class Net:
    """A memory network with a gateway peer (index 0, everyone's bootstrap) and nodes that
    can be started and killed one by one.
    """

    def __init__(self, network: MemoryNetwork, gateway: Peer, nursery: trio.Nursery) -> None:
        self.network = network
        self.gateway = gateway
        self.seed = gateway.host.listen_addrs[0].with_peer_id(gateway.peer_id)
        self.nursery = nursery
        self.dispatcher = Gateway(gateway, rng=random.Random(1)).dispatcher

    @property
    def directory(self):  # type: ignore[no-untyped-def]
        return self.dispatcher.directory

    async def start(
        self,
        index: int,
        backend: Backend | None = None,
        *,
        config: ProviderConfig = ProviderConfig(),
        handler: Callable[[Stream], Awaitable[None]] | None = None,
        host: str | None = None,
        seeds: tuple[Multiaddr, ...] | None = None,
        streams: int = 128,
    ) -> Node:
        """Start peer `index`: a provider of `backend`, or a hostile one serving the job
        protocol with `handler` and advertising model "card" at 50 it/s.
        """

        async def run(task_status: trio.TaskStatus[Node]) -> None:
            stopped = trio.Event()
            try:
                with trio.CancelScope() as scope:
                    transport = self.network.transport(host)
                    listen = (Multiaddr.parse(f"/ip4/{transport.host}/tcp/{PORT}/ws"),)
                    config_ = PeerConfig(
                        host=HostConfig(listen=listen, max_inbound_streams=streams),
                        bootstrap=self_seeds,
                    )
                    async with open_peer(
                        test_identity(index),
                        config_,
                        transport=transport,
                        wall_clock=mock_wall_clock,
                    ) as peer:
                        if handler is not None:
                            peer.host.set_handler(JOB, handler, max_message_size=MAX_JOB_MESSAGE)
                            await peer.publish_advert(claim(peer))
                            task_status.started(Node(peer, None, scope, stopped))
                            await trio.sleep_forever()
                        assert backend is not None
                        async with open_provider(peer, backend, config) as provider:
                            task_status.started(Node(peer, provider, scope, stopped))
                            await trio.sleep_forever()
            finally:
                stopped.set()

        self_seeds = (self.seed,) if seeds is None else seeds
        node: Node = await self.nursery.start(run)
        await node.peer.bootstrapped.wait()
        await wait_advert(self.gateway, node.peer)
        return node


def claim(peer: Peer, *, speed: float = 50.0) -> Advert:
    """An advert claiming model "card" at `speed`, whatever the peer really does."""
    now = peer.wall_clock()
    return Advert(
        peer.peer_id,
        seq=int(now * 1000),
        issued_at=now,
        ttl=180.0,
        addrs=tuple(peer.host.advertised_addrs),
        backend="testcard",
        models=(ModelInfo("card"),),
        samplers=("Euler a",),
        speed=speed,
    )


@asynccontextmanager
async def open_net(*, latency: float = 0.005) -> AsyncIterator[Net]:
    """Yields the network; on exit checks that closing it left no task behind."""
    before = all_tasks()
    network = MemoryNetwork(latency=latency)
    transport = network.transport()
    listen = (Multiaddr.parse(f"/ip4/{transport.host}/tcp/{PORT}/ws"),)
    async with (
        open_peer(
            test_identity(0),
            PeerConfig(host=HostConfig(listen=listen)),
            transport=transport,
            wall_clock=mock_wall_clock,
        ) as gateway,
        trio.open_nursery() as nursery,
    ):
        yield Net(network, gateway, nursery)
        nursery.cancel_scope.cancel()
    assert all_tasks() == before


async def run_timed(dispatcher: Dispatcher, job: JobRequest, deadline: float):  # type: ignore[no-untyped-def]
    """Run `job`; returns (result or DispatchError, seconds taken)."""
    start = trio.current_time()
    try:
        outcome: object = await dispatcher.run(job, deadline=deadline)
    except DispatchError as exc:
        outcome = exc
    return outcome, trio.current_time() - start


# --- providers that die ------------------------------------------------------------------------


class Started(TestcardBackend):
    """A test card that says when a job starts."""

    def __init__(self, config: TestcardConfig = CARD) -> None:
        super().__init__(config)
        self.started = trio.Event()

    async def generate(self, job: JobRequest, progress: Callable[[int, int], None]) -> JobOutput:
        self.started.set()
        return await super().generate(job, progress)


async def test_a_provider_killed_mid_job_fails_over_and_each_job_is_answered_once(
    autojump_clock,
) -> None:
    """Ten jobs at once on two providers; one is cancelled (its peer closed) while running:
    every job ends in images exactly once, from the survivor where the victim died.
    """
    async with open_net() as net:
        victim_backend = Started(TestcardConfig(models=("card",), speed=0.5))
        victim = await net.start(1, victim_backend, config=ProviderConfig(max_queue=20))
        survivor = await net.start(2, TestcardBackend(CARD), config=ProviderConfig(max_queue=20))
        results: dict[int, dict] = {}

        async def one(seed: int) -> None:
            result = await net.dispatcher.run(job(seed=seed, steps=40), deadline=60)
            assert seed not in results
            results[seed] = result.info

        async with trio.open_nursery() as nursery:
            for seed in range(10):
                nursery.start_soon(one, seed)
            await victim_backend.started.wait()
            assert victim.provider is not None and victim.provider.load > 0
            await victim.kill()
        assert sorted(results) == list(range(10))
        assert survivor.provider is not None
        assert survivor.provider.jobs_done == 10  # the victim finished none
        moved = [info for info in results.values() if info["attempts"] == 2]
        assert moved and all(info["provider"] == str(survivor.peer.peer_id) for info in moved)
        assert net.directory.is_banned(victim.peer.peer_id, mock_wall_clock())


# --- providers that hang -----------------------------------------------------------------------


class Hanging(TestcardBackend):
    """Advertises a card, then never returns from a job (until cancelled)."""

    def __init__(self) -> None:
        super().__init__(CARD)
        self.cancelled = 0
        self.ended = trio.Event()

    async def generate(self, job: JobRequest, progress: Callable[[int, int], None]) -> JobOutput:
        try:
            await trio.sleep_forever()
        finally:
            self.cancelled += 1
            self.ended.set()
        raise AssertionError("unreachable")


async def test_a_provider_that_hangs_ends_in_504_at_the_deadline(autojump_clock) -> None:
    async with open_net() as net:
        backend = Hanging()
        await net.start(1, backend)
        outcome, took = await run_timed(net.dispatcher, job(), deadline=20)
        assert isinstance(outcome, DeadlinePassed), outcome
        assert "deadline" in outcome.message
        assert 20 <= took <= 20.5
        with trio.fail_after(1):
            await backend.ended.wait()
        assert backend.cancelled == 1  # the provider stopped working on it too


async def test_a_hanging_unproven_provider_gets_half_the_deadline_then_a_proven_one_runs_it(
    autojump_clock,
) -> None:
    async with open_net() as net:
        sound = await net.start(1, TestcardBackend(CARD))
        await net.dispatcher.run(job(), deadline=30)  # the sound provider proves itself
        # A newcomer claims 10x the speed, and the sound one is busy with a long job.
        await net.start(2, Hanging(), config=ProviderConfig())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(net.dispatcher.run, job(steps=150, seed=1))
            while sound.provider is not None and sound.provider.load == 0:  # noqa: ASYNC110
                await trio.sleep(0.01)
            outcome, took = await run_timed(net.dispatcher, job(seed=2), deadline=30)
        assert not isinstance(outcome, DispatchError), outcome
        assert outcome.info["provider"] == str(sound.peer.peer_id)  # type: ignore[attr-defined]
        assert outcome.info["attempts"] == 2  # type: ignore[attr-defined]
        assert 15 <= took < 30


# --- providers that lie on the wire ------------------------------------------------------------

GARBAGE_INFO = {
    "seed": 7,
    "model": "card",
    "provider": "x",
    "queue_ms": 0,
    "run_ms": 1,
    "backend": "testcard",
}


async def send_garbage_png(stream: Stream) -> None:
    """Answer every job with bytes that start like a PNG and are not one."""
    await stream.receive_message()
    await stream.send_message(
        {"type": "result", "images": [b"\x89PNG\r\n\x1a\n" + bytes(200)], "info": GARBAGE_INFO}
    )
    await stream.aclose()


async def test_garbage_behind_a_png_signature_is_refused_and_the_job_fails_over(
    autojump_clock,
) -> None:
    async with open_net() as net:
        liar = await net.start(1, handler=send_garbage_png)
        sound = await net.start(2, TestcardBackend(CARD))
        # The liar claims 50 it/s: it is tried first, its answer refused, the job moves on.
        result = await net.dispatcher.run(job(), deadline=30)
        assert result.info["provider"] == str(sound.peer.peer_id)
        assert result.info["attempts"] == 2
        assert result.images[0].startswith(b"\x89PNG")
        assert net.directory.is_banned(liar.peer.peer_id, mock_wall_clock())


async def test_only_a_garbage_provider_is_a_clear_503(autojump_clock) -> None:
    async with open_net() as net:
        await net.start(1, handler=send_garbage_png)
        outcome, _ = await run_timed(net.dispatcher, job(), deadline=30)
        assert isinstance(outcome, AllBusy)
        assert "not a valid PNG" in outcome.message


async def trickle(stream: Stream) -> None:
    """Answer with a valid result, one byte a second (a slow-loris provider)."""
    await stream.receive_message()
    image = TestcardBackend(CARD)
    output = await image.generate(job(), lambda step, total: None)
    data = encode_message(result_message(output.images, GARBAGE_INFO), max_size=MAX_JOB_MESSAGE)
    for byte in data:
        await stream.send_all(bytes([byte]))
        await trio.sleep(1)


async def test_a_provider_answering_a_byte_a_second_is_cut_at_the_deadline(autojump_clock) -> None:
    async with open_net() as net:
        await net.start(1, handler=trickle)
        outcome, took = await run_timed(net.dispatcher, job(), deadline=25)
        assert isinstance(outcome, DeadlinePassed)
        assert 25 <= took <= 25.5


# --- the bootstrap peer, and a split network ---------------------------------------------------


async def test_a_restarted_bootstrap_peer_reconnects_the_network(autojump_clock) -> None:
    """The bootstrap dies; a provider joins through it once it is back, with the same id and
    address: the gateway, which had joined through it earlier, gets the newcomer's advert.
    """
    before = all_tasks()
    network = MemoryNetwork(latency=0.005)
    boot_host = "10.0.0.1"
    listen = (Multiaddr.parse(f"/ip4/{boot_host}/tcp/{PORT}/ws"),)
    boot_config = PeerConfig(host=HostConfig(listen=listen))
    seed = listen[0].with_peer_id(test_identity(0).peer_id)
    boot_transport = network.transport(boot_host)  # the same machine, started twice

    @asynccontextmanager
    async def bootstrap() -> AsyncIterator[None]:
        async with open_bootstrap(
            test_identity(0),
            boot_config,
            transport=boot_transport,
            wall_clock=mock_wall_clock,
        ):
            yield

    async with trio.open_nursery() as nursery:
        async with bootstrap():
            transport = network.transport()
            gw_listen = (Multiaddr.parse(f"/ip4/{transport.host}/tcp/{PORT}/ws"),)
            gateway = await nursery.start(
                _serve_peer,
                1,
                PeerConfig(HostConfig(listen=gw_listen), bootstrap=(seed,)),
                transport,
            )
            await gateway.bootstrapped.wait()
        # The bootstrap peer is gone for a while; the gateway keeps running.
        await trio.sleep(30)
        async with bootstrap():
            net = Net(network, gateway, nursery)
            net.seed = seed
            newcomer = await net.start(2, TestcardBackend(CARD))  # waits for the advert
            result = await net.dispatcher.run(job(), deadline=30)
            assert result.info["provider"] == str(newcomer.peer.peer_id)
            nursery.cancel_scope.cancel()
    assert all_tasks() == before


async def _serve_peer(
    index: int,
    config: PeerConfig,
    transport,
    *,
    task_status: trio.TaskStatus[Peer],  # type: ignore[no-untyped-def]
) -> None:
    async with open_peer(
        test_identity(index), config, transport=transport, wall_clock=mock_wall_clock
    ) as peer:
        task_status.started(peer)
        await trio.sleep_forever()


async def test_a_split_network_heals_and_its_halves_merge_their_adverts(autojump_clock) -> None:
    """Gateway and one provider on one side, two providers on the other. While split, each
    side keeps working and the gateway fails over to its own side; once healed, the gateway
    learns the far side's new adverts and runs jobs there again.
    """
    async with open_net() as net:
        near = await net.start(1, TestcardBackend(CARD))
        far = [await net.start(i, TestcardBackend(CARD)) for i in (2, 3)]
        hosts = [n.peer.host.transport.host for n in (near, *far)]
        gateway_host = net.gateway.host.transport.host
        net.network.partition([gateway_host, hosts[0]], hosts[1:])
        split_at = mock_wall_clock()
        for seed in range(6):
            result = await net.dispatcher.run(job(seed=seed), deadline=30)
            assert result.info["provider"] == str(near.peer.peer_id)
        # Long enough for the far side's adverts to expire at the gateway.
        await trio.sleep(200)
        assert net.gateway.adverts.get(far[0].peer.peer_id) is None
        net.network.heal()
        for node in far:
            await wait_advert(net.gateway, node.peer, lambda a: a.issued_at > split_at + 200)
        net.directory.ban(near.peer.peer_id, mock_wall_clock())  # make the far side work
        result = await net.dispatcher.run(job(seed=99), deadline=30)
        assert result.info["provider"] in {str(n.peer.peer_id) for n in far}


@pytest.mark.parametrize("kill_after", [0.0, 0.05])
async def test_killing_a_provider_while_it_joins_leaves_no_task_behind(
    autojump_clock, kill_after: float
) -> None:
    async with open_net() as net:
        node = await net.start(1, TestcardBackend(CARD))
        await trio.sleep(kill_after)
        await node.kill()


# --- back-pressure -----------------------------------------------------------------------------


async def post_at_once(
    app: object, *, count: int, steps: int, stagger: float = 0.0
) -> list[tuple[int, float, dict, httpx.Headers]]:
    """POST `count` txt2img jobs of model "card" (seeds 0, 1, ...), `stagger` seconds apart;
    returns (status, seconds taken, body, headers) of each, in the order they were answered.
    """
    answers: list[tuple[int, float, dict, httpx.Headers]] = []
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:

        async def one(seed: int) -> None:
            start = trio.current_time()
            body = {"model": "card", "prompt": "x", "seed": seed, "steps": steps}
            response = await http.post("/txt2img", json=body | {"width": 64, "height": 64})
            took = trio.current_time() - start
            answers.append((response.status_code, took, response.json(), response.headers))

        async with trio.open_nursery() as nursery:
            for seed in range(count):
                nursery.start_soon(one, seed)
                if stagger:
                    await trio.sleep(stagger)
    return answers


async def test_all_providers_full_queues_then_is_a_quick_503_with_retry_after_and_no_ban(
    autojump_clock,
) -> None:
    """Two providers with room for two jobs each, a gateway queue of two, twelve requests at
    once through the HTTP API: six get images (four at once, two after waiting for room), the
    rest a 503 with Retry-After at once (no DHT lookup, no waiting for a deadline), and nobody
    is banned for being busy.
    """
    slow = TestcardConfig(models=("card",), speed=0.5)
    full = ProviderConfig(slots=1, max_queue=1)
    async with open_net() as net:
        nodes = [await net.start(i, TestcardBackend(slow), config=full) for i in (1, 2)]
        lookups = 0
        real_get = net.gateway.dht.get

        async def counted_get(key: bytes):  # type: ignore[no-untyped-def]
            nonlocal lookups
            lookups += 1
            return await real_get(key)

        net.gateway.dht.get = counted_get  # type: ignore[method-assign]
        config = GatewayConfig(max_waiting=2)
        async with open_gateway(net.gateway, config, rng=random.Random(4)) as gateway:
            statuses = await post_at_once(create_app(gateway), count=12, steps=40)
        codes = sorted(code for code, *_ in statuses)
        assert codes == [200] * 6 + [503] * 6
        for code, took, body, headers in statuses:
            if code == 503:
                assert took < 1.0 and set(body) == {"msg"} and headers["retry-after"] == "1"
        assert lookups == 0
        now = mock_wall_clock()
        assert not any(gateway.directory.is_banned(n.peer.peer_id, now) for n in nodes)


async def test_a_job_that_could_not_start_in_its_wait_is_a_503_at_once_saying_when(
    autojump_clock,
) -> None:
    """One provider, 4.7 s a job, jobs that may wait 17.3 s: of six requests at once through
    the HTTP API, four get images (one at once, three after waiting) and two a 503 at once
    whose Retry-After is when the four will be through (18.75 s).
    """
    slow = TestcardConfig(models=("card",), speed=0.5)
    async with open_net() as net:
        await net.start(1, TestcardBackend(slow), config=ProviderConfig(slots=1, max_queue=0))
        async with open_gateway(net.gateway, rng=random.Random(4)) as gateway:
            answers = await post_at_once(create_app(gateway), count=6, steps=150, stagger=0.01)
        assert sorted(code for code, *_ in answers) == [200] * 4 + [503] * 2
        refusals = [(took, headers) for code, took, _, headers in answers if code == 503]
        assert all(took < 0.1 and headers["retry-after"] == "19" for took, headers in refusals)


async def test_streams_refused_at_a_providers_stream_limit_are_back_pressure(
    autojump_clock,
) -> None:
    """A provider that resets job streams beyond its stream limit while we keep it full is
    held back like a busy one, not banned: the jobs it refused wait for room and run as soon
    as ours end; with no queue, they are 503s.
    """
    async with open_net() as net:
        config = ProviderConfig(max_queue=20)
        node = await net.start(1, TestcardBackend(CARD), config=config, streams=4)
        outcomes: list[object] = []

        async def one(seed: int) -> None:
            try:
                outcomes.append(await net.dispatcher.run(job(seed=seed, steps=40), deadline=30))
            except DispatchError as exc:
                outcomes.append(exc)
                banned.append(net.directory.is_banned(node.peer.peer_id, mock_wall_clock()))

        banned: list[bool] = []
        async with trio.open_nursery() as nursery:
            for seed in range(10):
                nursery.start_soon(one, seed)
        assert all(isinstance(o, DispatchResult) for o in outcomes)
        assert node.provider is not None and node.provider.jobs_done == 10

        outcomes.clear()
        net.dispatcher.config = GatewayConfig(queue_wait=0)
        async with trio.open_nursery() as nursery:
            for seed in range(10):
                nursery.start_soon(one, seed)
        refused = [o for o in outcomes if isinstance(o, DispatchError)]
        assert refused and all(isinstance(o, AllBusy) for o in refused)
        assert "closed before the protocol was accepted" in refused[0].message
        assert not any(banned)
        result = await net.dispatcher.run(job(seed=99), deadline=30)
        assert result.info["provider"] == str(node.peer.peer_id)


async def test_a_stream_cancelled_while_opening_is_reset_not_leaked(autojump_clock) -> None:
    """A job request cancelled inside `open_stream` (a client that went away at that very
    moment) leaves no stream behind on either side.
    """
    async with open_memory_hosts(2) as (gateway, provider):
        handled = trio.Event()

        async def handler(stream: Stream) -> None:
            try:
                await stream.receive_message()
            finally:
                handled.set()

        provider.set_handler("/test/job/1.0.0", handler)
        addr = provider.listen_addrs[0].with_peer_id(provider.peer_id)
        conn = await gateway.connect(addr)
        await trio.sleep(1)  # identify is over
        assert conn.num_streams == 0
        for _ in range(3):
            with trio.CancelScope() as scope:
                scope.cancel()
                await conn.open_stream("/test/job/1.0.0")
        assert conn.num_streams == 0
        with trio.fail_after(5):
            await handled.wait()  # the provider's handler saw the reset
        await trio.sleep(1)
        remote = provider.connection(gateway.peer_id)
        assert remote is not None and remote.num_streams == 0
