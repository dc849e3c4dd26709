"""What operators see of a gateway: ``GET /metrics`` after real jobs, ``GET /v1/status``, and
log lines that follow a job from the gateway to its provider.

The gateway's HTTP app runs in-process (httpx's ASGI transport) against test-card providers
on the in-memory network, under MockClock. Scrapes are parsed with prometheus_client's own
parser, as Prometheus would read them.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from gateway.api import create_app
from gateway.metrics import RecentWork, api_of
from gateway.node import Gateway, open_gateway
from gateway.trust import TrustConfig
from sdcn_p2p.backends import Backend, JobOutput
from sdcn_p2p.backends.testcard import TestcardBackend, TestcardConfig
from sdcn_p2p.errors import JobError
from sdcn_p2p.jobs import JobRequest
from sdcn_p2p.jobs.protocol import request_job
from sdcn_p2p.logs import ContextFilter, JsonFormatter
from sdcn_p2p.peer import Peer, PeerConfig
from sdcn_p2p.provider import Provider, ProviderConfig
from sdcn_p2p.testing import open_memory_providers, small_job

#: 10 steps of 64x64 take 10 * (64 * 64 / 512**2) / 0.5 = 0.31 s on this card.
SLOW = TestcardConfig(models=("card-a",), speed=0.5)
PROMPT = "a secret lighthouse"
DASHBOARD = Path(__file__).parents[2] / "docs" / "grafana-dashboard.json"


class Card(TestcardBackend):
    """A test card that can be told to fail, and says when a job starts."""

    def __init__(self, *, fail: bool = False) -> None:
        super().__init__(SLOW)
        self.fail = fail
        self.started = trio.Event()
        self.jobs = 0

    async def generate(self, job: JobRequest, progress: Callable[[int, int], None]) -> JobOutput:
        self.jobs += 1
        self.started.set()
        if self.fail:
            await trio.lowlevel.checkpoint()
            raise JobError("backend_failed", "out of VRAM")
        return await super().generate(job, progress)


@dataclass
class Net:
    http: httpx.AsyncClient
    gateway: Gateway
    nodes: list[Peer]
    providers: list[Provider]

    async def scrape(self) -> Scrape:
        response = await self.http.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        return Scrape(response.text)


@asynccontextmanager
async def gateway_network(
    *backends: Backend,
    configs: list[ProviderConfig] | None = None,
    metrics: bool = True,
    trust: TrustConfig | None = None,
) -> AsyncIterator[Net]:
    """Peer 0 is the gateway (checking no jobs unless given `trust`); one provider per
    backend after it."""
    async with (
        open_memory_providers(backends, configs, config=PeerConfig(metrics=metrics)) as (
            gateway_peer,
            nodes,
            providers,
        ),
        open_gateway(gateway_peer, trust=trust) as gateway,
    ):
        for node in nodes:  # every RTT known, so that the choice of provider is by speed alone
            await gateway_peer.host.ping(node.peer_id)
        transport = httpx.ASGITransport(app=create_app(gateway))
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
            yield Net(http, gateway, nodes, providers)


class Scrape:
    """One scrape, parsed: types by family name, and sample values by name and labels."""

    def __init__(self, text: str) -> None:
        self.types: dict[str, str] = {}
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def __call__(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def delta(self, before: Scrape, name: str, **labels: str) -> float:
        return self(name, **labels) - before(name, **labels)


def sdcn(**fields: Any) -> dict[str, Any]:
    body = {"model": "card-a", "prompt": PROMPT, "seed": 3, "steps": 10, "width": 64}
    return body | {"height": 64} | fields


def speeds(*values: float, base: ProviderConfig = ProviderConfig()) -> list[ProviderConfig]:
    return [replace(base, initial_speed=value) for value in values]


def provider_scrape(provider: Provider) -> Scrape:
    body, _ = provider.peer.metrics.exposition()
    return Scrape(body.decode())


GATEWAY_TYPES = {
    "sdcn_gateway_requests": "counter",
    "sdcn_gateway_jobs": "counter",
    "sdcn_gateway_attempts": "counter",
    "sdcn_gateway_megapixel_steps": "counter",
    "sdcn_gateway_job_queue_seconds": "histogram",
    "sdcn_gateway_job_run_seconds": "histogram",
    "sdcn_gateway_job_seconds": "histogram",
    "sdcn_gateway_jobs_waiting": "gauge",
    "sdcn_gateway_jobs_running": "gauge",
    "sdcn_gateway_providers": "gauge",
}
#: What a gateway that spot-checks adds.
TRUST_TYPES = {
    "sdcn_gateway_spot_checks": "counter",
    "sdcn_gateway_check_reruns": "counter",
    "sdcn_gateway_strikes": "counter",
    "sdcn_gateway_exclusions": "counter",
    "sdcn_gateway_providers_excluded": "gauge",
    "sdcn_gateway_fraud_reports": "counter",
}
PEER_TYPES = {
    "sdcn_peer_connections": "gauge",
    "sdcn_peer_streams": "gauge",
    "sdcn_peer_rtt_seconds": "histogram",
    "sdcn_dht_routing_table_peers": "gauge",
    "sdcn_dht_records": "gauge",
    "sdcn_gossip_adverts": "counter",
    "sdcn_adverts_cached": "gauge",
    "process_cpu_seconds": "counter",
    "process_resident_memory_bytes": "gauge",
    "python_info": "gauge",
}
PROVIDER_TYPES = {
    "sdcn_provider_jobs": "counter",
    "sdcn_provider_job_run_seconds": "histogram",
    "sdcn_provider_queue_length": "gauge",
    "sdcn_provider_slots_busy": "gauge",
    "sdcn_provider_speed_its": "gauge",
    "sdcn_provider_vram_bytes": "gauge",
}


async def test_counters_move_by_exactly_the_jobs_and_outcomes_that_happened(
    autojump_clock,
) -> None:
    """A failover, a 400, a busy refusal and an A1111 job, each counted once where it
    belongs; the histograms count every job."""
    broken, sound = Card(fail=True), Card()
    # The broken provider looks fastest, so it is tried first; adverts stay stale long after a
    # job starts, so that the sound one, full, answers busy rather than being passed over.
    configs = speeds(4.0, 1.0, base=ProviderConfig(slots=1, max_queue=0, min_advert_gap=100.0))
    async with gateway_network(broken, sound, configs=configs) as net:
        before = await net.scrape()
        for name, kind in (GATEWAY_TYPES | PEER_TYPES).items():
            assert before.types.get(name) == kind, name

        # A failover: the broken provider fails, the sound one runs it.
        response = await net.http.post("/txt2img", json=sdcn())
        assert response.status_code == 200 and response.json()["info"]["attempts"] == 2
        # A 400: bad input never reaches a provider.
        response = await net.http.post("/txt2img", json=sdcn(steps=0))
        assert response.status_code == 400
        # A busy refusal: the sound provider runs a job behind the gateway's back, so it
        # answers busy; the job waits in the gateway's line and runs once it has room.
        async with trio.open_nursery() as nursery:
            long = small_job(steps=40)
            sound_peer = net.nodes[1].peer_id
            nursery.start_soon(
                lambda: request_job(net.gateway.peer.host, sound_peer, long, deadline=60)
            )
            while sound.jobs < 2:  # noqa: ASYNC110 (simulated time: nothing to wait on)
                await trio.sleep(0.01)
            response = await net.http.post("/txt2img", json=sdcn())
        assert response.status_code == 200 and response.json()["info"]["attempts"] == 2
        # An A1111 job.
        a1111 = {"prompt": PROMPT, "steps": 10, "width": 64, "height": 64, "seed": 5}
        settings = {"override_settings": {"sd_model_checkpoint": "card-a"}}
        response = await net.http.post("/sdapi/v1/txt2img", json=a1111 | settings)
        assert response.status_code == 200

        after = await net.scrape()
        requests = "sdcn_gateway_requests_total"
        assert after.delta(before, requests, api="sdcn", status="200") == 2
        assert after.delta(before, requests, api="sdcn", status="400") == 1
        assert after.delta(before, requests, api="a1111", status="200") == 1
        assert after.delta(before, requests, api="other", status="200") == 1  # the first scrape
        attempts = "sdcn_gateway_attempts_total"
        for outcome, count in {"ok": 3, "failed": 1, "busy": 1, "timeout": 0}.items():
            assert after.delta(before, attempts, outcome=outcome) == count, outcome
        assert after.delta(before, "sdcn_gateway_jobs_total", status="ok") == 3
        assert after.delta(before, "sdcn_gateway_jobs_total", status="rejected") == 0
        for histogram in ("job_queue_seconds", "job_run_seconds", "job_seconds"):
            name = f"sdcn_gateway_{histogram}"
            assert after.delta(before, f"{name}_count") == 3
            assert after(f"{name}_bucket", le="+Inf") == 3
        # The job that waited for room counts its wait as queue time: it came while the job
        # behind the gateway's back (1.25 s on this card) had run for a few ms.
        assert after("sdcn_gateway_job_queue_seconds_sum") >= 1.0
        assert after("sdcn_gateway_megapixel_steps_total") == pytest.approx(3 * 10 * 64 * 64 / 1e6)
        assert after("sdcn_gateway_jobs_waiting") == 0 and after("sdcn_gateway_jobs_running") == 0
        states = {s: after("sdcn_gateway_providers", state=s) for s in ("online", "banned")}
        assert sum(states.values()) == 2

        # The gateway peer's own figures.
        assert after("sdcn_adverts_cached") == 3  # the two providers' and the gateway's own
        assert after("sdcn_peer_connections", direction="inbound") == 2
        assert after("sdcn_gossip_adverts_total", result="accepted") >= 2

        # Each provider counted its own side.
        for provider in net.providers:
            scrape = provider_scrape(provider)
            for name, kind in PROVIDER_TYPES.items():
                assert scrape.types.get(name) == kind, name
        bad, good = provider_scrape(net.providers[0]), provider_scrape(net.providers[1])
        assert bad("sdcn_provider_jobs_total", outcome="backend_failed") == 1
        assert bad("sdcn_provider_jobs_total", outcome="ok") == 0
        # Three of the gateway's and the one behind its back; one refused busy.
        assert good("sdcn_provider_jobs_total", outcome="ok") == 4
        assert good("sdcn_provider_jobs_total", outcome="busy") == 1
        assert good("sdcn_provider_job_run_seconds_count") == 4
        assert good("sdcn_provider_slots_busy") == 0 and good("sdcn_provider_queue_length") == 0
        assert good("sdcn_provider_speed_its") == pytest.approx(net.providers[1].speed)


async def test_a_provider_counts_a_job_it_refuses_as_unsupported(autojump_clock) -> None:
    async with gateway_network(Card()) as net:
        host, peer = net.gateway.peer.host, net.nodes[0].peer_id
        with pytest.raises(JobError) as info:
            await request_job(host, peer, small_job(model="card-z"), deadline=10)
        assert info.value.code == "unsupported"
        scrape = provider_scrape(net.providers[0])
        assert scrape("sdcn_provider_jobs_total", outcome="unsupported") == 1
        assert scrape("sdcn_provider_job_run_seconds_count") == 0


async def test_status_sums_up_the_gateway_and_the_last_minute(autojump_clock) -> None:
    card = Card()
    async with gateway_network(card, Card()) as net:
        status = (await net.http.get("/v1/status")).json()
        assert status["providers_online"] == 2 and status["models_online"] == 1
        assert status["images_last_minute"] == 0 and status["jobs_running"] == 0
        assert status["version"] and status["peer_id"] == str(net.gateway.peer_id)

        async with trio.open_nursery() as nursery:
            body = sdcn(steps=40, batch_size=2)
            nursery.start_soon(lambda: net.http.post("/txt2img", json=body))
            while net.gateway.dispatcher.running == 0:  # noqa: ASYNC110 (simulated time)
                await trio.sleep(0.01)
            status = (await net.http.get("/v1/status")).json()
            assert status["jobs_running"] == 1
            assert status["megapixel_steps_queued"] == pytest.approx(40 * 2 * 64 * 64 / 1e6, 1e-3)
            scrape = await net.scrape()
            assert scrape("sdcn_gateway_jobs_running") == 1

        status = (await net.http.get("/v1/status")).json()
        assert status["jobs_running"] == 0 and status["megapixel_steps_queued"] == 0
        assert status["images_last_minute"] == 2
        assert status["megapixel_steps_last_minute"] == pytest.approx(0.328, abs=1e-3)
        assert status["uptime_s"] > 0
        await trio.sleep(61)
        status = (await net.http.get("/v1/status")).json()
        assert status["images_last_minute"] == 0 and status["megapixel_steps_last_minute"] == 0


async def test_with_metrics_off_the_gateway_serves_no_metrics(autojump_clock) -> None:
    async with gateway_network(Card(), metrics=False) as net:
        response = await net.http.post("/txt2img", json=sdcn())
        assert response.status_code == 200
        response = await net.http.get("/metrics")
        assert response.status_code == 404 and response.json()["msg"] == (
            "metrics are off on this gateway"
        )
        assert net.providers[0].peer.metrics.exposition()[0] == b""
        assert (await net.http.get("/v1/status")).json()["images_last_minute"] == 1


# --- logs --------------------------------------------------------------------------------------


@contextmanager
def captured_json_lines() -> Iterator[list[dict[str, Any]]]:
    """Every log line of this process at info and above, as JSON objects (`--log-format json`)."""
    lines: list[dict[str, Any]] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(json.loads(self.format(record)))

    handler = Capture(logging.INFO)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


async def test_one_job_id_follows_a_job_from_the_gateway_to_its_provider(autojump_clock) -> None:
    broken, sound = Card(fail=True), Card()
    async with gateway_network(broken, sound, configs=speeds(4.0, 1.0)) as net:
        with captured_json_lines() as lines:
            response = await net.http.post("/txt2img", json=sdcn())
            assert response.status_code == 200
            first = [line for line in lines if "job_id" in line]
            response = await net.http.post("/txt2img", json=sdcn(seed=4))
            assert response.status_code == 200
    job_ids = {line["job_id"] for line in first}
    assert len(job_ids) == 1
    [job_id] = job_ids
    by_logger: dict[str, list[dict[str, Any]]] = {}
    for line in first:
        by_logger.setdefault(line["logger"], []).append(line)
    # The gateway's one line for the finished job, and each provider's for the job it ran.
    [done] = by_logger["gateway.dispatch"]
    assert done["status"] == "ok" and done["model"] == "card-a" and done["attempts"] == 2
    assert done["provider"] == str(net.nodes[1].peer_id)
    assert done["queue_s"] >= 0 and done["run_s"] > 0
    ran = by_logger["sdcn_p2p.provider"]
    assert sorted(line["status"] for line in ran) == ["backend_failed", "ok"]
    assert all(line["level"] == "INFO" and line["time"] for line in first)
    # The next job has an id of its own; nobody logged the prompt.
    assert {line["job_id"] for line in lines if "job_id" in line} - job_ids
    assert job_id not in {line.get("job_id") for line in lines[len(first) :]}
    assert not [line for line in lines if PROMPT in json.dumps(line)]


async def test_a_callers_job_id_names_the_job_and_each_part_of_a_batch(autojump_clock) -> None:
    async with gateway_network(Card(), Card()) as net:
        dispatcher = net.gateway.dispatcher
        with captured_json_lines() as lines:
            await dispatcher.run(small_job(), job_id="job-7")
            await dispatcher.run_batch([small_job(), small_job(seed=8)], job_id="job-8")
            await dispatcher.run_batch([small_job()], job_id="job-9")
        with pytest.raises(ValueError, match="job_id"):
            await dispatcher.run(small_job(), job_id="job 10")
    ids = {(line["logger"], line["job_id"]) for line in lines if "job_id" in line}
    for job_id in ("job-7", "job-8.0", "job-8.1", "job-9"):
        assert ("gateway.dispatch", job_id) in ids and ("sdcn_p2p.provider", job_id) in ids


async def test_the_grafana_dashboard_draws_only_metrics_that_exist(autojump_clock) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    async with gateway_network(Card(), trust=TrustConfig()) as net:
        assert (await net.http.post("/txt2img", json=sdcn())).status_code == 200
        await net.gateway.peer.host.ping(net.nodes[0].peer_id)
        scrapes = [await net.scrape(), provider_scrape(net.providers[0])]
    exported = {name for scrape in scrapes for name, _ in scrape.samples}
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 15
    drawn = set()
    for panel in panels:
        assert panel["description"] and panel["targets"], panel["title"]
        for target in panel["targets"]:
            drawn |= set(re.findall(r"\b(?:sdcn|process)_[a-z_]+", target["expr"]))
    assert drawn <= exported, drawn - exported
    every = GATEWAY_TYPES | TRUST_TYPES | PROVIDER_TYPES | PEER_TYPES
    wanted = {name.removesuffix("_total") for name in every}
    shown = {re.sub(r"_(total|bucket)$", "", name) for name in drawn}
    assert wanted - {"python_info"} <= shown, wanted - shown


# --- pure parts ----------------------------------------------------------------------------------


def test_recent_work_sums_the_last_minute_in_one_second_bins() -> None:
    recent = RecentWork(window=60)
    recent.add(100.2, 1, 0.5)
    recent.add(100.7, 2, 1.0)
    recent.add(130.0, 1, 0.25)
    assert recent.totals(130.5) == (4, 1.75)
    assert recent.totals(160.0) == (1, 0.25)  # the bin of second 100 is past
    assert recent.totals(190.0) == (0, 0)
    for second in range(1000):
        recent.add(second, 1, 1.0)
    assert len(recent._bins) <= 61


@pytest.mark.parametrize(
    ("path", "api"),
    [
        ("/txt2img", "sdcn"),
        ("/img2img", "sdcn"),
        ("/v1/models", "sdcn"),
        ("/healthz", "sdcn"),
        ("/sdapi/v1/txt2img", "a1111"),
        ("/v1/jobs", "jobs"),
        ("/v1/jobs/abc/events", "jobs"),
        ("/v1/jobsx", "sdcn"),
        ("/metrics", "other"),
        ("/nowhere", "other"),
    ],
)
def test_each_path_counts_under_one_api(path: str, api: str) -> None:
    assert api_of(path) == api


async def test_spot_checks_and_exclusions_are_counted_for_operators(autojump_clock) -> None:
    async with gateway_network(Card(), Card(), trust=TrustConfig()) as net:
        status = (await net.http.get("/v1/status")).json()
        assert status["trust"]["providers_excluded"] == 0
        assert status["trust"]["fraud_reports"]["received"] == 0
        before = await net.scrape()
        for name, kind in TRUST_TYPES.items():
            assert before.types.get(name) == kind, name
        response = await net.http.post("/txt2img", json=sdcn(verify=True))
        assert response.status_code == 200, response.text
        after = await net.scrape()
        checks = "sdcn_gateway_spot_checks_total"
        assert after.delta(before, checks, outcome="passed") == 1
        assert after.delta(before, checks, outcome="failed") == 0
        assert after.delta(before, "sdcn_gateway_check_reruns_total") == 1
        confirmed = ("sdcn_gateway_fraud_reports_total", frozenset({("event", "confirmed")}))
        assert after.samples[confirmed] == 0
        peer = net.nodes[0].peer_id
        now = net.gateway.wall_clock()
        for reason in ("a wrong picture", "another"):
            net.gateway.trust.struck(peer, reason, now)
        assert (await net.scrape())("sdcn_gateway_providers_excluded") == 1
        trust = (await net.http.get("/v1/status")).json()["trust"]
        assert trust["providers_excluded"] == 1 and trust["checks"]["passed"] == 1
        assert trust["extra_compute"] == pytest.approx(1.0)  # one job, checked once
