"""The gateway's HTTP app (FastAPI): the SDCN API, the AUTOMATIC1111-compatible API, the
network catalog and a health check; ``/docs`` and ``/openapi.json`` describe them.

- `gateway.sdcn_api`: ``POST /txt2img``, ``/img2img``; ``GET /v1/models``, ``/v1/providers``,
  ``/healthz``.
- `gateway.jobs_api`: async jobs, ``/v1/jobs``: submit, status, events (SSE), cancel.
- `gateway.a1111_api`: ``/sdapi/v1/...``, what an A1111 client needs.
- `gateway.ops_api`: ``GET /metrics`` (Prometheus) and ``GET /v1/status``, for operators;
  every request is counted by `gateway.metrics.RequestCounter`.
- `gateway.web_api`: the pages, ``GET /`` (generate) and ``GET /network``, from
  ``gateway/web/``.
- `gateway.http`: what both share: bodies (at most MAX_BODY bytes), responses, and the one
  mapping of errors to ``{"msg"}`` and a status.
"""

from __future__ import annotations

import random

from fastapi import FastAPI

from gateway import a1111_api, jobs_api, ops_api, sdcn_api, web_api
from gateway.http import (
    MAX_BODY,
    RETRY_AFTER,
    AccessGate,
    BodyLimit,
    GatewayServices,
    install_error_handlers,
)
from gateway.metrics import RequestCounter
from sdcn_p2p._version import __version__

__all__ = ["MAX_BODY", "RETRY_AFTER", "GatewayServices", "create_app"]


def create_app(gateway: GatewayServices, *, rng: random.Random | None = None) -> FastAPI:
    """The HTTP app serving `gateway` (its job service, catalog and default model, read at
    each request). `rng` draws the seeds of A1111 requests with seed -1.
    """
    app = FastAPI(
        title="SDCN gateway",
        version=__version__,
        description=(
            "Stable Diffusion on a peer-to-peer network of GPU providers. Errors are always "
            '`{"msg": "..."}`.'
        ),
    )
    app.state.services = gateway
    app.state.rng = rng or random.Random()
    app.add_middleware(AccessGate)  # before the body is read: a refusal costs no upload
    app.add_middleware(BodyLimit, limit=MAX_BODY)
    app.add_middleware(RequestCounter, metrics=gateway.metrics)  # outermost: counts the 413s
    install_error_handlers(app)
    app.include_router(sdcn_api.router)
    app.include_router(jobs_api.router)
    app.include_router(a1111_api.router)
    app.include_router(ops_api.router)
    app.include_router(web_api.router)
    return app
