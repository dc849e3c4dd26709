"""A bootstrap and four peers on real loopback WebSockets, configured as the CLI does."""

from __future__ import annotations

import contextlib

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from bootstrap.node import open_bootstrap
from sdcn_p2p.cli import build_parser, peer_config_from_args
from sdcn_p2p.peer import open_peer
from sdcn_p2p.records import Advert, LoraInfo, ModelInfo
from sdcn_p2p.testing import test_identity


def cli_config(*argv: str):
    return peer_config_from_args(build_parser().parse_args(["bootstrap", *argv]))


async def test_advert_published_by_one_peer_reaches_every_cache() -> None:
    config = cli_config("--listen", "/ip4/127.0.0.1/tcp/0/ws")
    async with open_bootstrap(
        test_identity(0), config, http="127.0.0.1:0", metrics="127.0.0.1:0"
    ) as node:
        seed = node.peer.host.listen_addrs[0].with_peer_id(node.peer.peer_id)
        peer_config = cli_config("--listen", "/ip4/127.0.0.1/tcp/0/ws", "--bootstrap", str(seed))
        async with (
            open_peer(test_identity(1), peer_config) as p1,
            open_peer(test_identity(2), peer_config) as p2,
            open_peer(test_identity(3), peer_config) as p3,
            open_peer(test_identity(4), peer_config) as p4,
        ):
            peers = [p1, p2, p3, p4]
            with trio.fail_after(20):
                for peer in peers:
                    await peer.bootstrapped.wait()
            received = {peer.peer_id: trio.Event() for peer in [node.peer, *peers[1:]]}
            with contextlib.ExitStack() as subscriptions:
                for peer in [node.peer, *peers[1:]]:
                    subscriptions.enter_context(
                        peer.adverts.subscribe(
                            lambda advert, peer=peer: (
                                advert.peer_id == p1.peer_id and received[peer.peer_id].set()
                            )
                        )
                    )
                advert = Advert(
                    p1.peer_id,
                    seq=1,
                    issued_at=p1.wall_clock(),
                    ttl=180,
                    addrs=tuple(p1.host.advertised_addrs),
                    backend="testcard",
                    models=(ModelInfo("sd-v1-5", "Stable Diffusion 1.5", "", "sd1"),),
                    loras=(LoraInfo("pixel-art"),),
                    samplers=("Euler a",),
                    speed=10.0,
                )
                await p1.publish_advert(advert)
                with trio.fail_after(20):
                    for event in received.values():
                        await event.wait()
                for peer in [node.peer, *peers[1:]]:
                    held = peer.adverts.get(p1.peer_id)
                    assert held == advert
                    assert [a.peer_id for a in peer.adverts.find("SD-V1-5", ["pixel-art"])] == [
                        p1.peer_id
                    ]

                async with httpx.AsyncClient() as client:
                    response = await client.get(node.http_urls[0] + "/v1/network")
                status = response.json()
                assert response.status_code == 200
                assert status["peer_id"] == str(node.peer.peer_id)
                assert set(status["connected_peers"]) >= {str(p.peer_id) for p in peers}
                assert status["routing_table_size"] >= 4
                assert status["adverts_held"] == 1
                assert status["listen_addrs"] == [str(seed)]

                # `sdcn bootstrap --metrics`: the same figures for Prometheus.
                async with httpx.AsyncClient() as client:
                    response = await client.get(node.metrics_urls[0])
                found = {
                    (s.name, tuple(s.labels.values())): s.value
                    for f in text_string_to_metric_families(response.text)
                    for s in f.samples
                }
                assert found[("sdcn_peer_connections", ("inbound",))] >= 4
                assert found[("sdcn_dht_routing_table_peers", ())] >= 4
                assert found[("sdcn_adverts_cached", ())] == 1
                assert found[("sdcn_gossip_adverts_total", ("accepted",))] == 1
