"""The dispatcher against real providers (test cards) on the in-memory network."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from functools import partial

import pytest
import trio

from gateway.directory import ProviderDirectory
from gateway.dispatch import (
    Dispatcher,
    DispatchEvent,
    DispatchResult,
    GatewayConfig,
    JobAssigned,
    JobProgress,
    JobWaiting,
)
from gateway.errors import AllBusy, DeadlinePassed, DispatchError, NoProvider, ProviderFailed
from sdcn_p2p.backends import Backend, JobOutput
from sdcn_p2p.backends.testcard import TestcardBackend, TestcardConfig
from sdcn_p2p.errors import ConfigError, JobError
from sdcn_p2p.jobs import JobRequest
from sdcn_p2p.jobs.protocol import request_job
from sdcn_p2p.peer import Peer
from sdcn_p2p.provider import Provider, ProviderConfig
from sdcn_p2p.records import model_key
from sdcn_p2p.testing import (
    mock_wall_clock,
    open_memory_providers,
    small_job,
    wait_advert,
)
from sdcn_p2p.transport.memory import MemoryNetwork

#: 10 steps of 64x64 take 10 * (64 * 64 / 512**2) / 0.5 = 0.31 s on this card.
SLOW = TestcardConfig(models=("card-a",), speed=0.5)
#: Adverts that do not change for a long while after a job starts: the gateway's view of the
#: providers' load stays stale, so that they answer busy.
STALE = ProviderConfig(slots=1, max_queue=0, min_advert_gap=100.0)
#: A gateway that answers 503 at once when every provider is busy.
NO_QUEUE = GatewayConfig(queue_wait=0)


job = small_job


def long_job(**fields: object) -> JobRequest:
    """150 steps: 4.7 s on the slow card."""
    return job(steps=150, **fields)


class WatchedBackend(TestcardBackend):
    """A test card that tells when a job starts and ends, and can be told to fail."""

    def __init__(self, config: TestcardConfig = SLOW, *, fail: bool = False) -> None:
        super().__init__(config)
        self.fail = fail
        self.started = trio.Event()
        self.ended = trio.Event()
        self.seeds: list[int] = []

    async def generate(self, job: JobRequest, progress: Callable[[int, int], None]) -> JobOutput:
        self.seeds.append(job.seed)
        self.started.set()
        try:
            if self.fail:
                await trio.lowlevel.checkpoint()
                raise JobError("backend_failed", "out of VRAM")
            return await super().generate(job, progress)
        finally:
            self.ended.set()


@dataclass
class Net:
    network: MemoryNetwork
    gateway: Peer
    nodes: list[Peer]
    providers: list[Provider]
    directory: ProviderDirectory
    dispatcher: Dispatcher

    def provider_of(self, result: DispatchResult) -> int:
        return [str(node.peer_id) for node in self.nodes].index(result.info["provider"])

    def banned(self, index: int) -> bool:
        return self.directory.is_banned(self.nodes[index].peer_id, mock_wall_clock())


async def wait_idle(net: Net, index: int) -> None:
    """Wait for an advert of provider `index`, issued from now on, that shows it idle."""
    since = mock_wall_clock()
    await wait_advert(
        net.gateway, net.nodes[index], lambda a: a.issued_at >= since and a.queue == 0
    )
    assert net.providers[index].load == 0


@asynccontextmanager
async def gateway_network(
    *backends: Backend,
    configs: Sequence[ProviderConfig] | None = None,
    gateway_config: GatewayConfig = GatewayConfig(),
) -> AsyncIterator[Net]:
    """Peer 0 is the gateway (and everyone's bootstrap); one provider per backend after it."""
    network = MemoryNetwork(latency=0.005)
    async with open_memory_providers(backends, configs, network=network) as (
        gateway,
        nodes,
        providers,
    ):
        directory = ProviderDirectory(
            gateway.adverts, gateway.host.peerstore.rtt, rng=random.Random(1)
        )
        dispatcher = Dispatcher(gateway, directory, gateway_config, rng=random.Random(2))
        yield Net(network, gateway, nodes, providers, directory, dispatcher)


def speeds(*values: float, base: ProviderConfig = ProviderConfig()) -> list[ProviderConfig]:
    """One config per provider, each advertising its speed until it has measured one."""
    return [replace(base, initial_speed=value) for value in values]


async def waiting(net: Net, count: int) -> None:
    """Return (in simulated time) once `count` jobs wait in the gateway's queue."""
    while net.dispatcher.waiting < count:  # noqa: ASYNC110 (simulated time: nothing to wait on)
        await trio.sleep(0.001)


async def occupy(net: Net, index: int, nursery: trio.Nursery) -> WatchedBackend:
    """Start a long job on provider `index` behind the dispatcher's back; return once it runs."""
    backend = net.providers[index].backend
    assert isinstance(backend, WatchedBackend)
    nursery.start_soon(
        lambda: request_job(net.gateway.host, net.nodes[index].peer_id, long_job(), deadline=60)
    )
    await backend.started.wait()
    return backend


# --- choosing --------------------------------------------------------------------------------


async def test_a_model_only_one_provider_has_goes_to_it(autojump_clock) -> None:
    async with gateway_network(
        TestcardBackend(TestcardConfig(models=("card-a",))),
        TestcardBackend(TestcardConfig(models=("card-b",), loras=("pixel",))),
        TestcardBackend(TestcardConfig(models=("card-a", "card-c"))),
    ) as net:
        for _ in range(5):
            result = await net.dispatcher.run(job(model="CARD-B", loras=(("pixel", 0.8),)))
            assert net.provider_of(result) == 1
            assert result.info["attempts"] == 1 and result.info["seed"] == 7
            assert len(result.images) == 1 and result.images[0].startswith(b"\x89PNG")
            assert {"queue_ms", "run_ms", "model"} <= result.info.keys()
        result = await net.dispatcher.run(job(model="card-c"))
        assert net.provider_of(result) == 2
        assert net.directory.in_flight(net.nodes[1].peer_id) == 0


async def test_nobody_has_the_model_or_the_lora_is_404(autojump_clock) -> None:
    async with gateway_network(TestcardBackend(TestcardConfig(models=("card-a",)))) as net:
        with pytest.raises(DispatchError) as info:
            await net.dispatcher.run(job(loras=(("nope", 1.0),)))
        assert isinstance(info.value, NoProvider) and "'nope'" in info.value.message
        with pytest.raises(DispatchError) as info:
            await net.dispatcher.run(job(model="sdxl"))
        assert isinstance(info.value, NoProvider) and "'sdxl'" in info.value.message
        with pytest.raises(DispatchError) as info:
            await net.dispatcher.run(job(sampler_name="Made Up"))
        assert isinstance(info.value, NoProvider) and "'Made Up'" in info.value.message
        assert not net.banned(0)


# --- failover --------------------------------------------------------------------------------


async def test_busy_providers_are_skipped_and_attempts_counted(autojump_clock) -> None:
    backends = [WatchedBackend() for _ in range(3)]
    async with (
        gateway_network(*backends, configs=speeds(4.0, 2.0, 1.0, base=STALE)) as net,
        trio.open_nursery() as nursery,
    ):
        # The two the gateway thinks fastest are running jobs it does not know of.
        await occupy(net, 0, nursery)
        await occupy(net, 1, nursery)
        result = await net.dispatcher.run(job())
        assert net.provider_of(result) == 2 and result.info["attempts"] == 3
        # Busy is back-pressure, not a failure: held back until their next advert, not banned.
        assert not any(net.banned(i) for i in range(3))
        now = mock_wall_clock()
        assert [net.directory.is_busy(n.peer_id, now) for n in net.nodes] == [True, True, False]
        # While they are held back, the next job goes straight to the idle one.
        result = await net.dispatcher.run(job())
        assert net.provider_of(result) == 2 and result.info["attempts"] == 1


async def test_all_busy_is_503_at_once_without_a_queue(autojump_clock) -> None:
    backends = [WatchedBackend() for _ in range(2)]
    async with (
        gateway_network(
            *backends, configs=speeds(2.0, 1.0, base=STALE), gateway_config=NO_QUEUE
        ) as net,
        trio.open_nursery() as nursery,
    ):
        await occupy(net, 0, nursery)
        await occupy(net, 1, nursery)
        with pytest.raises(DispatchError) as info:
            await net.dispatcher.run(job())
        assert isinstance(info.value, AllBusy) and "busy" in info.value.message
        assert all(net.directory.is_busy(n.peer_id, mock_wall_clock()) for n in net.nodes)
        # Both held back: no provider to try at all, though both offer the model.
        with pytest.raises(DispatchError) as info:
            await net.dispatcher.run(job())
        assert isinstance(info.value, AllBusy)
        assert [len(b.seeds) for b in backends] == [1, 1]


async def test_when_all_are_busy_jobs_wait_for_room(
    autojump_clock,
) -> None:
    backends = [WatchedBackend() for _ in range(2)]
    async with (
        gateway_network(*backends, configs=speeds(2.0, 1.0, base=STALE)) as net,
        trio.open_nursery() as nursery,
    ):
        await occupy(net, 0, nursery)
        await occupy(net, 1, nursery)
        done: list[int] = []

        async def one(seed: int) -> None:
            result = await net.dispatcher.run(long_job(seed=seed))
            assert result.info["seed"] == seed
            done.append(seed)

        async with trio.open_nursery() as jobs:
            for seed in (1, 2, 3):
                jobs.start_soon(one, seed)
                await waiting(net, seed)  # in this order

        # Two took the providers as they freed up, the third the first of those to finish.
        # Each ran once.
        assert sorted(done) == [1, 2, 3]
        assert sorted(backends[0].seeds[1:] + backends[1].seeds[1:]) == [1, 2, 3]
        assert net.dispatcher.waiting == 0


async def test_a_provider_advertising_a_full_queue_is_not_asked(autojump_clock) -> None:
    """Its advert says it would answer busy: the job waits for room without asking it, and
    runs there once its next advert shows room.
    """
    backends = [WatchedBackend()]
    config = ProviderConfig(slots=1, max_queue=0)
    async with (
        gateway_network(*backends, configs=[config]) as net,
        trio.open_nursery() as nursery,
    ):
        await occupy(net, 0, nursery)
        advert = await wait_advert(net.gateway, net.nodes[0], lambda a: a.queue == 1)
        assert advert.max_queue == 0 and advert.full
        assert net.directory.is_busy(net.nodes[0].peer_id, mock_wall_clock())
        result = await net.dispatcher.run(job(seed=5))
        assert result.info["attempts"] == 1  # no busy answer on the way
        assert backends[0].seeds[1:] == [5]


async def test_a_full_queue_and_a_long_wait_are_503(autojump_clock) -> None:
    backends = [WatchedBackend()]
    config = GatewayConfig(queue_wait=2.0, max_waiting=1)
    async with (
        gateway_network(*backends, configs=[STALE], gateway_config=config) as net,
        trio.open_nursery() as nursery,
    ):
        await occupy(net, 0, nursery)
        started = trio.current_time()
        errors: list[DispatchError] = []

        async def one() -> None:
            with pytest.raises(DispatchError) as info:
                await net.dispatcher.run(job())
            errors.append(info.value)

        async with trio.open_nursery() as jobs:
            jobs.start_soon(one)
            await waiting(net, 1)
            await one()  # the queue is full: turned away at once
            assert trio.current_time() - started < 0.5 and isinstance(errors[0], AllBusy)
        # The one that waited gave up after queue_wait, well before its deadline.
        assert isinstance(errors[1], AllBusy)
        assert 2.0 <= trio.current_time() - started < 2.5
        assert backends[0].seeds == [backends[0].seeds[0]]  # only the job that occupied it


async def test_a_job_that_could_not_start_in_its_wait_is_503_at_once(autojump_clock) -> None:
    """One provider, 4.7 s a job; a job may wait 17.3 s (half its deadline). Of nine jobs at
    once, one runs and three can start within their wait (4.7, 9.4 and 14.1 s in): they wait
    and run. The other five would start 18.8 s in: a 503 at once, saying when.
    """
    backends = [WatchedBackend()]
    config = ProviderConfig(slots=1, max_queue=0)
    async with gateway_network(*backends, configs=[config]) as net:
        started = trio.current_time()
        outcomes: dict[int, tuple[float, DispatchResult | DispatchError]] = {}

        async def one(seed: int) -> None:
            try:
                outcome: DispatchResult | DispatchError = await net.dispatcher.run(
                    long_job(seed=seed)
                )
            except DispatchError as exc:
                outcome = exc
            outcomes[seed] = (trio.current_time() - started, outcome)

        async with trio.open_nursery() as nursery:
            for seed in range(9):
                nursery.start_soon(one, seed)
                await trio.sleep(0.01)
        done = {seed for seed, (_, o) in outcomes.items() if isinstance(o, DispatchResult)}
        assert done == {0, 1, 2, 3}
        assert backends[0].seeds == [0, 1, 2, 3]
        for seed in range(4, 9):
            took, error = outcomes[seed]
            assert isinstance(error, AllBusy)
            assert took < 0.1 and "past its 17 s wait" in error.message
            assert error.retry_after == pytest.approx(4 * 4.6875)  # when the four are done


async def test_a_provider_killed_mid_job_fails_over_and_each_job_runs_once(
    autojump_clock,
) -> None:
    backends = [WatchedBackend() for _ in range(3)]
    config = ProviderConfig(slots=4, max_queue=8)
    async with gateway_network(*backends, configs=[config] * 3) as net:
        results: dict[int, DispatchResult] = {}

        async def one(seed: int) -> None:
            results[seed] = await net.dispatcher.run(long_job(seed=seed))

        async with trio.open_nursery() as nursery:
            for seed in range(9):
                nursery.start_soon(one, seed)
            victim = backends[0]
            await victim.started.wait()
            net.network.set_down(net.nodes[0].host.transport.host)

        assert sorted(results) == list(range(9))
        assert all(r.info["seed"] == seed for seed, r in results.items())
        moved = [r for r in results.values() if r.info["attempts"] > 1]
        assert moved, "some jobs were running on the provider that died"
        assert all(net.provider_of(r) != 0 for r in results.values())
        assert all(r.info["attempts"] == 2 for r in moved)
        # Every job ran to the end exactly once, on a provider that survived.
        assert net.providers[0].jobs_done == 0
        assert net.providers[1].jobs_done + net.providers[2].jobs_done == 9
        assert net.directory.banned_until(net.nodes[0].peer_id) is not None
        assert all(net.directory.in_flight(node.peer_id) == 0 for node in net.nodes)


async def test_a_provider_that_always_fails_is_banned_and_then_a_proven_one_preferred(
    autojump_clock,
) -> None:
    broken, sound = WatchedBackend(fail=True), WatchedBackend()
    async with gateway_network(broken, sound, configs=speeds(4.0, 1.0)) as net:
        bad = net.nodes[0].peer_id
        result = await net.dispatcher.run(job())
        assert net.provider_of(result) == 1 and result.info["attempts"] == 2
        until = net.directory.banned_until(bad)
        assert until == pytest.approx(mock_wall_clock() + 5, abs=1)
        # Banned: not chosen, though it still looks fastest.
        result = await net.dispatcher.run(job())
        assert result.info["attempts"] == 1 and len(broken.seeds) == 1
        await trio.sleep(until - mock_wall_clock())
        # The ban is over, but the sound provider has proven itself and the broken one has
        # not: it is credited with no more speed than the proven one, which wins the tie.
        result = await net.dispatcher.run(job())
        assert result.info["attempts"] == 1 and len(broken.seeds) == 1
        assert net.directory.is_proven(net.nodes[1].peer_id) and not net.directory.is_proven(bad)
        assert net.directory.banned_until(net.nodes[1].peer_id) is None


async def test_the_only_provider_failing_is_502(autojump_clock) -> None:
    async with gateway_network(WatchedBackend(fail=True)) as net:
        with pytest.raises(DispatchError) as info:
            await net.dispatcher.run(job())
        assert isinstance(info.value, ProviderFailed) and "out of VRAM" in info.value.message


async def test_a_random_seed_is_drawn_once_and_kept_on_retry(autojump_clock) -> None:
    broken, sound = WatchedBackend(fail=True), WatchedBackend()
    async with gateway_network(broken, sound, configs=speeds(4.0, 1.0)) as net:
        result = await net.dispatcher.run(job(seed=-1))
        seed = result.info["seed"]
        assert 0 <= seed < 2**32 and result.info["attempts"] == 2
        assert broken.seeds == sound.seeds == [seed]


# --- deadlines and cancelling ------------------------------------------------------------------


async def test_deadline_passed_is_504_and_the_job_stops(autojump_clock) -> None:
    backend = WatchedBackend()
    async with gateway_network(backend) as net:
        start = trio.current_time()
        with pytest.raises(DispatchError) as info:
            await net.dispatcher.run(long_job(), deadline=1.0)
        assert isinstance(info.value, DeadlinePassed)
        assert trio.current_time() - start == pytest.approx(1.0, abs=0.1)
        # A deadline shorter than the job needs is not the provider's fault.
        assert not net.banned(0)
        await backend.ended.wait()
        await wait_idle(net, 0)


async def test_a_provider_far_slower_than_it_claims_is_banned_at_the_deadline(
    autojump_clock,
) -> None:
    # It claims 10 it/s but runs at 0.5: an ETA of 0.3 s, and nothing after 2 s.
    async with gateway_network(WatchedBackend(), configs=speeds(10.0)) as net:
        with pytest.raises(DispatchError) as info:
            await net.dispatcher.run(long_job(), deadline=2.0)
        assert isinstance(info.value, DeadlinePassed) and net.banned(0)


async def test_default_deadline_scales_with_the_job_and_is_capped(autojump_clock) -> None:
    async with gateway_network(TestcardBackend()) as net:
        small, big = job(steps=20, width=512, height=512), job(steps=150, width=2048, height=2048)
        assert net.dispatcher.default_deadline(small) == 30 + 20 * 2
        assert net.dispatcher.default_deadline(big) == 600


async def test_cancelling_run_cancels_the_job_on_the_provider(autojump_clock) -> None:
    backend = WatchedBackend()
    async with gateway_network(backend) as net:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: net.dispatcher.run(long_job()))
            await backend.started.wait()
            assert net.directory.in_flight(net.nodes[0].peer_id) == 1
            nursery.cancel_scope.cancel()  # the HTTP client went away
        assert net.directory.in_flight(net.nodes[0].peer_id) == 0
        await backend.ended.wait()
        await wait_idle(net, 0)
        assert net.providers[0].jobs_done == 0 and not net.banned(0)


# --- the DHT ---------------------------------------------------------------------------------


async def test_a_provider_missing_from_the_cache_is_found_in_the_dht(
    autojump_clock, monkeypatch
) -> None:
    async with gateway_network(TestcardBackend(TestcardConfig(models=("card-a",)))) as net:
        node, gateway = net.nodes[0], net.gateway
        envelope = node.adverts.envelope(node.peer_id)
        assert envelope is not None and await node.dht.put(envelope)  # stored by now
        # A gateway that joined late: gossip has not brought it this advert.
        gateway.adverts.remove(node.peer_id)
        lookups: list[bytes] = []
        get = gateway.dht.get

        async def spy(key: bytes):  # type: ignore[no-untyped-def]
            lookups.append(key)
            return await get(key)

        monkeypatch.setattr(gateway.dht, "get", spy)
        result = await net.dispatcher.run(job())
        assert result.info["provider"] == str(node.peer_id)
        assert lookups == [model_key("card-a")]
        assert gateway.adverts.get(node.peer_id) is not None
        # Known now: no more lookups.
        await net.dispatcher.run(job())
        assert len(lookups) == 1


async def test_each_model_has_its_own_line(autojump_clock) -> None:
    """A job for a model whose provider frees up does not wait behind one for another model."""
    crawl = WatchedBackend(TestcardConfig(models=("card-a",), speed=0.2))  # 150 steps: 12 s
    other = WatchedBackend(TestcardConfig(models=("card-b",), speed=0.5))  # 150 steps: 4.7 s
    async with (
        gateway_network(crawl, other, configs=[STALE, STALE]) as net,
        trio.open_nursery() as nursery,
    ):
        for index, model in enumerate(("card-a", "card-b")):
            nursery.start_soon(
                partial(
                    request_job,
                    net.gateway.host,
                    net.nodes[index].peer_id,
                    long_job(model=model),
                    deadline=100,
                )
            )
        await crawl.started.wait()
        await other.started.wait()
        finished: dict[str, float] = {}

        async def one(model: str) -> None:
            await net.dispatcher.run(job(model=model), deadline=120)
            finished[model] = trio.current_time()

        started = trio.current_time()
        async with trio.open_nursery() as jobs:
            jobs.start_soon(one, "card-a")
            await waiting(net, 1)
            jobs.start_soon(one, "card-b")
            await waiting(net, 2)
        # card-b ran once its provider's busy hold lapsed, while card-a still waited.
        assert finished["card-b"] - started < 8 < finished["card-a"] - started


# --- events and batches ------------------------------------------------------------------------


async def test_a_followed_job_hears_its_wait_each_attempt_and_its_progress(autojump_clock) -> None:
    backends = [WatchedBackend()]
    async with (
        gateway_network(*backends, configs=[STALE]) as net,
        trio.open_nursery() as nursery,
    ):
        await occupy(net, 0, nursery)
        events: list[DispatchEvent] = []
        result = await net.dispatcher.run(job(steps=4), on_event=events.append)
    provider = net.nodes[0].peer_id
    # Busy at first (its advert is stale), so the job waits first in line, then runs there.
    waits = [e for e in events if isinstance(e, JobWaiting)]
    assigned = [e for e in events if isinstance(e, JobAssigned)]
    steps = [e for e in events if isinstance(e, JobProgress)]
    assert waits and all(e == JobWaiting(0) for e in waits)
    assert assigned == [JobAssigned(provider, 1), JobAssigned(provider, 2)]
    assert result.info["attempts"] == 2
    assert steps[-1] == JobProgress(4, 4)
    assert events.index(waits[0]) < events.index(assigned[1]) < events.index(steps[0])


async def test_run_batch_returns_results_in_order_and_tags_events_with_the_part(
    autojump_clock,
) -> None:
    async with gateway_network(WatchedBackend(), WatchedBackend()) as net:
        events: list[DispatchEvent] = []
        jobs = [job(seed=seed, steps=2 + seed) for seed in (5, 1, 3)]
        results = await net.dispatcher.run_batch(jobs, on_event=events.append)
    assert [r.info["seed"] for r in results] == [5, 1, 3]
    for part, one in enumerate(jobs):
        assert JobProgress(one.steps, one.steps, part) in events
        assert any(isinstance(e, JobAssigned) and e.part == part for e in events)


async def test_run_batch_stops_the_others_when_one_fails(autojump_clock) -> None:
    backend = WatchedBackend()
    async with gateway_network(backend) as net:
        with pytest.raises(NoProvider):
            await net.dispatcher.run_batch([long_job(), job(model="nobody-has-it")])
        await backend.ended.wait()
        await wait_idle(net, 0)
        assert net.providers[0].jobs_done == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_attempts", 0),
        ("max_attempts", 1.5),
        ("max_waiting", -1),
        ("max_waiting", True),
        ("deadline_base", 0),
        ("deadline_cap", -1.0),
        ("dht_lookup_timeout", float("nan")),
        ("deadline_per_unit", -0.5),
        ("queue_wait", float("inf")),
        ("queue_wait", "30"),
    ],
)
def test_a_gateway_config_out_of_range_is_refused_naming_the_field(
    field: str, value: object
) -> None:
    with pytest.raises(ConfigError, match=rf"^GatewayConfig\.{field} "):
        GatewayConfig(**{field: value})  # type: ignore[arg-type]
