"""What an operator reads from a gateway over HTTP.

- ``GET /metrics``: the peer's Prometheus metrics (the gateway's, the peer's, and a
  provider's on the same peer), in the text format, or OpenMetrics when asked for.
- ``GET /v1/status``: a summary in JSON, like AI Horde's performance endpoint: providers and
  models online, jobs waiting and running, work queued and done in the last minute, uptime,
  version, and the spot checks' counts and exclusions (``trust``).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from gateway.http import error_response, services

__all__ = ["Status", "TrustStatus", "router"]

router = APIRouter()


class TrustStatus(BaseModel):
    providers_excluded: int = Field(description="Providers excluded now for wrong pictures")
    checks_running: int = Field(description="Spot checks running in the background now")
    jobs_seen: int = Field(description="Clients' jobs the checker saw")
    checks: dict[str, int] = Field(
        description="Checks by outcome: passed, failed, upheld, unsettled, unavailable, skipped"
    )
    strikes: int
    exclusions: int
    extra_compute: float = Field(description="Work spent on checks / work done for clients")
    fraud_reports: dict[str, int] | None = Field(
        description="published, sent, received, rate_limited, rejected, ignored, confirmed, "
        "refuted, unconfirmed"
    )


class Status(BaseModel):
    peer_id: str
    version: str
    uptime_s: float = Field(description="Seconds since this gateway started")
    providers_online: int = Field(description="Providers taking jobs now")
    models_online: int = Field(description="Models at least one online provider offers")
    jobs_waiting: int = Field(description="Jobs waiting in this gateway's line for room")
    jobs_running: int = Field(description="Jobs on a provider now")
    megapixel_steps_queued: float = Field(
        description="Work of the jobs accepted and not finished (steps x pixels x images / 1e6)"
    )
    megapixel_steps_last_minute: float = Field(description="Work finished in the last 60 s")
    images_last_minute: int = Field(description="Images returned in the last 60 s")
    trust: TrustStatus | None = Field(
        description="Spot checks and exclusions (README, Trust); null if this gateway checks none"
    )
    jobs_queued: int = Field(description="Async jobs in the gateway's fair line, not yet sent")
    clients_active: int = Field(description="Clients with jobs waiting or running")
    load: float | None = Field(
        description="Jobs running or waiting per provider slot online (1: every slot busy; "
        "above: a line); null when no provider is online"
    )
    keys_required: bool = Field(description="Whether only clients with an API key are served")


@router.get("/v1/status", tags=["operate"], response_model=Status)
async def status(request: Request) -> Status:
    """What this gateway and the network it sees are doing now."""
    return Status(**services(request).status())


@router.get(
    "/metrics",
    tags=["operate"],
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
)
async def metrics(request: Request) -> Response:
    """Prometheus metrics of this peer (see the README, "Operate a network")."""
    registry = services(request).metrics
    if not registry.enabled:
        return error_response(404, "metrics are off on this gateway")
    body, content_type = registry.exposition(request.headers.get("accept", ""))
    return Response(body, media_type=content_type)
