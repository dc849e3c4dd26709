"""Load: N concurrent HTTP clients against a devnet gateway for D seconds.

The devnet (`python -m sdcn_p2p devnet`: a bootstrap, test-card providers, a gateway) runs as
its own process, so its memory (RSS, from /proc) is measured alone. Each client POSTs a small
txt2img job in a loop and, after a 503 (all providers full: back-pressure), waits as its
Retry-After header says (else `--backoff` seconds) before trying again, as a polite client
would. Clients start over `--ramp` seconds.

Phases: a warm-up (`--warmup` s at full load), a settle, the measured run (`--duration` s),
a settle. RSS growth is the devnet's RSS after the run and its settle, less its RSS after the
warm-up and its settle: first-use allocations are not a leak, growth across a run is.

Passes when ``errors_non_503 == 0``: every request got 200 or 503, nothing else (no 5xx,
no 4xx, no connection error, no timeout).

Usage: python benchmarks/load.py [--clients 1000] [--duration 60] [--providers 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import trio

ROOT = Path(__file__).resolve().parents[1]
JOB = {
    "model": "sd-v1-5",
    "prompt": "a lighthouse at dusk",
    "seed": -1,
    "sampler_name": "Euler a",
    "steps": 20,
    "width": 64,
    "height": 64,
}


# One for all clients: building one per client costs ~5 ms of CPU and ~0.7 MB each.
_SSL_CONTEXT = ssl.create_default_context()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident set size of process `pid`, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


class Stats:
    def __init__(self) -> None:
        self.statuses: Counter[str] = Counter()
        self.latency: dict[str, list[float]] = {"200": [], "503": []}
        self.errors: Counter[str] = Counter()  # what the non-503 errors said
        self.recording = False

    def record(self, status: str, seconds: float, detail: str = "") -> None:
        if not self.recording:
            return
        self.statuses[status] += 1
        if status not in ("200", "503"):
            self.errors[f"{status} {detail}"[:120]] += 1
        if status in self.latency:
            self.latency[status].append(seconds)


async def client(args: argparse.Namespace, url: str, stats: Stats, start_after: float) -> None:
    """One client with its own connection (one shared pool of 1,000 connections costs the
    load generator more CPU than the gateway spends answering).
    """
    await trio.sleep(start_after)
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(
        limits=limits, timeout=args.request_timeout, verify=_SSL_CONTEXT
    ) as http:
        await _requests(http, url, stats, args.backoff)


async def _requests(http: httpx.AsyncClient, url: str, stats: Stats, backoff: float) -> None:
    while True:
        start = time.perf_counter()
        detail = ""
        retry_after = 0.0
        try:
            response = await http.post(url, json=JOB)
            status = str(response.status_code)
            if status == "200" and not response.json()["images"]:
                status = "200-without-images"
            elif status == "503":
                retry_after = float(response.headers.get("retry-after", 0))
            elif status != "200":
                detail = response.text
        except httpx.HTTPError as exc:
            status, detail = type(exc).__name__, str(exc)
        stats.record(status, time.perf_counter() - start, detail)
        if status != "200":
            await trio.sleep(retry_after or backoff)


async def sample_rss(pid: int, peak: list[float]) -> None:
    while True:
        peak[0] = max(peak[0], rss_mb(pid))
        await trio.sleep(0.5)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_load(args: argparse.Namespace, url: str, pid: int) -> dict:
    stats = Stats()
    peak = [0.0]
    async with trio.open_nursery() as nursery:
        rss_start = rss_mb(pid)
        nursery.start_soon(sample_rss, pid, peak)
        for index in range(args.clients):
            ramp = args.ramp * index / args.clients
            nursery.start_soon(client, args, f"{url}/txt2img", stats, ramp)
        await trio.sleep(args.ramp + args.warmup)
        nursery.cancel_scope.cancel()
    await trio.sleep(args.settle)
    rss_base = rss_mb(pid)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample_rss, pid, peak)
        for index in range(args.clients):
            ramp = args.ramp * index / args.clients
            nursery.start_soon(client, args, f"{url}/txt2img", stats, ramp)
        await trio.sleep(args.ramp)
        stats.recording = True
        started = time.perf_counter()
        await trio.sleep(args.duration)
        stats.recording = False
        elapsed = time.perf_counter() - started
        nursery.cancel_scope.cancel()
    await trio.sleep(args.settle)
    rss_after = rss_mb(pid)

    ok, busy = stats.latency["200"], stats.latency["503"]
    return {
        "clients": args.clients,
        "duration_s": round(elapsed, 1),
        "providers": args.providers,
        "requests": sum(stats.statuses.values()),
        "ok": stats.statuses["200"],
        "busy_503": stats.statuses["503"],
        "errors_non_503": sum(n for s, n in stats.statuses.items() if s not in ("200", "503")),
        "statuses": dict(stats.statuses),
        "error_messages": dict(stats.errors.most_common(5)),
        "images_per_s": round(stats.statuses["200"] / elapsed, 1),
        "p50_ms_200": _ms(percentile(ok, 0.5)),
        "p99_ms_200": _ms(percentile(ok, 0.99)),
        "p50_ms_503": _ms(percentile(busy, 0.5)),
        "p99_ms_503": _ms(percentile(busy, 0.99)),
        "rss_start_mb": round(rss_start, 1),
        "rss_after_warmup_mb": round(rss_base, 1),
        "rss_peak_mb": round(peak[0], 1),
        "rss_after_mb": round(rss_after, 1),
        "rss_growth_after_mb": round(rss_after - rss_base, 1),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


async def wait_ready(url: str, providers: int, process: subprocess.Popen) -> None:
    async with httpx.AsyncClient(timeout=2) as http:
        with trio.fail_after(60):
            while True:
                if process.poll() is not None:
                    raise RuntimeError("the devnet exited")
                try:
                    health = (await http.get(f"{url}/healthz")).json()
                    if health["providers"] >= providers:
                        return
                except httpx.HTTPError:
                    pass
                await trio.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=60.0, help="measured seconds")
    parser.add_argument("--providers", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds at full load first")
    parser.add_argument("--settle", type=float, default=5.0)
    parser.add_argument("--ramp", type=float, default=2.0, help="seconds to start all clients")
    parser.add_argument("--backoff", type=float, default=0.5, help="seconds to wait after a 503")
    parser.add_argument("--request-timeout", type=float, default=120.0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--devnet-log", metavar="FILE", help="write the devnet's log here")
    parser.add_argument("--url", help="load this gateway (and --pid for its RSS), no devnet")
    parser.add_argument("--pid", type=int, help="the process of the gateway at --url")
    args = parser.parse_args()
    if args.url:
        result = trio.run(run_load, args, args.url, args.pid or os.getpid())
        print(json.dumps(result))
        return

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "sdcn_p2p", "devnet"]
    command += ["--providers", str(args.providers), "--http", f"127.0.0.1:{port}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = open(args.devnet_log, "wb") if args.devnet_log else subprocess.DEVNULL  # noqa: SIM115
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log)
    try:
        trio.run(wait_ready, url, args.providers, process)
        result = trio.run(run_load, args, url, process.pid)
    finally:
        process.terminate()
        process.wait(timeout=30)
    if args.json:
        print(json.dumps(result))
        return
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    ok = result["errors_non_503"] == 0
    print("PASS: only 200 and 503" if ok else "FAIL: errors other than 503")


if __name__ == "__main__":
    main()
