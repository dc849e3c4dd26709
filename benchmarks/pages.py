"""The pages' first load: bytes transferred and time to interactive, in headless Chromium.

``sdcn devnet`` (bootstrap, three test-card providers, a gateway with its HTTP server on
loopback) runs as a process of its own, as a user starts it. The system's Chromium (see
`sdcn_p2p.testing.browser`) opens each page --rounds times, every time in a fresh browser
context (empty cache, no localStorage), and reads the browser's Performance API once the page
says it is ready:

- transferred_kb: what the first load fetched in all, headers included: the navigation
  entry's ``transferSize`` plus that of every resource entry (stylesheet, scripts, icon, and
  the API calls the page makes to fill itself: ``/v1/models``, ``/v1/providers``, ...).
- interactive_ms: from the start of navigation to the page's ``sdcn:ready`` mark, set once
  the page has its data and its controls work (the Generate button is enabled; the network
  tables are filled).
- dom_interactive_ms / load_ms: the navigation entry's ``domInteractive`` and
  ``loadEventEnd``, for comparison.

Figures are the best, the median and the worst over the rounds (on a machine shared with
other work the best is the one least disturbed). The targets (issue 15): the first load of
``/`` at most 100 KB and interactive within 300 ms on loopback.

Usage: python benchmarks/pages.py [--rounds 10] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from _processes import free_port, sdcn, spawn, wait_http

from sdcn_p2p.testing.browser import HOW_TO_GET_CHROMIUM, find_chromium, open_browser

#: Each page and the attribute its script sets on <html> when it is ready.
PAGES = {"/": "data-ready", "/network": "data-updates"}

MEASURE = """() => {
  const [nav] = performance.getEntriesByType("navigation");
  const resources = performance.getEntriesByType("resource");
  const [ready] = performance.getEntriesByName("sdcn:ready");
  return {
    transferred: nav.transferSize + resources.reduce((sum, r) => sum + r.transferSize, 0),
    requests: 1 + resources.length,
    interactive: ready ? ready.startTime : null,
    dom_interactive: nav.domInteractive,
    load: nav.loadEventEnd,
  };
}"""


def measure_page(browser: Any, url: str, path: str, rounds: int) -> dict[str, Any]:
    samples = []
    for _ in range(rounds):
        context = browser.new_context(base_url=url)
        try:
            page = context.new_page()
            page.goto(path, wait_until="load")
            page.wait_for_selector(f"html[{PAGES[path]}]", state="attached")
            page.wait_for_function("performance.getEntriesByName('sdcn:ready').length > 0")
            samples.append(page.evaluate(MEASURE))
        finally:
            context.close()

    def figure(key: str, scale: float = 1.0, digits: int = 1) -> dict[str, float]:
        values = [sample[key] / scale for sample in samples]
        return {
            "min": round(min(values), digits),
            "median": round(statistics.median(values), digits),
            "max": round(max(values), digits),
        }

    return {
        "transferred_kb": figure("transferred", 1024),
        "requests": samples[-1]["requests"],
        "interactive_ms": figure("interactive"),
        "dom_interactive_ms": figure("dom_interactive"),
        "load_ms": figure("load"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="loads of each page")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    chromium = find_chromium()
    if chromium is None:
        print(HOW_TO_GET_CHROMIUM, file=sys.stderr)
        return 2
    result: dict[str, Any] = {"rounds": args.rounds, "pages": {}}
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        url = f"http://127.0.0.1:{free_port()}"
        devnet = spawn(stack, sdcn("devnet", "--http", url[len("http://") :]), workdir / "log")
        wait_http(f"{url}/v1/status", devnet, lambda status: status["providers_online"] == 3)
        browser = stack.enter_context(open_browser(chromium))
        result["browser"] = f"Chromium {browser.version}"
        # One load first, not counted: the gateway reads its files on first use.
        measure_page(browser, url, "/", 1)
        for path in PAGES:
            result["pages"][path] = measure_page(browser, url, path, args.rounds)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['browser']}, {args.rounds} first loads of each page (best / median / worst):")
    for path, figures in result["pages"].items():
        kb, ms = figures["transferred_kb"], figures["interactive_ms"]
        print(
            f"  {path:9} {kb['median']:.1f} KB in {figures['requests']} requests, interactive "
            f"in {ms['min']:.0f} / {ms['median']:.0f} / {ms['max']:.0f} ms "
            f"(DOM interactive {figures['dom_interactive_ms']['median']:.0f} ms, "
            f"load {figures['load_ms']['median']:.0f} ms)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
