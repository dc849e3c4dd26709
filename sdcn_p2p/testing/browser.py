"""Headless Chromium for the gateway's pages, and a devnet beside it in a thread of its own.

The page tests and ``benchmarks/pages.py`` drive the system's Chromium with Playwright's
synchronous API (the ``test`` extra installs it; ``playwright install`` is never needed: the
browser is the one the package manager installed). Playwright's API blocks, so the network it
talks to runs in a trio run on another thread: `TrioThread`.

- `find_chromium`: the browser's path (``$SDCN_CHROMIUM``, else ``chromium`` and its usual
  names on ``$PATH``), or None; `HOW_TO_GET_CHROMIUM` says how to install one.
- `open_browser`: Playwright's Browser on it, headless, with background networking off (the
  machines this runs on may have no network, where Chromium's own requests hang it). Every
  launch gets a fresh, temporary profile.
- `TrioThread`: enters an async context manager (`open_devnet`) in a trio run of its own
  thread; `run` calls into that run from the test's thread.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import trio

if TYPE_CHECKING:
    from playwright.sync_api import Browser

__all__ = [
    "CHROMIUM_ARGS",
    "HOW_TO_GET_CHROMIUM",
    "TrioThread",
    "find_chromium",
    "open_browser",
]

#: Chromium's switches: no sandbox (root in a container), no GPU, and none of the requests a
#: browser makes on its own (updates, sync, safe browsing), which hang without a network.
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-default-apps",
    "--disable-extensions",
)
_NAMES = ("chromium", "chromium-browser", "google-chrome-stable", "google-chrome")
HOW_TO_GET_CHROMIUM = (
    "no Chromium to test the pages with: install one (Debian/Ubuntu: `sudo apt-get install "
    "chromium`) or point SDCN_CHROMIUM at a Chromium or Chrome executable, and install the "
    "test extra (`pip install -e '.[test]'`, which brings Playwright); `playwright install` "
    "is not needed"
)

_T = TypeVar("_T")
_R = TypeVar("_R")


def find_chromium() -> str | None:
    """The Chromium executable to use: ``$SDCN_CHROMIUM`` if set, else the first of
    chromium, chromium-browser, google-chrome-stable, google-chrome on ``$PATH``; None if
    there is none (or Playwright is not installed)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return None
    chosen = os.environ.get("SDCN_CHROMIUM")
    if chosen:
        return chosen if os.access(chosen, os.X_OK) else None
    return next((path for name in _NAMES if (path := shutil.which(name))), None)


@contextmanager
def open_browser(executable: str | None = None) -> Iterator[Browser]:
    """Launch headless Chromium (`executable`, or `find_chromium`'s) under Playwright.

    Raises RuntimeError with HOW_TO_GET_CHROMIUM if there is none.
    """
    from playwright.sync_api import sync_playwright

    path = executable or find_chromium()
    if path is None:
        raise RuntimeError(HOW_TO_GET_CHROMIUM)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=path, args=list(CHROMIUM_ARGS), headless=True
        )
        try:
            yield browser
        finally:
            browser.close()


class TrioThread(Generic[_T]):
    """`enter()` entered in a trio run on a thread of its own, for blocking code beside it.

    ``with TrioThread(lambda: open_devnet(http="127.0.0.1:0")) as thread:``: `thread.value`
    is what the context manager yields; `run(fn, *args)` runs the async `fn` in that trio run
    and returns its result (or raises its exception). Leaving the block exits the context
    manager there and joins the thread; an error inside the run is raised again here.
    """

    def __init__(
        self, enter: Callable[[], AbstractAsyncContextManager[_T]], *, timeout: float = 60.0
    ) -> None:
        self._enter = enter
        self._timeout = timeout
        self._ready = threading.Event()
        self._value: _T | None = None
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="trio", daemon=True)

    @property
    def value(self) -> _T:
        """What the context manager yielded."""
        if self._value is None:
            raise RuntimeError("the trio thread is not running")
        return self._value

    def __enter__(self) -> TrioThread[_T]:
        self._thread.start()
        if not self._ready.wait(self._timeout):
            raise TimeoutError(f"the trio thread did not start within {self._timeout} s")
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None and self._thread.is_alive():
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(self._timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the trio thread did not stop within {self._timeout} s")
        if self._error is not None:
            raise self._error

    def run(self, fn: Callable[..., Awaitable[_R]], *args: Any) -> _R:
        """Run `await fn(*args)` in the trio thread; its result, or its exception."""
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def _main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with self._enter() as value:
            self._value = value
            self._ready.set()
            await self._stop.wait()
