"""Fair shares on a public gateway: one flooding client against polite ones.

A gateway (`open_gateway`, with its job service, limits and fair line) and PROVIDERS
test-card providers (one slot, a queue of 8, as `sdcn node` runs by default) on the
in-memory transport under trio's MockClock. Every job is 5 to 15 steps at 256x256 (at
random: 0.5 to 1.5 s on a provider). Clients submit async jobs through the gateway's HTTP
app (``POST /v1/jobs``, in-process over ASGI, each client from its own address); a job's
latency is from its submission to its terminal event. Work the gateway and providers do in
threads (SQLite, PNG encoding) runs inline here, taking no simulated time: MockClock would
jump ahead while a thread works, and the figures would change from run to run.

- POLITE anonymous clients (each its own address, the default anonymous limits) submit one
  job every 8-12 s (at random) for --seconds seconds: about half the providers' capacity;
- a contributor (an API key linked to provider 0, which serves this gateway) and its twin
  (anonymous) each submit 4 jobs at once every 32-48 s;
- with the flood, one client (an API key of a "bulk" tier: no limit on jobs waiting or on
  requests) submits --flood jobs at once at the start.

Figures: ``polite_p95_ratio``: the polite clients' p95 latency with the flood over their
p95 without it (same arrivals); ``provider_busy_fraction``: the mean share of provider slots
running a job during the polite clients' window, with the flood (it may take every slot the
others leave); ``contributor_p95_vs_anonymous``: the contributor's p95 over its twin's,
with the flood; ``flood_done``: the flood's jobs done when the last polite job ended.

Usage: python benchmarks/fairness.py [--providers 4] [--polite 20] [--flood 1000]
       [--seconds 60] [--seed 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack

import httpx
import trio
import trio.testing

from gateway.access import AccessConfig, hash_key
from gateway.api import create_app
from gateway.node import open_gateway
from sdcn_p2p.backends.testcard import TestcardBackend, TestcardConfig
from sdcn_p2p.provider import Provider, open_provider
from sdcn_p2p.testing import inline_threads, open_memory_peers, wait_advert

MODEL = "card"
STEPS, SIZE = 10, 256
SPEED = 2.5  # it/s at 512x512: 10 it/s at 256x256, a job in 1 s
FLOOD_KEY, CONTRIBUTOR_KEY = "sdcn_flood", "sdcn_contributor"


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else math.inf


def keys(contributor_provider: str) -> AccessConfig:
    return AccessConfig.from_mapping(
        {
            "tiers": {
                "bulk": {
                    "limits": {
                        "max_waiting": "unlimited",
                        "requests_per_second": "unlimited",
                        "request_burst": "unlimited",
                        "megapixel_steps_per_minute": "unlimited",
                    }
                }
            },
            "keys": [
                {"name": "flood", "sha256": hash_key(FLOOD_KEY), "tier": "bulk"},
                {
                    "name": "contributor",
                    "sha256": hash_key(CONTRIBUTOR_KEY),
                    "provider": contributor_provider,
                },
            ],
        }
    )


def body(index: int, steps: int) -> dict[str, object]:
    return {
        "kind": "txt2img",
        "model": MODEL,
        "prompt": f"job {index}",
        "seed": index,
        "steps": steps,
        "width": SIZE,
        "height": SIZE,
    }


async def simulate(args: argparse.Namespace, flood: bool) -> dict[str, object]:
    async with (
        open_memory_peers(1 + args.providers, seed=args.seed) as (peer, *nodes),
        AsyncExitStack() as stack,
    ):
        providers: list[Provider] = []
        for node in nodes:
            card = TestcardConfig(models=(MODEL,), speed=SPEED)
            providers.append(
                await stack.enter_async_context(open_provider(node, TestcardBackend(card)))
            )
        for node in nodes:
            await wait_advert(peer, node)
        access = keys(str(nodes[0].peer_id))
        gateway = await stack.enter_async_context(open_gateway(peer, access=access))
        app = create_app(gateway)
        # The contributor's provider has served this gateway (an hour ago, say).
        gateway.jobs.contributions[str(nodes[0].peer_id)] = (100.0, 10, peer.wall_clock() - 60)
        start = trio.current_time()
        end = start + args.seconds
        latencies: dict[str, list[float]] = {"polite": [], "contributor": [], "twin": []}
        refused: list[int] = []

        def client(address: str) -> httpx.AsyncClient:
            transport = httpx.ASGITransport(app=app, client=(address, 40000))
            return httpx.AsyncClient(transport=transport, base_url="http://gw", timeout=None)

        async def submit(
            http: httpx.AsyncClient, index: int, key: str | None, rng: random.Random
        ) -> str | None:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            steps = rng.randint(STEPS // 2, STEPS * 3 // 2)
            answer = await http.post("/v1/jobs", json=body(index, steps), headers=headers)
            if answer.status_code != 202:
                refused.append(answer.status_code)
                return None
            return answer.json()["id"]

        async def wait_done(job_id: str) -> None:
            feed = await gateway.jobs.events(job_id)
            try:
                async for _ in feed:
                    pass
            finally:
                feed.close()

        async def follow(kind: str, job_id: str | None, submitted: float) -> None:
            if job_id is not None:
                await wait_done(job_id)
                latencies[kind].append(trio.current_time() - submitted)

        async def polite(
            number: int, kind: str, key: str | None, batch: int = 1, every: float = 10.0
        ) -> None:
            """Send `batch` jobs at once every `every` s (+-20 %) until the end."""
            async with client(f"10.0.{number // 250}.{number % 250 + 1}") as http:
                rng = random.Random(f"{args.seed}:{number}")  # the same with the flood or not
                await trio.sleep(rng.uniform(0, min(every, args.seconds / 2)))
                index = number * 10_000
                async with trio.open_nursery() as jobs:
                    while trio.current_time() < end:
                        submitted = trio.current_time()
                        for _ in range(batch):
                            index += 1
                            job_id = await submit(http, index, key, rng)
                            jobs.start_soon(follow, kind, job_id, submitted)
                        await trio.sleep(rng.uniform(0.8 * every, 1.2 * every))

        flood_ids: list[str] = []

        async def flooder() -> None:
            async with client("192.0.2.1") as http:
                rng = random.Random(f"{args.seed}:flood")
                for index in range(args.flood):
                    job_id = await submit(http, 10**8 + index, FLOOD_KEY, rng)
                    if job_id is not None:
                        flood_ids.append(job_id)

        busy: list[float] = []

        async def sample() -> None:
            # At random moments: on a grid, samples would fall on the instants MockClock
            # ends one job and starts the next (jobs of exactly 1 s back to back).
            slots = sum(p.config.slots for p in providers)
            sampler = random.Random(args.seed + 1)
            await trio.sleep(sampler.uniform(0, 0.5))
            while trio.current_time() < end:
                busy.append(sum(min(p.running, p.config.slots) for p in providers) / slots)
                await trio.sleep(sampler.uniform(0.25, 0.75))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample)
            if flood:
                nursery.start_soon(flooder)
            for number in range(args.polite):
                nursery.start_soon(polite, number, "polite", None)
            # Two clients alike but for the key: bursts of 4 jobs every 40 s.
            nursery.start_soon(polite, args.polite, "contributor", CONTRIBUTOR_KEY, 4, 40.0)
            nursery.start_soon(polite, args.polite + 1, "twin", None, 4, 40.0)
        flood_done = 0
        for job_id in flood_ids:
            state = await gateway.jobs.status(job_id, images=False)
            flood_done += state.status == "done"
        for job_id in flood_ids:  # leave nothing running behind
            await gateway.jobs.cancel(job_id)
        return {
            "polite_p95_s": round(percentile(latencies["polite"], 0.95), 3),
            "polite_p50_s": round(percentile(latencies["polite"], 0.5), 3),
            "polite_jobs": len(latencies["polite"]),
            "contributor_p95_s": round(percentile(latencies["contributor"], 0.95), 3),
            "twin_p95_s": round(percentile(latencies["twin"], 0.95), 3),
            "busy_fraction": round(sum(busy) / len(busy), 3),
            "refused": len(refused),
            "flood_done": flood_done,
        }


def run_case(args: argparse.Namespace, flood: bool) -> dict[str, object]:
    clock = trio.testing.MockClock(autojump_threshold=0)
    with inline_threads():
        return trio.run(simulate, args, flood, clock=clock)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--providers", type=int, default=4)
    parser.add_argument("--polite", type=int, default=20, help="polite anonymous clients")
    parser.add_argument("--flood", type=int, default=1000, help="jobs the flood submits at once")
    parser.add_argument("--seconds", type=float, default=60.0, help="the polite clients' window")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    calm = run_case(args, flood=False)
    flooded = run_case(args, flood=True)
    result = {
        "polite_p95_ratio": round(flooded["polite_p95_s"] / calm["polite_p95_s"], 3),  # type: ignore[operator]
        "provider_busy_fraction": flooded["busy_fraction"],
        "contributor_p95_vs_anonymous": round(
            flooded["contributor_p95_s"] / flooded["twin_p95_s"],  # type: ignore[operator]
            3,
        ),
        "without_flood": calm,
        "with_flood": flooded,
        "real_seconds": round(time.perf_counter() - started, 1),
    }
    if args.json:
        print(json.dumps(result))
        return 0
    for name, value in result.items():
        print(f"{name:30}{value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
