"""The AUTOMATIC1111-compatible HTTP API's routes (``/sdapi/v1/...``).

Requests are translated by `gateway.a1111`; the catalog (`gateway.catalog`) answers what a
webui lists. Errors are ``{"msg"}`` with the statuses `gateway.http` gives.

txt2img and img2img are sync jobs of the job service, as in `gateway.sdcn_api`. ``progress``
reports, and ``interrupt`` cancels, the A1111 jobs in flight for the calling client (its
address), or the job with the ``force_task_id`` given as ``id_task``. An interrupted request is
answered as the webui answers one: 200, with the images done so far (none: a job's images
come back together).
"""

from __future__ import annotations

import logging
import random
from typing import Any

import trio
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from gateway import a1111
from gateway.catalog import scheduler_list
from gateway.dispatch import DispatchResult
from gateway.errors import JobCancelled
from gateway.http import (
    ERRORS,
    client_key,
    gone,
    json_response,
    read_json,
    request_client,
    services,
    until_disconnect,
)

__all__ = ["router"]

log = logging.getLogger(__name__)

router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111"])
_BODY = {
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


@router.post("/txt2img", openapi_extra=_BODY, responses=ERRORS)
async def a1111_txt2img(request: Request) -> Response:
    """The webui's txt2img: ``{"images", "parameters", "info"}``, with info a JSON string."""
    return await _job(request, "txt2img")


@router.post("/img2img", openapi_extra=_BODY, responses=ERRORS)
async def a1111_img2img(request: Request) -> Response:
    """The webui's img2img: ``{"images", "parameters", "info"}``, with info a JSON string."""
    return await _job(request, "img2img")


async def _job(request: Request, kind: str) -> Response:
    gateway = services(request)
    body = await read_json(request)
    rng: random.Random = request.app.state.rng
    plan = a1111.parse_request(
        kind,
        body,
        default_model=gateway.default_model,
        adverts=gateway.catalog.adverts,
        rng=rng,
    )
    job = await trio.to_thread.run_sync(plan.job) if kind == "img2img" else plan.job()
    parts = plan.split(job)
    jobs = gateway.jobs
    client = request_client(request)

    async def run() -> list[DispatchResult]:
        try:
            outcome = await jobs.run(parts, api="a1111", client=client, task_id=plan.task_id)
        except JobCancelled:
            return []  # interrupted
        return outcome.results

    results = await until_disconnect(request, run)
    if results is None:
        return gone()
    now = gateway.wall_clock()

    def shape() -> dict[str, Any]:
        return plan.response([(r.images, r.info) for r in results], now)

    return await json_response(shape, sum(len(png) for r in results for png in r.images))


@router.get("/sd-models")
async def sd_models(request: Request) -> list[dict[str, Any]]:
    """Each model online providers offer (title, model_name, hash, ...)."""
    return services(request).catalog.sd_models()


@router.get("/loras")
async def loras(request: Request) -> list[dict[str, Any]]:
    """Each LoRA online providers offer; use one as ``<lora:name:weight>`` in the prompt."""
    return services(request).catalog.loras()


@router.get("/samplers")
async def samplers(request: Request) -> list[dict[str, Any]]:
    """Each sampler online providers offer."""
    return services(request).catalog.samplers()


@router.get("/schedulers")
async def schedulers() -> list[dict[str, Any]]:
    """The schedulers a request may name."""
    return scheduler_list()


@router.get("/scripts")
async def scripts() -> dict[str, list[str]]:
    """No scripts: the network runs none."""
    return {"txt2img": [], "img2img": []}


@router.get("/options")
async def get_options(request: Request) -> dict[str, Any]:
    """``sd_model_checkpoint`` is the gateway's default model; the rest are the settings
    providers run with.
    """
    gateway = services(request)
    return a1111.options(gateway.default_model, gateway.catalog.adverts)


@router.post("/options", responses={400: ERRORS[400]})
async def set_options(request: Request) -> None:
    """Set the default model with ``sd_model_checkpoint`` (a model on the network).

    Settings that change nothing are accepted; others are refused, and then nothing is set.
    """
    gateway = services(request)
    model = a1111.parse_options(await read_json(request), gateway.catalog.adverts)
    if model is not None:
        log.info("default model set to %r", model)
        gateway.default_model = model


@router.get("/sd-vae")
async def sd_vae() -> list[dict[str, Any]]:
    """No VAEs to choose: providers run each model's own."""
    return []


@router.get("/upscalers")
async def upscalers() -> list[dict[str, Any]]:
    """No upscalers: the network has no hires fix."""
    return []


@router.get("/embeddings")
async def embeddings() -> dict[str, Any]:
    """No embeddings are known to the gateway."""
    return {"loaded": {}, "skipped": {}}


@router.get("/progress")
async def progress(
    request: Request,
    skip_current_image: bool = False,
    id_task: str | None = Query(None, max_length=a1111.MAX_TASK_ID_CHARS),
) -> dict[str, Any]:
    """The calling client's jobs in flight (or the one whose ``force_task_id`` is
    `id_task`): progress 0 to 1, ETA, steps. ``current_image`` is always null (providers send
    no previews), so `skip_current_image` changes nothing."""
    jobs = services(request).jobs
    client = client_key(request)
    return a1111.progress(
        jobs.client_jobs(client, id_task), interrupted=jobs.was_interrupted(client)
    )


@router.post("/interrupt")
async def interrupt(request: Request) -> dict[str, Any]:
    """Cancel the calling client's jobs in flight (their providers stop them)."""
    cancelled = services(request).jobs.interrupt(client_key(request))
    if cancelled:
        log.info("interrupted %d job(s) of %s", cancelled, client_key(request))
    return {}
