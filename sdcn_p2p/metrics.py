"""Prometheus metrics: a registry per peer, and a small HTTP server that exposes it.

Every Peer has a `Metrics` (``peer.metrics``): its own `prometheus_client` registry, never the
library's global one, since tests and ``sdcn devnet`` run several peers in one process. The
peer and its roles add their instruments to it: counters and histograms that the code they
measure updates, and gauges read from live state when Prometheus scrapes (`Gauge.set_function`
or a custom collector), so that a scrape costs the hot paths nothing. Names follow the
Prometheus conventions (an ``sdcn_`` prefix, ``_seconds``, ``_total``); label values are small
fixed sets, never a peer id, a prompt or a job id.

`Metrics.off()` is the same interface doing nothing (``PeerConfig(metrics=False)``, ``sdcn ...
--no-metrics``), for measuring what the metrics cost.

`open_metrics_server` serves ``GET /metrics`` alone on an address of its own (``--metrics``),
on hypercorn's trio worker in the peer's own trio run; a gateway also serves it on its HTTP API.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from sdcn_p2p._util import open_service_nursery
from sdcn_p2p.httpserver import serve_http

__all__ = [
    "JOB_BUCKETS",
    "RTT_BUCKETS",
    "Metrics",
    "MetricsApp",
    "open_metrics_server",
]

log = logging.getLogger(__name__)

#: Histogram buckets (seconds) for what jobs take: waiting, running, end to end.
JOB_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
#: Histogram buckets (seconds) for round trips between peers.
RTT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

_M = TypeVar("_M", Counter, Gauge, Histogram)


class Metrics:
    """One peer's metrics: a registry of its own, or nothing at all (`Metrics.off`).

    Asking twice for an instrument of one name returns the same one (two gateways on one
    peer, or a provider opened again, count on), so code may ask for what it needs when it
    starts. Collectors are keyed for the same reason: a second one under a key replaces the
    first.
    """

    def __init__(self, registry: CollectorRegistry | None) -> None:
        """`registry`: where the instruments go; None: collect nothing (see `off`)."""
        self.registry = registry
        self._instruments: dict[str, Counter | Gauge | Histogram] = {}
        self._collectors: dict[str, Collector] = {}

    @classmethod
    def for_peer(cls) -> Metrics:
        """A fresh registry with the process metrics (CPU, memory, file descriptors, GC,
        Python version) that the client library collects."""
        registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        return cls(registry)

    @classmethod
    def off(cls) -> Metrics:
        """Metrics that record nothing: every instrument is a no-op."""
        return cls(None)

    @property
    def enabled(self) -> bool:
        return self.registry is not None

    def counter(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Counter:
        """A counter named `name` (``..._total``) with `labels`, created on first use."""
        return self._instrument(Counter, name, documentation, labels)

    def gauge(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Gauge:
        """A gauge: `set` it, or `set_function` to read a value at each scrape."""
        return self._instrument(Gauge, name, documentation, labels)

    def histogram(
        self,
        name: str,
        documentation: str,
        buckets: Sequence[float] = JOB_BUCKETS,
        labels: Sequence[str] = (),
    ) -> Histogram:
        return self._instrument(Histogram, name, documentation, labels, buckets=buckets)

    def _instrument(
        self, kind: type[_M], name: str, documentation: str, labels: Sequence[str], **extra: Any
    ) -> _M:
        if self.registry is None:
            return _OFF  # type: ignore[return-value]
        held = self._instruments.get(name)
        if held is None:
            held = self._instruments[name] = kind(
                name, documentation, labelnames=tuple(labels), registry=self.registry, **extra
            )
        elif not isinstance(held, kind):
            raise ValueError(f"metric {name!r} exists as a {type(held).__name__}")
        return held  # type: ignore[return-value]

    def add_collector(self, key: str, collect: Callable[[], Iterable[Metric]]) -> None:
        """Call `collect()` at each scrape for the metric families it yields (say
        `CounterMetricFamily`, for counts kept elsewhere), instead of what was added earlier
        under `key`."""
        if self.registry is None:
            return
        held = self._collectors.pop(key, None)
        if held is not None:
            self.registry.unregister(held)
        collector = _FunctionCollector(collect)
        self.registry.register(collector)
        self._collectors[key] = collector

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The registry in the text format `accept` (an Accept header) asks for: the
        Prometheus text format, or OpenMetrics. Returns (body, content type)."""
        encoder, content_type = choose_encoder(accept)
        if self.registry is None:
            return b"", content_type
        return encoder(self.registry), content_type


class _Off:
    """Every instrument of `Metrics.off()`: accepts everything, records nothing."""

    def labels(self, *values: object, **named: object) -> _Off:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def set_function(self, function: Callable[[], float]) -> None:
        pass

    def observe(self, value: float) -> None:
        pass


_OFF = _Off()


# --- the /metrics server -----------------------------------------------------------------------


class MetricsApp:
    """An ASGI app that answers ``GET /metrics`` (and HEAD) with `metrics`, and 404 else."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def __call__(
        self,
        scope: dict[str, Any],
        receive: Callable[[], Any],
        send: Callable[[dict[str, Any]], Any],
    ) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if scope["path"] != "/metrics" or not self.metrics.enabled:
            await _answer(send, 404, b"only GET /metrics here\n", "text/plain; charset=utf-8")
        elif scope["method"] not in ("GET", "HEAD"):
            await _answer(send, 405, b"only GET /metrics here\n", "text/plain; charset=utf-8")
        else:
            accept = b",".join(v for k, v in scope["headers"] if k.lower() == b"accept")
            body, content_type = self.metrics.exposition(accept.decode("latin-1"))
            await _answer(send, 200, b"" if scope["method"] == "HEAD" else body, content_type)


async def _answer(
    send: Callable[[dict[str, Any]], Any], status: int, body: bytes, content_type: str
) -> None:
    headers = [(b"content-type", content_type.encode()), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@asynccontextmanager
async def open_metrics_server(metrics: Metrics, bind: str) -> AsyncIterator[list[str]]:
    """Serve ``GET /metrics`` on `bind` (``HOST:PORT``, port 0 picks one) until the block
    exits; yields the URLs it serves (``http://127.0.0.1:9100/metrics``).

    Raises ConfigError if the address cannot be bound.
    """
    async with open_service_nursery() as nursery:
        urls = await nursery.start(serve_http, MetricsApp(metrics), bind)
        urls = [f"{url}/metrics" for url in urls]
        for url in urls:
            log.info("metrics on %s", url)
        try:
            yield urls
        finally:
            nursery.cancel_scope.cancel()


class _FunctionCollector(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()
