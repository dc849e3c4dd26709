"""The fake ComfyUI's HTTP and WebSocket API: a FastAPI app over a `FakeComfyui`, served.

The routes carry each call to the fake and its answer back, as ComfyUI's aiohttp server would
(its status codes and bodies, the bad JSON that makes ``POST /prompt`` a 500); a middleware
checks the optional HTTP Basic or bearer auth of a proxy in front of ComfyUI, records each
request and answers what a test `FakeComfyui.inject`-ed.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import json
import secrets
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response

from sdcn_p2p._util import open_service_nursery
from sdcn_p2p.httpserver import serve_http
from sdcn_p2p.testing.fakecomfyui.fake import FakeComfyui

__all__ = ["create_app", "open_fake_comfyui"]


def _authorized(fake: FakeComfyui, header: str | None) -> bool:
    if fake.auth is None:
        return True
    if isinstance(fake.auth, tuple):
        expected = "Basic " + base64.b64encode(":".join(fake.auth).encode()).decode()
    else:
        expected = f"Bearer {fake.auth}"
    return header is not None and secrets.compare_digest(header.encode(), expected.encode())


def _parse_form(content_type: str, body: bytes) -> tuple[dict[str, str], tuple[str, bytes] | None]:
    """The text fields and the ``image`` file of a multipart/form-data body."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    fields: dict[str, str] = {}
    image = None
    if not message.is_multipart():
        return fields, None
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True) or b""
        if name == "image":
            image = (part.get_filename() or "", payload)
        elif isinstance(name, str):
            fields[name] = payload.decode(errors="replace")
    return fields, image


def create_app(fake: FakeComfyui) -> FastAPI:
    """ComfyUI's API over `fake`."""

    app = FastAPI(title="fake ComfyUI")

    @app.middleware("http")
    async def check(request: Request, call_next: Any) -> Response:
        if not _authorized(fake, request.headers.get("authorization")):
            return Response(b"<html>401 Authorization Required</html>", 401, media_type="text/html")
        body = await request.body()
        try:
            payload = json.loads(body) if body else None
        except ValueError:
            payload = None
        fake.requests.append((f"{request.method} {request.url.path}", payload))
        injected = fake.take_injected(request.url.path)
        if injected is not None:
            status, answer = injected
            if isinstance(answer, bytes):
                return Response(answer, status_code=status, media_type="text/html")
            return JSONResponse(answer, status_code=status)
        return await call_next(request)

    @app.get("/object_info/{node}")
    async def object_info(node: str) -> dict[str, Any]:
        return fake.object_info(node)

    @app.get("/system_stats")
    async def system_stats() -> dict[str, Any]:
        return fake.system_stats()

    @app.get("/prompt")
    async def get_prompt() -> dict[str, Any]:
        return fake.queue_info()

    @app.post("/prompt")
    async def post_prompt(request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError:
            return Response(status_code=500)  # aiohttp's request.json() raises
        status, answer = fake.post_prompt(body)
        return JSONResponse(answer, status_code=status)

    @app.get("/queue")
    async def get_queue() -> dict[str, Any]:
        return fake.get_queue()

    @app.post("/queue")
    async def post_queue(request: Request) -> Response:
        fake.post_queue(json.loads(await request.body() or b"{}"))
        return Response(status_code=200)

    @app.post("/interrupt")
    async def interrupt(request: Request) -> Response:
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError:
            body = {}
        fake.post_interrupt(body)
        return Response(status_code=200)

    @app.get("/history/{prompt_id}")
    async def history(prompt_id: str) -> dict[str, Any]:
        entry = fake.history(prompt_id)
        return {} if entry is None else {prompt_id: entry}

    @app.get("/view")
    async def view(request: Request) -> Response:
        status, data = fake.view(dict(request.query_params))
        if data is None:
            return Response(status_code=status)
        return Response(data, media_type="image/png")

    @app.post("/upload/image")
    async def upload(request: Request) -> Response:
        fields, image = _parse_form(request.headers.get("content-type", ""), await request.body())
        status, answer = fake.upload(fields, image)
        if answer is None:
            return Response(status_code=status)
        return JSONResponse(answer)

    @app.websocket("/ws")
    async def websocket(ws: WebSocket) -> None:
        if not fake.accept_websockets or not _authorized(fake, ws.headers.get("authorization")):
            await ws.close(code=1008)
            return
        await ws.accept()
        sid = ws.query_params.get("clientId") or uuid.uuid4().hex
        send, receive = fake.connect(sid)

        async def pump() -> None:
            async with receive:
                async for kind, payload in receive:
                    if kind == "json":
                        await ws.send_text(json.dumps(payload))
                    else:
                        await ws.send_bytes(payload)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump)
                while (await ws.receive())["type"] != "websocket.disconnect":
                    pass  # ComfyUI reads feature flags here; the fake ignores them
                nursery.cancel_scope.cancel()
        finally:
            fake.disconnect(sid, send)

    return app


@asynccontextmanager
async def open_fake_comfyui(fake: FakeComfyui, bind: str = "127.0.0.1:0") -> AsyncIterator[str]:
    """Serve `fake` over HTTP on `bind` and yield its URL (``http://127.0.0.1:PORT``).

    Leaving the block stops the server and its prompt worker (ComfyUI "goes away": a running
    prompt is lost); serving the same `fake` again on the same port brings it back with its
    queue (call `forget()` first for a restarted ComfyUI).
    """
    async with open_service_nursery() as nursery:
        urls = await nursery.start(serve_http, create_app(fake), bind)
        nursery.start_soon(fake.run_queue)
        try:
            yield urls[0]
        finally:
            nursery.cancel_scope.cancel()
