"""A public gateway: API keys, per-client limits on both APIs and async jobs, refusals on
``/metrics`` by reason only, ``GET /v1/account``, contributors' providers first, and keys
reloaded on SIGHUP.

The gateway's HTTP app runs in-process (httpx's ASGI transport, each client from the address
it is given) against test-card providers on the in-memory network, under MockClock.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from gateway.access import AccessConfig, add_key
from gateway.api import create_app
from gateway.node import Gateway, open_gateway
from sdcn_p2p.backends import Backend
from sdcn_p2p.backends.testcard import TestcardBackend, TestcardConfig
from sdcn_p2p.cli import reload_keys_on_sighup
from sdcn_p2p.peer import Peer
from sdcn_p2p.testing import inline_threads, open_memory_providers
from sdcn_p2p.testing.gated import GatedBackend

#: 10 steps of 64x64 take 10 * (64 * 64 / 512**2) / 0.5 = 0.31 s on this card.
CARD = TestcardConfig(models=("card-a",), speed=0.5)
SYNC = {"model": "card-a", "prompt": "a dog", "steps": 10, "width": 64, "height": 64}
JOB = {"kind": "txt2img", **SYNC}  # 0.04 megapixel-steps
ALICE, BOB = "sdcn_alice_secret", "sdcn_bob_secret"


def keys_file(path: Path, provider: str) -> Path:
    path.write_text(
        "[tiers.tight]\n"
        "limits = { request_burst = 3, requests_per_second = 1, max_in_flight = 1, "
        "max_waiting = 1, megapixel_steps_per_minute = 0.05 }\n"
    )
    add_key(path, ALICE, "alice", provider=provider)
    add_key(path, BOB, "bob", tier="tight")
    return path


@dataclass
class Net:
    gateway: Gateway
    nodes: list[Peer]

    @asynccontextmanager
    async def client(
        self, address: str = "192.0.2.10", key: str | None = None
    ) -> AsyncIterator[httpx.AsyncClient]:
        transport = httpx.ASGITransport(app=create_app(self.gateway), client=(address, 5000))
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://gw", headers=headers
        ) as http:
            yield http


@pytest.fixture(autouse=True)
def _no_time_in_threads() -> Iterator[None]:
    # The limits count simulated minutes: the job store's thread must not let MockClock jump.
    with inline_threads():
        yield


@asynccontextmanager
async def public_gateway(
    tmp_path: Path, *, require_key: bool = False, backend: Backend | None = None
) -> AsyncIterator[Net]:
    """A gateway with the keys file of `keys_file` and two providers (on `backend`, default
    a paced test card each); alice's is the second."""
    backends = [backend or TestcardBackend(CARD) for _ in range(2)]
    async with open_memory_providers(backends) as (peer, nodes, _), AsyncExitStack() as stack:
        for node in nodes:
            await peer.host.ping(node.peer_id)
        path = keys_file(tmp_path / "keys.toml", str(nodes[1].peer_id))
        access = AccessConfig.load(path, require_key=require_key)
        gateway = await stack.enter_async_context(open_gateway(peer, access=access))
        yield Net(gateway, nodes)


def refused(scrape: str) -> dict[str, float]:
    """``sdcn_gateway_refused_total`` by reason; asserts no sample anywhere is labelled with
    a client's address or key."""
    counts = {}
    for family in text_string_to_metric_families(scrape):
        for sample in family.samples:
            for value in sample.labels.values():
                assert "192.0.2" not in value and "alice" not in value and "bob" not in value
            if sample.name == "sdcn_gateway_refused_total":
                counts[sample.labels["reason"]] = sample.value
    return counts


async def test_keys_are_required_and_checked_and_never_logged(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with public_gateway(tmp_path, require_key=True) as net:
        async with net.client() as anonymous:
            answer = await anonymous.get("/v1/models")
            assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"
            assert answer.json() == {
                "msg": "this gateway serves only clients with an API key "
                "(Authorization: Bearer <key>)"
            }
            assert (await anonymous.post("/v1/jobs", json=JOB)).status_code == 401
            assert (await anonymous.get("/healthz")).status_code == 200  # open to all
            scrape = (await anonymous.get("/metrics")).text
        async with net.client(key="sdcn_wrong") as wrong:
            answer = await wrong.post("/txt2img", json=SYNC)
            assert answer.status_code == 401 and answer.json() == {"msg": "unknown API key"}
        async with net.client(key=ALICE) as alice:
            answer = await alice.post("/txt2img", json=SYNC)
            assert answer.status_code == 200, answer.text
        assert refused(scrape) == {
            "no_key": 2, "bad_key": 0, "requests": 0, "in_flight": 0, "waiting": 0,
            "megapixel_steps": 0,
        }  # fmt: skip
    assert ALICE not in caplog.text and "sdcn_wrong" not in caplog.text


async def test_limits_hold_on_both_apis_and_async_jobs(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with public_gateway(tmp_path) as net, net.client(key=BOB) as bob:
        assert (await bob.post("/v1/jobs", json=JOB)).status_code == 202
        await trio.testing.wait_all_tasks_blocked()  # at a provider: no longer waiting
        second = await bob.post("/v1/jobs", json=JOB)
        assert second.status_code == 429
        assert second.json()["msg"].startswith("over the limit of 0.05 megapixel-steps a minute")
        assert 30 <= int(second.headers["retry-after"]) <= 60
        await trio.sleep(60)  # a minute's work back; the first job has run
        a1111 = {"prompt": "a dog", "steps": 10, "width": 64, "height": 64,
                 "override_settings": {"sd_model_checkpoint": "card-a"}}  # fmt: skip
        assert (await bob.post("/sdapi/v1/txt2img", json=a1111)).status_code == 200
        answer = await bob.post("/sdapi/v1/txt2img", json=a1111)
        assert answer.status_code == 429 and "megapixel-steps" in answer.json()["msg"]
        for _ in range(3):
            answer = await bob.get("/v1/models")
            if answer.status_code == 429:
                break
        assert answer.status_code == 429 and "requests a second" in answer.json()["msg"]
        assert answer.headers["retry-after"] == "1"
        scrape = refused((await bob.get("/metrics")).text)
        assert scrape["requests"] == 1 and scrape["megapixel_steps"] == 2
        assert sum(scrape.values()) == 3


async def test_jobs_in_flight_and_waiting_are_limited(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    gated = GatedBackend(models=CARD.models)  # its jobs run until the test ends
    async with public_gateway(tmp_path, backend=gated) as net:
        net.gateway.access = AccessConfig.from_mapping(
            {"tiers": {"anonymous": {"limits": {"max_in_flight": 1, "max_waiting": 1}}}}
        )
        async with net.client("2001:db8::1") as one, net.client("2001:db8::2") as same_64:
            assert (await one.post("/v1/jobs", json=JOB)).status_code == 202
            await gated.started.wait()  # it went to a provider
            assert (await same_64.post("/v1/jobs", json=JOB)).status_code == 202  # waits
            answer = await one.post("/v1/jobs", json=JOB)
            assert answer.status_code == 429 and "jobs waiting" in answer.json()["msg"]
            answer = await same_64.post("/txt2img", json=SYNC)
            assert answer.status_code == 429 and "jobs in flight" in answer.json()["msg"]
            account = (await one.get("/v1/account")).json()
            assert account["client"] == "anonymous" and account["tier"] == "anonymous"
            assert account["usage"]["jobs_in_flight"] == 1
            assert account["usage"]["jobs_waiting"] == 1
            assert account["limits"]["max_in_flight"] == 1
            status = (await one.get("/v1/status")).json()
            assert status["clients_active"] == 1 and status["jobs_queued"] == 1
            assert status["load"] == 1.0 and status["keys_required"] is False


async def test_a_contributor_is_served_by_its_own_provider_and_weighs_more(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with public_gateway(tmp_path) as net, net.client(key=ALICE) as alice:
        own = str(net.nodes[1].peer_id)
        account = (await alice.get("/v1/account")).json()
        assert account["client"] == "alice" and account["tier"] == "standard"
        assert account["contributor"] is False and account["weight"] == 1.0
        assert account["providers"] == [
            {"peer_id": own, "megapixel_steps": 0.0, "jobs": 0, "last_job_at": None}
        ]
        for _ in range(3):  # its own provider first, whatever the choice would be
            answer = await alice.post("/txt2img", json=SYNC)
            job = await net.gateway.jobs.status(answer.headers["sdcn-job-id"], images=False)
            assert job.provider == own
        account = (await alice.get("/v1/account")).json()
        assert account["contributor"] is True and account["weight"] == 4.0
        assert account["providers"][0]["jobs"] == 3
        assert account["providers"][0]["megapixel_steps"] == pytest.approx(
            3 * 10 * 64 * 64 / 1e6, abs=1e-3
        )


async def test_keys_are_reloaded_and_a_bad_file_keeps_the_old_ones(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with public_gateway(tmp_path, require_key=True) as net:
        path = tmp_path / "keys.toml"
        add_key(path, "sdcn_carol", "carol")
        async with net.client(key="sdcn_carol") as carol:
            assert (await carol.get("/v1/models")).status_code == 401
            reloaded = trio.Event()

            class Watched:
                def reload_access(self) -> None:
                    assert net.gateway.reload_access()
                    reloaded.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reload_keys_on_sighup, Watched())
                await trio.testing.wait_all_tasks_blocked()
                os.kill(os.getpid(), signal.SIGHUP)
                await reloaded.wait()
                nursery.cancel_scope.cancel()
            assert (await carol.get("/v1/models")).status_code == 200
            path.write_text("[[keys]]\nname = 'broken'")
            assert not net.gateway.reload_access()
            assert (await carol.get("/v1/models")).status_code == 200
