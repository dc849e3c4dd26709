"""The gateway's HTTP API (FastAPI): the SDCN API, the AUTOMATIC1111-compatible API, the
network catalog and a health check.

- ``POST /txt2img``, ``POST /img2img``: the SDCN API (``shared/seed/SDCN.md``). Success is
  ``{"images": [base64 PNG, ...], "info": {...}}``.
- ``/sdapi/v1/...``: what an A1111 client needs (see `gateway.a1111`).
- ``GET /v1/models``, ``GET /v1/providers``, ``GET /healthz``; ``/docs``, ``/openapi.json``.

Every error, on every route, is ``{"msg": "..."}`` and nothing else: 400 bad input (the
message names the field), 404 no provider offers the model, LoRA, sampler or size (or no such
route), 405 wrong method, 413 a body over MAX_BODY bytes, 502 the provider failed, 503 every
capable provider stayed busy while the job waited in the gateway's queue, or is unreachable,
or the queue ahead would not let the job start within its wait (with Retry-After: when the
queue ahead is through, if the gateway can tell, else 1 s), 504 the deadline passed. A client
that disconnects while its job runs cancels the job (the provider's stream is reset).
"""

from __future__ import annotations

import base64
import json
import logging
import math
import random
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import trio
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import a1111
from gateway.dispatch import Dispatcher, DispatchError, DispatchResult
from sdcn_p2p._util import open_service_nursery
from sdcn_p2p._version import __version__
from sdcn_p2p.errors import JobError, SdcnError
from sdcn_p2p.jobs import MAX_BATCH_SIZE, MAX_LORAS, MAX_PROMPT_CHARS, JobRequest
from sdcn_p2p.provider import PROVIDER_ROLE
from sdcn_p2p.records import Advert, ModelInfo, normalize_model_name

if TYPE_CHECKING:
    from gateway.node import Gateway

__all__ = ["MAX_BODY", "RETRY_AFTER", "create_app"]

log = logging.getLogger(__name__)

#: Seconds a 503 (every capable provider busy) asks the client to wait, in Retry-After.
RETRY_AFTER = 1
#: Largest request body, in bytes; a larger one gets 413 and is not read.
MAX_BODY = 50 * 2**20
# JSON bodies and responses above this many bytes are encoded or decoded in a worker thread,
# so that a 50 MiB img2img request does not stall every other request.
_THREAD_BYTES = 2**20
_T = TypeVar("_T")


def create_app(gateway: Gateway) -> FastAPI:
    """The HTTP API of `gateway` (its peer, directory, dispatcher and default model)."""
    app = FastAPI(
        title="SDCN gateway",
        version=__version__,
        description=(
            "Stable Diffusion on a peer-to-peer network of GPU providers. Errors are always "
            '`{"msg": "..."}`.'
        ),
    )
    app.state.gateway = gateway
    app.state.rng = random.Random()  # seeds of A1111 requests with seed -1
    app.add_middleware(_BodyLimit, limit=MAX_BODY)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(JobError, _job_error)
    app.add_exception_handler(DispatchError, _dispatch_error)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(Exception, _internal_error)
    app.include_router(_sdcn)
    app.include_router(_a1111)
    return app


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway


# --- documentation models ----------------------------------------------------------------------
# They describe the API in /docs (their names name its schemas); the handlers validate with
# JobRequest and gateway.a1111, which name the field in every error.


class Txt2ImgBody(BaseModel):
    """An SDCN txt2img request. Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="Model name (GET /v1/models), or its title")
    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    loras: list[tuple[str, float]] = Field(
        [], max_length=MAX_LORAS, description="[name, weight] pairs, weight -5 to 5"
    )
    seed: int = Field(-1, ge=-1, le=2**32 - 1, description="-1 for a random seed")
    sampler_name: str = Field("Euler a", description='e.g. "Euler a", "DPM++ 2M Karras"')
    steps: int = Field(20, ge=1, le=150)
    cfg_scale: float = Field(7.0, ge=0, le=30)
    width: int = Field(512, ge=64, le=2048, multiple_of=8)
    height: int = Field(512, ge=64, le=2048, multiple_of=8)
    batch_size: int = Field(1, ge=1, le=MAX_BATCH_SIZE)


class Img2ImgBody(Txt2ImgBody):
    """An SDCN img2img request. Unknown fields are refused."""

    init_image: str = Field(description="Base64 PNG, JPEG or WebP (a data: prefix is allowed)")
    denoising_strength: float = Field(0.75, ge=0, le=1)


class ImagesResponse(BaseModel):
    images: list[str] = Field(description="Base64 PNG images, one per batch item")
    info: dict[str, Any] = Field(
        description="seed, model, provider, queue_ms, run_ms, attempts, backend, ..."
    )


class ErrorMessage(BaseModel):
    msg: str


class ModelEntry(BaseModel):
    name: str
    title: str
    architecture: str
    providers: int = Field(description="Online providers offering it")
    loras: list[str] = Field(description="LoRAs at least one of them offers with it")


class ProviderEntry(BaseModel):
    peer_id: str
    state: str
    roles: list[str]
    reachability: str
    backend: str
    models: list[dict[str, str]]
    loras: list[str]
    samplers: list[str]
    slots: int
    queue: int
    max_queue: int | None = Field(description="Jobs that may wait there; null if unsaid")
    speed: float = Field(description="Iterations per second at 512x512")
    max_pixels: int
    max_steps: int
    vram_total_mb: int
    vram_free_mb: int
    addrs: list[str]
    expires_in: float = Field(description="Seconds until the advert expires")
    rtt_ms: float | None = Field(description="Measured round trip (EWMA), null if unknown")
    in_flight: int = Field(description="This gateway's jobs running there now")
    banned_until: float | None = Field(
        description="Wall time (Unix seconds) a ban after failures ends, null if not banned"
    )


class Health(BaseModel):
    status: str
    peer_id: str
    providers: int = Field(description="Online providers known")


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema()
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorMessage, "description": what}
    for status, what in (
        (400, "Bad input; the message names the field"),
        (404, "No provider offers the model, a LoRA, the sampler or the size"),
        (413, "Body over 50 MiB"),
        (502, "The provider failed"),
        (503, "Every capable provider is busy or unreachable"),
        (504, "The deadline passed"),
    )
}


# --- the SDCN API ------------------------------------------------------------------------------

_sdcn = APIRouter()


@_sdcn.post(
    "/txt2img",
    tags=["SDCN"],
    openapi_extra=_json_body(Txt2ImgBody),
    responses={200: {"model": ImagesResponse}, **_ERRORS},
)
async def txt2img(request: Request) -> Response:
    """Draw images from a prompt."""
    return await _sdcn_job(request, "txt2img")


@_sdcn.post(
    "/img2img",
    tags=["SDCN"],
    openapi_extra=_json_body(Img2ImgBody),
    responses={200: {"model": ImagesResponse}, **_ERRORS},
)
async def img2img(request: Request) -> Response:
    """Draw images from a prompt and an init image."""
    return await _sdcn_job(request, "img2img")


async def _sdcn_job(request: Request, kind: str) -> Response:
    gateway = _gateway(request)
    body = await _read_json(request)
    if kind == "img2img":  # decoding the init image is CPU work
        job = await trio.to_thread.run_sync(JobRequest.from_api, kind, body)
    else:
        job = JobRequest.from_api(kind, body)
    results = await _until_disconnect(request, lambda: _run_jobs(gateway.dispatcher, [job]))
    if results is None:
        return _gone()
    [result] = results

    def shape() -> dict[str, Any]:
        return {"images": [_base64(png) for png in result.images], "info": _json_safe(result.info)}

    return await _json_response(shape, sum(map(len, result.images)))


@_sdcn.get("/v1/models", tags=["network"], response_model=list[ModelEntry])
async def models(request: Request) -> list[ModelEntry]:
    """Each model online providers offer, with its LoRAs and how many providers offer it."""
    adverts = _gateway(request).peer.adverts
    first: dict[str, ModelInfo] = {}  # as the first provider to offer it describes it
    for advert in _online_providers(adverts):
        for model in advert.models:
            first.setdefault(normalize_model_name(model.name), model)
    entries = []
    for key, summary in sorted(adverts.models().items()):
        model = first.get(key, ModelInfo(summary.name))
        entries.append(
            ModelEntry(
                name=summary.name,
                title=model.title or summary.name,
                architecture=model.architecture,
                providers=summary.providers,
                loras=list(summary.loras),
            )
        )
    return entries


@_sdcn.get("/v1/providers", tags=["network"], response_model=list[ProviderEntry])
async def providers(request: Request) -> list[ProviderEntry]:
    """Every provider's advert, with the RTT this gateway measured and its load from here."""
    gateway = _gateway(request)
    now = gateway.peer.wall_clock()
    return [
        _provider_entry(gateway, advert, now)
        for advert in gateway.peer.adverts
        if PROVIDER_ROLE in advert.roles
    ]


def _provider_entry(gateway: Gateway, advert: Advert, now: float) -> ProviderEntry:
    peer = advert.peer_id
    rtt = gateway.peer.host.peerstore.rtt(peer)
    directory = gateway.directory
    return ProviderEntry(
        peer_id=str(peer),
        state=advert.state,
        roles=list(advert.roles),
        reachability=advert.reachability,
        backend=advert.backend,
        models=[
            {"name": m.name, "title": m.title, "hash": m.hash, "architecture": m.architecture}
            for m in advert.models
        ],
        loras=[lora.name for lora in advert.loras],
        samplers=list(advert.samplers),
        slots=advert.slots,
        queue=advert.queue,
        max_queue=advert.max_queue,
        speed=advert.speed,
        max_pixels=advert.max_pixels,
        max_steps=advert.max_steps,
        vram_total_mb=advert.vram_total_mb,
        vram_free_mb=advert.vram_free_mb,
        addrs=[str(addr) for addr in advert.addrs],
        expires_in=max(advert.expires_at - now, 0.0),
        rtt_ms=None if rtt is None else rtt * 1000,
        in_flight=directory.in_flight(peer),
        banned_until=directory.banned_until(peer) if directory.is_banned(peer, now) else None,
    )


@_sdcn.get("/healthz", tags=["network"], response_model=Health)
async def healthz(request: Request) -> Health:
    """Whether the gateway is up, and how many online providers it knows."""
    gateway = _gateway(request)
    online = _online_providers(gateway.peer.adverts)
    return Health(status="ok", peer_id=str(gateway.peer.peer_id), providers=len(online))


def _online_providers(adverts: Iterable[Advert]) -> list[Advert]:
    return [a for a in adverts if a.state == "online" and PROVIDER_ROLE in a.roles]


# --- the AUTOMATIC1111-compatible API ----------------------------------------------------------

_a1111 = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111"])
_A1111_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "description": "The webui's StableDiffusionProcessing payload",
                }
            }
        },
    }
}


@_a1111.post("/txt2img", openapi_extra=_A1111_BODY, responses=_ERRORS)
async def a1111_txt2img(request: Request) -> Response:
    """The webui's txt2img: ``{"images", "parameters", "info"}``, with info a JSON string."""
    return await _a1111_job(request, "txt2img")


@_a1111.post("/img2img", openapi_extra=_A1111_BODY, responses=_ERRORS)
async def a1111_img2img(request: Request) -> Response:
    """The webui's img2img: ``{"images", "parameters", "info"}``, with info a JSON string."""
    return await _a1111_job(request, "img2img")


async def _a1111_job(request: Request, kind: str) -> Response:
    gateway = _gateway(request)
    body = await _read_json(request)
    plan = a1111.parse_request(
        kind,
        body,
        default_model=gateway.default_model,
        adverts=gateway.peer.adverts,
        rng=request.app.state.rng,
    )
    job = await trio.to_thread.run_sync(plan.job) if kind == "img2img" else plan.job()
    jobs = plan.split(job)
    results = await _until_disconnect(request, lambda: _run_jobs(gateway.dispatcher, jobs))
    if results is None:
        return _gone()
    now = gateway.peer.wall_clock()

    def shape() -> dict[str, Any]:
        return plan.response([(r.images, r.info) for r in results], now)

    return await _json_response(shape, sum(len(png) for r in results for png in r.images))


@_a1111.get("/sd-models")
async def sd_models(request: Request) -> list[dict[str, Any]]:
    """Each model online providers offer (title, model_name, hash, ...)."""
    return a1111.sd_model_list(_gateway(request).peer.adverts)


@_a1111.get("/loras")
async def loras(request: Request) -> list[dict[str, Any]]:
    """Each LoRA online providers offer; use one as ``<lora:name:weight>`` in the prompt."""
    return a1111.lora_list(_gateway(request).peer.adverts)


@_a1111.get("/samplers")
async def samplers(request: Request) -> list[dict[str, Any]]:
    """Each sampler online providers offer."""
    return a1111.sampler_list(_gateway(request).peer.adverts)


@_a1111.get("/schedulers")
async def schedulers() -> list[dict[str, Any]]:
    """The schedulers a request may name."""
    return a1111.scheduler_list()


@_a1111.get("/scripts")
async def scripts() -> dict[str, list[str]]:
    """No scripts: the network runs none."""
    return {"txt2img": [], "img2img": []}


@_a1111.get("/options")
async def get_options(request: Request) -> dict[str, Any]:
    """``sd_model_checkpoint`` is the gateway's default model; the rest are the settings
    providers run with.
    """
    gateway = _gateway(request)
    return a1111.options(gateway.default_model, gateway.peer.adverts)


@_a1111.post("/options", responses={400: _ERRORS[400]})
async def set_options(request: Request) -> None:
    """Set the default model with ``sd_model_checkpoint`` (a model on the network).

    Settings that change nothing are accepted; others are refused, and then nothing is set.
    """
    gateway = _gateway(request)
    model = a1111.parse_options(await _read_json(request), gateway.peer.adverts)
    if model is not None:
        log.info("default model set to %r", model)
        gateway.default_model = model


@_a1111.get("/sd-vae")
async def sd_vae() -> list[dict[str, Any]]:
    """No VAEs to choose: providers run each model's own."""
    return []


@_a1111.get("/upscalers")
async def upscalers() -> list[dict[str, Any]]:
    """No upscalers: the network has no hires fix."""
    return []


@_a1111.get("/embeddings")
async def embeddings() -> dict[str, Any]:
    """No embeddings are known to the gateway."""
    return {"loaded": {}, "skipped": {}}


@_a1111.get("/progress")
async def progress() -> dict[str, Any]:
    """Always idle: the gateway does not track jobs for this call (it has no single queue)."""
    return {
        "progress": 0.0,
        "eta_relative": 0.0,
        "state": {"job_count": 0, "sampling_step": 0, "sampling_steps": 0, "interrupted": False},
        "current_image": None,
        "textinfo": None,
    }


# --- running jobs ------------------------------------------------------------------------------


async def _run_jobs(dispatcher: Dispatcher, jobs: Sequence[JobRequest]) -> list[DispatchResult]:
    """Run `jobs` in parallel; the first to fail cancels the others and its error is raised."""
    results: list[DispatchResult | None] = [None] * len(jobs)

    async def run(index: int, job: JobRequest) -> None:
        results[index] = await dispatcher.run(job)

    try:
        async with open_service_nursery() as nursery:
            for index, job in enumerate(jobs):
                nursery.start_soon(run, index, job)
    except BaseExceptionGroup as group:  # several failed at once: report one
        failures = [exc for exc in group.exceptions if isinstance(exc, SdcnError)]
        if len(failures) < len(group.exceptions):
            raise
        raise failures[0] from None
    return [result for result in results if result is not None]


async def _until_disconnect(request: Request, work: Callable[[], Awaitable[_T]]) -> _T | None:
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


def _gone() -> Response:
    """What a handler returns for a client that went away (nobody reads it)."""
    return Response(status_code=499)


# --- bodies ------------------------------------------------------------------------------------


async def _read_json(request: Request) -> Any:
    """The request's JSON body; JobError("bad_request") if it is not JSON, or holds text
    that is not Unicode (a lone surrogate escape: no peer could encode it).
    """
    body = await request.body()
    try:
        if len(body) > _THREAD_BYTES:
            value = await trio.to_thread.run_sync(json.loads, body)
        else:
            value = json.loads(body)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise JobError("bad_request", f"body: not valid JSON ({exc})") from None
    except RecursionError:
        raise JobError("bad_request", "body: JSON nested too deeply") from None
    if _SURROGATE_ESCAPE.search(body) and (where := _non_unicode(value)) is not None:
        raise JobError("bad_request", f"{where}: not valid Unicode text")
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


async def _json_response(shape: Callable[[], dict[str, Any]], size: int) -> Response:
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


def _base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _json_safe(value: Any) -> Any:
    """`value` with what JSON cannot hold (bytes, NaN, non-string keys) replaced or dropped."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items() if isinstance(k, str)}
    return None


class _BodyTooLarge(Exception):
    pass


class _BodyLimit:
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
            await _error(400, "Content-Length: not a valid length")(scope, receive, send)
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
        await _error(413, message)(scope, receive, send)


# --- errors ------------------------------------------------------------------------------------


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"msg": message}, status_code=status, headers=headers)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    if exc.status_code == 404 and exc.detail == "Not Found":
        message = f"no such endpoint: {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return _error(exc.status_code, message, exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    problems = []
    for error in exc.errors()[:4]:
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        problems.append(f"{where or 'request'}: {error.get('msg', 'invalid')}")
    return _error(400, "; ".join(problems) or "invalid request")


async def _job_error(request: Request, exc: JobError) -> Response:
    if exc.code == "bad_request":
        return _error(400, exc.message)
    return _error(502, exc.message)  # the dispatcher translates these; a safety net


async def _dispatch_error(request: Request, exc: DispatchError) -> Response:
    # 503 is back-pressure: tell clients when trying again is worth it (RFC 9110 10.2.3).
    retry_after = RETRY_AFTER if exc.retry_after is None else math.ceil(exc.retry_after)
    headers = {"Retry-After": str(retry_after)} if exc.status == 503 else None
    return _error(exc.status, exc.message, headers)


async def _client_gone(request: Request, exc: Exception) -> Response:
    return _gone()


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return _error(500, "internal error in the gateway")
