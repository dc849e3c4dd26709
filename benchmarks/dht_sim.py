"""Simulate an SDCN network of N peers: DHT lookups and advert gossip, with and without churn.

Every peer is a real `Peer` (Host + Noise + yamux + DHT + gossip) on the in-memory transport,
under trio's MockClock, so simulated minutes take seconds. Pairwise round-trip times are drawn
uniformly from 20-200 ms (fixed per pair). The run:

1. starts N peers, one every JOIN_INTERVAL simulated seconds; each joins through two of a
   few bootstrap peers;
2. runs LOOKUPS lookups for random keys from random peers and checks each result against a
   brute-force sort of all peers by XOR distance (success = exactly the true k closest);
3. has ADVERTS random peers publish an advert and records when each peer's cache gets it
   (propagation to 99 % of peers) and how many gossip messages carried it;
4. kills a fraction CHURN of the peers at random (their host goes down, like a crash), then
   runs LOOKUPS more lookups for keys of live peers (success = the peer owning the key is found).

Usage: python benchmarks/dht_sim.py --peers 1000 [--churn 0.2] [--lookups 200] [--adverts 5]
       [--seed 1] [--join-interval 0.05] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import random
import resource
import sys
import time

import trio
import trio.testing

from sdcn_p2p.dht.service import DhtConfig
from sdcn_p2p.host import HostConfig
from sdcn_p2p.identity import PeerId
from sdcn_p2p.multiaddr import Multiaddr
from sdcn_p2p.peer import Peer, PeerConfig, open_peer
from sdcn_p2p.records import Advert, ModelInfo
from sdcn_p2p.testing import mock_wall_clock, test_identity
from sdcn_p2p.transport.memory import MemoryNetwork

K = 20
BOOTSTRAPS = 8


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


class Simulation:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.network = MemoryNetwork(latency=self.one_way, seed=args.seed)
        self.peers: list[Peer] = []
        self.scopes: list[trio.CancelScope] = []
        self.alive: list[bool] = []

    def one_way(self, src: str, dst: str) -> float:
        """Half of a round-trip time drawn once per pair from 20-200 ms."""
        a, b = sorted((src, dst))
        digest = hashlib.sha256(f"{self.args.seed}:{a}:{b}".encode()).digest()
        rtt = 0.020 + 0.180 * int.from_bytes(digest[:8], "big") / 2**64
        return rtt / 2

    async def start_peer(self, index: int, seeds: tuple[Multiaddr, ...], task_status) -> None:
        transport = self.network.transport()
        listen = (Multiaddr.parse(f"/ip4/{transport.host}/tcp/4001/ws"),)
        config = PeerConfig(
            host=HostConfig(listen=listen, max_connections=4096, idle_timeout=600),
            dht=DhtConfig(),
            bootstrap=seeds,
        )
        with trio.CancelScope() as scope:
            async with open_peer(
                test_identity(index, seed=self.args.seed),
                config,
                transport=transport,
                wall_clock=mock_wall_clock,
            ) as peer:
                task_status.started((peer, scope))
                await trio.sleep_forever()

    async def run(self) -> dict[str, float]:
        args = self.args
        results: dict[str, float] = {"peers": args.peers}
        wall_start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            seeds: list[Multiaddr] = []
            for index in range(args.peers):
                own_seeds = tuple(self.rng.sample(seeds, min(2, len(seeds)))) if seeds else ()
                peer, scope = await nursery.start(self.start_peer, index, own_seeds)
                self.peers.append(peer)
                self.scopes.append(scope)
                self.alive.append(True)
                if index < BOOTSTRAPS:
                    seeds.append(peer.host.listen_addrs[0].with_peer_id(peer.peer_id))
                await trio.sleep(args.join_interval)  # peers arrive over time, not in one herd
            with trio.move_on_after(3600):
                for peer in self.peers:
                    await peer.bootstrapped.wait()
            stragglers = [i for i, p in enumerate(self.peers) if not p.bootstrapped.is_set()]
            if stragglers:
                raise RuntimeError(f"peers {stragglers[:10]} never joined the network")
            await trio.sleep(30)  # let bucket refreshes after joining settle
            gc.freeze()  # the joined network is long-lived: spare it from every collection
            results["join_wall_s"] = round(time.perf_counter() - wall_start, 1)
            print(f"{args.peers} peers joined in {results['join_wall_s']} s", file=sys.stderr)

            hops, times, successes = await self.lookups(exact=True)
            results["hops_p50"] = percentile(hops, 0.5)
            results["hops_p95"] = percentile(hops, 0.95)
            results["lookup_success"] = round(sum(successes) / len(successes), 4)
            results["lookup_ms_p50"] = round(percentile(times, 0.5) * 1000, 1)
            results["lookup_ms_p95"] = round(percentile(times, 0.95) * 1000, 1)

            propagation, messages = await self.adverts()
            results["propagation_ms_p99"] = round(max(propagation) * 1000, 1)
            results["msgs_per_peer_per_advert"] = round(messages, 2)

            if args.churn > 0:
                self.kill(args.churn)
                _, _, successes = await self.lookups(exact=False)
                results["churn_lookup_success"] = round(sum(successes) / len(successes), 4)
            nursery.cancel_scope.cancel()
        results["wall_s"] = round(time.perf_counter() - wall_start, 1)
        results["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        return results

    def live_peers(self) -> list[Peer]:
        return [p for p, alive in zip(self.peers, self.alive, strict=True) if alive]

    async def lookups(self, *, exact: bool) -> tuple[list[float], list[float], list[bool]]:
        """Run lookups concurrently in small batches; return hops, durations and successes."""
        live = self.live_peers()
        keys = sorted(p.peer_id.dht_key for p in live)
        hops: list[float] = []
        times: list[float] = []
        successes: list[bool] = []

        async def one() -> None:
            source = self.rng.choice(live)
            if exact:
                target = self.rng.randbytes(32)
                true = sorted(
                    keys, key=lambda k: int.from_bytes(k, "big") ^ int.from_bytes(target, "big")
                )[:K]
            else:
                owner = self.rng.choice(live)
                target = owner.peer_id.dht_key
                true = [target]
            start = trio.current_time()
            result = await source.dht.lookup(target)
            times.append(trio.current_time() - start)
            hops.append(result.hops)
            found = [p.dht_key for p in result.closest]
            if source.peer_id.dht_key in true and source.peer_id.dht_key not in found:
                found.append(source.peer_id.dht_key)  # a lookup never returns its own peer
            if exact:
                successes.append(sorted(found[:K]) == sorted(true) or set(true) <= set(found))
            else:
                successes.append(true[0] in found)

        for _ in range(0, self.args.lookups, 20):
            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(one)
        return hops, times, successes

    async def adverts(self) -> tuple[list[float], float]:
        live = self.live_peers()
        target = int(0.99 * (len(live) - 1))
        arrivals: dict[PeerId, list[float]] = {}
        reached: dict[PeerId, trio.Event] = {}

        def on_advert(advert: Advert) -> None:
            times = arrivals.setdefault(advert.peer_id, [])
            times.append(trio.current_time())
            if len(times) >= target and advert.peer_id in reached:
                reached[advert.peer_id].set()

        with contextlib.ExitStack() as subscriptions:
            for peer in live:
                subscriptions.enter_context(peer.adverts.subscribe(on_advert))
            propagation = []
            pushes_before = sum(p.gossip.stats.pushes for p in live)
            for publisher in self.rng.sample(live, self.args.adverts):
                reached[publisher.peer_id] = trio.Event()
                advert = Advert(
                    publisher.peer_id,
                    seq=1,
                    issued_at=publisher.wall_clock(),
                    ttl=180,
                    addrs=tuple(publisher.host.advertised_addrs),
                    backend="testcard",
                    models=(ModelInfo(f"model-{publisher.peer_id}"),),
                    speed=5.0,
                )
                start = trio.current_time()
                await publisher.publish_advert(advert)
                with trio.move_on_after(60):
                    await reached[publisher.peer_id].wait()
                times = sorted(t for t in arrivals.get(publisher.peer_id, []))
                propagation.append(
                    (times[target - 1] if len(times) >= target else start + 60) - start
                )
                await trio.sleep(5)  # let the last duplicates arrive before counting
            pushes = sum(p.gossip.stats.pushes for p in live) - pushes_before
            return propagation, pushes / len(live) / self.args.adverts

    def kill(self, fraction: float) -> None:
        candidates = list(range(BOOTSTRAPS, len(self.peers)))
        for index in self.rng.sample(candidates, int(fraction * len(self.peers))):
            self.network.set_down(self.peers[index].host.transport.host)
            self.scopes[index].cancel()
            self.alive[index] = False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--churn", type=float, default=0.2)
    parser.add_argument("--lookups", type=int, default=200)
    parser.add_argument("--adverts", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--join-interval", type=float, default=0.05, help="simulated seconds between joins"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    # A simulation holds millions of long-lived objects; collecting the young generation less
    # often keeps the collector from dominating the run (it is not what is being measured).
    gc.set_threshold(100_000, 50, 100)
    sim = Simulation(args)
    results = trio.run(sim.run, clock=trio.testing.MockClock(autojump_threshold=0))
    if args.json:
        print(json.dumps(results))
    else:
        for name, value in results.items():
            print(f"{name:28}{value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
