"""Gateway overhead: an instant webui called directly, and through gateway -> provider.

The backend is the fake AUTOMATIC1111 webui returning a fixed 512x512 noise PNG (~400 KB) at
once. The same /sdapi/v1/txt2img body goes

- (a) directly to the fake webui over HTTP, and
- (b) to the gateway's AUTOMATIC1111-compatible /sdapi/v1/txt2img, which sends the job over a
  real loopback WebSocket (Noise + yamux) to a provider whose webui backend calls the same fake.

Every part is its own process, as deployed: the fake webui, the gateway (`sdcn gateway`) and
PROVIDERS provider nodes (`sdcn node --backend webui`), plus this client (httpx). One process
would put every part on one core and make the requests-per-second figure meaningless.

A webui runs one job at a time, so each provider has one slot (as `sdcn node` insists) and a
queue of --max-queue (default 64: room for every request at once, so this measures the
network's cost and not admission; the gateway does not know a provider's queue limit, so with
short queues a busy provider is refused, banned for 5 s and the request may fail with 503).
PROVIDERS providers share the one fake, standing for that many GPUs. The fake serialises its
jobs too, so both paths have the same single backend behind them.

Sequential latency (concurrency 1) alternates a and b request by request, so background load
hits both alike; added_ms_* are the percentiles of b minus those of a. Requests per second at
concurrency 8 and 64 run a, b, b, a for --duration seconds each and add up.

The gateway and providers collect their Prometheus metrics as deployed; the gateway's
``GET /metrics`` is read once at the end (metrics_jobs_ok: the jobs it counted). With
--no-metrics they collect none (``sdcn ... --no-metrics``): compare the CPU per request of
runs with and without to see what the metrics cost.

Usage: python benchmarks/overhead.py [--requests 300] [--duration 5] [--providers 4]
       [--max-queue 64] [--no-metrics] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio
from _processes import (
    cpu_seconds,
    free_port,
    percentile,
    sdcn,
    spawn,
    start_gateway,
    wait_http,
)

MODEL = "sd-v1-5"
BODY = {
    "prompt": "a lighthouse at dusk",
    "negative_prompt": "",
    "seed": 1234,
    "sampler_name": "Euler a",
    "steps": 20,
    "cfg_scale": 7,
    "width": 512,
    "height": 512,
    "override_settings": {"sd_model_checkpoint": MODEL},
}


@dataclass
class Network:
    webui_url: str
    gateway_url: str
    fake: subprocess.Popen[bytes]
    gateway: subprocess.Popen[bytes]
    providers: list[subprocess.Popen[bytes]]


@contextmanager
def start_network(
    providers: int, max_queue: int, workdir: Path, *, metrics: bool = True
) -> Iterator[Network]:
    """Start the fake webui, a gateway and `providers` webui providers; stop them on exit."""
    off = () if metrics else ("--no-metrics",)
    with ExitStack() as stack:
        webui_port = free_port()
        webui_url = f"http://127.0.0.1:{webui_port}"
        fake = spawn(
            stack,
            [sys.executable, __file__, "--serve-fake", f"127.0.0.1:{webui_port}"],
            workdir / "fake.log",
        )
        gateway, gateway_url, seed = start_gateway(stack, workdir, "--default-model", MODEL, *off)
        wait_http(f"{webui_url}/sdapi/v1/sd-models", fake)
        nodes = [
            spawn(
                stack,
                sdcn(
                    "node",
                    "--key",
                    str(workdir / f"provider{i}.key"),
                    "--backend",
                    "webui",
                    "--webui-url",
                    webui_url,
                    "--bootstrap",
                    seed,
                    "--max-queue",
                    str(max_queue),
                    *off,
                ),
                workdir / f"provider{i}.log",
            )
            for i in range(providers)
        ]
        wait_http(
            f"{gateway_url}/healthz",
            gateway,
            check=lambda body: body.get("providers") == providers,
        )
        yield Network(webui_url, gateway_url, fake, gateway, nodes)


def serve_fake(bind: str) -> None:
    """The fake webui process: one model, a fixed ~400 KB noise PNG per image, no delay."""
    from sdcn_p2p.testing.fakewebui import FakeWebui, noise_png, open_fake_webui

    async def run() -> None:
        fake = FakeWebui(models=(MODEL,), png=noise_png())
        async with open_fake_webui(fake, bind):
            await trio.sleep_forever()

    trio.run(run)


# --- the client -------------------------------------------------------------------------------


async def _post(client: httpx.AsyncClient, url: str) -> float:
    start = time.perf_counter()
    response = await client.post(url, json=BODY)
    elapsed = time.perf_counter() - start
    if response.status_code != 200:
        raise RuntimeError(f"{url}: HTTP {response.status_code}: {response.text[:200]}")
    body = response.json()
    if len(body["images"]) != 1 or len(body["images"][0]) < 100_000:
        raise RuntimeError(f"{url}: unexpected answer")
    return elapsed


async def sequential(direct: str, gateway: str, requests: int) -> tuple[list[float], list[float]]:
    """`requests` latencies (s) of each path, alternating a and b."""
    a, b = [], []
    async with httpx.AsyncClient(timeout=60) as client:
        for url in (direct, gateway) * 5:  # warm up connections and caches
            await _post(client, url)
        for _ in range(requests):
            a.append(await _post(client, direct))
            b.append(await _post(client, gateway))
    return a, b


async def throughput(url: str, concurrency: int, duration: float) -> tuple[int, float]:
    """(requests completed, seconds) with `concurrency` clients posting for `duration` s."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    done = 0
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        for _ in range(min(concurrency, 8)):
            await _post(client, url)
        start = time.perf_counter()
        end = start + duration

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < end:
                await _post(client, url)
                done += 1

        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
        return done, time.perf_counter() - start


async def rates(
    net: Network, concurrency: int, duration: float
) -> tuple[float, float, dict[str, float]]:
    """(direct rps, gateway rps, CPU ms per gateway-path request of each process)."""
    direct = f"{net.webui_url}/sdapi/v1/txt2img"
    gateway = f"{net.gateway_url}/sdapi/v1/txt2img"
    totals = {direct: [0, 0.0], gateway: [0, 0.0]}
    pids = {
        "gateway": [net.gateway.pid],
        "providers": [p.pid for p in net.providers],
        "fake webui": [net.fake.pid],
        "client": [os.getpid()],
    }
    cpu = dict.fromkeys(pids, 0.0)
    for url in (direct, gateway, gateway, direct):
        before = {name: sum(map(cpu_seconds, ps)) for name, ps in pids.items()}
        count, seconds = await throughput(url, concurrency, duration)
        totals[url][0] += count
        totals[url][1] += seconds
        if url == gateway:
            for name, ps in pids.items():
                cpu[name] += sum(map(cpu_seconds, ps)) - before[name]
    per_request = {
        name: round(1000 * used / max(totals[gateway][0], 1), 2) for name, used in cpu.items()
    }
    return (
        totals[direct][0] / totals[direct][1],
        totals[gateway][0] / totals[gateway][1],
        per_request,
    )


async def measure(net: Network, args: argparse.Namespace) -> dict[str, object]:
    direct = f"{net.webui_url}/sdapi/v1/txt2img"
    gateway = f"{net.gateway_url}/sdapi/v1/txt2img"
    ours = {"gateway": [net.gateway.pid], "providers": [p.pid for p in net.providers]}
    before = {name: sum(map(cpu_seconds, pids)) for name, pids in ours.items()}
    a, b = await sequential(direct, gateway, args.requests)
    # Only path b uses the gateway and the providers (10 warm-up requests included).
    seq_cpu = {
        name: round(1000 * (sum(map(cpu_seconds, pids)) - before[name]) / (len(b) + 5), 2)
        for name, pids in ours.items()
    }
    result: dict[str, object] = {
        "direct_ms_p50": round(percentile(a, 0.5) * 1000, 2),
        "direct_ms_p99": round(percentile(a, 0.99) * 1000, 2),
        "gateway_ms_p50": round(percentile(b, 0.5) * 1000, 2),
        "gateway_ms_p99": round(percentile(b, 0.99) * 1000, 2),
    }
    for q in ("p50", "p99"):
        added = result[f"gateway_ms_{q}"] - result[f"direct_ms_{q}"]  # type: ignore[operator]
        result[f"added_ms_{q}"] = round(added, 2)
    result["cpu_ms_per_request_c1"] = seq_cpu
    for concurrency in args.concurrency:
        direct_rps, gateway_rps, cpu = await rates(net, concurrency, args.duration)
        result[f"direct_rps_c{concurrency}"] = round(direct_rps, 1)
        result[f"gateway_rps_c{concurrency}"] = round(gateway_rps, 1)
        result[f"rps_ratio_c{concurrency}"] = round(gateway_rps / direct_rps, 3)
        result[f"cpu_ms_per_request_c{concurrency}"] = cpu
    result["metrics"] = not args.no_metrics
    if not args.no_metrics:
        async with httpx.AsyncClient(timeout=30) as client:
            text = (await client.get(f"{net.gateway_url}/metrics")).text
        ok = 'sdcn_gateway_jobs_total{status="ok"} '
        result["metrics_jobs_ok"] = next(
            int(float(line.removeprefix(ok))) for line in text.splitlines() if line.startswith(ok)
        )
    result["providers"] = args.providers
    result["requests"] = args.requests
    result["duration_s"] = args.duration
    return result


def run(args: argparse.Namespace) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="sdcn-overhead-") as tmp:
        workdir = Path(args.logs) if args.logs else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        with start_network(
            args.providers, args.max_queue, workdir, metrics=not args.no_metrics
        ) as net:
            return trio.run(measure, net, args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="sequential requests per path")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per rps run")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[8, 64], help="levels for rps"
    )
    parser.add_argument("--providers", type=int, default=4)
    parser.add_argument("--max-queue", type=int, default=64, help="each provider's queue")
    parser.add_argument("--logs", metavar="DIR", help="keep the processes' logs and keys here")
    parser.add_argument(
        "--no-metrics", action="store_true", help="run the gateway and providers without metrics"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--serve-fake", metavar="HOST:PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_fake:
        serve_fake(args.serve_fake)
        return 0
    result = run(args)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{'':28}{'direct':>12}{'gateway':>12}{'added/ratio':>14}")
    for q in ("p50", "p99"):
        print(
            f"{'latency ' + q + ' c=1 (ms)':28}{result[f'direct_ms_{q}']:>12}"
            f"{result[f'gateway_ms_{q}']:>12}{result[f'added_ms_{q}']:>14}"
        )
    for c in args.concurrency:
        print(
            f"{f'requests/s c={c}':28}{result[f'direct_rps_c{c}']:>12}"
            f"{result[f'gateway_rps_c{c}']:>12}{result[f'rps_ratio_c{c}']:>14}"
        )
    for c in [1, *args.concurrency]:
        cpu = result[f"cpu_ms_per_request_c{c}"]
        print(
            f"CPU ms per gateway request at c={c}: " + ", ".join(f"{k} {v}" for k, v in cpu.items())
        )  # type: ignore[union-attr]
    if "metrics_jobs_ok" in result:
        print(f"metrics on: the gateway counted {result['metrics_jobs_ok']} jobs")
    else:
        print("metrics off (--no-metrics)")
    python = sys.version.split()[0]
    print(
        f"aim: added p50 <= 3 ms, p99 <= 15 ms, gateway rps at c=64 >= 0.5 of direct "
        f"({args.providers} providers; {os.cpu_count()} cores, python {python})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
