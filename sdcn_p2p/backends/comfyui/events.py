"""Following a job's prompts over ComfyUI's websocket, ``/ws?clientId=``.

ComfyUI sends execution events only to the websocket of the prompt's client id, so each job
opens one with a client id of its own (`open_events`). Progress comes from its ``progress``
messages; a prompt has ended when ComfyUI says ``executing`` with node null (`Tracker`, pure:
messages in, state out). Where the websocket says nothing (it broke, a proxy refused it, or an
old ComfyUI), `Events.closed` tells the backend to poll ``/history`` instead.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import trio
import trio_websocket

from sdcn_p2p._util import open_service_nursery
from sdcn_p2p.backends.comfyui.parse import ComfyError
from sdcn_p2p.backends.comfyui.workflow import SAMPLER_NODE

__all__ = ["Events", "Tracker", "open_events"]

log = logging.getLogger(__name__)

# Seconds to wait for ComfyUI's answer to our websocket close.
_WS_CLOSE_TIMEOUT = 1.0


class Tracker:
    """What ComfyUI's websocket says of one job's prompts; pure: messages in, state out.

    Reports progress over the whole job, image after image: step ``i * steps + s`` of
    ``batch * steps`` while image i is at step s, never going back.
    """

    def __init__(self, steps: int, batch: int, progress: Callable[[int, int], None]) -> None:
        self._steps = steps
        self._total = steps * batch
        self._progress = progress
        self._reported = 0
        self._running: str | None = None
        self._ended: set[str] = set()
        #: ``execution_error`` messages by prompt id, in case the history lacks them.
        self.errors: dict[str, dict[str, Any]] = {}

    def has_ended(self, prompt_id: str) -> bool:
        """Whether ComfyUI has said `prompt_id` ended (its history is written by then)."""
        return prompt_id in self._ended

    def ended(self, prompt_id: str) -> None:
        """Count `prompt_id`'s image as done, whatever the websocket said."""
        self._ended.add(prompt_id)
        self._report(len(self._ended) * self._steps)

    def feed(self, message: Any) -> bool:
        """Take one JSON message; return whether it told something about our prompts."""
        if not isinstance(message, dict) or not isinstance(data := message.get("data"), dict):
            return False
        kind = message.get("type")
        prompt_id = data.get("prompt_id")
        if not isinstance(prompt_id, str):
            prompt_id = self._running  # ComfyUI before 2024 sent progress without it
        if prompt_id is None:
            return False
        if kind == "execution_start":
            self._running = prompt_id
        elif kind == "executing" and data.get("node") is None:
            self._running = None
            self._ended.add(prompt_id)
        elif kind == "progress" and data.get("node") in (SAMPLER_NODE, None):
            value, most = data.get("value"), data.get("max")
            if type(value) is int and type(most) is int and 0 < value <= most:
                done = len(self._ended - {prompt_id}) * self._steps
                self._report(done + value * self._steps // most)
        elif kind == "execution_error":
            self.errors[prompt_id] = data
        else:
            return kind in ("execution_success", "execution_interrupted")
        return True

    def _report(self, step: int) -> None:
        step = min(step, self._total)
        if step > self._reported:
            self._reported = step
            self._progress(step, self._total)


class Events:
    """A job's websocket: a reader task feeds the `Tracker`; waiters learn of each change."""

    def __init__(self, client_id: str, tracker: Tracker) -> None:
        self.client_id = client_id
        self.tracker = tracker
        #: ComfyUI's first message (``status``) has come: it knows our client id.
        self.ready = False
        #: The websocket is gone: only /history can tell now.
        self.closed = False
        self._changed = trio.Event()

    async def wait_ready(self) -> None:
        while not self.ready and not self.closed:
            await self.wait_changed()

    async def wait_changed(self) -> None:
        await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def read(self, ws: trio_websocket.WebSocketConnection) -> None:
        try:
            while True:
                message = await ws.get_message()
                if isinstance(message, bytes):
                    continue  # a preview image
                try:
                    data = json.loads(message)
                except ValueError:
                    log.debug("ComfyUI sent a websocket message that is not JSON")
                    continue
                if not self.ready and isinstance(data, dict) and data.get("type") == "status":
                    self.ready = True
                    self._notify()
                elif self.tracker.feed(data):
                    self._notify()
        except trio_websocket.ConnectionClosed as exc:
            log.info("ComfyUI's websocket closed (%s); polling /history", exc.reason)
            self.closed = True
            self._notify()


@asynccontextmanager
async def open_events(
    base_url: httpx.URL,
    tracker: Tracker,
    *,
    headers: Iterable[tuple[bytes, bytes]],
    open_timeout: float,
    max_message_size: int,
) -> AsyncIterator[Events]:
    """The websocket of the ComfyUI at `base_url`, with a client id of its own, feeding
    `tracker`; `headers` (credentials) are sent when opening it, within `open_timeout` seconds.

    Without a websocket (a proxy that refuses it) the job goes on, following /history: the
    events yielded are closed. Raises ComfyError if ComfyUI cannot be reached, or its
    websocket sends no status within `open_timeout`.
    """
    events = Events(uuid.uuid4().hex, tracker)
    stream = await _connect(base_url, open_timeout)
    try:
        async with open_service_nursery() as nursery:
            try:
                with trio.fail_after(open_timeout):
                    ws = await nursery.start(
                        _follow, base_url, stream, events, list(headers), max_message_size
                    )
            except (trio_websocket.HandshakeError, trio.TooSlowError) as exc:
                log.warning(
                    "no websocket from ComfyUI at %s (%s): following /history",
                    str(base_url).rstrip("/"),
                    _handshake_error(exc),
                )
                events.closed = True
                yield events
                return
            with trio.move_on_after(open_timeout):
                await events.wait_ready()
            if not events.ready:
                raise ComfyError("its websocket sent no status")
            yield events
            with trio.move_on_after(_WS_CLOSE_TIMEOUT):
                await ws.aclose()
            nursery.cancel_scope.cancel()
    finally:
        # Ours to close: trio-websocket leaves the stream open when the peer went away.
        await stream.aclose()


async def _connect(
    base: httpx.URL, open_timeout: float
) -> trio.SocketStream | trio.SSLStream[trio.SocketStream]:
    """A TCP (or TLS) connection to ComfyUI, for its websocket."""
    host, port = base.host, base.port or (443 if base.scheme == "https" else 80)
    try:
        with trio.fail_after(open_timeout):
            if base.scheme == "https":
                return await trio.open_ssl_over_tcp_stream(host, port, https_compatible=True)
            return await trio.open_tcp_stream(host, port)
    except (OSError, trio.TooSlowError) as exc:
        raise ComfyError(f"cannot reach it: {exc or type(exc).__name__}") from exc


async def _follow(
    base: httpx.URL,
    stream: trio.SocketStream | trio.SSLStream[trio.SocketStream],
    events: Events,
    headers: list[tuple[bytes, bytes]],
    max_message_size: int,
    *,
    task_status: trio.TaskStatus[trio_websocket.WebSocketConnection],
) -> None:
    """Open ``/ws?clientId=`` over `stream` and feed `events` until it closes.

    Raises HandshakeError (through `task_status`) if ComfyUI or a proxy refuses it.
    """
    prefix = base.raw_path.decode().split("?")[0].rstrip("/")
    async with open_service_nursery() as nursery:
        ws = await trio_websocket.wrap_client_stream(
            nursery,
            stream,
            base.host,
            f"{prefix}/ws?clientId={events.client_id}",
            extra_headers=headers,
            max_message_size=max_message_size,
        )
        task_status.started(ws)
        await events.read(ws)


def _handshake_error(exc: Exception) -> str:
    if isinstance(exc, trio_websocket.ConnectionRejected):
        hint = " (check --comfyui-auth)" if exc.status_code in (401, 403) else ""
        return f"HTTP {exc.status_code}{hint}"
    cause = exc.__cause__ or exc.__context__
    return str(cause or exc) or type(cause or exc).__name__
