"""What the metrics cost per request: the same jobs through a gateway with metrics and without.

Two networks in this process, alike but for `PeerConfig(metrics=...)`: each a gateway (its
HTTP app called in-process through httpx's ASGI transport) and a test-card provider that
answers at once, on the in-memory transport. SDCN txt2img requests go to each in turn (on,
off, off, on, ...), and the CPU time of this process (user + system) is measured around each
request: it covers the gateway's HTTP layer and dispatcher, the job protocol on both sides and
the provider, with their metrics (counters, histograms, the request counter, the last-minute
window) or without. Each network's /metrics is scraped once every --jobs requests (counted
apart), as Prometheus would every 15 s or so.

added_cpu_ms is the median CPU of a request with metrics minus that of one without, over all
--rounds x --jobs requests of each; spread_ms is the range of that difference round by round.
Requests alternate one by one in one process, so that background load hits both alike, which
a machine shared with other work needs. `benchmarks/overhead.py --no-metrics` measures the
same across real processes, with far more noise.

Usage: python benchmarks/metrics_cost.py [--jobs 200] [--rounds 10] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import httpx
import trio

from gateway.api import create_app
from gateway.node import open_gateway
from sdcn_p2p.backends.testcard import TestcardBackend, TestcardConfig
from sdcn_p2p.peer import PeerConfig
from sdcn_p2p.provider import open_provider
from sdcn_p2p.testing import open_memory_peers, wait_advert

BODY = {"model": "card", "prompt": "a lighthouse", "steps": 20, "width": 64, "height": 64}


@asynccontextmanager
async def open_network(metrics: bool) -> AsyncIterator[httpx.AsyncClient]:
    """A gateway and an instant test-card provider; yields an HTTP client of the gateway."""
    async with (
        open_memory_peers(2, config=PeerConfig(metrics=metrics)) as (gateway_peer, node),
        AsyncExitStack() as stack,
    ):
        card = TestcardBackend(TestcardConfig(models=("card",)))
        await stack.enter_async_context(open_provider(node, card))
        await wait_advert(gateway_peer, node, lambda a: a.state == "online")
        gateway = await stack.enter_async_context(open_gateway(gateway_peer))
        transport = httpx.ASGITransport(app=create_app(gateway))
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
            yield http


async def request_cpu(http: httpx.AsyncClient, seed: int) -> float:
    """CPU seconds of one request."""
    start = time.process_time()
    response = await http.post("/txt2img", json=BODY | {"seed": seed})
    used = time.process_time() - start
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
    return used


async def measure(args: argparse.Namespace) -> dict[str, object]:
    async with open_network(True) as on, open_network(False) as off:
        for seed in range(20):  # warm up
            await request_cpu(on, seed)
            await request_cpu(off, seed)
        rounds: list[tuple[list[float], list[float]]] = []
        scrapes: list[float] = []
        for index in range(args.rounds):
            with_metrics: list[float] = []
            without: list[float] = []
            for seed in range(index * args.jobs, (index + 1) * args.jobs):
                pair = ((on, with_metrics), (off, without))
                for http, times in pair if seed % 2 else reversed(pair):
                    times.append(await request_cpu(http, seed))
            start = time.process_time()
            scrape = (await on.get("/metrics")).text
            scrapes.append(time.process_time() - start)
            rounds.append((with_metrics, without))
    all_with = [1000 * t for a, _ in rounds for t in a]
    all_without = [1000 * t for _, b in rounds for t in b]
    differences = [1000 * (statistics.median(a) - statistics.median(b)) for a, b in rounds]
    return {
        "cpu_ms_per_request_metrics": round(statistics.median(all_with), 3),
        "cpu_ms_per_request_no_metrics": round(statistics.median(all_without), 3),
        "added_cpu_ms": round(statistics.median(all_with) - statistics.median(all_without), 3),
        "spread_ms": [round(min(differences), 3), round(max(differences), 3)],
        "scrape_cpu_ms": round(1000 * statistics.median(scrapes), 2),
        "scrape_bytes": len(scrape),
        "jobs": args.jobs,
        "rounds": args.rounds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200, help="requests of each kind per round")
    parser.add_argument("--rounds", type=int, default=10, help="rounds (one scrape each)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    result = trio.run(measure, args)
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"CPU per request: {result['cpu_ms_per_request_metrics']} ms with metrics, "
        f"{result['cpu_ms_per_request_no_metrics']} ms without"
    )
    low, high = result["spread_ms"]  # type: ignore[misc]
    print(
        f"added by the metrics: {result['added_cpu_ms']} ms per request "
        f"(round by round {low} to {high} ms; aim: <= 0.2 ms; python {sys.version.split()[0]})"
    )
    print(f"one scrape: {result['scrape_cpu_ms']} ms of CPU, {result['scrape_bytes']} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
