"""Trust: how fast spot checks catch providers that return wrong pictures, and what they cost.

A gateway and --honest (8) test-card providers whose pictures carry per-provider device jitter
(`sdcn_p2p.testing.trust.JitterBackend`: ±8 levels of pixel noise and a smooth drift) run on
the in-memory transport under trio's MockClock, round-trip times 20-200 ms per pair. Every job
goes through the real `Dispatcher` and `SpotChecker` (default `TrustConfig`), Poisson arrivals
at LOAD of the honest providers' capacity, jobs of 8-12 steps at 64x64 with their own seed.

- *kinds*: after --warmup jobs, one liar of each kind joins (`LyingBackend`: random noise; one
  fixed image; half the steps asked for; another model; seed 0 whatever the job says; honest
  80 % of the time and noise otherwise), each on its own address, as fast as the honest ones
  (the one running fewer steps looks faster); --jobs in all.
- *sybil*: after --warmup jobs, a swarm of --swarm (20) liars of those kinds in turn joins at
  once, four identities per machine (address); --sybil-jobs in all.

Per liar kind it reports the clients' jobs the liar ran before its exclusion (the most, over
the liars of that kind), and the bad pictures that reached clients; over each run, the extra
compute (the checks' work over the clients' work), honest providers excluded, and jobs drawn
for a check that no other provider could run (`unchecked`).

Usage: python benchmarks/trust.py [--jobs 10000] [--sybil-jobs 4000] [--warmup 300] [--seed 1]
       [--swarm 20] [--honest 8] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import random
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import trio
import trio.testing

from gateway.dispatch import DispatchResult
from gateway.errors import DispatchError
from gateway.node import Gateway
from gateway.spotcheck import Evidence, SpotChecker, TrustStats, open_spot_checker
from sdcn_p2p.backends.testcard import TestcardBackend, TestcardConfig
from sdcn_p2p.host import HostConfig
from sdcn_p2p.identity import PeerId
from sdcn_p2p.jobs import JobRequest
from sdcn_p2p.multiaddr import Multiaddr
from sdcn_p2p.peer import Peer, PeerConfig, open_peer
from sdcn_p2p.provider import open_provider
from sdcn_p2p.testing import (
    mock_wall_clock,
    open_memory_peers,
    test_identity,
    wait_advert,
)
from sdcn_p2p.testing.trust import JitterBackend, Lie, LyingBackend
from sdcn_p2p.transport.memory import MemoryNetwork

MODEL, CHEAP = "card", "card-cheap"
HONEST = 8
SPEED = 1.0  # it/s at 512x512: a 10-step 64x64 job takes 0.16 s
LOAD = 0.6
WARMUP = 300  # jobs before the liars join
SWARM = 20
PER_MACHINE = 4


@dataclass
class Run:
    """What one simulated run saw."""

    liars: dict[PeerId, LyingBackend] = field(default_factory=dict)
    honest: set[PeerId] = field(default_factory=set)
    served: Counter[PeerId] = field(default_factory=Counter)  # clients' jobs each one ran
    at_exclusion: dict[PeerId, int] = field(default_factory=dict)
    bad_served: Counter[PeerId] = field(default_factory=Counter)
    failed_jobs: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    checker: SpotChecker | None = None
    half: TrustStats | None = None  # the checker's figures halfway


def job_for(index: int, rng: random.Random) -> JobRequest:
    return JobRequest(
        "txt2img",
        MODEL,
        f"job {index}",
        seed=1 + index,  # seed 0 is what the seed-ignoring liar draws
        steps=rng.randrange(8, 13),
        width=64,
        height=64,
    )


def card() -> TestcardBackend:
    return TestcardBackend(TestcardConfig(models=(MODEL, CHEAP), speed=SPEED))


def liar_backend(lie: Lie, seed: int) -> LyingBackend:
    return LyingBackend(JitterBackend(card(), seed), lie, seed=seed, other_model=CHEAP)


@asynccontextmanager
async def open_sybils(
    network: MemoryNetwork, seed_addr: Multiaddr, count: int, *, seed: int
) -> AsyncIterator[list[Peer]]:
    """`count` peers, PER_MACHINE to an address, joining through `seed_addr`."""
    async with AsyncExitStack() as stack:
        peers = []
        transports = {}
        for index in range(count):
            machine = index // PER_MACHINE
            if machine not in transports:
                transports[machine] = network.transport(f"10.99.0.{machine + 1}")
            transport = transports[machine]
            listen = (Multiaddr.parse(f"/ip4/{transport.host}/tcp/{5000 + index}/ws"),)
            config = PeerConfig(host=HostConfig(listen=listen), bootstrap=(seed_addr,))
            peer = await stack.enter_async_context(
                open_peer(
                    test_identity(1000 + index, seed=seed),
                    config,
                    transport=transport,
                    wall_clock=mock_wall_clock,
                )
            )
            peers.append(peer)
        yield peers


async def simulate(case: str, jobs: int, seed: int, warmup: int, swarm: int, honest: int) -> Run:
    def one_way(src: str, dst: str) -> float:
        a, b = sorted((src, dst))
        digest = hashlib.sha256(f"{seed}:{a}:{b}".encode()).digest()
        return (0.020 + 0.180 * int.from_bytes(digest[:8], "big") / 2**64) / 2

    network = MemoryNetwork(latency=one_way, seed=seed)
    kinds = list(Lie)
    liars = len(kinds) if case == "kinds" else swarm
    run = Run()
    rng = random.Random(seed)
    async with (
        open_memory_peers(
            1 + honest + (liars if case == "kinds" else 0), network=network, seed=seed
        ) as (peer, *nodes),
        AsyncExitStack() as stack,
    ):
        for index, node in enumerate(nodes[:honest]):
            await stack.enter_async_context(open_provider(node, JitterBackend(card(), index)))
            run.honest.add(node.peer_id)
        for node in nodes[:honest]:
            await wait_advert(peer, node)
            await peer.host.ping(node.peer_id)
        gateway = Gateway(peer, rng=random.Random(seed))
        checker = await stack.enter_async_context(
            open_spot_checker(gateway.dispatcher, gateway.trust, rng=random.Random(seed + 1))
        )
        run.checker = checker

        def excluded(evidence: Evidence) -> None:
            run.at_exclusion.setdefault(evidence.provider, run.served[evidence.provider])

        checker.on_exclusion = excluded
        inner = gateway.dispatcher.checker

        async def counting(job: JobRequest, result: DispatchResult, *, verify: bool):  # type: ignore[no-untyped-def]
            assert inner is not None and result.provider is not None
            run.served[result.provider] += 1
            return await inner(job, result, verify=verify)

        gateway.dispatcher.checker = counting  # type: ignore[assignment]

        async def host_liars(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            async with AsyncExitStack() as liars_stack:
                if case == "kinds":
                    for index, (node, lie) in enumerate(zip(nodes[honest:], kinds, strict=True)):
                        backend = liar_backend(lie, 100 + index)
                        run.liars[node.peer_id] = backend
                        await liars_stack.enter_async_context(open_provider(node, backend))
                else:
                    seed_addr = peer.host.listen_addrs[0].with_peer_id(peer.peer_id)
                    sybils = await liars_stack.enter_async_context(
                        open_sybils(network, seed_addr, swarm, seed=seed)
                    )
                    for index, node in enumerate(sybils):  # in no simulated time: at once
                        backend = liar_backend(kinds[index % len(kinds)], 200 + index)
                        run.liars[node.peer_id] = backend
                        await liars_stack.enter_async_context(open_provider(node, backend))
                task_status.started()
                await trio.sleep_forever()

        # The honest providers' capacity: the liars' is no capacity once they are caught.
        capacity = honest * SPEED / job_for(0, random.Random(0)).cost
        start = trio.current_time()
        arrivals, at = [], 0.0
        for _ in range(jobs):
            at += rng.expovariate(LOAD * capacity)
            arrivals.append(at)

        async def one(index: int, at: float) -> None:
            await trio.sleep_until(start + at)
            job = job_for(index, random.Random(index))
            try:
                result = await gateway.dispatcher.run(job)
            except DispatchError as exc:
                run.failed_jobs += 1
                run.errors[f"{type(exc).__name__}: {exc.message[:60]}"] += 1
                return
            provider = result.provider
            liar = run.liars.get(provider) if provider is not None else None
            if liar is not None and job.seed in liar.lied_seeds:
                run.bad_served[provider] += 1
            if result.check is not None:  # the run ends once every check has
                await result.check.wait()

        async with trio.open_nursery() as services:
            async with trio.open_nursery() as nursery:
                for index, at in enumerate(arrivals):
                    if index == warmup:
                        await trio.sleep_until(start + at)
                        await services.start(host_liars)
                    if index == jobs // 2:  # the second half is the steady state
                        await trio.sleep_until(start + at)
                        run.half = dataclasses.replace(checker.stats)
                    nursery.start_soon(one, index, at)
            services.cancel_scope.cancel()
    return run


def summarize(run: Run) -> dict[str, object]:
    checker = run.checker
    assert checker is not None
    stats, half = checker.stats, run.half or TrustStats()
    per_kind: dict[str, dict[str, object]] = {}
    for peer, backend in run.liars.items():
        entry = per_kind.setdefault(
            str(backend.lie),
            {"liars": 0, "excluded": 0, "jobs_before_exclusion": [], "bad_images_served": 0},
        )
        entry["liars"] += 1  # type: ignore[operator]
        if peer in run.at_exclusion:
            entry["excluded"] += 1  # type: ignore[operator]
            entry["jobs_before_exclusion"].append(run.at_exclusion[peer])  # type: ignore[union-attr]
        else:  # never excluded: every job it ran counts
            entry["jobs_before_exclusion"].append(run.served[peer])  # type: ignore[union-attr]
        entry["bad_images_served"] += run.bad_served[peer]  # type: ignore[operator]
    for entry in per_kind.values():
        counts = entry.pop("jobs_before_exclusion")
        entry["jobs_before_exclusion_max"] = max(counts)  # type: ignore[type-var]
    honest_excluded = sum(peer in run.at_exclusion for peer in run.honest)
    return {
        "per_kind": per_kind,
        "liar_jobs_before_exclusion_max": max(
            (e["jobs_before_exclusion_max"] for e in per_kind.values()),  # type: ignore[type-var]
            default=0,
        ),
        "liars_excluded": sum(e["excluded"] for e in per_kind.values()),  # type: ignore[misc]
        "liars": len(run.liars),
        "bad_images_served": sum(run.bad_served.values()),
        "extra_compute": round(stats.extra_compute, 4),
        "extra_compute_second_half": round(
            (stats.rerun_cost - half.rerun_cost) / (stats.job_cost - half.job_cost), 4
        ),
        "honest_excluded": honest_excluded,
        "unchecked_jobs": stats.unchecked,
        "skipped_checks": stats.skipped,
        "jobs": stats.jobs,
        "failed_jobs": run.failed_jobs,
        "errors": dict(run.errors.most_common(5)),
        "checks": stats.reruns,
        "arbitrations": stats.arbitrations,
        "strikes": stats.strikes,
    }


def run_case(
    case: str,
    jobs: int,
    seed: int,
    warmup: int = WARMUP,
    swarm: int = SWARM,
    honest: int = HONEST,
) -> dict[str, object]:
    clock = trio.testing.MockClock(autojump_threshold=0)
    run = trio.run(simulate, case, jobs, seed, warmup, swarm, honest, clock=clock)
    return {**summarize(run), "honest": honest}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000, help="jobs in the kinds run")
    parser.add_argument("--sybil-jobs", type=int, default=4_000, help="jobs in the Sybil run")
    parser.add_argument("--warmup", type=int, default=WARMUP, help="jobs before liars join")
    parser.add_argument("--swarm", type=int, default=SWARM, help="liars in the Sybil swarm")
    parser.add_argument("--honest", type=int, default=HONEST, help="honest providers")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    kinds = run_case("kinds", args.jobs, args.seed, args.warmup, args.swarm, args.honest)
    sybil = run_case("sybil", args.sybil_jobs, args.seed, args.warmup, args.swarm, args.honest)
    result = {
        **{key: kinds[key] for key in kinds if key != "per_kind"},
        "per_kind": kinds["per_kind"],
        "sybil": sybil,
        "real_seconds": round(time.perf_counter() - started, 1),
    }
    if args.json:
        print(json.dumps(result))
        return 0
    for name, figures in (
        ("one liar of each kind", kinds),
        (f"Sybil swarm of {args.swarm}", sybil),
    ):
        print(f"{name}: {figures['jobs']} jobs, {args.honest} honest providers")
        print(f"  {'kind':16}{'excluded':>10}{'jobs before':>13}{'bad served':>12}")
        for kind, entry in figures["per_kind"].items():  # type: ignore[attr-defined]
            print(
                f"  {kind:16}{entry['excluded']:>6}/{entry['liars']:<3}"
                f"{entry['jobs_before_exclusion_max']:>13}{entry['bad_images_served']:>12}"
            )
        print(
            f"  extra compute {figures['extra_compute']:.2%} (second half "
            f"{figures['extra_compute_second_half']:.2%}), honest excluded "
            f"{figures['honest_excluded']}, unchecked {figures['unchecked_jobs']}, "
            f"checks {figures['checks']}, arbitrations {figures['arbitrations']}, "
            f"failed jobs {figures['failed_jobs']}"
        )
    python = sys.version.split()[0]
    print(
        "aim: <= 20 jobs before exclusion, <= 5 % extra compute, 0 honest excluded "
        f"(simulated; real time {result['real_seconds']} s, python {python})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
