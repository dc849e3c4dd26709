"""``/sdcn/job/2.0.0`` (sdcn_p2p.jobs.protocol): its messages and the client `request_job`."""

from __future__ import annotations

import functools
import io
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from PIL import Image

from sdcn_p2p.connection import Stream
from sdcn_p2p.errors import JobError, ProtocolError, StreamReset, UnsupportedProtocol
from sdcn_p2p.host import Host
from sdcn_p2p.identity import PeerId
from sdcn_p2p.jobs import JobRequest, JobResult, Progress, Queued
from sdcn_p2p.jobs.protocol import (
    JOB,
    MAX_JOB_MESSAGE,
    decode_reply,
    error_message,
    job_message,
    parse_job_id,
    parse_job_message,
    progress_message,
    queued_message,
    request_job,
    result_message,
)
from sdcn_p2p.jobs.schema import check_job_id, new_job_id
from sdcn_p2p.testing import open_memory_hosts
from sdcn_p2p.wire.messages import pack, unpack


@functools.cache
def image(fmt: str = "PNG", size: tuple[int, int] = (64, 48)) -> bytes:
    rng = random.Random(f"{fmt}{size}")
    picture = Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3))
    buffer = io.BytesIO()
    picture.save(buffer, fmt)
    return buffer.getvalue()


#: A valid txt2img job in its wire form (the SDCN seed document's example).
WIRE_TXT2IMG = JobRequest(
    kind="txt2img",
    model="XXXXXXXX",
    prompt="A dog",
    loras=(("XXXXXXXX", 0.5), ("YYYYYYYY", 0.6)),
    sampler_name="DDIM",
).to_wire()


def refused(field: str, call: Callable[[], object]) -> JobError:
    with pytest.raises(JobError) as info:
        call()
    assert info.value.code == "bad_request"
    assert info.value.message.startswith(field + ":"), info.value.message
    return info.value


# --- messages ------------------------------------------------------------------------------------

INFO = {
    "seed": 7,
    "model": "m",
    "provider": "12D3KooWtest",
    "queue_ms": 0,
    "run_ms": 1500,
    "backend": "testcard",
}


def over_the_wire(message: dict[str, Any]) -> Any:
    return unpack(pack(message), max_size=MAX_JOB_MESSAGE)


def test_parse_job_message_returns_the_job_and_its_deadline() -> None:
    job = JobRequest.from_wire(WIRE_TXT2IMG | {"kind": "img2img", "init_image": image()})
    assert parse_job_message(over_the_wire(job_message(job, 12.5))) == (job, 12.5)
    assert job_message(job, 10**9)["deadline"] == 86_400


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ("type", ["job"]),
        ("type", {"type": "jobs", "job": {}, "deadline": 1.0}),
        ("deadline", {"type": "job", "job": WIRE_TXT2IMG}),
        ("deadline", {"type": "job", "job": WIRE_TXT2IMG, "deadline": -1}),
        ("deadline", {"type": "job", "job": WIRE_TXT2IMG, "deadline": True}),
        ("deadline", {"type": "job", "job": WIRE_TXT2IMG, "deadline": 1e9}),
        ("job", {"type": "job", "deadline": 1.0}),
        ("width", {"type": "job", "job": WIRE_TXT2IMG | {"width": 7}, "deadline": 1.0}),
        ("job_id", {"type": "job", "job": WIRE_TXT2IMG, "deadline": 1.0, "job_id": 7}),
        ("job_id", {"type": "job", "job": WIRE_TXT2IMG, "deadline": 1.0, "job_id": ""}),
        ("job_id", {"type": "job", "job": WIRE_TXT2IMG, "deadline": 1.0, "job_id": "a" * 65}),
        ("job_id", {"type": "job", "job": WIRE_TXT2IMG, "deadline": 1.0, "job_id": "a b"}),
        ("job_id", {"type": "job", "job": WIRE_TXT2IMG, "deadline": 1.0, "job_id": "a\nb"}),
        ("job_id", {"type": "job", "job": WIRE_TXT2IMG, "deadline": 1.0, "job_id": "é"}),
        ("job_id", {"type": "job", "job": WIRE_TXT2IMG, "deadline": 1.0, "job_id": b"ab"}),
    ],
)
def test_parse_job_message_refuses_bad_requests(field: str, message: Any) -> None:
    refused(field, lambda: parse_job_message(message))


def test_a_job_id_travels_with_the_job_and_is_optional() -> None:
    job = JobRequest.from_wire(WIRE_TXT2IMG)
    for job_id in ("7f3a09c2d1e4b588", "0b6e1c3a-5d7f-4e2a-9c8b-1a2b3c4d5e6f.3", "x" * 64):
        message = over_the_wire(job_message(job, 5.0, job_id))
        assert parse_job_id(message) == job_id
        assert parse_job_message(message) == (job, 5.0)
    assert "job_id" not in job_message(job, 5.0)
    assert parse_job_id(over_the_wire(job_message(job, 5.0))) is None
    with pytest.raises(JobError, match="job_id"):
        job_message(job, 5.0, "no spaces")
    assert len({new_job_id() for _ in range(100)}) == 100
    assert all(len(check_job_id(new_job_id())) == 16 for _ in range(10))


def test_replies_built_by_the_provider_decode_on_the_client() -> None:
    png = image()
    assert decode_reply(over_the_wire(queued_message(3))) == Queued(3)
    assert decode_reply(over_the_wire(progress_message(5, 20))) == Progress(5, 20)
    result = decode_reply(over_the_wire(result_message([png, png], INFO | {"testcard": True})))
    assert result == JobResult([png, png], INFO | {"testcard": True})
    error = decode_reply(over_the_wire(error_message("busy", "queue full")))
    assert isinstance(error, JobError)
    assert (error.code, error.message) == ("busy", "queue full")


def test_reply_builders_keep_within_the_limits() -> None:
    assert progress_message(30, 20) == {"type": "progress", "step": 20, "total": 20}
    assert progress_message(-1, 0) == {"type": "progress", "step": 0, "total": 1}
    assert queued_message(-5)["position"] == 0
    assert len(error_message("backend_failed", "x" * 10_000)["message"]) == 2000
    with pytest.raises(ValueError, match="code"):
        error_message("oops", "")
    for images in ([], [image()] * 5, [image("JPEG")]):
        with pytest.raises(JobError) as info:
            result_message(images, INFO)
        assert info.value.code == "backend_failed"
    for info in ({k: v for k, v in INFO.items() if k != "seed"}, INFO | {"run_ms": -1}):
        with pytest.raises(ValueError, match="info"):
            result_message([image()], info)
    with pytest.raises(ValueError, match="info"):
        result_message([image()], INFO | {"extra": "x" * 100_000})


PNG = image()
MALFORMED_REPLIES = [
    ["progress"],
    {"kind": "progress"},
    {"type": "done"},
    {"type": "progress", "step": 3, "total": 2},
    {"type": "progress", "step": -1, "total": 2},
    {"type": "progress", "step": 0, "total": 0},
    {"type": "progress", "step": True, "total": 2},
    {"type": "progress", "step": 1.0, "total": 2},
    {"type": "queued", "position": -1},
    {"type": "queued"},
    {"type": "result", "images": [], "info": INFO},
    {"type": "result", "images": [PNG] * 5, "info": INFO},
    {"type": "result", "images": [b"GIF89a"], "info": INFO},
    {"type": "result", "images": ["iVBORw0KGgo="], "info": INFO},
    {"type": "result", "images": PNG, "info": INFO},
    {"type": "result", "images": [PNG]},
    {"type": "result", "images": [PNG], "info": INFO | {"seed": "7"}},
    {"type": "result", "images": [PNG], "info": INFO | {"queue_ms": -1}},
    {"type": "result", "images": [PNG], "info": INFO | {"x": b"x" * 100_000}},
    {"type": "result", "images": [PNG], "info": {**INFO, b"bin": 1}},
    {"type": "error", "code": "exploded", "message": "boom"},
    {"type": "error", "code": "busy"},
    {"type": "error", "code": "busy", "message": "x" * 2001},
]


@pytest.mark.parametrize("reply", MALFORMED_REPLIES)
def test_malformed_replies_are_protocol_errors(reply: Any) -> None:
    with pytest.raises(ProtocolError):
        decode_reply(reply)


# --- request_job ---------------------------------------------------------------------------------

Handler = Callable[[Stream], Awaitable[None]]
JOB_REQUEST = JobRequest(kind="txt2img", model="m", prompt="a dog", steps=2)


@asynccontextmanager
async def provider(handler: Handler | None) -> AsyncIterator[tuple[Host, PeerId]]:
    async with open_memory_hosts(2) as (client, server):
        if handler is not None:
            server.set_handler(JOB, handler, max_message_size=MAX_JOB_MESSAGE)
        client.peerstore.add_addrs(server.peer_id, server.listen_addrs)
        yield client, server.peer_id


async def test_request_job_returns_the_result_and_reports_progress(autojump_clock: Any) -> None:
    seen: dict[str, Any] = {}

    async def handler(stream: Stream) -> None:
        job, deadline = parse_job_message(await stream.receive_message())
        seen.update(job=job, deadline=deadline)
        with trio.move_on_after(1):
            seen["client sent"] = await stream.receive_some()  # no FIN: it would cancel
        await stream.send_message(queued_message(0))
        for step in (1, 2):
            await stream.send_message(progress_message(step, job.steps))
        await stream.send_message(result_message([PNG], INFO))

    progress: list[tuple[int, int]] = []
    async with provider(handler) as (client, peer):
        result = await request_job(
            client, peer, JOB_REQUEST, deadline=30, on_progress=lambda *p: progress.append(p)
        )
    assert result == JobResult([PNG], INFO)
    assert progress == [(1, 2), (2, 2)]
    assert seen["job"] == JOB_REQUEST
    assert 29 < seen["deadline"] <= 30
    assert "client sent" not in seen


async def test_an_error_reply_raises_the_providers_code(autojump_clock: Any) -> None:
    async def handler(stream: Stream) -> None:
        await stream.receive_message()
        await stream.send_message(error_message("busy", "queue full"))

    async with provider(handler) as (client, peer):
        with pytest.raises(JobError) as info:
            await request_job(client, peer, JOB_REQUEST, deadline=30)
    assert (info.value.code, info.value.message) == ("busy", "queue full")


async def test_a_provider_refuses_an_invalid_job_naming_the_field(autojump_clock: Any) -> None:
    async def handler(stream: Stream) -> None:
        try:
            parse_job_message(await stream.receive_message())
        except JobError as exc:
            await stream.send_message(error_message(exc.code, exc.message))

    async with provider(handler) as (client, peer):
        with pytest.raises(JobError) as info:
            bad = JobRequest(kind="txt2img", model="m", prompt="", width=500)
            await request_job(client, peer, bad, deadline=30)
    assert info.value.code == "bad_request"
    assert info.value.message.startswith("width:")


def stalling_handler(ended: list[BaseException], done: trio.Event) -> Handler:
    """A provider that sends one progress message, then waits for the client to go away."""

    async def handler(stream: Stream) -> None:
        await stream.receive_message()
        await stream.send_message(progress_message(1, 2))
        try:
            await stream.receive_some()
        except BaseException as exc:
            ended.append(exc)
            raise
        finally:
            done.set()

    return handler


async def test_the_deadline_raises_timeout_and_resets_the_stream(autojump_clock: Any) -> None:
    ended: list[BaseException] = []
    done = trio.Event()
    async with provider(stalling_handler(ended, done)) as (client, peer):
        start = trio.current_time()
        with pytest.raises(JobError) as info:
            await request_job(client, peer, JOB_REQUEST, deadline=5)
        assert info.value.code == "timeout"
        assert trio.current_time() - start == pytest.approx(5)
        await done.wait()
    assert len(ended) == 1 and isinstance(ended[0], StreamReset)


async def test_a_deadline_already_past_times_out_at_once(autojump_clock: Any) -> None:
    async with provider(None) as (client, peer):
        with pytest.raises(JobError) as info:
            await request_job(client, peer, JOB_REQUEST, deadline=-1)
    assert info.value.code == "timeout"


async def test_cancelling_the_caller_resets_the_stream(autojump_clock: Any) -> None:
    ended: list[BaseException] = []
    done = trio.Event()
    async with provider(stalling_handler(ended, done)) as (client, peer):
        with trio.CancelScope() as scope:
            await request_job(
                client, peer, JOB_REQUEST, deadline=30, on_progress=lambda *_: scope.cancel()
            )
        assert scope.cancelled_caught
        await done.wait()
    assert len(ended) == 1 and isinstance(ended[0], StreamReset)


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(progress_message(1, 2) | {"step": 3}, id="bad-progress"),
        pytest.param(result_message([PNG, PNG], INFO), id="wrong-image-count"),
        pytest.param(None, id="closed-without-result"),
    ],
)
async def test_a_misbehaving_provider_is_a_protocol_error(
    reply: dict[str, Any] | None, autojump_clock: Any
) -> None:
    async def handler(stream: Stream) -> None:
        await stream.receive_message()
        if reply is not None:
            await stream.send_message(reply)

    async with provider(handler) as (client, peer):
        with pytest.raises(ProtocolError):
            await request_job(client, peer, JOB_REQUEST, deadline=30)


async def test_a_peer_without_the_job_protocol_says_so(autojump_clock: Any) -> None:
    async with provider(None) as (client, peer):
        with pytest.raises(UnsupportedProtocol):
            await request_job(client, peer, JOB_REQUEST, deadline=30)


async def test_a_10_mb_img2img_job_crosses_the_wire() -> None:
    size = (1900, 1900)
    picture = Image.frombytes("RGB", size, random.Random(2).randbytes(size[0] * size[1] * 3))
    buffer = io.BytesIO()
    picture.save(buffer, "PNG", compress_level=0)
    job = JobRequest(kind="img2img", model="m", prompt="", init_image=buffer.getvalue())

    async def handler(stream: Stream) -> None:
        message = await stream.receive_message()
        received, _ = await trio.to_thread.run_sync(parse_job_message, message)
        assert received == job
        await stream.send_message(result_message([PNG], INFO))

    async with provider(handler) as (client, peer):
        result = await request_job(client, peer, job, deadline=60)
    assert result.images == [PNG]
