"""The pages as files served (no browser: `tests/gateway/web/` drives them in Chromium): the
security headers, revalidation, what is not served, markup that a Content-Security-Policy of
``default-src 'self'`` allows, and the first load's size budget.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI

from gateway import web_api
from gateway.http import install_error_handlers

# What the first load of each page fetches from gateway/web/.
FIRST_LOAD = {
    "/": ["index.html", "style.css", "common.js", "generate.js", "favicon.svg"],
    "/network": ["network.html", "style.css", "common.js", "network.js", "favicon.svg"],
}


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(web_api.router)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        yield client


@pytest.mark.parametrize(
    ("path", "media_type"),
    [
        ("/", "text/html"),
        ("/network", "text/html"),
        ("/static/style.css", "text/css"),
        ("/static/generate.js", "text/javascript"),
        ("/static/favicon.svg", "image/svg+xml"),
    ],
)
async def test_pages_and_files_are_served_with_their_policy(
    http: httpx.AsyncClient, path: str, media_type: str
) -> None:
    response = await http.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(media_type)
    assert (
        response.headers["content-security-policy"] == "default-src 'self'; frame-ancestors 'none'"
    )
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cache-control"] == "no-cache"
    # Revalidation: the same ETag answers 304 without a body.
    again = await http.get(path, headers={"If-None-Match": response.headers["etag"]})
    assert (again.status_code, again.content) == (304, b"")


@pytest.mark.parametrize(
    "path", ["/static/index.html", "/static/nope.js", "/static/..%2Fweb_api.py", "/static/"]
)
async def test_what_is_not_a_servable_file_is_404(http: httpx.AsyncClient, path: str) -> None:
    response = await http.get(path)
    assert response.status_code == 404
    assert set(response.json()) == {"msg"}


@pytest.mark.parametrize("name", ["index.html", "network.html"])
def test_pages_hold_no_inline_script_or_style(name: str) -> None:
    html = web_api.assets()[name].body.decode()
    assert not re.search(r"<style\b", html)
    assert not re.search(r"\sstyle\s*=", html)
    assert not re.search(r"\son[a-z]+\s*=", html)  # onclick=...
    assert not re.search(r"javascript:", html)
    scripts = re.findall(r"<script\b[^>]*>", html)
    assert scripts and all(' src="/static/' in tag for tag in scripts)
    # Everything they link to is this gateway's.
    for url in re.findall(r'(?:src|href)="([^"]+)"', html):
        assert url.startswith("/"), url


@pytest.mark.parametrize("page", list(FIRST_LOAD))
def test_a_first_load_stays_within_100_kb(page: str) -> None:
    files = web_api.assets()
    assert sum(len(files[name].body) for name in FIRST_LOAD[page]) <= 100 * 1024
