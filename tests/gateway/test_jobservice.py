"""The job service in-process, on the in-memory network under MockClock: retention and
eviction, the cap on unfinished jobs, a full or read-only store at submit, a restart with the
same data dir, a data dir that cannot be used, and the line in front of the dispatcher.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from gateway.api import create_app
from gateway.dispatch import GatewayConfig
from gateway.jobservice import JobEvent, JobsConfig
from gateway.node import Gateway, open_gateway
from sdcn_p2p.backends import Backend
from sdcn_p2p.backends.testcard import TestcardBackend, TestcardConfig
from sdcn_p2p.errors import ConfigError
from sdcn_p2p.jobs import JobRequest
from sdcn_p2p.peer import Peer
from sdcn_p2p.provider import Provider, ProviderConfig
from sdcn_p2p.testing import open_memory_peers, open_memory_providers
from sdcn_p2p.testing.gated import GatedBackend

CARD = TestcardConfig(models=("card",))


@dataclass
class Net:
    peer: Peer
    providers: list[Provider]
    data_dir: Path


@asynccontextmanager
async def memory_network(
    tmp_path: Path, *backends: Backend, config: ProviderConfig = ProviderConfig(max_queue=32)
) -> AsyncIterator[Net]:
    """Peer 0 will be the gateway; a provider per backend after it."""
    configs = [config] * len(backends)
    async with open_memory_providers(backends, configs) as (peer, _, providers):
        yield Net(peer, providers, tmp_path / "data")


#: Jobs wait on gated backends while the job store's thread works, and MockClock's autojump
#: moves on whenever every task waits: deadlines long enough not to pass meanwhile.
PATIENT = GatewayConfig(deadline_base=86_400, deadline_cap=86_400)


@asynccontextmanager
async def serving(net: Net, **config: Any) -> AsyncIterator[tuple[Gateway, httpx.AsyncClient]]:
    jobs = JobsConfig(data_dir=net.data_dir, **config)
    async with open_gateway(net.peer, PATIENT, jobs=jobs) as gateway:
        transport = httpx.ASGITransport(app=create_app(gateway))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
            yield gateway, http


def body(**fields: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "kind": "txt2img",
        "model": "card",
        "prompt": "a harbour",
        "seed": 3,
        "steps": 4,
        "width": 64,
        "height": 64,
    }
    values.update(fields)
    return values


async def submit(http: httpx.AsyncClient, **fields: Any) -> str:
    response = await http.post("/v1/jobs", json=body(**fields))
    assert response.status_code == 202, response.text
    return response.json()["id"]


async def end_of(gateway: Gateway, job_id: str) -> JobEvent:
    """Follow `job_id` in-process to its terminal event."""
    return (await events_of(gateway, job_id, "done", "failed", "cancelled"))[-1]


async def events_of(
    gateway: Gateway, job_id: str, *names: str, after: str | None = None
) -> list[JobEvent]:
    """`job_id`'s events (in-process, after the one with id `after`) up to the first named
    one of `names`, in order."""
    wanted = list(names)
    seen: list[JobEvent] = []
    feed = await gateway.jobs.events(job_id, after)
    try:
        async for event in feed:
            if event is None:
                continue
            seen.append(event)
            if event.name in wanted or (event.terminal and len(names) > 1):
                return seen
    finally:
        feed.close()
    raise AssertionError(f"the feed ended without {names}")


def rows(data_dir: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(data_dir / "jobs.db") as db:
        return db.execute("SELECT id, status, mode, parts FROM jobs ORDER BY rowid").fetchall()


def assert_msg(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    assert set(response.json()) == {"msg"}
    for word in words:
        assert word in response.json()["msg"], response.json()["msg"]


# --- retention and eviction -----------------------------------------------------------------------


async def test_results_expire_after_the_retention_then_their_ids_are_forgotten(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Wide margins: the clock also jumps while the store's thread works.
    async with (
        memory_network(tmp_path, TestcardBackend(CARD)) as net,
        serving(net, retention=3600, tombstone_keep=7200) as (gateway, http),
    ):
        job_id = await submit(http)
        assert (await end_of(gateway, job_id)).name == "done"
        await trio.sleep(1800)
        await gateway.jobs.sweep()
        assert (await http.get(f"/v1/jobs/{job_id}")).json()["status"] == "done"
        await trio.sleep(3600)  # past the hour
        await gateway.jobs.sweep()
        assert_msg(await http.get(f"/v1/jobs/{job_id}"), 410, "expired")
        assert_msg(await http.get(f"/v1/jobs/{job_id}/events"), 410, "expired")
        assert list((net.data_dir / "results").iterdir()) == []
        await trio.sleep(7200)  # past the retention and the time its id is remembered
        await gateway.jobs.sweep()
        assert_msg(await http.get(f"/v1/jobs/{job_id}"), 404)
        assert rows(net.data_dir) == []


async def test_past_the_size_cap_the_oldest_results_go_first(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    card = TestcardBackend(CARD)
    sizes = []
    for seed in (1, 2, 3):
        job = JobRequest("txt2img", "card", "a harbour", seed=seed, steps=4, width=64, height=64)
        sizes.append(len((await card.generate(job, lambda step, total: None)).images[0]))
    cap = (sizes[1] + sizes[2]) / 2**20  # room for the last two
    async with (
        memory_network(tmp_path, card) as net,
        serving(net, results_max_mb=cap) as (gateway, http),
    ):
        ids = []
        for seed in (1, 2, 3):
            ids.append(await submit(http, seed=seed))
            assert (await end_of(gateway, ids[-1])).name == "done"
            await trio.sleep(1)
        await gateway.jobs.sweep()
        assert_msg(await http.get(f"/v1/jobs/{ids[0]}"), 410, "room")
        for job_id in ids[1:]:
            assert (await http.get(f"/v1/jobs/{job_id}")).json()["status"] == "done"
        kept = sorted(path.name for path in (net.data_dir / "results").iterdir())
        assert kept == sorted(f"{job_id}.0.png" for job_id in ids[1:])


# --- limits and a disk that cannot take more ------------------------------------------------------


async def test_past_the_cap_on_unfinished_jobs_a_submit_is_503_with_retry_after(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with (
        memory_network(tmp_path, GatedBackend()) as net,
        serving(net, max_unfinished=2) as (gateway, http),
    ):
        first, _ = await submit(http), await submit(http)
        response = await http.post("/v1/jobs", json=body())
        assert_msg(response, 503, "unfinished")
        assert int(response.headers["retry-after"]) >= 1
        assert (await http.delete(f"/v1/jobs/{first}")).json()["status"] == "cancelled"
        await submit(http)
        assert gateway.jobs.unfinished == 2


async def test_a_disk_without_room_is_507_at_submit_and_nothing_is_kept(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with (
        memory_network(tmp_path, TestcardBackend(CARD)) as net,
        serving(net, min_free_mb=2**40) as (gateway, http),
    ):
        assert_msg(await http.post("/v1/jobs", json=body()), 507, "disk is full")
        assert rows(net.data_dir) == [] and gateway.jobs.unfinished == 0
        assert net.providers[0].jobs_done == 0


async def test_a_full_store_is_507_and_a_read_only_one_503(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with (
        memory_network(tmp_path, TestcardBackend(CARD)) as net,
        serving(net) as (gateway, http),
    ):
        store = gateway.jobs._store

        def fill(db: sqlite3.Connection) -> None:  # SQLite's own "database or disk is full"
            pages = db.execute("PRAGMA page_count").fetchone()[0]
            db.execute(f"PRAGMA max_page_count = {pages}")

        await store._read(fill)
        big = body(prompt="x" * 8000, negative_prompt="y" * 8000)
        for _ in range(8):  # until the pages it had run out
            response = await http.post("/v1/jobs", json=big)
            if response.status_code != 202:
                break
        assert_msg(response, 507, "full")
        await store._read(lambda db: db.execute("PRAGMA max_page_count = 1000000"))
        await store._read(lambda db: db.execute("PRAGMA query_only = ON"))
        assert_msg(await http.post("/v1/jobs", json=body()), 503, "cannot store jobs")
        # A sync job does not need the store: it still runs (its record is lost, logged).
        sync = body()
        del sync["kind"]
        assert (await http.post("/txt2img", json=sync)).status_code == 200


# --- restart --------------------------------------------------------------------------------------


async def test_a_restart_serves_finished_results_and_runs_unfinished_jobs_again(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    backend = GatedBackend()
    async with memory_network(tmp_path, backend) as net:
        async with serving(net) as (gateway, http):
            finished = await submit(http, seed=-1)
            backend.allow(4)
            assert (await end_of(gateway, finished)).name == "done"
            before = (await http.get(f"/v1/jobs/{finished}")).json()
            running = await submit(http, seed=-1)
            waiting = await submit(http, seed=-1)
            await backend.started.wait()
            seeds = {job_id: _seed(net.data_dir, job_id) for job_id in (running, waiting)}
        # The gateway stopped with two jobs unfinished; it starts again on the same dir.
        statuses = sorted(row[1] for row in rows(net.data_dir))
        assert statuses[0] == "done" and set(statuses[1:]) <= {"queued", "running"}
        backend.allow(1000)
        async with serving(net) as (gateway, http):
            assert (await http.get(f"/v1/jobs/{finished}")).json() == before
            for job_id in (running, waiting):
                end = await end_of(gateway, job_id)
                assert end.name == "done" and end.id.startswith("2.")  # its second run
                assert end.data["info"]["seed"] == seeds[job_id]
                status = (await http.get(f"/v1/jobs/{job_id}")).json()
                assert status["status"] == "done" and status["info"]["seed"] == seeds[job_id]


def _seed(data_dir: Path, job_id: str) -> int:
    import json

    [(parts,)] = [(row[3],) for row in rows(data_dir) if row[0] == job_id]
    [part] = json.loads(parts)
    assert part["seed"] != -1
    return part["seed"]


async def test_a_restart_marks_unfinished_sync_jobs_cancelled(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    backend = GatedBackend()
    async with memory_network(tmp_path, backend) as net:
        async with serving(net) as (gateway, http), trio.open_nursery() as nursery:
            sync = body()
            del sync["kind"]
            nursery.start_soon(partial(http.post, "/txt2img", json=sync))
            await backend.started.wait()
            [job_id] = list(gateway.jobs._live)
            nursery.cancel_scope.cancel()
        # Stopped, the gateway recorded the job cancelled; a crash would have left it running.
        await _unfinish(net.data_dir, job_id)
        async with serving(net) as (gateway, http):
            status = (await http.get(f"/v1/jobs/{job_id}")).json()
            assert status["status"] == "cancelled" and gateway.jobs.unfinished == 0


async def _unfinish(data_dir: Path, job_id: str) -> None:
    def update() -> None:
        with sqlite3.connect(data_dir / "jobs.db") as db:
            db.execute(
                "UPDATE jobs SET status = 'running', finished_at = NULL WHERE id = ?", (job_id,)
            )

    await trio.to_thread.run_sync(update)


# --- a data dir that cannot be used ---------------------------------------------------------------


@pytest.mark.parametrize("damage", ["file", "garbage", "newer", "foreign"])
async def test_a_data_dir_that_cannot_be_used_is_a_config_error_at_start(
    tmp_path: Path, damage: str
) -> None:
    data_dir = tmp_path / "data"
    if damage == "file":
        data_dir.write_text("not a directory")
    else:
        data_dir.mkdir()
        db_path = data_dir / "jobs.db"
        if damage == "garbage":
            db_path.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)
        else:
            with sqlite3.connect(db_path) as db:
                if damage == "newer":
                    db.execute("PRAGMA user_version = 99")
                else:
                    db.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY)")
    async with open_memory_peers(1) as (peer,):
        with pytest.raises(ConfigError, match=str(data_dir)):
            async with open_gateway(peer, jobs=JobsConfig(data_dir=data_dir)):
                pass


async def test_a_data_dir_in_use_by_another_gateway_is_a_config_error(tmp_path: Path) -> None:
    async with open_memory_peers(2) as (one, two):
        jobs = JobsConfig(data_dir=tmp_path)
        async with open_gateway(one, jobs=jobs):
            with pytest.raises(ConfigError, match="in use"):
                async with open_gateway(two, jobs=jobs):
                    pass


# --- the line in front of the dispatcher ----------------------------------------------------------


async def test_queued_jobs_wait_in_order_and_report_their_place(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """With one job at the dispatcher at a time, the rest wait in the service's line, in
    order, each told its place as the line moves."""
    backend = GatedBackend()
    async with (
        memory_network(tmp_path, backend) as net,
        serving(net, max_dispatching=1) as (gateway, http),
    ):
        ids = [await submit(http, seed=seed) for seed in range(8)]
        await backend.started.wait()
        states = [(await http.get(f"/v1/jobs/{job_id}")).json() for job_id in ids]
        assert [s["status"] for s in states] == ["running"] + ["queued"] * 7
        assert [s["queue_position"] for s in states] == [None, 0, 1, 2, 3, 4, 5, 6]
        assert all(s["eta_s"] is None or s["eta_s"] >= 0 for s in states)
        feed = await gateway.jobs.events(ids[-1])
        positions = []
        backend.allow(10_000)
        async for event in feed:
            if event is not None and event.name == "queued":
                positions.append(event.data["position"])
            if event is not None and event.terminal:
                break
        feed.close()
        assert positions == [6, 5, 4, 3, 2, 1, 0]
        ends = [await end_of(gateway, job_id) for job_id in ids]
        assert all(end.name == "done" for end in ends)
        finished = [(await http.get(f"/v1/jobs/{i}")).json()["finished_at"] for i in ids]
        assert finished == sorted(finished)  # first come, first served
