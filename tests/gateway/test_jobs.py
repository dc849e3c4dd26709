"""Async jobs through the real HTTP server and SSE (httpx streaming) on loopback, with the
providers behind real WebSockets: submit, status, events in order, reconnecting with
Last-Event-ID, several followers, keep-alives, cancel reaching the provider, and the A1111
API's progress and interrupt. Real time: each step of a job waits for the test to allow it.
"""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from PIL import Image

from gateway.jobservice import JobsConfig
from gateway.node import Gateway, open_gateway
from sdcn_p2p.backends.testcard import TestcardBackend, TestcardConfig
from sdcn_p2p.provider import Provider, ProviderConfig
from sdcn_p2p.testing import open_loopback_providers
from sdcn_p2p.testing.gated import GatedBackend


@dataclass
class Net:
    http: httpx.AsyncClient
    gateway: Gateway
    providers: list[Provider]
    url: str
    data_dir: Path
    backends: list[TestcardBackend] = field(default_factory=list)


@asynccontextmanager
async def network(
    tmp_path: Path, *backends: TestcardBackend, jobs: JobsConfig | None = None
) -> AsyncIterator[Net]:
    """A gateway serving HTTP on loopback, and one provider per backend dialling it over a
    real WebSocket."""
    data_dir = tmp_path / "data"
    config = jobs or JobsConfig()
    async with AsyncExitStack() as stack:
        peer, providers = await stack.enter_async_context(
            open_loopback_providers(*backends, config=ProviderConfig(max_queue=16))
        )
        gateway = await stack.enter_async_context(
            open_gateway(
                peer,
                http="127.0.0.1:0",
                default_model="card",
                jobs=JobsConfig(**{**_fields(config), "data_dir": data_dir}),
            )
        )
        url = gateway.urls[0]
        http = await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=30))
        yield Net(http, gateway, providers, url, data_dir, list(backends))


def _fields(config: JobsConfig) -> dict[str, Any]:
    return {name: getattr(config, name) for name in config.__dataclass_fields__}


def body(**fields: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "kind": "txt2img",
        "model": "card",
        "prompt": "a lighthouse",
        "seed": 9,
        "steps": 3,
        "width": 96,
        "height": 64,
    }
    values.update(fields)
    return values


@dataclass
class Event:
    id: str | None
    name: str
    data: dict[str, Any]


class Follower:
    """Reads a job's event stream line by line (comments are kept, as ``:`` events)."""

    def __init__(self, response: httpx.Response, lines: AsyncIterator[str]) -> None:
        self.response = response
        self._lines = lines

    async def next(self, *, comments: bool = False) -> Event:
        """The next event; raises StopAsyncIteration when the stream ends."""
        fields: dict[str, str] = {}
        async for line in self._lines:
            if line.startswith(":"):
                if comments:
                    return Event(None, ":", {"text": line[1:].strip()})
                continue
            if line == "":
                if "event" in fields or "data" in fields:
                    return Event(fields.get("id"), fields["event"], json.loads(fields["data"]))
                fields.clear()  # a retry: field alone
                continue
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
        raise StopAsyncIteration

    async def until(self, name: str) -> list[Event]:
        """Events up to and including the first named `name` (for a terminal event, the
        stream must end there)."""
        seen = [await self.next()]
        while seen[-1].name != name:
            seen.append(await self.next())
        if name in ("done", "failed", "cancelled"):
            assert await self.rest() == []
        return seen

    async def rest(self) -> list[Event]:
        events = []
        try:
            while True:
                events.append(await self.next())
        except StopAsyncIteration:
            return events


@asynccontextmanager
async def follow(
    http: httpx.AsyncClient, job_id: str, last_event_id: str | None = None
) -> AsyncIterator[Follower]:
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    async with http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        async with aclosing(response.aiter_lines()) as lines:
            yield Follower(response, lines)


_RAW_EVENT = re.compile(rb"id: (\S+)\nevent: (\w+)\ndata: (.*)\n\n")


async def follow_then_drop(url: str, job_id: str, until: str) -> list[Event]:
    """Follow a job's events over a plain socket until the event named `until`, then drop
    the connection, as a client that goes away does. (httpx cannot stop reading a stream
    midway without leaving its async generators to the garbage collector.)"""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        request = f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: {host}\r\n\r\n"
        await stream.send_all(request.encode())
        received = b""
        while True:
            received += await stream.receive_some()
            events = [
                Event(i.decode(), name.decode(), json.loads(data))
                for i, name, data in _RAW_EVENT.findall(received)
            ]
            if events and events[-1].name == until:
                return events


async def submit(http: httpx.AsyncClient, **fields: Any) -> str:
    response = await http.post("/v1/jobs", json=body(**fields))
    assert response.status_code == 202, response.text
    return response.json()["id"]


def png_size(text: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(text))).size


def assert_msg(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    assert set(response.json()) == {"msg"}
    for word in words:
        assert word in response.json()["msg"]


# --- submit, status, events -----------------------------------------------------------------------


async def test_a_job_is_accepted_then_followed_event_by_event_to_its_images(
    tmp_path: Path,
) -> None:
    backend = GatedBackend()
    async with network(tmp_path, backend) as net:
        response = await net.http.post("/v1/jobs", json=body(seed=-1))
        assert response.status_code == 202
        accepted = response.json()
        job_id = accepted["id"]
        assert re.fullmatch(r"[A-Za-z0-9_-]{22,}", job_id)  # 128 random bits, URL-safe
        assert accepted == {
            "id": job_id,
            "status": "queued",
            "urls": {"self": f"/v1/jobs/{job_id}", "events": f"/v1/jobs/{job_id}/events"},
        }
        assert response.headers["location"] == f"/v1/jobs/{job_id}"

        async with follow(net.http, job_id) as events:
            queued, assigned = await events.next(), await events.next()
            assert (queued.name, queued.data["position"]) == ("queued", 0)
            assert queued.data["eta_s"] is None or queued.data["eta_s"] >= 0
            provider = str(net.providers[0].peer.peer_id)
            assert (assigned.name, assigned.data) == (
                "assigned",
                {"provider": provider, "attempt": 1},
            )
            status = (await net.http.get(accepted["urls"]["self"])).json()
            assert status["status"] == "running" and status["provider"] == provider
            assert status["progress"] == {"step": 0, "total": 3} and "images" not in status
            for step in (1, 2, 3):
                backend.allow()
                progress = await events.next()
                assert progress.name == "progress"
                assert (progress.data["step"], progress.data["total"]) == (step, 3)
                assert progress.data["eta_s"] is None or progress.data["eta_s"] >= 0
            done = await events.next()
            assert done.name == "done"
            [image] = done.data["images"]
            assert png_size(image) == (96, 64)
            assert done.data["info"]["provider"] == provider
            assert 0 <= done.data["info"]["seed"] < 2**32  # drawn at submit
            assert await events.rest() == []  # the stream closes after the terminal event
        ids = [queued.id, assigned.id, progress.id, done.id]
        assert ids == ["1.1", "1.2", "1.5", "1.6"]

        status = (await net.http.get(f"/v1/jobs/{job_id}")).json()
        assert status["status"] == "done" and status["images"] == [image]
        assert status["info"] == done.data["info"] and status["attempts"] == 1
        assert status["progress"] == {"step": 3, "total": 3}
        assert status["queue_position"] is None and status["eta_s"] is None
        assert status["created_at"] <= status["started_at"] <= status["finished_at"]
        assert status["kind"] == "txt2img" and "error" not in status


async def test_followers_reconnect_with_last_event_id_and_late_ones_get_the_end_at_once(
    tmp_path: Path,
) -> None:
    backend = GatedBackend()
    async with network(tmp_path, backend) as net:
        job_id = await submit(net.http)
        async with follow(net.http, job_id) as second:
            # One follower drops after "assigned"; another stays.
            seen = await follow_then_drop(net.url, job_id, "assigned")
            assert [e.name for e in seen] == ["queued", "assigned"]
            assert await second.until("assigned") == seen
            backend.allow()
            one = await second.next()
            assert one.name == "progress" and one.data["step"] == 1
            # The first comes back for what it missed, and follows on with the other.
            async with follow(net.http, job_id, last_event_id=seen[-1].id) as again:
                assert await again.next() == one  # replayed
                backend.allow()
                rest = [await again.next()]
                assert await second.next() == rest[0]
                backend.allow()
                rest += await again.rest()
                assert await second.rest() == rest[1:]
        assert [e.name for e in rest] == ["progress", "progress", "done"]
        assert [e.data.get("step") for e in rest] == [2, 3, None]
        done = rest[-1]
        # After the end: the terminal event at once, with the same id ...
        async with follow(net.http, job_id) as late:
            assert await late.rest() == [done]
        async with follow(net.http, job_id, last_event_id="1.2") as late:
            assert await late.rest() == [done]
        # ... and nothing more for a client that had it (204: an EventSource stops).
        response = await net.http.get(
            f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": done.id}
        )
        assert response.status_code == 204


async def test_an_idle_stream_gets_keep_alive_comments(tmp_path: Path) -> None:
    backend = GatedBackend()
    async with network(tmp_path, backend, jobs=JobsConfig(keepalive=0.05)) as net:
        job_id = await submit(net.http)
        async with follow(net.http, job_id) as events:
            await events.until("assigned")
            comment = await events.next(comments=True)
            assert comment.name == ":" and comment.data == {"text": "keep-alive"}
            backend.allow(3)
            assert (await events.until("done"))[-1].name == "done"


# --- cancel ---------------------------------------------------------------------------------------


async def test_delete_cancels_the_job_on_its_provider(tmp_path: Path) -> None:
    backend = GatedBackend()
    async with network(tmp_path, backend) as net:
        job_id = await submit(net.http)
        async with follow(net.http, job_id) as events:
            await events.until("assigned")
            await backend.started.wait()
            response = await net.http.delete(f"/v1/jobs/{job_id}")
            assert response.status_code == 200
            state = response.json()
            assert state["status"] == "cancelled" and state["result_deleted"] is False
            assert (await events.next()).name == "cancelled"
            assert await events.rest() == []
        with trio.fail_after(10):
            await backend.cancelled.wait()  # the provider stopped drawing
            await net.providers[0].wait_idle()
        assert net.providers[0].jobs_cancelled == 1
        status = (await net.http.get(f"/v1/jobs/{job_id}")).json()
        assert status["status"] == "cancelled" and status["finished_at"] is not None
        # DELETE once more: the record goes; then the id is gone.
        response = await net.http.delete(f"/v1/jobs/{job_id}")
        assert response.status_code == 200 and response.json()["result_deleted"] is True
        assert_msg(await net.http.get(f"/v1/jobs/{job_id}"), 410, "DELETE")
        assert_msg(await net.http.delete(f"/v1/jobs/{job_id}"), 410)


async def test_delete_of_a_finished_job_deletes_its_stored_result(tmp_path: Path) -> None:
    async with network(tmp_path, TestcardBackend(TestcardConfig(models=("card",)))) as net:
        job_id = await submit(net.http)
        async with follow(net.http, job_id) as events:
            assert (await events.until("done"))[-1].name == "done"
        files = sorted((net.data_dir / "results").iterdir())
        assert [path.name for path in files] == [f"{job_id}.0.png"]
        response = await net.http.delete(f"/v1/jobs/{job_id}")
        assert response.status_code == 200
        assert response.json()["status"] == "done" and response.json()["result_deleted"] is True
        assert list((net.data_dir / "results").iterdir()) == []
        assert_msg(await net.http.get(f"/v1/jobs/{job_id}"), 410, "deleted")
        assert_msg(await net.http.get(f"/v1/jobs/{job_id}/events"), 410)


async def test_a_done_jobs_images_are_served_one_by_one_as_png(tmp_path: Path) -> None:
    backend = GatedBackend()
    async with network(tmp_path, backend) as net:
        job_id = await submit(net.http, batch_size=2)
        await backend.started.wait()
        assert_msg(await net.http.get(f"/v1/jobs/{job_id}/images/0"), 404, "running")
        backend.allow(3)
        async with follow(net.http, job_id) as events:
            await events.until("done")
        for index in (0, 1):
            response = await net.http.get(f"/v1/jobs/{job_id}/images/{index}")
            assert response.status_code == 200
            assert response.headers["content-type"] == "image/png"
            image = Image.open(io.BytesIO(response.content))
            assert (image.format, image.size) == ("PNG", (96, 64))
        assert_msg(await net.http.get(f"/v1/jobs/{job_id}/images/2"), 404, "2 image(s)")
        assert_msg(await net.http.get(f"/v1/jobs/{job_id}/images/-1"), 400, "index")
        assert_msg(await net.http.get(f"/v1/jobs/{job_id}/images/x"), 400, "index")
        assert_msg(await net.http.get(f"/v1/jobs/{'A' * 22}/images/0"), 404)
        await net.http.delete(f"/v1/jobs/{job_id}")
        assert_msg(await net.http.get(f"/v1/jobs/{job_id}/images/0"), 410)


async def test_an_async_job_outlives_the_client_that_submitted_it(tmp_path: Path) -> None:
    backend = GatedBackend()
    async with network(tmp_path, backend) as net:
        async with httpx.AsyncClient(base_url=net.url, timeout=30) as submitter:
            job_id = await submit(submitter)
        await follow_then_drop(net.url, job_id, "assigned")
        # The client that submitted it is gone, and one that followed it; the job runs on.
        backend.allow(3)
        async with follow(net.http, job_id) as events:
            assert (await events.until("done"))[-1].name == "done"
        assert net.providers[0].jobs_cancelled == 0


# --- bad requests ---------------------------------------------------------------------------------


async def test_bad_submissions_and_unknown_ids(tmp_path: Path) -> None:
    async with network(tmp_path, TestcardBackend(TestcardConfig(models=("card",)))) as net:
        post = net.http.post
        no_kind = body()
        del no_kind["kind"]
        assert_msg(await post("/v1/jobs", json=no_kind), 400, "kind")
        assert_msg(await post("/v1/jobs", json=body(kind="upscale")), 400, "kind")
        assert_msg(await post("/v1/jobs", json=body(steps=0)), 400, "steps")
        assert_msg(await post("/v1/jobs", json=body(init_image="AAAA")), 400, "init_image")
        assert_msg(await post("/v1/jobs", json=body(kind="img2img")), 400, "init_image")
        assert_msg(await post("/v1/jobs", json=[1, 2]), 400, "request")
        assert_msg(await post("/v1/jobs", json=body(model="sdxl")), 404, "sdxl")
        assert_msg(await post("/v1/jobs", json=body(loras=[["ink", 1]])), 404, "ink")
        for job_id in ("A" * 22, "nope", "..%2F..%2Fjobs.db"):
            assert_msg(await net.http.get(f"/v1/jobs/{job_id}"), 404)
            assert_msg(await net.http.get(f"/v1/jobs/{job_id}/events"), 404)
            assert_msg(await net.http.delete(f"/v1/jobs/{job_id}"), 404)


async def test_an_img2img_job_keeps_its_init_image_with_its_result(tmp_path: Path) -> None:
    out = io.BytesIO()
    Image.new("RGB", (96, 64), (10, 200, 10)).save(out, "PNG")
    init = base64.b64encode(out.getvalue()).decode()
    async with network(tmp_path, TestcardBackend(TestcardConfig(models=("card",)))) as net:
        job_id = await submit(net.http, kind="img2img", init_image=init, denoising_strength=0.0)
        async with follow(net.http, job_id) as events:
            done = (await events.until("done"))[-1]
        picture = Image.open(io.BytesIO(base64.b64decode(done.data["images"][0])))
        assert picture.convert("RGB").getpixel((48, 32)) == (10, 200, 10)
        assert (net.data_dir / "inputs" / job_id).read_bytes() == out.getvalue()


# --- sync jobs are jobs too -----------------------------------------------------------------------


async def test_a_sync_job_is_a_job_record_with_its_result(tmp_path: Path) -> None:
    async with network(tmp_path, TestcardBackend(TestcardConfig(models=("card",)))) as net:
        fields = body()
        del fields["kind"]
        response = await net.http.post("/txt2img", json=fields)
        assert response.status_code == 200
        job_id = response.headers["sdcn-job-id"]
        status = (await net.http.get(f"/v1/jobs/{job_id}")).json()
        assert status["status"] == "done" and status["images"] == response.json()["images"]
        async with follow(net.http, job_id) as events:
            done = (await events.rest())[-1]  # all of them while it is in memory, or the end
        assert done.name == "done" and done.data["images"] == response.json()["images"]


async def test_a_sync_job_cancelled_by_delete_is_409(tmp_path: Path) -> None:
    backend = GatedBackend()
    async with network(tmp_path, backend) as net:
        fields = body()
        del fields["kind"]
        answers: list[httpx.Response] = []

        async def call() -> None:
            answers.append(await net.http.post("/txt2img", json=fields))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call)
            await backend.started.wait()
            [job_id] = [job.id for job in net.gateway.jobs._live.values() if not job.ended.is_set()]
            response = await net.http.delete(f"/v1/jobs/{job_id}")
            assert response.json()["status"] == "cancelled"
        assert_msg(answers[0], 409, "cancelled")
        with trio.fail_after(10):
            await backend.cancelled.wait()


# --- the A1111 API's progress and interrupt -------------------------------------------------------


def a1111(**fields: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "prompt": "a lighthouse",
        "seed": 5,
        "steps": 4,
        "width": 64,
        "height": 64,
        "sampler_name": "Euler a",
        "override_settings": {"sd_model_checkpoint": "card"},
    }
    values.update(fields)
    return values


async def test_a1111_progress_moves_while_the_clients_txt2img_runs(tmp_path: Path) -> None:
    backend = GatedBackend()
    async with network(tmp_path, backend) as net:
        idle = (await net.http.get("/sdapi/v1/progress")).json()
        assert idle["progress"] == 0 and idle["state"]["job_count"] == 0
        assert idle["current_image"] is None and idle["state"]["interrupted"] is False
        answers: list[httpx.Response] = []

        async def call() -> None:
            payload = a1111(force_task_id="task(abc123)")
            answers.append(await net.http.post("/sdapi/v1/txt2img", json=payload))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call)
            await backend.started.wait()
            # The test follows the job's events to know when the gateway has each step.
            job_id = net.gateway.jobs._by_task["task(abc123)"].id
            seen = []
            async with follow(net.http, job_id) as events:
                await events.until("assigned")
                for _ in range(3):
                    backend.allow()
                    await events.until("progress")
                    seen.append((await net.http.get("/sdapi/v1/progress")).json())
                by_task = await net.http.get(
                    "/sdapi/v1/progress", params={"id_task": "task(abc123)"}
                )
                assert by_task.json()["state"] == seen[-1]["state"]
                other = await net.http.get("/sdapi/v1/progress", params={"id_task": "task(x)"})
                assert other.json()["state"]["job_count"] == 0
                backend.allow()
                await events.until("done")
        assert [s["state"]["sampling_step"] for s in seen] == [1, 2, 3]
        assert [s["progress"] for s in seen] == [0.25, 0.5, 0.75]
        assert all(s["state"]["sampling_steps"] == 4 for s in seen)
        assert all(s["state"]["job_count"] == 1 and s["eta_relative"] >= 0 for s in seen)
        assert set(seen[0]["state"]) >= {"job_count", "job_no", "interrupted", "job_timestamp"}
        assert answers[0].status_code == 200 and len(answers[0].json()["images"]) == 1
        assert (await net.http.get("/sdapi/v1/progress")).json()["state"]["job_count"] == 0


async def test_a1111_interrupt_stops_the_clients_job(tmp_path: Path) -> None:
    backend = GatedBackend()
    async with network(tmp_path, backend) as net:
        answers: list[httpx.Response] = []

        async def call() -> None:
            answers.append(await net.http.post("/sdapi/v1/txt2img", json=a1111()))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call)
            await backend.started.wait()
            response = await net.http.post("/sdapi/v1/interrupt")
            assert response.status_code == 200 and response.json() == {}
        answer = answers[0]
        assert answer.status_code == 200 and answer.json()["images"] == []
        with trio.fail_after(10):
            await backend.cancelled.wait()
        progress = (await net.http.get("/sdapi/v1/progress")).json()
        assert progress["state"]["interrupted"] is True and progress["state"]["job_count"] == 0


async def test_a1111_force_task_id_must_be_a_string(tmp_path: Path) -> None:
    async with network(tmp_path, TestcardBackend(TestcardConfig(models=("card",)))) as net:
        response = await net.http.post("/sdapi/v1/txt2img", json=a1111(force_task_id=7))
        assert_msg(response, 400, "force_task_id")


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/jobs/x", "/v1/jobs/x/events"])
async def test_job_routes_are_in_the_openapi_document(tmp_path: Path, path: str) -> None:
    async with network(tmp_path) as net:
        schema = (await net.http.get("/openapi.json")).json()
        assert path.replace("/x", "/{job_id}") in schema["paths"]
