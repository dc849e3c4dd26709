"""The page tests' browser and network: one headless Chromium for the session, a devnet (a
bootstrap peer, three test-card providers and a gateway over real WebSockets and the real
HTTP server on loopback) per module, run by trio in a thread beside the test.

Each test gets a fresh browser context (no cookies, no localStorage). It fails on any
uncaught script error or console error (a Content-Security-Policy violation is one) and on any
request to anywhere but the gateway. When a test fails, a screenshot of each page it had open
is written to ``test-artifacts/pages/`` (gitignored).

Without Chromium or Playwright the tests skip, saying how to get them; with
``SDCN_REQUIRE_BROWSER=1`` (CI) they fail instead.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import pytest

from sdcn_p2p.devnet import Devnet, open_devnet
from sdcn_p2p.testing.browser import HOW_TO_GET_CHROMIUM, TrioThread, find_chromium, open_browser

try:
    from playwright.sync_api import Browser, BrowserContext, Page, expect
except ImportError:  # the browser fixture skips
    Browser = BrowserContext = Page = object  # type: ignore[misc,assignment]
else:
    # Waits end on a page condition; this is only how long before one counts as failed.
    expect.set_options(timeout=15_000)

NewContext = Callable[..., AbstractContextManager[BrowserContext]]
# Chromium logs a failed fetch (an expected 400, say) as a console error: not a fault.
_EXPECTED_CONSOLE = re.compile(r"^Failed to load resource: the server responded with a status")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    path = find_chromium()
    if path is None:
        if os.environ.get("SDCN_REQUIRE_BROWSER"):
            pytest.fail(HOW_TO_GET_CHROMIUM)
        pytest.skip(HOW_TO_GET_CHROMIUM)
    with open_browser(path) as launched:
        yield launched


@pytest.fixture(scope="module")
def devnet(browser: Browser) -> Iterator[TrioThread[Devnet]]:
    with TrioThread(lambda: open_devnet(providers=3, http="127.0.0.1:0")) as thread:
        yield thread


@pytest.fixture
def new_context(browser: Browser, request: pytest.FixtureRequest) -> NewContext:
    """Open a browser context on the gateway at a URL, watched as the module docstring says:
    ``with new_context(url, viewport=...) as context:``."""

    @contextmanager
    def new(url: str, **options: Any) -> Iterator[BrowserContext]:
        options.setdefault("viewport", {"width": 1200, "height": 900})
        context = browser.new_context(base_url=url, **options)
        problems: list[str] = []

        def watch(page: Page) -> None:
            page.on("pageerror", lambda error: problems.append(f"script error: {error}"))
            page.on(
                "console",
                lambda message: (
                    message.type == "error"
                    and not _EXPECTED_CONSOLE.match(message.text)
                    and problems.append(f"console: {message.text}")
                ),
            )

        context.on("page", watch)
        context.on(
            "request",
            lambda req: req.url.startswith(url) or problems.append(f"request outside: {req.url}"),
        )
        failed = True
        try:
            yield context
            failed = False
        finally:
            report = getattr(request.node, "report_call", None)
            if failed or problems or (report is not None and report.failed):
                _screenshots(context, request)
            context.close()
        assert problems == []

    return new


@pytest.fixture
def context(new_context: NewContext, devnet: TrioThread[Devnet]) -> Iterator[BrowserContext]:
    """A watched browser context on the module's devnet."""
    with new_context(devnet.value.url) as context:
        yield context


def _screenshots(context: BrowserContext, request: pytest.FixtureRequest) -> None:
    folder = Path(request.config.rootpath) / "test-artifacts" / "pages"
    folder.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^\w.-]+", "_", request.node.name)
    for index, page in enumerate(context.pages):
        page.screenshot(path=folder / f"{name}-{index}.png", full_page=True)
