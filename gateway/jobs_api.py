"""The SDCN API's async jobs (``/v1/jobs``), over the job service (`gateway.jobservice`).

- ``POST /v1/jobs``: the SDCN parameters (``verify`` too) plus ``"kind"`` → ``202 {"id",
  "status", "urls"}`` with ``Location``. Refused as ``/txt2img`` would refuse it (400, 404),
  and with 503 (too many unfinished jobs, or a data dir that cannot be written) or 507 (a
  full disk).
- ``GET /v1/jobs/{id}``: its state (``verify`` as asked); ``images`` and ``info`` once done
  (with a background spot check's outcome once it ends), ``error`` once failed.
- ``GET /v1/jobs/{id}/events``: ``text/event-stream`` of ``queued``, ``assigned``,
  ``progress`` and one of ``done``, ``failed``, ``cancelled``; each with an ``id:``, replayed
  after ``Last-Event-ID``; comments keep an idle stream alive. 204 when the client had the
  last event already (an EventSource then stops reconnecting).
- ``DELETE /v1/jobs/{id}``: cancel it, or delete its result if it has ended.
- ``GET /v1/jobs/{id}/images/{n}``: image `n` (from 0) of a done job, as PNG, for an
  ``<img>`` or a download link (the pages' Content-Security-Policy allows no ``data:`` URLs).

A job's result is kept for the gateway's retention; then (and after DELETE) its id is 410.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

import trio
from fastapi import APIRouter, Header, Path, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.types import Receive, Scope, Send

from gateway.http import (
    base64_text,
    error_docs,
    error_response,
    error_status,
    json_body,
    json_response,
    json_safe,
    read_json,
    request_client,
    services,
)
from gateway.jobservice import EventFeed, JobEvent, JobState, JobStatus
from gateway.sdcn import parse_request, split_verify
from gateway.sdcn_api import Txt2ImgBody
from sdcn_p2p._util import open_service_nursery
from sdcn_p2p.errors import JobError, SdcnError
from sdcn_p2p.jobs import KINDS

__all__ = ["EventStream", "router"]

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
#: Milliseconds an EventSource waits before it reconnects (the ``retry:`` field).
RECONNECT_MS = 2000
# Events whose encoded form is over this many bytes (a done event's images) are encoded in a
# worker thread.
_THREAD_BYTES = 2**20


# --- documentation models ----------------------------------------------------------------------


class JobBody(Txt2ImgBody):
    """An async job: the SDCN parameters of ``/txt2img`` or ``/img2img``, and its kind."""

    kind: Literal["txt2img", "img2img"]
    init_image: str | None = Field(
        None, description="img2img only, required: base64 PNG, JPEG or WebP"
    )
    denoising_strength: float = Field(0.75, ge=0, le=1, description="img2img only")


class JobUrls(BaseModel):
    self: str = Field(description="GET for its state, DELETE to cancel it")
    events: str = Field(description="GET for its events (text/event-stream)")


class JobAccepted(BaseModel):
    id: str = Field(description="128 random bits, URL-safe")
    status: Literal["queued"]
    urls: JobUrls


class StepProgress(BaseModel):
    step: int
    total: int


class JobFailure(BaseModel):
    status: int = Field(description="The HTTP status /txt2img would have answered")
    msg: str


class JobStatusBody(BaseModel):
    id: str
    kind: str
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    queue_position: int | None = Field(description="Jobs ahead of it, while queued")
    eta_s: float | None = Field(description="Seconds until it is likely done, if known")
    progress: StepProgress
    provider: str | None = Field(description="Peer id of the provider running it (or last)")
    attempts: int
    created_at: float = Field(description="Unix seconds")
    started_at: float | None
    finished_at: float | None
    images: list[str] | None = Field(None, description="Base64 PNG images, once done")
    info: dict[str, Any] | None = Field(
        None,
        description="As /txt2img gives it, once done; spot_check changes from 'scheduled' to "
        "the check's outcome when it ends (spot_check_detail says more)",
    )
    verify: bool = Field(description="Whether the client asked that a second provider agree")
    error: JobFailure | None = Field(None, description="Why it failed, once failed")


class JobDeleted(JobStatusBody):
    result_deleted: bool = Field(description="Whether a stored result was deleted")


_GONE = error_docs(404, 410, meaning={404: "No job has that id"})
#: One server-sent event of a job (comments, the keep-alives, are not events).
_EVENT_SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "description": "RUN.SEQ; send it back as Last-Event-ID"},
        "event": {
            "type": "string",
            "enum": ["queued", "assigned", "progress", "done", "failed", "cancelled"],
        },
        "data": {"type": "string", "description": "The event's fields, as a JSON object"},
    },
    "required": ["id", "event", "data"],
}
_EVENTS = (
    "Server-sent events, each with an id: `queued {position, eta_s}`, `assigned {provider, "
    "attempt}`, `progress {step, total, eta_s}`, then one of `done {images, info}`, `failed "
    "{status, msg}`, `cancelled {}`."
)


# --- routes ------------------------------------------------------------------------------------


@router.post(
    "",
    status_code=202,
    openapi_extra=json_body(JobBody),
    responses={
        202: {"model": JobAccepted, "description": "Accepted; Location is its URL"},
        **error_docs(
            400,
            404,
            413,
            503,
            507,
            meaning={503: "Too many unfinished jobs, or the gateway cannot store jobs now"},
        ),
    },
)
async def submit(request: Request) -> Response:
    """Submit a job to run in the background; follow it with its URLs."""
    body = await read_json(request)
    if not isinstance(body, dict):
        raise JobError.bad_request("request", "must be a JSON object")
    if "kind" not in body:
        raise JobError.bad_request("kind", "is required ('txt2img' or 'img2img')")
    kind = body["kind"]
    if kind not in KINDS:
        raise JobError.bad_request("kind", f"must be 'txt2img' or 'img2img', got {kind!r:.40}")
    fields, verify = split_verify({key: value for key, value in body.items() if key != "kind"})
    if kind == "img2img":  # decoding the init image is CPU work
        job = await trio.to_thread.run_sync(parse_request, kind, fields)
    else:
        job = parse_request(kind, fields)
    state = await services(request).jobs.submit(job, client=request_client(request), verify=verify)
    url = f"{request.scope.get('root_path', '')}/v1/jobs/{state.id}"
    content = {"id": state.id, "status": "queued", "urls": {"self": url, "events": f"{url}/events"}}
    return JSONResponse(content, status_code=202, headers={"Location": url})


@router.get(
    "/{job_id}",
    response_model=JobStatusBody,
    responses=_GONE,
)
async def job_status(job_id: str, request: Request) -> Response:
    """A job's state; its images and info once done, its error once failed."""
    return await status_response(await services(request).jobs.status(job_id))


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": _EVENTS,
            "content": {"text/event-stream": {"schema": _EVENT_SCHEMA}},
        },
        204: {"description": "The job has ended and Last-Event-ID was its last event"},
        **_GONE,
        **error_docs(400, meaning={400: "Last-Event-ID over 64 characters"}),
    },
)
async def job_events(
    job_id: str,
    request: Request,
    last_event_id: str | None = Header(None, max_length=64),
) -> Response:
    """Follow a job's events as they happen (several clients may follow one job)."""
    feed = await services(request).jobs.events(job_id, last_event_id)
    if feed.empty:
        feed.close()
        return Response(status_code=204)
    return EventStream(feed)


@router.delete("/{job_id}", response_model=JobDeleted, responses=_GONE)
async def cancel(job_id: str, request: Request) -> Response:
    """Cancel a job that has not ended (its provider stops it), or delete the result of one
    that has."""
    state, deleted = await services(request).jobs.cancel(job_id)
    return JSONResponse({**state_json(state), "result_deleted": deleted})


@router.get(
    "/{job_id}/images/{index}",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}}, "description": "The PNG"},
        **error_docs(
            400,
            404,
            410,
            meaning={
                400: "index is not a whole number from 0",
                404: "No job has that id, it is not done, or it has fewer images",
            },
        ),
    },
)
async def job_image(job_id: str, request: Request, index: int = Path(ge=0, le=2**31)) -> Response:
    """Image `index` (from 0) of a done job, as PNG."""
    state = await services(request).jobs.status(job_id)
    if state.images is None:
        return error_response(404, f"job {job_id}: no images ({state.status})")
    if index >= len(state.images):
        return error_response(404, f"job {job_id}: has {len(state.images)} image(s), not {index}")
    # A job's images never change: a browser may keep them while the page shows them.
    headers = {"Cache-Control": "private, max-age=3600"}
    return Response(state.images[index], media_type="image/png", headers=headers)


# --- responses ---------------------------------------------------------------------------------


def state_json(state: JobState) -> dict[str, Any]:
    """A job's state as the API shows it, without images."""
    body: dict[str, Any] = {
        "id": state.id,
        "kind": state.kind,
        "status": str(state.status),
        "queue_position": state.queue_position,
        "eta_s": state.eta_s,
        "progress": {"step": state.step, "total": state.total},
        "provider": state.provider,
        "attempts": state.attempts,
        "created_at": state.created_at,
        "started_at": state.started_at,
        "finished_at": state.finished_at,
        "verify": state.verify,
    }
    if state.status is JobStatus.DONE and state.info is not None:
        body["info"] = json_safe(state.info)
    if state.error is not None:
        body["error"] = _failure(state.error)
    return body


async def status_response(state: JobState) -> Response:
    """``GET /v1/jobs/{id}``: the state, with base64 images once done."""
    body = state_json(state)
    if state.images is None:
        return JSONResponse(body)
    images = state.images

    def shape() -> dict[str, Any]:
        return {"images": [base64_text(png) for png in images], **body}

    return await json_response(shape, sum(map(len, images)))


def _failure(error: BaseException) -> dict[str, Any]:
    status = error_status(error) if isinstance(error, SdcnError) else 500
    return {"status": status, "msg": getattr(error, "message", str(error))}


async def encode_event(event: JobEvent) -> bytes:
    """`event` as server-sent event text, made once and kept on the event."""
    if event.wire is None:
        if event.name == "done":
            size = sum(map(len, event.data["images"]))
            if size > _THREAD_BYTES:
                event.wire = await trio.to_thread.run_sync(_encode, event)
            else:
                event.wire = _encode(event)
        else:
            event.wire = _encode(event)
    return event.wire


def _encode(event: JobEvent) -> bytes:
    if event.name == "done":
        images = b",".join(b'"' + base64_text(png).encode() + b'"' for png in event.data["images"])
        info = json.dumps(json_safe(event.data["info"]), separators=(",", ":")).encode()
        data = b'{"images":[' + images + b'],"info":' + info + b"}"
    elif event.name == "failed":
        data = json.dumps(_failure(event.data["error"]), separators=(",", ":")).encode()
    else:
        data = json.dumps(event.data, separators=(",", ":")).encode()
    return b"id: %s\nevent: %s\ndata: %s\n\n" % (event.id.encode(), event.name.encode(), data)


class EventStream(StreamingResponse):
    """A job's events as ``text/event-stream``, until the job ends or the client goes.

    Each event is sent as soon as the job service logs it; a comment (``: keep-alive``)
    goes out whenever the feed's keep-alive passes with nothing to say.
    """

    media_type = "text/event-stream"

    def __init__(self, feed: EventFeed) -> None:
        super().__init__(
            _nothing(),
            media_type=self.media_type,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._feed = feed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        feed = self._feed
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async with open_service_nursery() as nursery:
                nursery.start_soon(_until_disconnect, receive, nursery.cancel_scope)
                await _body(send, b"retry: %d\n\n" % RECONNECT_MS)
                async for event in feed:
                    await _body(
                        send, b": keep-alive\n\n" if event is None else await encode_event(event)
                    )
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                nursery.cancel_scope.cancel()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            log.debug("an event stream's client went away")
        finally:
            feed.close()


async def _nothing() -> Any:  # StreamingResponse wants a body; EventStream sends its own
    return
    yield


async def _body(send: Send, chunk: bytes) -> None:
    await send({"type": "http.response.body", "body": chunk, "more_body": True})


async def _until_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()
