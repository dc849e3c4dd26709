"""A peer's metrics registry, and the HTTP server that serves only ``/metrics``."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.metrics_core import CounterMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from sdcn_p2p.host import HostConfig
from sdcn_p2p.metrics import Metrics, open_metrics_server
from sdcn_p2p.multiaddr import Multiaddr
from sdcn_p2p.peer import PeerConfig
from sdcn_p2p.testing import open_memory_peers


def families(metrics: Metrics) -> dict[str, str]:
    body, _ = metrics.exposition()
    return {f.name: f.type for f in text_string_to_metric_families(body.decode())}


def test_asking_twice_for_an_instrument_gives_the_same_one() -> None:
    metrics = Metrics.for_peer()
    a = metrics.counter("sdcn_test_things_total", "Things", ["kind"])
    b = metrics.counter("sdcn_test_things_total", "Things", ["kind"])
    assert a is b
    a.labels("x").inc(2)
    b.labels("x").inc()
    body, content_type = metrics.exposition()
    assert b'sdcn_test_things_total{kind="x"} 3.0' in body
    assert content_type.startswith("text/plain")
    with pytest.raises(ValueError, match="exists as a Counter"):
        metrics.gauge("sdcn_test_things_total", "Things")
    # The process metrics the client library collects come with every registry.
    assert families(metrics)["process_cpu_seconds"] == "counter"
    assert "python_info" in families(metrics)


def test_two_registries_do_not_share_figures() -> None:
    one, two = Metrics.for_peer(), Metrics.for_peer()
    one.counter("sdcn_test_total", "Test").inc()
    assert b"sdcn_test_total 1.0" in one.exposition()[0]
    assert b"sdcn_test_total" not in two.exposition()[0]


def test_a_collector_added_again_under_its_key_replaces_the_first() -> None:
    metrics = Metrics.for_peer()

    def counting(value: float):  # type: ignore[no-untyped-def]
        def collect():  # type: ignore[no-untyped-def]
            family = CounterMetricFamily("sdcn_test_seen", "Seen", labels=["result"])
            family.add_metric(["ok"], value)
            return [family]

        return collect

    metrics.add_collector("seen", counting(1))
    metrics.add_collector("seen", counting(5))
    body, _ = metrics.exposition()
    assert body.count(b"sdcn_test_seen_total{") == 1
    assert b'sdcn_test_seen_total{result="ok"} 5.0' in body


def test_openmetrics_is_served_when_asked_for() -> None:
    metrics = Metrics.for_peer()
    metrics.counter("sdcn_test_total", "Test").inc()
    body, content_type = metrics.exposition("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


def test_metrics_off_accept_everything_and_record_nothing() -> None:
    metrics = Metrics.off()
    assert not metrics.enabled
    counter = metrics.counter("sdcn_test_total", "Test", ["outcome"])
    counter.labels("ok").inc()
    metrics.gauge("sdcn_test_gauge", "Test").set_function(lambda: 1.0)
    metrics.histogram("sdcn_test_seconds", "Test").observe(0.5)
    metrics.add_collector("x", list)
    assert metrics.exposition()[0] == b""


async def test_a_peer_has_its_own_metrics_unless_they_are_off(autojump_clock) -> None:
    async with open_memory_peers(2) as (a, b):
        await a.host.ping(b.peer_id)
        found = families(a.metrics)
        assert found["sdcn_peer_rtt_seconds"] == "histogram"
        assert found["sdcn_gossip_adverts"] == "counter"
        body, _ = a.metrics.exposition()
        assert b"sdcn_peer_rtt_seconds_count 1.0" in body
        assert b'sdcn_peer_connections{direction="inbound"} 1.0' in body  # b joined through a
        assert b'sdcn_peer_connections{direction="outbound"} 1.0' in b.metrics.exposition()[0]
        assert found["sdcn_peer_streams"] == "gauge"
        assert b"sdcn_dht_routing_table_peers 1.0" in body
    async with open_memory_peers(1, config=PeerConfig(metrics=False)) as (peer,):
        assert not peer.metrics.enabled and peer.metrics.exposition()[0] == b""


async def test_the_metrics_server_serves_only_metrics_and_stops_with_its_block() -> None:
    listen = (Multiaddr.parse("/ip4/127.0.0.1/tcp/0/ws"),)
    async with open_memory_peers(1, config=PeerConfig(host=HostConfig(listen=listen))) as (peer,):
        async with (
            open_metrics_server(peer.metrics, "127.0.0.1:0") as urls,
            httpx.AsyncClient() as http,
        ):
            [url] = urls
            assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
            response = await http.get(url)
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/plain")
            names = {f.name for f in text_string_to_metric_families(response.text)}
            assert {"sdcn_peer_connections", "sdcn_adverts_cached", "process_cpu_seconds"} <= names
            assert (await http.head(url)).status_code == 200
            assert (await http.get(url.removesuffix("metrics") + "v1/status")).status_code == 404
            assert (await http.post(url)).status_code == 405
        with pytest.raises(httpx.ConnectError):
            async with httpx.AsyncClient() as http:
                await http.get(url)
