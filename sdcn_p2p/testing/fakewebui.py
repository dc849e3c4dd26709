"""A fake AUTOMATIC1111 webui: its HTTP API's shapes and quirks, drawing test cards.

For the webui backend's tests, the provider's, and the overhead benchmark. It serves
``/sdapi/v1/``: sd-models, loras, samplers, schedulers (absent when `schedulers` is None, like
a webui older than 1.9), memory, progress, interrupt, txt2img and img2img, with optional HTTP
Basic auth (``--api-auth``). Like the real one it runs one job at a time, answers errors as
``{"error", "detail", "body", "errors"}``, returns `info` as a JSON *string*, and silently:

- runs its first model when ``override_settings.sd_model_checkpoint`` names none of its own;
- runs its first sampler when `sampler_name` is not one of its own;
- ignores a ``<lora:name:weight>`` tag for a LoRA it does not have.

A job's steps take `step_time` seconds each (trio time), or wait for `advance()` when it is
None; ``/interrupt`` ends the running job early. With `png` set, every image is those bytes
(`noise_png` makes a realistic one) instead of a drawn card: an instant backend for
benchmarks. Tests arrange failures with `inject()` and stop the server to make the webui
disappear.
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import io
import json
import random
import re
import secrets
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any

import trio
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from PIL import Image

from sdcn_p2p._util import open_service_nursery
from sdcn_p2p.backends.testcard import SAMPLERS, render_card
from sdcn_p2p.httpserver import serve_http

__all__ = ["SCHEDULERS", "FakeWebui", "create_app", "noise_png", "open_fake_webui"]

#: AUTOMATIC1111's schedulers (1.10): (name, label).
SCHEDULERS = (
    ("automatic", "Automatic"),
    ("uniform", "Uniform"),
    ("karras", "Karras"),
    ("exponential", "Exponential"),
    ("polyexponential", "Polyexponential"),
    ("sgm_uniform", "SGM Uniform"),
    ("kl_optimal", "KL Optimal"),
    ("align_your_steps", "Align Your Steps"),
    ("simple", "Simple"),
    ("normal", "Normal"),
    ("ddim", "DDIM"),
    ("beta", "Beta"),
)
_LORA_TAG = re.compile(r"<lora:([^:>]+):([^:>]+)>")
_API = "/sdapi/v1"
_GIB = 2**30
_BASIC = HTTPBasic(auto_error=False)


class FakeWebui:
    """The state of a fake webui: what it offers (change it at will), what it was sent.

    `vram_mb` is (total, free) MiB, or None for a webui without CUDA. `requests` holds
    ``(path, JSON body or None)`` of the latest 64 requests that passed auth, progress polls
    left out.
    """

    def __init__(
        self,
        *,
        models: Sequence[str] = ("sd-v1-5",),
        loras: Sequence[str] = (),
        samplers: Sequence[str] = SAMPLERS,
        schedulers: Sequence[tuple[str, str]] | None = SCHEDULERS,
        vram_mb: tuple[int, int] | None = (8192, 6144),
        auth: tuple[str, str] | None = None,
        step_time: float | None = 0.0,
        interrupt_no_content: bool = False,
        png: bytes | None = None,
    ) -> None:
        self.models = list(models)
        self.loras = list(loras)
        self.samplers = list(samplers)
        self.schedulers = None if schedulers is None else list(schedulers)
        self.vram_mb = vram_mb
        self.auth = auth
        self.step_time = step_time
        #: Answer /interrupt with 204 and no body, as SD.Next does.
        self.interrupt_no_content = interrupt_no_content
        #: PNG bytes every image of every job is, instead of a drawn card (None: draw).
        self.png = png
        self.requests: collections.deque[tuple[str, Any]] = collections.deque(maxlen=64)
        self.interrupts = 0
        self.jobs_done = 0
        self._injected: dict[str, collections.deque[tuple[int, Any]]] = {}
        self._lock = trio.Lock()
        self._running = False
        self._started = trio.Event()
        self._job_scope: trio.CancelScope | None = None
        self._step = 0
        self._steps = 0
        self._credits = 0
        self._advanced = trio.Event()

    @property
    def last_payload(self) -> dict[str, Any] | None:
        """The body of the latest txt2img or img2img request, if any."""
        for path, body in reversed(self.requests):
            if path in (f"{_API}/txt2img", f"{_API}/img2img"):
                return body
        return None

    def inject(self, path: str, status: int, body: Any) -> None:
        """Answer the next request to `path` with `status` and `body` instead (bytes are sent
        as they are, anything else as JSON)."""
        self._injected.setdefault(path, collections.deque()).append((status, body))

    def advance(self, steps: int = 1) -> None:
        """Let jobs take `steps` more steps (when `step_time` is None)."""
        self._credits += steps
        self._advanced.set()
        self._advanced = trio.Event()

    async def wait_job_started(self) -> None:
        """Return once a job is running (at once if one is)."""
        while not self._running:
            await self._started.wait()

    # --- the webui's behaviour ---------------------------------------------------------------

    def sd_models(self) -> list[dict[str, Any]]:
        """The entries of ``/sdapi/v1/sd-models``: title, model_name, hash, sha256, ..."""
        entries = []
        for name in self.models:
            sha256 = hashlib.sha256(name.encode()).hexdigest()
            entries.append(
                {
                    "title": f"{name}.safetensors [{sha256[:10]}]",
                    "model_name": name,
                    "hash": sha256[:10],
                    "sha256": sha256,
                    "filename": f"/webui/models/Stable-diffusion/{name}.safetensors",
                    "config": None,
                }
            )
        return entries

    def _checkpoint(self, wanted: object) -> dict[str, Any]:
        entries = self.sd_models()
        for entry in entries:
            if wanted in (entry["title"], entry["model_name"], entry["hash"], entry["sha256"]):
                return entry
        return entries[0]  # the quirk: an unknown checkpoint runs the default one

    def _sampler(self, name: object, scheduler: object) -> tuple[str, str | None]:
        if not isinstance(name, str):
            name = self.samplers[0]
        if self.schedulers is None:
            return (name if name in self.samplers else self.samplers[0]), None
        found = next((s for s in self.schedulers if scheduler in s), self.schedulers[0])
        for entry in self.schedulers:
            if name.endswith(" " + entry[1]):
                name, found = name.removesuffix(" " + entry[1]), entry
                break
        return (name if name in self.samplers else self.samplers[0]), found[1]

    async def _next_step(self) -> None:
        if self.step_time is not None:
            await trio.sleep(self.step_time)
            return
        while self._credits == 0:
            await self._advanced.wait()
        self._credits -= 1

    async def _generate(self, kind: str, payload: Any) -> Response:
        if not isinstance(payload, dict):
            return _error(422, "ValidationError", "the body must be a JSON object")
        try:
            prompt = _get(payload, "prompt", str, "")
            seed = _get(payload, "seed", int, -1)
            steps = _get(payload, "steps", int, 50)
            width = _get(payload, "width", int, 512)
            height = _get(payload, "height", int, 512)
            batch_size = _get(payload, "batch_size", int, 1)
            n_iter = _get(payload, "n_iter", int, 1)
            cfg_scale = float(_get(payload, "cfg_scale", (int, float), 7.0))
            negative = _get(payload, "negative_prompt", str, "")
            denoising = float(_get(payload, "denoising_strength", (int, float), 0.75))
            overrides = _get(payload, "override_settings", dict, {})
        except TypeError as exc:
            return _error(422, "ValidationError", str(exc))
        if not (1 <= steps <= 150 and 8 <= width <= 2048 and 8 <= height <= 2048):
            return _error(422, "ValidationError", "steps, width or height out of range")
        init = None
        if kind == "img2img":
            images = payload.get("init_images")
            if not images or not isinstance(images, list) or not isinstance(images[0], str):
                return _error(404, "HTTPException", "Init image not found")
            try:
                init = base64.b64decode(images[0].split(",", 1)[-1], validate=True)
            except (binascii.Error, ValueError):
                return _error(500, "HTTPException", "Invalid encoded image")
        model = self._checkpoint(overrides.get("sd_model_checkpoint"))
        sampler, scheduler = self._sampler(payload.get("sampler_name"), payload.get("scheduler"))
        applied = [(n, w) for n, w in _LORA_TAG.findall(prompt) if n in self.loras]
        if seed == -1:
            seed = secrets.randbelow(2**32)
        seeds = [seed + i for i in range(batch_size * n_iter)]

        async with self._lock:
            self._running, self._step, self._steps = True, 0, steps
            self._started.set()
            self._started = trio.Event()
            try:
                with trio.CancelScope() as self._job_scope:
                    for step in range(1, steps + 1):
                        await self._next_step()
                        self._step = step
            finally:
                self._running, self._job_scope = False, None
            params = {
                "model": model["model_name"],
                "sampler": sampler if scheduler is None else f"{sampler} / {scheduler}",
                "steps": steps,
                "cfg": cfg_scale,
                "loras": ", ".join(f"{n}:{w}" for n, w in applied) or "none",
                "prompt": _LORA_TAG.sub("", prompt).strip(),
                "negative": negative,
            }
            try:
                if self.png is not None:
                    pngs = [self.png] * len(seeds)
                else:
                    pngs = await trio.to_thread.run_sync(
                        _render, params, seeds, width, height, init, denoising
                    )
            except (OSError, SyntaxError, ValueError) as exc:
                return _error(500, type(exc).__name__, f"cannot open the init image: {exc}")
            self.jobs_done += 1
        info = {
            "prompt": prompt,
            "all_prompts": [prompt] * len(seeds),
            "negative_prompt": negative,
            "seed": seeds[0],
            "all_seeds": seeds,
            "subseed": 0,
            "width": width,
            "height": height,
            "sampler_name": sampler,
            "cfg_scale": cfg_scale,
            "steps": steps,
            "batch_size": batch_size,
            "sd_model_name": model["model_name"],
            "sd_model_hash": model["hash"],
            "version": "v1.10.1-fake",
        }
        if scheduler is not None:
            info["scheduler"] = scheduler
        if kind == "img2img":
            info["denoising_strength"] = denoising
        parameters = {k: v for k, v in payload.items() if k != "init_images"}
        return JSONResponse(
            {
                "images": [base64.b64encode(png).decode() for png in pngs],
                "parameters": parameters,
                "info": json.dumps(info),
            }
        )

    def _progress(self) -> dict[str, Any]:
        # Idle, the real webui reports job_count 0 and the last job's stale step counts.
        done = self._step / self._steps if self._running and self._steps else 0.0
        return {
            "progress": done,
            "eta_relative": 0.0,
            "state": {
                "skipped": False,
                "interrupted": False,
                "stopping_generation": False,
                "job": "txt2img" if self._running else "",
                "job_count": 1 if self._running else 0,
                "job_timestamp": "20240101000000",
                "job_no": 0,
                "sampling_step": self._step,
                "sampling_steps": self._steps,
            },
            "current_image": None,
            "textinfo": None,
        }

    def _interrupt(self) -> Response:
        self.interrupts += 1
        if self._job_scope is not None:
            self._job_scope.cancel()
        return Response(status_code=204) if self.interrupt_no_content else JSONResponse({})

    def _memory(self) -> dict[str, Any]:
        ram = {"free": 16 * _GIB, "used": 16 * _GIB, "total": 32 * _GIB}
        if self.vram_mb is None:
            return {"ram": ram, "cuda": {"error": "Torch not compiled with CUDA enabled"}}
        total, free = (mb * 2**20 for mb in self.vram_mb)
        system = {"free": free, "used": total - free, "total": total}
        return {"ram": ram, "cuda": {"system": system, "events": {"retries": 0, "oom": 0}}}


def noise_png(width: int = 512, height: int = 512, *, levels: int = 16, seed: int = 0) -> bytes:
    """An RGB PNG of random noise with `levels` values per channel: it compresses about as
    well as a generated picture (512x512 with 16 levels: ~400 KB). Same arguments, same bytes.
    """
    if not 2 <= levels <= 256:
        raise ValueError(f"levels must be from 2 to 256, not {levels}")
    step = 256 // levels
    quantize = bytes((value * levels >> 8) * step for value in range(256))
    data = random.Random(seed).randbytes(width * height * 3).translate(quantize)
    out = io.BytesIO()
    Image.frombytes("RGB", (width, height), data).save(out, "PNG")
    return out.getvalue()


def _get(payload: dict[str, Any], name: str, kind: Any, default: Any) -> Any:
    value = payload.get(name, default)
    if value is None:
        return default
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"{name}: wrong type {type(value).__name__}")
    return value


def _render(
    params: dict[str, Any],
    seeds: list[int],
    width: int,
    height: int,
    init: bytes | None,
    denoising: float,
) -> list[bytes]:
    return [
        render_card(
            {**params, "seed": seed},
            width,
            height,
            title="FAKE WEBUI",
            init_image=init,
            denoising_strength=denoising,
        )
        for seed in seeds
    ]


def _error(status: int, error: str, detail: str) -> JSONResponse:
    """An error as the webui's API middleware shapes it."""
    return JSONResponse(
        {"error": error, "detail": detail, "body": "", "errors": detail}, status_code=status
    )


class _Injected(Exception):
    def __init__(self, status: int, body: Any) -> None:
        self.status, self.body = status, body


class _Unauthorized(Exception):
    pass


def create_app(fake: FakeWebui) -> FastAPI:
    """The webui's ``/sdapi/v1`` API over `fake`."""

    async def check(
        request: Request, credentials: Annotated[HTTPBasicCredentials | None, Depends(_BASIC)]
    ) -> None:
        if fake.auth is not None:
            given = (credentials.username, credentials.password) if credentials else None
            if given is None or not all(
                secrets.compare_digest(a.encode(), b.encode())
                for a, b in zip(given, fake.auth, strict=True)
            ):
                raise _Unauthorized()
        body = await request.body()
        try:
            payload = json.loads(body) if body else None
        except ValueError:
            payload = body
        if request.url.path != f"{_API}/progress":  # polls would crowd out the rest
            fake.requests.append((request.url.path, payload))
        if queue := fake._injected.get(request.url.path):
            raise _Injected(*queue.popleft())

    app = FastAPI(title="fake AUTOMATIC1111 webui", dependencies=[Depends(check)])

    @app.exception_handler(_Injected)
    async def injected(request: Request, exc: _Injected) -> Response:
        if isinstance(exc.body, bytes):
            return Response(exc.body, status_code=exc.status, media_type="text/html")
        return JSONResponse(exc.body, status_code=exc.status)

    @app.exception_handler(_Unauthorized)
    async def unauthorized(request: Request, exc: _Unauthorized) -> Response:
        return JSONResponse(
            {"detail": "Incorrect username or password"},
            status_code=401,
            headers={"WWW-Authenticate": "Basic"},
        )

    @app.get(f"{_API}/sd-models")
    async def sd_models() -> list[dict[str, Any]]:
        return fake.sd_models()

    @app.get(f"{_API}/loras")
    async def loras() -> list[dict[str, Any]]:
        return [
            {"name": n, "alias": n, "path": f"/webui/models/Lora/{n}.safetensors", "metadata": {}}
            for n in fake.loras
        ]

    @app.get(f"{_API}/samplers")
    async def samplers() -> list[dict[str, Any]]:
        return [{"name": n, "aliases": [n.lower()], "options": {}} for n in fake.samplers]

    @app.get(f"{_API}/schedulers")
    async def schedulers() -> Response:
        if fake.schedulers is None:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        return JSONResponse(
            [
                {"name": n, "label": label, "aliases": None, "default_rho": -1.0}
                for n, label in fake.schedulers
            ]
        )

    @app.get(f"{_API}/memory")
    async def memory() -> dict[str, Any]:
        return fake._memory()

    @app.get(f"{_API}/progress")
    async def progress() -> dict[str, Any]:
        return fake._progress()

    @app.post(f"{_API}/interrupt")
    async def interrupt() -> Response:
        return fake._interrupt()

    @app.post(f"{_API}/txt2img")
    async def txt2img(request: Request) -> Response:
        return await fake._generate("txt2img", _json_or_none(await request.body()))

    @app.post(f"{_API}/img2img")
    async def img2img(request: Request) -> Response:
        return await fake._generate("img2img", _json_or_none(await request.body()))

    return app


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


@asynccontextmanager
async def open_fake_webui(fake: FakeWebui, bind: str = "127.0.0.1:0") -> AsyncIterator[str]:
    """Serve `fake` over HTTP on `bind` and yield its URL (``http://127.0.0.1:PORT``).

    Leaving the block stops the server (the webui "goes away"); serving the same `fake` again
    on the same port brings it back with its state.
    """
    async with open_service_nursery() as nursery:
        urls = await nursery.start(serve_http, create_app(fake), bind)
        try:
            yield urls[0]
        finally:
            nursery.cancel_scope.cancel()
