#!/usr/bin/env python3
"""Send one SDCN job to a gateway and save the images.

    sdcn_run.py txt2img PARAMS.json OUT.png
    sdcn_run.py img2img PARAMS.json INIT.png OUT.png

PARAMS.json holds the SDCN parameters (see params-txt2img.json); for img2img the init image
is read from INIT.png. Every returned image is written: OUT.png, OUT-1.png, ... The gateway is
--gateway URL, else $SDCN_GATEWAY, else http://127.0.0.1:8080.

The job is submitted to the gateway's async API (POST /v1/jobs) and followed over its event
stream: on a terminal, a progress bar on stderr shows the place in the queue, then the steps,
the ETA and the provider; otherwise progress is printed as plain lines. Ctrl-C cancels the job
on the gateway and exits with status 130. --sync sends it to POST /txt2img or /img2img and
waits for the answer instead. On failure the gateway's message is printed and the exit status
is 1. Standard library only: copy it anywhere.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

DEFAULT_GATEWAY = "http://127.0.0.1:8080"
#: Seconds without a byte from the event stream before it is opened again (the gateway sends
#: a keep-alive at least every 15 s).
STREAM_IDLE = 60.0
#: Times a broken event stream is opened again before giving up.
RECONNECTS = 5
BAR = 24


class Failed(Exception):
    """The job did not give images; str() says why, as the gateway did."""


def output_paths(out: Path, count: int) -> list[Path]:
    """OUT.png, OUT-1.png, OUT-2.png, ... for `count` images."""
    return [out] + [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(1, count)]


def call(
    method: str,
    url: str,
    body: dict | None = None,
    *,
    timeout: float,
    headers: dict[str, str] | None = None,
) -> Any:
    """Send a request; return the open response (the caller reads and closes it).

    Raises Failed with the gateway's status and msg for an error answer.
    """
    request = urllib.request.Request(
        url,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
        method=method,
    )
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        try:
            message = json.load(exc).get("msg", exc.reason)
        except (ValueError, AttributeError):
            message = exc.reason
        raise Failed(f"{exc.code}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise Failed(f"cannot reach the gateway at {url.split('/v1/')[0]}: {reason}") from None


def run_sync(kind: str, params: dict, gateway: str, timeout: float) -> dict:
    """POST the job to /txt2img or /img2img; return the gateway's JSON answer."""
    with call("POST", f"{gateway}/{kind}", params, timeout=timeout) as response:
        return json.load(response)


class Progress:
    """Progress on stderr: a bar redrawn in place on a terminal, plain lines otherwise."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.provider = ""
        self._drawn = 0
        self._printed_at = 0.0
        self._last = ""

    def event(self, name: str, data: dict) -> None:
        eta = data.get("eta_s")
        eta_text = f", eta {eta:.0f}s" if isinstance(eta, int | float) else ""
        if name == "queued":
            position = data.get("position") or 0
            self.show(f"queued: {position} ahead{eta_text}" if position else f"queued{eta_text}")
        elif name == "assigned":
            self.provider = "…" + str(data.get("provider", ""))[-8:]
            retry = f" (attempt {data['attempt']})" if data.get("attempt", 1) > 1 else ""
            self.show(f"running on {self.provider}{retry}")
        elif name == "progress":
            step, total = data.get("step", 0), max(data.get("total", 1), 1)
            if self.tty:
                filled = BAR * step // total
                bar = "#" * filled + "-" * (BAR - filled)
                self.show(f"[{bar}] {step}/{total}{eta_text.replace(',', '')} on {self.provider}")
            else:
                self.show(f"step {step}/{total}{eta_text}", every=1.0, final=step == total)

    def show(self, text: str, *, every: float = 0.0, final: bool = False) -> None:
        if self.tty:
            padding = " " * max(self._drawn - len(text), 0)
            self.stream.write("\r" + text + padding)
            self._drawn = len(text)
        else:  # a line per change, progress at most every `every` seconds
            now = time.monotonic()
            if text == self._last or (not final and now - self._printed_at < every):
                return
            self.stream.write(text + "\n")
            self._printed_at, self._last = now, text
        self.stream.flush()

    def end(self) -> None:
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = 0


def follow(url: str, job_id: str, progress: Progress, deadline: float) -> dict:
    """Read the job's events until its end; return the ``done`` event's data.

    A dropped stream is opened again with Last-Event-ID. Raises Failed for a failed or
    cancelled job, a gateway that cannot be reached, or `deadline` (time.monotonic()) passing.
    """
    last_id: str | None = None
    broken = 0
    while True:
        headers = {"Accept": "text/event-stream"}
        if last_id is not None:
            headers["Last-Event-ID"] = last_id
        try:
            response = call("GET", f"{url}/events", timeout=STREAM_IDLE, headers=headers)
        except Failed:
            broken += 1
            if broken > RECONNECTS or time.monotonic() > deadline:
                raise
            time.sleep(min(2**broken, 10))
            continue
        with response:
            if response.status == 204:  # the end came and went: ask for the job itself
                return status_as_event(url)
            try:
                for event_id, name, data in events(response):
                    last_id, broken = event_id or last_id, 0
                    if name == "done":
                        return data
                    if name == "failed":
                        raise Failed(f"{data.get('status')}: {data.get('msg')}")
                    if name == "cancelled":
                        raise Failed(f"job {job_id} was cancelled")
                    if name is not None:
                        progress.event(name, data)
                    if time.monotonic() > deadline:
                        raise TimeoutError
            except (OSError, ValueError, http.client.HTTPException) as exc:
                if isinstance(exc, TimeoutError) and time.monotonic() > deadline:
                    raise
                broken += 1  # the stream broke: open it again where it stopped
                if broken > RECONNECTS:
                    raise Failed(f"the event stream keeps breaking: {exc}") from None
                continue
        broken += 1  # it ended without a terminal event
        if broken > RECONNECTS:
            return status_as_event(url)


def events(response: Any) -> Any:
    """(id, name, data) of each server-sent event, and (None, None, None) for a keep-alive."""
    fields: dict[str, str] = {}
    for raw in response:
        line = raw.decode("utf-8").rstrip("\r\n")
        if line.startswith(":"):
            yield None, None, None
        elif line:
            key, _, value = line.partition(":")
            fields[key] = value.removeprefix(" ")
        elif "event" in fields:
            yield fields.get("id"), fields["event"], json.loads(fields.get("data") or "{}")
            fields = {}
        else:
            fields = {}


def status_as_event(url: str) -> dict:
    """The job's state as a ``done`` event's data; Failed unless it is done."""
    with call("GET", url, timeout=60) as response:
        state = json.load(response)
    if state.get("status") == "done":
        return state
    error = state.get("error") or {}
    raise Failed(f"{error.get('status', state.get('status'))}: {error.get('msg', 'no images')}")


def run_async(kind: str, params: dict, gateway: str, timeout: float, progress: Progress) -> dict:
    """Submit the job to /v1/jobs and follow it to its end; return ``{"images", "info"}``.

    Ctrl-C (KeyboardInterrupt) cancels the job on the gateway before it propagates.
    """
    deadline = time.monotonic() + timeout
    with call("POST", f"{gateway}/v1/jobs", {"kind": kind, **params}, timeout=60) as response:
        accepted = json.load(response)
    url = gateway + accepted["urls"]["self"]
    if not progress.tty:
        progress.stream.write(f"job {accepted['id']} queued\n")
    try:
        return follow(url, accepted["id"], progress, deadline)
    except (KeyboardInterrupt, TimeoutError):
        cancel(url)
        raise
    finally:
        progress.end()


def cancel(url: str) -> None:
    """DELETE the job; a gateway that cannot be reached is not worth waiting for."""
    try:
        with call("DELETE", url, timeout=10):
            pass
    except Failed as exc:
        print(f"sdcn_run: could not cancel the job: {exc}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Send one SDCN job to a gateway.")
    parser.add_argument("kind", choices=("txt2img", "img2img"))
    parser.add_argument("params", type=Path, help="JSON file of SDCN parameters")
    parser.add_argument("files", type=Path, nargs="+", help="[INIT.png] OUT.png")
    parser.add_argument("--gateway", default=os.environ.get("SDCN_GATEWAY", DEFAULT_GATEWAY))
    parser.add_argument("--timeout", type=float, default=600, help="seconds (default 600)")
    parser.add_argument(
        "--sync", action="store_true", help="use POST /txt2img or /img2img and wait for it"
    )
    args = parser.parse_args(argv)
    wanted = 2 if args.kind == "img2img" else 1
    if len(args.files) != wanted:
        parser.error("img2img takes INIT.png OUT.png" if wanted == 2 else "txt2img takes OUT.png")
    try:
        params = json.loads(args.params.read_text())
        if args.kind == "img2img":
            params["init_image"] = base64.b64encode(args.files[0].read_bytes()).decode()
    except (OSError, ValueError) as exc:
        print(f"sdcn_run: {exc}", file=sys.stderr)
        return 1
    gateway = args.gateway.rstrip("/")
    try:
        if args.sync:
            answer = run_sync(args.kind, params, gateway, args.timeout)
        else:
            answer = run_async(args.kind, params, gateway, args.timeout, Progress(sys.stderr))
    except Failed as exc:
        print(f"sdcn_run: {exc}", file=sys.stderr)
        return 1
    except TimeoutError:
        print(f"sdcn_run: no images within {args.timeout:g} s; cancelled", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sdcn_run: cancelled", file=sys.stderr)
        return 130
    images = answer.get("images") or []
    for path, image in zip(output_paths(args.files[-1], len(images)), images, strict=True):
        path.write_bytes(base64.b64decode(image))
        print(path)
    info = answer.get("info", {})
    print(
        f"seed {info.get('seed')}, model {info.get('model')}, provider {info.get('provider')}, "
        f"{info.get('run_ms')} ms",
        file=sys.stderr,
    )
    return 0 if images else 1


if __name__ == "__main__":
    raise SystemExit(main())
