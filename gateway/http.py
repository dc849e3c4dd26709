"""HTTP plumbing both of the gateway's APIs share: what the app serves, bodies, responses and
errors.

Every error, on every route, is ``{"msg": "..."}`` and nothing else. `error_status` is the
one place a failure becomes an HTTP status: 400 bad input (JobError ``bad_request``, or a
provider that refused the request), 404 no provider offers the model, LoRA, sampler or size
(or no such route), 405 wrong method, 413 a body over the limit, 502 the provider failed, 503
every capable provider stayed busy while the job waited in the gateway's queue, or is
unreachable, or the queue ahead would not let the job start within its wait (with Retry-After:
when the queue ahead is through, if the gateway can tell, else 1 s), 504 the deadline passed.
The job service adds 404 no such job, 409 the job was cancelled, 410 its result was deleted,
503 too many unfinished jobs (with Retry-After) or a data dir that cannot be written, 507 a
full disk. The client's own: 401 no API key where one is required, or an unknown one
(``WWW-Authenticate: Bearer``), 429 over one of its limits (with Retry-After), answered by
`AccessGate` before the request is read, or by the job service when the job comes.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import re
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import trio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.access import AccessConfig, address_client_id
from gateway.catalog import Catalog
from gateway.errors import (
    AccessError,
    AllBusy,
    DeadlinePassed,
    DispatchError,
    JobCancelled,
    JobServiceError,
    LimitExceeded,
    NoProvider,
    ProviderFailed,
    Rejected,
    ResultGone,
    StoreFull,
    StoreUnavailable,
    TooManyJobs,
    UnknownJob,
)
from gateway.jobservice import JobService
from gateway.jobstore import json_safe
from gateway.limits import Client
from gateway.metrics import RefusalCounter
from sdcn_p2p._util import open_service_nursery
from sdcn_p2p.errors import JobError, JobErrorCode, SdcnError
from sdcn_p2p.identity import PeerId
from sdcn_p2p.metrics import Metrics

__all__ = [
    "ERRORS",
    "MAX_BODY",
    "OPEN_PATHS",
    "RETRY_AFTER",
    "AccessGate",
    "BodyLimit",
    "GatewayServices",
    "base64_text",
    "client_key",
    "error_docs",
    "error_response",
    "error_status",
    "gone",
    "install_error_handlers",
    "json_body",
    "json_response",
    "json_safe",
    "read_json",
    "refusal_response",
    "request_client",
    "services",
    "until_disconnect",
]

log = logging.getLogger(__name__)

#: Seconds a 503 (every capable provider busy) asks the client to wait, in Retry-After.
RETRY_AFTER = 1
#: Largest request body, in bytes; a larger one gets 413 and is not read.
MAX_BODY = 50 * 2**20
# JSON bodies and responses above this many bytes are encoded or decoded in a worker thread,
# so that a 50 MiB img2img request does not stall every other request.
_THREAD_BYTES = 2**20
_T = TypeVar("_T")


class GatewayServices(Protocol):
    """What the HTTP APIs need of a gateway (`gateway.node.Gateway` is one): they read these
    attributes at each request.
    """

    #: Every job, sync or async: records, events, results (it runs them on the dispatcher).
    jobs: JobService
    catalog: Catalog
    #: The model a request that names none runs on (A1111's sd_model_checkpoint option).
    default_model: str | None
    #: What ``GET /metrics`` serves.
    metrics: Metrics
    #: Who may ask (API keys, tiers, limits); replaced whole when the keys file is reloaded.
    access: AccessConfig
    #: Counts the clients refused, by reason.
    refusals: RefusalCounter

    @property
    def peer_id(self) -> PeerId: ...

    def status(self) -> dict[str, Any]:
        """What ``GET /v1/status`` answers."""
        ...

    def wall_clock(self) -> float:
        """Unix seconds."""
        ...


def services(request: Request) -> GatewayServices:
    """The gateway the app serving `request` was made for (`gateway.api.create_app`)."""
    return request.app.state.services


def request_client(request: Request) -> Client:
    """Who is asking (`AccessGate` found out): an address, or an API key."""
    client = request.scope.get("state", {}).get("client")
    if client is None:  # a path AccessGate lets through as it is
        return Client(address_client_id(request.client.host if request.client else None))
    return client


def client_key(request: Request) -> str:
    """The id of who is asking: ``ip:ADDRESS`` (IPv6: its /64) or ``key:NAME``."""
    return request_client(request).id


#: Paths served to anyone, without a key and outside the limits: health checks, metrics
#: scrapes and the API's description.
OPEN_PATHS = frozenset({"/healthz", "/metrics", "/docs", "/docs/oauth2-redirect", "/openapi.json"})


class AccessGate:
    """ASGI middleware: find out who is asking (`GatewayServices.access`) and count the
    request against the client's rate; 401 or 429 ``{"msg"}`` when refused. The client goes
    in the request's state for the routes (`request_client`)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        gateway: GatewayServices = scope["app"].state.services
        authorization = None
        for name, value in scope["headers"]:
            if name.lower() == b"authorization":
                authorization = value.decode("latin-1")
        address = scope["client"][0] if scope.get("client") else None
        try:
            client = gateway.access.identify(authorization, address)
            gateway.jobs.quotas.request(client, trio.current_time())
        except AccessError as exc:
            await refusal_response(exc, gateway.refusals)(scope, receive, send)
            return
        scope.setdefault("state", {})["client"] = client
        await self.app(scope, receive, send)


def refusal_response(exc: AccessError, refusals: RefusalCounter) -> Response:
    """401 (with ``WWW-Authenticate``) or 429 (with ``Retry-After``) for a refused client,
    counted by its reason."""
    refusals.count(exc.reason)
    if isinstance(exc, LimitExceeded):
        retry_after = exc.retry_after
        seconds = math.ceil(retry_after) if math.isfinite(retry_after) else 3600
        return error_response(429, exc.message, {"Retry-After": str(max(seconds, 1))})
    return error_response(401, exc.message, {"WWW-Authenticate": "Bearer"})


# --- statuses ----------------------------------------------------------------------------------

_STATUS: dict[type[SdcnError], int] = {
    Rejected: 400,
    NoProvider: 404,
    ProviderFailed: 502,
    AllBusy: 503,
    DeadlinePassed: 504,
    UnknownJob: 404,
    JobCancelled: 409,
    ResultGone: 410,
    TooManyJobs: 503,
    StoreUnavailable: 503,
    StoreFull: 507,
}


class ErrorMessage(BaseModel):
    msg: str


_MEANING = {
    400: "Bad input; the message names the field",
    401: "No API key where the gateway requires one, or an unknown key",
    404: "No provider offers the model, a LoRA, the sampler or the size",
    409: "The job was cancelled (DELETE /v1/jobs/{id})",
    410: "The job's result was deleted (retention, room for newer ones, DELETE)",
    413: "Body over 50 MiB",
    429: "The client is over one of its limits (the message says which; see Retry-After)",
    502: "The provider failed",
    503: "Every capable provider is busy or unreachable",
    504: "The deadline passed",
    507: "The gateway's disk is full",
}


def error_docs(
    *statuses: int, meaning: dict[int, str] | None = None
) -> dict[int | str, dict[str, Any]]:
    """The error responses of a route, for /docs: `statuses` with their usual meaning, or
    the one `meaning` gives the route."""
    meaning = {**_MEANING, **(meaning or {})}
    return {status: {"model": ErrorMessage, "description": meaning[status]} for status in statuses}


#: The error responses of a job route, for /docs.
ERRORS = error_docs(400, 401, 404, 413, 429, 502, 503, 504)


def error_status(exc: SdcnError) -> int:
    """The HTTP status a job that did not run is answered with."""
    if isinstance(exc, JobError):
        # A request the gateway itself refused; other codes are the dispatcher's to
        # translate, and a 502 is only a safety net.
        return 400 if exc.code is JobErrorCode.BAD_REQUEST else 502
    return next((s for kind, s in _STATUS.items() if isinstance(exc, kind)), 500)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"msg": message}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error `app` raises with ``{"msg"}`` and its status."""
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(JobError, _job_error)
    app.add_exception_handler(DispatchError, _job_error)
    app.add_exception_handler(JobServiceError, _job_error)
    app.add_exception_handler(AccessError, _access_error)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(Exception, _internal_error)


async def _job_error(request: Request, exc: JobError | DispatchError | JobServiceError) -> Response:
    status = error_status(exc)
    # 503 is back-pressure: tell clients when trying again is worth it (RFC 9110 10.2.3).
    retry_after = getattr(exc, "retry_after", None)
    seconds = RETRY_AFTER if retry_after is None else math.ceil(retry_after)
    headers = {"Retry-After": str(seconds)} if status == 503 else None
    return error_response(status, exc.message, headers)


async def _access_error(request: Request, exc: AccessError) -> Response:
    return refusal_response(exc, services(request).refusals)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    if exc.status_code == 404 and exc.detail == "Not Found":
        message = f"no such endpoint: {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return error_response(exc.status_code, message, exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    problems = []
    for error in exc.errors()[:4]:
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        problems.append(f"{where or 'request'}: {error.get('msg', 'invalid')}")
    return error_response(400, "; ".join(problems) or "invalid request")


async def _client_gone(request: Request, exc: ClientDisconnect) -> Response:
    return gone()


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal error in the gateway")


def gone() -> Response:
    """What a handler returns for a client that went away (nobody reads it)."""
    return Response(status_code=499)


# --- running jobs for a client -----------------------------------------------------------------


async def until_disconnect(request: Request, work: Callable[[], Awaitable[_T]]) -> _T | None:
    """Run `work`, cancelling it if the client disconnects first (then return None).

    Call once the body has been read: the next ASGI message can only be the disconnect.
    """
    outcome: list[_T] = []
    async with open_service_nursery() as nursery:
        nursery.start_soon(_cancel_on_disconnect, request.receive, nursery.cancel_scope)
        outcome.append(await work())
        nursery.cancel_scope.cancel()
    return outcome[0] if outcome else None


async def _cancel_on_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    log.info("the client went away: cancelling its job")
    scope.cancel()


# --- bodies ------------------------------------------------------------------------------------


async def read_json(request: Request) -> Any:
    """The request's JSON body; JobError(JobErrorCode.BAD_REQUEST) if it is not JSON, or holds text
    that is not Unicode (a lone surrogate escape: no peer could encode it).
    """
    body = await request.body()
    try:
        if len(body) > _THREAD_BYTES:
            value = await trio.to_thread.run_sync(json.loads, body)
        else:
            value = json.loads(body)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise JobError.bad_request("body", f"not valid JSON ({exc})") from None
    except RecursionError:
        raise JobError.bad_request("body", "JSON nested too deeply") from None
    if _SURROGATE_ESCAPE.search(body) and (where := _non_unicode(value)) is not None:
        raise JobError.bad_request(where, "not valid Unicode text")
    return value


# Only a \uD800-\uDFFF escape can put a surrogate in a decoded JSON string.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _non_unicode(value: Any) -> str | None:
    """Where the first string of `value` (parsed JSON) with a lone surrogate is, or None."""
    stack: list[tuple[str, Any]] = [("body", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str) and not _is_unicode(item):
            return path
        if isinstance(item, list):
            stack.extend((f"{path}[{i}]", v) for i, v in reversed(list(enumerate(item))))
        elif isinstance(item, dict):
            for key, v in reversed(item.items()):
                if not _is_unicode(key):
                    return path
                stack.append((key if path == "body" else f"{path}.{key}", v))
    return None


def _is_unicode(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: 413 for a body over `limit` bytes, read no further than that.

    A Content-Length over the limit is refused before reading; a body without one (chunked)
    is counted as it arrives.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        lengths = [v for k, v in scope["headers"] if k.lower() == b"content-length"]
        if lengths and (len(set(lengths)) > 1 or not lengths[0].isdigit()):
            await error_response(400, "Content-Length: not a valid length")(scope, receive, send)
            return
        if lengths and int(lengths[0]) > self.limit:
            await self._refuse(scope, receive, send)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _BodyTooLarge
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, watched_send)
        except _BodyTooLarge:
            if started:
                raise
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"the body is over the limit of {self.limit // 2**20} MiB"
        await error_response(413, message)(scope, receive, send)


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` documenting a JSON request body of `model`'s schema (for routes that
    read their body themselves, to name the field in every error)."""
    schema = model.model_json_schema()
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


# --- responses ---------------------------------------------------------------------------------


async def json_response(shape: Callable[[], dict[str, Any]], size: int) -> Response:
    """Encode what `shape` returns as JSON; `size` (bytes of images) says if a thread should.

    Its ``images``, base64 strings, are copied into the output as they are: base64 needs no
    JSON escaping, and running the encoder over megabytes of it was the gateway's largest
    cost per request.
    """

    def encode() -> bytes:
        body = shape()
        images = body.pop("images")
        rest = json.dumps(body, separators=(",", ":")).encode()
        parts = [b'{"images":[']
        for index, image in enumerate(images):
            parts += [b',"' if index else b'"', image.encode("ascii"), b'"']
        parts.append(b"]}" if rest == b"{}" else b"],")
        if rest != b"{}":
            parts.append(rest[1:])
        return b"".join(parts)

    content = await trio.to_thread.run_sync(encode) if size > _THREAD_BYTES else encode()
    return Response(content, media_type="application/json")


def base64_text(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
