"""The AUTOMATIC1111-compatible HTTP API's routes (``/sdapi/v1/...``).

Requests are translated by `gateway.a1111`; the catalog (`gateway.catalog`) answers what a
webui lists. Errors are ``{"msg"}`` with the statuses `gateway.http` gives.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import trio
from fastapi import APIRouter, Request
from fastapi.responses import Response

from gateway import a1111
from gateway.catalog import scheduler_list
from gateway.http import ERRORS, gone, json_response, read_json, services, until_disconnect

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
    jobs = plan.split(job)
    dispatcher = gateway.dispatcher
    results = await until_disconnect(request, lambda: dispatcher.run_batch(jobs))
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
async def progress() -> dict[str, Any]:
    """Always idle: the gateway does not track jobs for this call (it has no single queue)."""
    return {
        "progress": 0.0,
        "eta_relative": 0.0,
        "state": {"job_count": 0, "sampling_step": 0, "sampling_steps": 0, "interrupted": False},
        "current_image": None,
        "textinfo": None,
    }
