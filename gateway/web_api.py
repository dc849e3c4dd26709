"""The gateway's pages: plain HTML, CSS and JavaScript from ``gateway/web/`` (package data,
no build step), using only the public HTTP API.

- ``GET /``: the generation page (prompt, model, LoRAs, sampler, size, ...; submits to
  ``POST /v1/jobs`` and follows the job's events).
- ``GET /network``: the network page (``/v1/status``, ``/v1/providers``, ``/v1/models``,
  refreshed every few seconds).
- ``GET /static/{name}``: their stylesheet, scripts and icon.

Nothing is fetched from anywhere else: every answer here carries ``Content-Security-Policy:
default-src 'self'``, so the pages hold no inline script or style, and generated images come
from ``/v1/jobs/{id}/images/{n}``, not ``data:`` URLs. The files are read once, on first use;
each answer has an ETag, and a browser revalidates (``no-cache``) so a new version shows at
once.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import Response

from gateway.http import error_response

__all__ = ["CONTENT_SECURITY_POLICY", "PAGES", "Asset", "assets", "router"]

router = APIRouter(include_in_schema=False)

#: What a page may load: only what this gateway serves. `frame-ancestors` (which
#: `default-src` does not cover) keeps other sites from framing the Generate button.
CONTENT_SECURITY_POLICY = "default-src 'self'; frame-ancestors 'none'"
#: Path -> the file in gateway/web/ that it serves.
PAGES = {"/": "index.html", "/network": "network.html"}
_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}
_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True, slots=True)
class Asset:
    """One file of gateway/web/, as served."""

    body: bytes
    media_type: str
    etag: str


@functools.cache
def assets() -> dict[str, Asset]:
    """Every servable file of gateway/web/ by name (read once)."""
    found = {}
    for entry in (resources.files("gateway") / "web").iterdir():
        media_type = _MEDIA_TYPES.get("." + entry.name.rpartition(".")[2])
        if media_type is None or not entry.is_file():
            continue
        body = entry.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
        found[entry.name] = Asset(body, media_type, etag)
    return found


def _serve(request: Request, name: str) -> Response:
    asset = assets().get(name)
    if asset is None:
        return error_response(404, f"no such file: {request.url.path}")
    headers = {**_HEADERS, "ETag": asset.etag}
    if asset.etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.media_type, headers=headers)


@router.get("/")
async def generation_page(request: Request) -> Response:
    return _serve(request, PAGES["/"])


@router.get("/network")
async def network_page(request: Request) -> Response:
    return _serve(request, PAGES["/network"])


@router.get("/static/{name}")
async def static_file(name: str, request: Request) -> Response:
    if name.endswith(".html"):  # pages have their own paths
        return error_response(404, f"no such file: {request.url.path}")
    return _serve(request, name)
