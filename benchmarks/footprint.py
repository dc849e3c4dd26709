"""Memory footprint: an idle provider, a gateway holding 1,000 requests, in-memory peers.

- provider_idle_rss_mb: resident memory of an `sdcn node --backend testcard` process that has
  joined a gateway and sits idle for --idle seconds.
- gateway_rss_growth_mb_1000_concurrent: an `sdcn gateway` process and PROVIDERS slow
  test-card providers (one slot and a queue of --max-queue each; a job of 150 steps at
  0.01 it/s, so none finishes during the run). The gateway's RSS is read once it has joined
  and answered a few requests, then again once CONCURRENT HTTP requests are in flight: it
  reports the jobs it has running on providers (`in_flight` in /v1/providers), and the client
  counts the answers that came back early (a 503 would make the figure meaningless).
  The gateway keeps at most MAX_IN_FLIGHT (64) of its jobs at one provider, and a provider
  accepts 128 streams from one peer: hence ceil(CONCURRENT / 64) providers by default.
- sim_peers_max: how many in-memory peers (Host, Noise, yamux, DHT, gossip, as in
  dht_sim.py) fit in 8 GiB. Each size in --sim-sizes runs in a fresh process that starts that
  many peers under MockClock, lets them run 60 simulated seconds, and reports its RSS; the
  line through the two largest sizes is extrapolated to 8 GiB. That is an estimate: memory
  per peer grows a little with the network (routing tables, connections).

Usage: python benchmarks/footprint.py [--concurrent 1000] [--providers 16] [--max-queue 63]
       [--sim-sizes 100 200 400] [--idle 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import trio
from _processes import rss_mb, sdcn, spawn, start_gateway, wait_http

from gateway.directory import MAX_IN_FLIGHT

GIB8_MB = 8 * 2**30 / 1e6
SLOW_MODEL = "slow-card"
SLOW_BODY = {
    "model": SLOW_MODEL,
    "prompt": "a slow one",
    "seed": 1,
    "sampler_name": "Euler a",
    "steps": 150,
    "width": 512,
    "height": 512,
}


def _raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


def _provider_args(workdir: Path, index: int, seed: str, *extra: str) -> list[str]:
    return sdcn(
        "node",
        "--key",
        str(workdir / f"provider{index}.key"),
        "--backend",
        "testcard",
        "--bootstrap",
        seed,
        *extra,
    )


async def _hold_requests(
    url: str, gateway_pid: int, concurrent: int, expected_in_flight: int
) -> dict[str, float]:
    """Send `concurrent` slow requests at once; measure the gateway once they are in flight."""
    early: list[int] = []
    limits = httpx.Limits(max_connections=concurrent + 8, max_keepalive_connections=16)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        for path in ("/healthz", "/v1/models", "/v1/providers"):
            (await client.get(path)).raise_for_status()
        for _ in range(3):  # warm the job path up: an unknown model is a 404
            await client.post("/txt2img", json={**SLOW_BODY, "model": "none"})
        before = rss_mb(gateway_pid)

        async def one() -> None:
            response = await client.post("/txt2img", json=SLOW_BODY)
            early.append(response.status_code)

        async with trio.open_nursery() as nursery:
            for _ in range(concurrent):
                nursery.start_soon(one)
            start = time.monotonic()
            in_flight = 0
            with trio.move_on_after(120):
                while in_flight < expected_in_flight and not early:
                    await trio.sleep(0.5)
                    providers = (await client.get("/v1/providers")).json()
                    in_flight = sum(p["in_flight"] for p in providers)
            await trio.sleep(1.0)  # a moment for the last ones to settle
            providers = (await client.get("/v1/providers")).json()
            in_flight = sum(p["in_flight"] for p in providers)
            during = rss_mb(gateway_pid)
            seconds = time.monotonic() - start
            nursery.cancel_scope.cancel()
    return {
        "gateway_rss_before_mb": round(before, 1),
        "gateway_rss_during_mb": round(during, 1),
        "gateway_rss_growth_mb_1000_concurrent": round(during - before, 1),
        "in_flight": in_flight,
        "answered_early": len(early),
        "seconds_to_fill": round(seconds, 1),
    }


def processes(workdir: Path, args: argparse.Namespace) -> dict[str, float]:
    """Both process figures, with one gateway: an idle test-card provider joins it (and is
    measured) while the slow providers join; then the requests are held.
    """
    _raise_fd_limit(4 * args.concurrent + 256)
    with ExitStack() as stack:
        gateway, url, seed = start_gateway(stack, workdir)
        idle = spawn(stack, _provider_args(workdir, 0, seed), workdir / "idle-provider.log")
        for index in range(args.providers):
            slow = ("--testcard-models", SLOW_MODEL, "--testcard-speed", "0.01")
            spawn(
                stack,
                _provider_args(workdir, 1 + index, seed, *slow, "--max-queue", str(args.max_queue)),
                workdir / f"slow-provider{index}.log",
            )
        wanted = 1 + args.providers
        wait_http(f"{url}/healthz", gateway, check=lambda body: body.get("providers") == wanted)
        time.sleep(args.idle)  # let it settle: timers, an advert refresh
        result = {"provider_idle_rss_mb": round(rss_mb(idle.pid), 1)}
        expected = min(args.concurrent, args.providers * (1 + args.max_queue))
        result.update(trio.run(_hold_requests, url, gateway.pid, args.concurrent, expected))
        return result


# --- in-memory peers ----------------------------------------------------------------------


def sim_rss(peers: int) -> float:
    """RSS (MB) of a fresh process running `peers` in-memory peers for 60 simulated s."""
    done = subprocess.run(
        [sys.executable, __file__, "--sim-child", str(peers)],
        capture_output=True,
        check=True,
        text=True,
    )
    return float(done.stdout.strip().splitlines()[-1])


def sim_child(count: int) -> None:
    """Start `count` in-memory peers joining through 8 bootstrap peers; print RSS in MB."""
    import trio.testing

    from sdcn_p2p.host import HostConfig
    from sdcn_p2p.multiaddr import Multiaddr
    from sdcn_p2p.peer import PeerConfig, open_peer
    from sdcn_p2p.testing import mock_wall_clock, test_identity
    from sdcn_p2p.transport.memory import MemoryNetwork

    async def run() -> None:
        network = MemoryNetwork(latency=0.01, seed=1)
        seeds: list[Multiaddr] = []
        async with trio.open_nursery() as nursery:

            async def start(index: int, task_status) -> None:  # type: ignore[no-untyped-def]
                transport = network.transport()
                listen = (Multiaddr.parse(f"/ip4/{transport.host}/tcp/4001/ws"),)
                config = PeerConfig(
                    host=HostConfig(listen=listen, max_connections=4096, idle_timeout=600),
                    bootstrap=tuple(seeds[index % 8 : index % 8 + 2]) if seeds else (),
                )
                async with open_peer(
                    test_identity(index),
                    config,
                    transport=transport,
                    wall_clock=mock_wall_clock,
                ) as peer:
                    if len(seeds) < 8:
                        seeds.append(peer.host.listen_addrs[0].with_peer_id(peer.peer_id))
                    task_status.started()
                    await trio.sleep_forever()

            for index in range(count):
                await nursery.start(start, index)
                await trio.sleep(0.05)
            await trio.sleep(60)
            print(rss_mb(os.getpid()))
            nursery.cancel_scope.cancel()

    trio.run(run, clock=trio.testing.MockClock(autojump_threshold=0))


def sim_peers_max(sizes: list[int]) -> tuple[int, dict[int, float]]:
    """Peers that fit in 8 GiB, extrapolated from the RSS at `sizes`, and those RSS.

    Memory per peer grows a little with the network, so the line goes through the two largest
    sizes (the steepest part measured), not a fit through all of them.
    """
    measured = {n: sim_rss(n) for n in sorted(sizes)}
    if len(measured) < 2:
        ((n, rss),) = measured.items()
        return int(GIB8_MB / (rss / n)), measured
    (small, rss_small), (large, rss_large) = list(measured.items())[-2:]
    per_peer = (rss_large - rss_small) / (large - small)
    if per_peer <= 0:  # sizes too close for RSS noise: fall back to the mean per peer
        return int(GIB8_MB / (rss_large / large)), measured
    return large + int((GIB8_MB - rss_large) / per_peer), measured


# --- the benchmark -------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="sdcn-footprint-") as tmp:
        result: dict[str, object] = dict(processes(Path(tmp), args))
    peers_max, measured = sim_peers_max(args.sim_sizes)
    result["sim_peers_max"] = peers_max
    result["sim_rss_mb"] = {str(n): round(rss, 1) for n, rss in measured.items()}
    result["concurrent"] = args.concurrent
    result["providers"] = args.providers
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrent", type=int, default=1000, help="requests held at once")
    parser.add_argument("--providers", type=int, help="slow providers (default: enough)")
    parser.add_argument(
        "--max-queue", type=int, default=MAX_IN_FLIGHT - 1, help="each slow provider's queue"
    )
    parser.add_argument("--sim-sizes", type=int, nargs="+", default=[100, 200, 400])
    parser.add_argument("--idle", type=float, default=5.0, help="seconds the provider idles")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--sim-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sim_child:
        sim_child(args.sim_child)
        return 0
    if args.providers is None:
        args.providers = -(-args.concurrent // MAX_IN_FLIGHT)
    result = run(args)
    if args.json:
        print(json.dumps(result))
        return 0
    rows = [
        ("idle test-card provider RSS (MB)", result["provider_idle_rss_mb"], "<= 80"),
        (
            f"gateway RSS growth, {args.concurrent} requests (MB)",
            result["gateway_rss_growth_mb_1000_concurrent"],
            "<= 200",
        ),
        ("  jobs in flight at the gateway", result["in_flight"], ""),
        ("  answered before the measurement", result["answered_early"], "0"),
        ("in-memory peers in 8 GiB (extrapolated)", result["sim_peers_max"], ""),
    ]
    print(f"{'figure':48}{'value':>10}{'aim':>10}")
    for name, value, aim in rows:
        print(f"{name:48}{value!s:>10}{aim:>10}")
    sizes = ", ".join(f"{n} peers {rss} MB" for n, rss in result["sim_rss_mb"].items())  # type: ignore[attr-defined]
    print(f"in-memory RSS: {sizes} (python {sys.version.split()[0]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
