"""The SDCN HTTP API's routes (``shared/seed/SDCN.md``) and the network views.

- ``POST /txt2img``, ``POST /img2img``: success is ``{"images": [base64 PNG, ...],
  "info": {...}}``; errors are ``{"msg"}`` with the statuses `gateway.http` gives. With
  ``"verify": true`` the answer waits until a second provider agrees (`gateway.spotcheck`).
- ``GET /v1/models``, ``GET /v1/providers``: the catalog (`gateway.catalog`).
- ``GET /healthz``.
- ``GET /v1/account``: who the gateway takes the caller for (its API key, or its address),
  its limits and usage, and the work of the providers linked to its key.

The jobs are sync jobs of the job service (`gateway.jobservice`): recorded like async ones,
with the job's id in the ``SDCN-Job-Id`` header of the answer. A client that disconnects
while its job runs cancels the job (the provider's stream is reset); a job cancelled with
``DELETE /v1/jobs/{id}`` is answered 409.
"""

from __future__ import annotations

from typing import Any

import trio
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from gateway.http import (
    ERRORS,
    base64_text,
    error_docs,
    gone,
    json_body,
    json_response,
    json_safe,
    read_json,
    request_client,
    services,
    until_disconnect,
)
from gateway.sdcn import parse_request, split_verify
from sdcn_p2p.jobs import MAX_BATCH_SIZE, MAX_LORAS, MAX_PROMPT_CHARS, MAX_SEED

__all__ = ["router"]

router = APIRouter()


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
    seed: int = Field(-1, ge=-1, le=MAX_SEED, description="-1 for a random seed")
    sampler_name: str = Field("Euler a", description='e.g. "Euler a", "DPM++ 2M Karras"')
    steps: int = Field(20, ge=1, le=150)
    cfg_scale: float = Field(7.0, ge=0, le=30)
    width: int = Field(512, ge=64, le=2048, multiple_of=8)
    height: int = Field(512, ge=64, le=2048, multiple_of=8)
    batch_size: int = Field(1, ge=1, le=MAX_BATCH_SIZE)
    verify: bool = Field(
        False,
        description="Answer only once a second provider drew the same picture (twice the "
        "compute); info.verified says whether it did, info.verification how or why not",
    )


class Img2ImgBody(Txt2ImgBody):
    """An SDCN img2img request. Unknown fields are refused."""

    init_image: str = Field(description="Base64 PNG, JPEG or WebP (a data: prefix is allowed)")
    denoising_strength: float = Field(0.75, ge=0, le=1)


class ImagesResponse(BaseModel):
    images: list[str] = Field(description="Base64 PNG images, one per batch item")
    info: dict[str, Any] = Field(
        description="seed, model, provider, queue_ms, run_ms, attempts, backend, spot_check "
        "(whether the job is re-run elsewhere to check it), verified and verification (when "
        "asked to verify), ..."
    )


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
    jobs_sent: int = Field(description="Jobs this gateway sent there since it started")
    jobs_done: int = Field(description="Of those, the ones it completed")
    observed_speed: float | None = Field(
        description="it/s at 512x512 as this gateway measured it (EWMA), null before any job"
    )
    proven: bool = Field(description="It completed a job for this gateway")
    banned_until: float | None = Field(
        description="Wall time (Unix seconds) a ban after failures ends, null if not banned"
    )
    checks: int = Field(description="Its jobs spot-checked here, of its last 50 checked")
    strikes: int = Field(description="Checks it failed among those (2 exclude it)")
    excluded_until: float | None = Field(
        description="Wall time (Unix seconds) its exclusion for wrong pictures ends, or null"
    )
    excluded_reason: str | None = Field(description="Why it is excluded, or null")


class Health(BaseModel):
    status: str
    peer_id: str
    providers: int = Field(description="Online providers known")


# --- jobs --------------------------------------------------------------------------------------


#: The header naming the job service's record of a sync job.
JOB_ID_HEADER = "SDCN-Job-Id"
_JOB_ERRORS = {**ERRORS, **error_docs(409)}


@router.post(
    "/txt2img",
    tags=["SDCN"],
    openapi_extra=json_body(Txt2ImgBody),
    responses={200: {"model": ImagesResponse}, **_JOB_ERRORS},
)
async def txt2img(request: Request) -> Response:
    """Draw images from a prompt."""
    return await _job(request, "txt2img")


@router.post(
    "/img2img",
    tags=["SDCN"],
    openapi_extra=json_body(Img2ImgBody),
    responses={200: {"model": ImagesResponse}, **_JOB_ERRORS},
)
async def img2img(request: Request) -> Response:
    """Draw images from a prompt and an init image."""
    return await _job(request, "img2img")


async def _job(request: Request, kind: str) -> Response:
    jobs = services(request).jobs
    body, verify = split_verify(await read_json(request))
    if kind == "img2img":  # decoding the init image is CPU work
        job = await trio.to_thread.run_sync(parse_request, kind, body)
    else:
        job = parse_request(kind, body)
    client = request_client(request)
    outcome = await until_disconnect(
        request, lambda: jobs.run([job], api="sdcn", client=client, verify=verify)
    )
    if outcome is None:
        return gone()
    [result] = outcome.results

    def shape() -> dict[str, Any]:
        return {
            "images": [base64_text(png) for png in result.images],
            "info": json_safe(result.info),
        }

    response = await json_response(shape, sum(map(len, result.images)))
    response.headers[JOB_ID_HEADER] = outcome.job_id
    return response


# --- the network -------------------------------------------------------------------------------


@router.get("/v1/models", tags=["network"], response_model=list[ModelEntry])
async def models(request: Request) -> list[dict[str, Any]]:
    """Each model online providers offer, with its LoRAs and how many providers offer it."""
    return services(request).catalog.models()


@router.get("/v1/providers", tags=["network"], response_model=list[ProviderEntry])
async def providers(request: Request) -> list[dict[str, Any]]:
    """Every provider's advert, with the RTT this gateway measured and its load from here."""
    return services(request).catalog.providers()


class ProviderWork(BaseModel):
    peer_id: str
    megapixel_steps: float = Field(description="Work it returned images for, for this gateway")
    jobs: int
    last_job_at: float | None = Field(description="Unix seconds of its latest job here")


class Usage(BaseModel):
    jobs_in_flight: int = Field(description="Jobs running, or next in line for a provider")
    jobs_waiting: int = Field(description="Async jobs in the gateway's line")
    megapixel_steps_available: float | None = Field(
        description="Work the client may submit now (null: no limit)"
    )


class Account(BaseModel):
    client: str = Field(description='The API key\'s name, or "anonymous"')
    tier: str | None
    weight: float = Field(description="The client's share in the gateway's fair line")
    contributor: bool = Field(
        description="A provider linked to the key ran a job here lately (a bigger share)"
    )
    limits: dict[str, float | None] = Field(description="Each limit; null: none")
    usage: Usage
    providers: list[ProviderWork] = Field(description="The providers linked to the key")


@router.get(
    "/v1/account",
    tags=["network"],
    response_model=Account,
    responses=error_docs(401, 429),
)
async def account(request: Request) -> dict[str, Any]:
    """The caller's tier, limits and usage, and its providers' work for this gateway (send
    the API key: without one, the anonymous client at the caller's address)."""
    return services(request).jobs.account(request_client(request))


@router.get("/healthz", tags=["network"], response_model=Health)
async def healthz(request: Request) -> Health:
    """Whether the gateway is up, and how many online providers it knows."""
    gateway = services(request)
    online = gateway.catalog.online_providers()
    return Health(status="ok", peer_id=str(gateway.peer_id), providers=len(online))
