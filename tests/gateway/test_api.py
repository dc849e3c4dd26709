"""The gateway's HTTP API in-process (httpx's ASGI transport), against real providers.

The gateway and the test-card providers are Peers on the in-memory network. Real time, not
MockClock: decoding init images and encoding big responses runs in worker threads.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import trio
from fastapi import FastAPI
from PIL import Image

from gateway.api import MAX_BODY, create_app
from gateway.dispatch import DispatchResult
from gateway.errors import AllBusy, DeadlinePassed, DispatchError, ProviderFailed, Rejected
from gateway.node import Gateway, open_gateway
from gateway.trust import TrustConfig
from sdcn_p2p.backends import JobOutput
from sdcn_p2p.backends.testcard import TestcardBackend, TestcardConfig
from sdcn_p2p.jobs import JobRequest
from sdcn_p2p.peer import Peer
from sdcn_p2p.provider import Provider
from sdcn_p2p.testing import open_memory_providers

CARDS = (
    TestcardConfig(models=("card-a", "card-b"), loras=("pixel",)),
    TestcardConfig(models=("card-a",), loras=("ink",)),
)


class WatchedBackend(TestcardBackend):
    """A test card so slow that a job runs until cancelled; it says when one starts and ends."""

    def __init__(self) -> None:
        super().__init__(TestcardConfig(models=("card-slow",), speed=0.001))
        self.started = trio.Event()
        self.cancelled = trio.Event()

    async def generate(self, job: JobRequest, progress: Callable[[int, int], None]) -> JobOutput:
        self.started.set()
        try:
            return await super().generate(job, progress)
        except trio.Cancelled:
            self.cancelled.set()
            raise


@dataclass
class Net:
    http: httpx.AsyncClient
    app: FastAPI
    gateway: Gateway
    nodes: list[Peer]
    providers: list[Provider]


@asynccontextmanager
async def gateway_network(
    *backends: TestcardBackend,
    default_model: str | None = None,
    trust: TrustConfig | None = TrustConfig(),
) -> AsyncIterator[Net]:
    """Peer 0 is the gateway; one test-card provider per backend after it."""
    backends = backends or tuple(TestcardBackend(card) for card in CARDS)
    async with (
        open_memory_providers(backends) as (peer, nodes, providers),
        open_gateway(peer, default_model=default_model, trust=trust) as gateway,
    ):
        app = create_app(gateway)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
            yield Net(http, app, gateway, nodes, providers)


@pytest.fixture
async def net() -> AsyncIterator[Net]:
    async with gateway_network() as net:
        yield net


def png(width: int = 64, height: int = 64, colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, "PNG")
    return out.getvalue()


def b64png(width: int = 64, height: int = 64) -> str:
    return base64.b64encode(png(width, height)).decode()


def image_size(text: str) -> tuple[int, int]:
    data = base64.b64decode(text, validate=True)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    return Image.open(io.BytesIO(data)).size


def sdcn(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt": "a lighthouse",
        "negative_prompt": "",
        "model": "card-a",
        "seed": 11,
        "sampler_name": "Euler a",
        "steps": 5,
        "cfg_scale": 7,
        "width": 96,
        "height": 64,
    }
    body.update(fields)
    return body


def a1111(**fields: Any) -> dict[str, Any]:
    """What an A1111 client (the ``webuiapi`` package, with its defaults) sends."""
    body: dict[str, Any] = {
        "enable_hr": False,
        "hr_scale": 2,
        "hr_upscaler": "Latent",
        "hr_second_pass_steps": 0,
        "hr_resize_x": 0,
        "hr_resize_y": 0,
        "denoising_strength": 0.7,
        "firstphase_width": 0,
        "firstphase_height": 0,
        "prompt": "a lighthouse",
        "styles": [],
        "seed": 5,
        "subseed": -1,
        "subseed_strength": 0.0,
        "seed_resize_from_h": 0,
        "seed_resize_from_w": 0,
        "batch_size": 1,
        "n_iter": 1,
        "steps": 4,
        "cfg_scale": 7.0,
        "width": 64,
        "height": 64,
        "restore_faces": False,
        "tiling": False,
        "do_not_save_samples": False,
        "do_not_save_grid": False,
        "negative_prompt": "",
        "eta": 1.0,
        "s_churn": 0,
        "s_tmax": 0,
        "s_tmin": 0,
        "s_noise": 1,
        "override_settings": {"sd_model_checkpoint": "card-a (SDCN test card)"},
        "override_settings_restore_afterwards": True,
        "sampler_name": "Euler a",
        "sampler_index": "Euler a",
        "script_name": None,
        "script_args": [],
        "send_images": True,
        "save_images": False,
        "alwayson_scripts": {},
    }
    body.update(fields)
    return body


def assert_error(response: httpx.Response, status: int, *words: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["msg"] and isinstance(body["msg"], str)
    for word in words:
        assert word in body["msg"]
    return body["msg"]


# --- the SDCN API ------------------------------------------------------------------------------


async def test_txt2img_answers_png_images_of_the_requested_size(net: Net) -> None:
    response = await net.http.post("/txt2img", json=sdcn(batch_size=2, loras=[["pixel", 0.5]]))
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"images", "info"}
    assert [image_size(image) for image in body["images"]] == [(96, 64), (96, 64)]
    info = body["info"]
    assert info["seed"] == 11 and info["model"] == "card-a" and info["attempts"] == 1
    assert info["provider"] == str(net.nodes[0].peer_id)  # the only one with "pixel"
    assert {"queue_ms", "run_ms", "backend"} <= info.keys()


async def test_img2img_answers_png_images_of_the_requested_size(net: Net) -> None:
    body = sdcn(init_image="data:image/png;base64," + b64png(80, 80), denoising_strength=0.0)
    response = await net.http.post("/img2img", json=body)
    assert response.status_code == 200
    [image] = response.json()["images"]
    assert image_size(image) == (96, 64)
    picture = Image.open(io.BytesIO(base64.b64decode(image))).convert("RGB")
    assert picture.getpixel((48, 32)) == (200, 30, 30)  # strength 0 keeps the init image


async def test_seed_minus_one_gets_a_concrete_seed(net: Net) -> None:
    response = await net.http.post("/txt2img", json=sdcn(seed=-1))
    assert response.status_code == 200
    assert 0 <= response.json()["info"]["seed"] < 2**32


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("model", None),
        ("model", ""),
        ("prompt", 7),
        ("prompt", "p" * 8001),
        ("negative_prompt", ["no"]),
        ("loras", "pixel"),
        ("loras", [["pixel", 9.0]]),
        ("loras", [["pixel"]]),
        ("loras", [[f"l{i}", 1.0] for i in range(9)]),
        ("seed", -2),
        ("seed", 2**32),
        ("seed", "11"),
        ("sampler_name", ""),
        ("sampler_name", 3),
        ("steps", 0),
        ("steps", 151),
        ("steps", 20.5),
        ("cfg_scale", 31),
        ("cfg_scale", "7"),
        ("width", 100),
        ("width", 4096),
        ("height", 60),
        ("height", True),
        ("batch_size", 0),
        ("batch_size", 5),
        ("init_image", b64png()),
        ("unknown_field", 1),
    ],
)
async def test_an_invalid_txt2img_parameter_is_400_naming_it(
    net: Net, field: str, value: Any
) -> None:
    response = await net.http.post("/txt2img", json=sdcn(**{field: value}))
    assert assert_error(response, 400).startswith(field)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("init_image", None),
        ("init_image", "not base64!"),
        ("init_image", base64.b64encode(b"GIF89a not an image").decode()),
        ("init_image", base64.b64encode(png()[:40]).decode()),
        ("denoising_strength", 1.5),
        ("denoising_strength", "half"),
    ],
)
async def test_an_invalid_img2img_parameter_is_400_naming_it(
    net: Net, field: str, value: Any
) -> None:
    body = sdcn(init_image=b64png(), denoising_strength=0.5)
    body[field] = value
    response = await net.http.post("/img2img", json=body)
    assert assert_error(response, 400).startswith(field)


async def test_a_model_or_lora_nobody_has_is_404(net: Net) -> None:
    response = await net.http.post("/txt2img", json=sdcn(model="sdxl-turbo"))
    assert_error(response, 404, "sdxl-turbo")
    response = await net.http.post("/txt2img", json=sdcn(loras=[["no-such-lora", 0.5]]))
    assert_error(response, 404, "no-such-lora")
    # Each provider has one of them, nobody both.
    response = await net.http.post("/txt2img", json=sdcn(loras=[["pixel", 1], ["ink", 1]]))
    assert_error(response, 404, "pixel", "ink")


class FakeDispatcher:
    """Stands in for the Dispatcher: `run_batch` runs the jobs through `run` one by one."""

    async def run(self, job: JobRequest, **kwargs: Any) -> DispatchResult:
        raise NotImplementedError

    async def run_batch(self, jobs: list[JobRequest], **kwargs: Any) -> list[DispatchResult]:
        return [await self.run(job) for job in jobs]


@pytest.mark.parametrize(
    ("error", "status", "message"),
    [
        (Rejected, 400, "steps: the provider says no"),
        (ProviderFailed, 502, "provider failed: out of VRAM"),
        (AllBusy, 503, "every provider of model 'card-a' is busy"),
        (DeadlinePassed, 504, "no result within the deadline"),
    ],
)
async def test_dispatch_errors_become_their_status(
    net: Net, error: type[DispatchError], status: int, message: str
) -> None:
    class Failing(FakeDispatcher):
        async def run(self, job: JobRequest, **kwargs: Any) -> DispatchResult:
            await trio.lowlevel.checkpoint()
            raise error(message)

    net.gateway.jobs.dispatcher = Failing()  # type: ignore[assignment]
    assert assert_error(await net.http.post("/txt2img", json=sdcn()), status) == message
    response = await net.http.post("/sdapi/v1/txt2img", json=a1111(n_iter=3, batch_size=4))
    assert assert_error(response, status) == message


async def test_info_a_provider_sends_is_made_json_safe(net: Net) -> None:
    class Odd(FakeDispatcher):
        async def run(self, job: JobRequest, **kwargs: Any) -> DispatchResult:
            await trio.lowlevel.checkpoint()
            info = {"seed": 1, "blob": b"\x00", "nan": float("nan"), "list": [1.5, b"x"]}
            return DispatchResult([png()], info)

    net.gateway.jobs.dispatcher = Odd()  # type: ignore[assignment]
    response = await net.http.post("/txt2img", json=sdcn())
    assert response.json()["info"] == {"seed": 1, "blob": None, "nan": None, "list": [1.5, None]}


# --- bad bodies and routes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"", ("body", "JSON")),
        (b"{'prompt': 'single quotes'}", ("body", "JSON")),
        (b'{"prompt": "a"', ("body", "JSON")),
        (b"\xff\xfe\x00", ("body",)),
        (b"[" * 100_000 + b"]" * 100_000, ("body",)),
        (b'["a", "list"]', ("request",)),
        (b'"a string"', ("request",)),
    ],
)
async def test_a_body_that_is_not_a_json_object_is_400(
    net: Net, content: bytes, words: tuple[str, ...]
) -> None:
    for path in ("/txt2img", "/img2img", "/sdapi/v1/txt2img", "/sdapi/v1/options"):
        response = await net.http.post(path, content=content)
        assert_error(response, 400, *words)


async def test_text_that_is_not_unicode_is_400_naming_the_field(net: Net) -> None:
    lone = b'{"model": "card-a", "prompt": "a \\ud800 b", "width": 64, "height": 64}'
    assert_error(await net.http.post("/txt2img", content=lone), 400, "prompt", "Unicode")
    body = b'{"prompt": "x", "override_settings": {"sd_model_checkpoint": "card-a\\udfff"}}'
    response = await net.http.post("/sdapi/v1/txt2img", content=body)
    assert_error(response, 400, "override_settings.sd_model_checkpoint")
    # A surrogate pair is one character: fine.
    emoji = b'{"model": "card-a", "prompt": "a \\ud83d\\ude00", "width": 64, "height": 64}'
    assert (await net.http.post("/txt2img", content=emoji)).status_code == 200


async def test_a_body_declared_over_the_limit_is_413_without_reading_it(net: Net) -> None:
    pulled = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal pulled
        pulled += 1
        yield b"{}"

    for path in ("/txt2img", "/sdapi/v1/img2img", "/no/such/route"):
        response = await net.http.post(
            path, content=body(), headers={"Content-Length": str(MAX_BODY + 1)}
        )
        assert_error(response, 413, "50 MiB")
    assert pulled == 0


class Chunks(httpx.AsyncByteStream):
    """A chunked request body that counts the chunks the server pulled."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.pulled = 0

    def __aiter__(self) -> Chunks:
        return self

    async def __anext__(self) -> bytes:
        await trio.lowlevel.checkpoint()
        if self.pulled == len(self.chunks):
            raise StopAsyncIteration
        self.pulled += 1
        return self.chunks[self.pulled - 1]


async def test_a_streamed_body_over_the_limit_is_413_read_no_further(net: Net) -> None:
    chunk = b" " * 2**20
    body = Chunks([chunk] * 80)
    request = httpx.Request("POST", "http://gateway/img2img", stream=body)  # no Content-Length
    assert_error(await net.http.send(request), 413, "50 MiB")
    assert body.pulled == MAX_BODY // len(chunk) + 1
    assert (await net.http.get("/healthz")).status_code == 200


async def test_a_streamed_body_under_the_limit_is_read(net: Net) -> None:
    text = json.dumps(sdcn()).encode()
    body = Chunks([text[start : start + 7] for start in range(0, len(text), 7)])
    response = await net.http.send(httpx.Request("POST", "http://gateway/txt2img", stream=body))
    assert response.status_code == 200 and len(response.json()["images"]) == 1


async def test_unknown_routes_and_methods_get_msg(net: Net) -> None:
    assert_error(await net.http.get("/nope"), 404, "/nope")
    assert_error(await net.http.get("/sdapi/v1/interrogate"), 404)
    response = await net.http.get("/txt2img")
    assert_error(response, 405, "GET", "/txt2img")
    assert "POST" in response.headers["allow"]
    assert_error(await net.http.delete("/sdapi/v1/options"), 405)


async def test_validation_errors_are_400_msg(net: Net) -> None:
    @net.app.get("/test/number")
    async def number(value: int) -> int:
        return value

    msg = assert_error(await net.http.get("/test/number", params={"value": "x"}), 400)
    assert msg.startswith("query.value:")
    assert (await net.http.get("/test/number", params={"value": "3"})).json() == 3


# --- the AUTOMATIC1111 API ---------------------------------------------------------------------


async def test_a1111_txt2img_with_batches_and_iterations(net: Net) -> None:
    payload = a1111(prompt="a lighthouse <lora:pixel:0.7>", batch_size=3, n_iter=2, seed=20)
    response = await net.http.post("/sdapi/v1/txt2img", json=payload)
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"images", "parameters", "info"}
    assert body["parameters"] == payload
    assert [image_size(image) for image in body["images"]] == [(64, 64)] * 6
    info = json.loads(body["info"])
    assert info["all_seeds"] == list(range(20, 26)) and info["seed"] == 20
    assert info["sd_model_name"] == "card-a" and info["batch_size"] == 3
    assert info["prompt"] == payload["prompt"] and len(info["infotexts"]) == 6
    assert info["sdcn"]["provider"] == str(net.nodes[0].peer_id)
    assert [job["images"] for job in info["sdcn"]["jobs"]] == [4, 2]
    # Image i is the picture of seed 20 + i: the same as an SDCN request for that seed alone.
    for index in (0, 4, 5):
        alone = sdcn(
            prompt="a lighthouse",
            loras=[["pixel", 0.7]],
            seed=20 + index,
            steps=4,
            width=64,
            height=64,
        )
        response = await net.http.post("/txt2img", json=alone)
        assert response.json()["images"][0] == body["images"][index]


async def test_a1111_img2img(net: Net) -> None:
    payload = a1111(init_images=[b64png(96, 64)], denoising_strength=0.0, include_init_images=False)
    del payload["enable_hr"]
    response = await net.http.post("/sdapi/v1/img2img", json=payload)
    assert response.status_code == 200
    body = response.json()
    [image] = body["images"]
    assert image_size(image) == (64, 64)
    picture = Image.open(io.BytesIO(base64.b64decode(image))).convert("RGB")
    assert picture.getpixel((32, 32)) == (200, 30, 30)
    assert body["parameters"]["init_images"] is None
    assert json.loads(body["info"])["denoising_strength"] == 0.0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("enable_hr", True),
        ("restore_faces", True),
        ("alwayson_scripts", {"ControlNet": {"args": [{"enabled": True}]}}),
        ("script_name", "x/y/z plot"),
        ("styles", ["cinematic"]),
        ("subseed_strength", 0.5),
        ("override_settings", {"CLIP_stop_at_last_layers": 2}),
        ("distilled_cfg_scale", 3.5),
        ("steps", 500),
    ],
)
async def test_a1111_fields_the_network_cannot_honour_are_400(
    net: Net, field: str, value: Any
) -> None:
    response = await net.http.post("/sdapi/v1/txt2img", json=a1111(**{field: value}))
    assert assert_error(response, 400).startswith(field)


async def test_a1111_unknown_checkpoint_is_404(net: Net) -> None:
    override = {"sd_model_checkpoint": "dreamshaper_8.safetensors [879db523c3]"}
    response = await net.http.post("/sdapi/v1/txt2img", json=a1111(override_settings=override))
    assert_error(response, 404, "dreamshaper_8")


async def test_a1111_catalog(net: Net) -> None:
    models = (await net.http.get("/sdapi/v1/sd-models")).json()
    assert [(m["model_name"], m["title"]) for m in models] == [
        ("card-a", "card-a (SDCN test card)"),
        ("card-b", "card-b (SDCN test card)"),
    ]
    assert {"hash", "sha256", "filename", "config"} <= models[0].keys()
    loras = (await net.http.get("/sdapi/v1/loras")).json()
    assert sorted(lora["name"] for lora in loras) == ["ink", "pixel"]
    samplers = (await net.http.get("/sdapi/v1/samplers")).json()
    assert {"name": "Euler a", "aliases": [], "options": {}} in samplers
    schedulers = (await net.http.get("/sdapi/v1/schedulers")).json()
    assert {"automatic", "karras", "sgm_uniform"} <= {s["name"] for s in schedulers}
    assert (await net.http.get("/sdapi/v1/scripts")).json() == {"txt2img": [], "img2img": []}
    for path in ("/sdapi/v1/sd-vae", "/sdapi/v1/upscalers"):
        assert (await net.http.get(path)).json() == []
    progress = (await net.http.get("/sdapi/v1/progress")).json()
    assert progress["progress"] == 0 and progress["state"]["job_count"] == 0


async def test_a1111_options_set_the_default_model(net: Net) -> None:
    payload = a1111()
    del payload["override_settings"]
    response = await net.http.post("/sdapi/v1/txt2img", json=payload)
    assert_error(response, 400, "sd_model_checkpoint")
    assert (await net.http.get("/sdapi/v1/options")).json()["sd_model_checkpoint"] is None

    response = await net.http.post(
        "/sdapi/v1/options", json={"sd_model_checkpoint": "card-b (SDCN test card)"}
    )
    assert response.status_code == 200 and response.json() is None
    assert net.gateway.default_model == "card-b"
    options = (await net.http.get("/sdapi/v1/options")).json()
    assert options["sd_model_checkpoint"] == "card-b (SDCN test card)"
    response = await net.http.post("/sdapi/v1/txt2img", json=payload)
    assert response.status_code == 200
    assert json.loads(response.json()["info"])["sd_model_name"] == "card-b"

    response = await net.http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope"})
    assert_error(response, 400, "sd_model_checkpoint", "nope")
    response = await net.http.post(
        "/sdapi/v1/options", json={"sd_model_checkpoint": "card-a", "sd_vae": "other.vae.pt"}
    )
    assert_error(response, 400, "sd_vae")
    assert net.gateway.default_model == "card-b"  # nothing set when anything is refused


# --- the network catalog -----------------------------------------------------------------------


async def test_models_providers_and_health(net: Net) -> None:
    models = (await net.http.get("/v1/models")).json()
    assert models == [
        {
            "name": "card-a",
            "title": "card-a (SDCN test card)",
            "architecture": "testcard",
            "providers": 2,
            "loras": ["ink", "pixel"],
        },
        {
            "name": "card-b",
            "title": "card-b (SDCN test card)",
            "architecture": "testcard",
            "providers": 1,
            "loras": ["pixel"],
        },
    ]
    first = net.nodes[0].peer_id
    net.gateway.directory.ban(first, net.gateway.peer.wall_clock())
    providers = {p["peer_id"]: p for p in (await net.http.get("/v1/providers")).json()}
    assert set(providers) == {str(node.peer_id) for node in net.nodes}
    entry = providers[str(first)]
    assert entry["state"] == "online" and entry["backend"] == "testcard"
    assert [m["name"] for m in entry["models"]] == ["card-a", "card-b"]
    assert entry["loras"] == ["pixel"] and "Euler a" in entry["samplers"]
    assert entry["in_flight"] == 0 and entry["banned_until"] > net.gateway.peer.wall_clock()
    assert (entry["slots"], entry["queue"], entry["max_queue"]) == (1, 0, 8)
    assert entry["rtt_ms"] is None or entry["rtt_ms"] >= 0
    assert providers[str(net.nodes[1].peer_id)]["banned_until"] is None
    assert (await net.http.get("/healthz")).json() == {
        "status": "ok",
        "peer_id": str(net.gateway.peer.peer_id),
        "providers": 2,
    }


async def test_providers_tell_the_jobs_this_gateway_sent_them(net: Net) -> None:
    for _ in range(2):
        assert (await net.http.post("/txt2img", json=sdcn(model="card-b"))).status_code == 200
    providers = {p["peer_id"]: p for p in (await net.http.get("/v1/providers")).json()}
    ran = providers[str(net.nodes[0].peer_id)]  # the only one with card-b
    assert (ran["jobs_sent"], ran["jobs_done"], ran["proven"]) == (2, 2, True)
    assert ran["observed_speed"] > 0
    idle = providers[str(net.nodes[1].peer_id)]
    assert (idle["jobs_sent"], idle["jobs_done"], idle["proven"]) == (0, 0, False)
    assert idle["observed_speed"] is None


async def test_the_pages_are_served_beside_the_api(net: Net) -> None:
    for path in ("/", "/network", "/static/common.js"):
        response = await net.http.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-security-policy"].startswith("default-src 'self'")
    paths = (await net.http.get("/openapi.json")).json()["paths"]
    assert not {"/", "/network", "/static/{name}"} & set(paths)


async def test_docs_and_openapi(net: Net) -> None:
    assert (await net.http.get("/docs")).status_code == 200
    schema = (await net.http.get("/openapi.json")).json()
    assert {"/txt2img", "/img2img", "/sdapi/v1/txt2img", "/v1/models"} <= schema["paths"].keys()
    body = schema["paths"]["/txt2img"]["post"]["requestBody"]["content"]["application/json"]
    assert {"model", "prompt", "loras"} <= body["schema"]["properties"].keys()


# --- a client that goes away -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/txt2img", sdcn(model="card-slow", steps=150, width=64, height=64)),
        # Two jobs (4 + 2 images): both cancelled, the second while it waits for a slot.
        (
            "/sdapi/v1/txt2img",
            a1111(override_settings={"sd_model_checkpoint": "card-slow"}, batch_size=6, steps=150),
        ),
    ],
)
async def test_a_client_that_disconnects_cancels_its_jobs(path: str, body: dict[str, Any]) -> None:
    backend = WatchedBackend()
    async with gateway_network(backend) as net:
        messages = [{"type": "http.request", "body": json.dumps(body).encode()}]
        gone = trio.Event()
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            """The body, then a disconnect once `gone` is set (as hypercorn does)."""
            if messages:
                return messages.pop()
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-type", b"application/json")],
            "client": ("127.0.0.1", 1234),
            "server": ("gateway", 80),
        }
        provider = net.nodes[0].peer_id
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(net.app, scope, receive, send)
                await backend.started.wait()
                gone.set()
                await backend.cancelled.wait()  # the provider stopped drawing
        assert net.gateway.directory.in_flight(provider) == 0
        assert not any(m.get("status") == 200 for m in sent)
        with trio.fail_after(30):
            await net.providers[0].drain()  # returns once no job runs or waits there


# --- trust -------------------------------------------------------------------------------------


async def test_verify_true_answers_once_a_second_provider_agrees(net: Net) -> None:
    for node in net.nodes:  # both ran jobs for this gateway before
        net.gateway.directory.succeeded(node.peer_id)
    response = await net.http.post("/txt2img", json=sdcn(verify=True))
    assert response.status_code == 200, response.text
    info = response.json()["info"]
    assert info["verified"] is True and info["spot_check"] == "passed"
    assert "drew the same picture" in info["verification"]
    assert sum(p.jobs_done for p in net.providers) == 2
    plain = (await net.http.post("/txt2img", json=sdcn(seed=12))).json()["info"]
    # A newcomer's job is checked before the answer too, but the client did not ask.
    assert plain["spot_check"] == "passed" and "verified" not in plain


async def test_verify_without_checks_says_it_was_not_verified(net: Net) -> None:
    net.gateway.dispatcher.checker = None  # a gateway that checks nothing
    response = await net.http.post("/txt2img", json=sdcn(verify=True))
    assert response.status_code == 200, response.text
    info = response.json()["info"]
    assert info["verified"] is False and "checks no results" in info["verification"]


@pytest.mark.parametrize("value", ["yes", 1, None, [True]])
async def test_verify_must_be_a_boolean(net: Net, value: Any) -> None:
    response = await net.http.post("/txt2img", json=sdcn(verify=value))
    assert response.status_code == 400
    assert response.json()["msg"].startswith("verify: must be a boolean")


async def test_an_excluded_provider_shows_why_on_the_providers_list(net: Net) -> None:
    first = net.nodes[0].peer_id
    now = net.gateway.peer.wall_clock()
    net.gateway.trust.struck(first, "job abc: a wrong picture", now)
    net.gateway.trust.struck(first, "job def: another wrong picture", now)
    providers = {p["peer_id"]: p for p in (await net.http.get("/v1/providers")).json()}
    entry = providers[str(first)]
    assert entry["excluded_until"] == pytest.approx(now + 86_400)
    assert entry["excluded_reason"] == "job def: another wrong picture"
    assert entry["strikes"] == 1 and entry["checks"] == 1  # on probation
    other = providers[str(net.nodes[1].peer_id)]
    assert other["excluded_until"] is None and other["excluded_reason"] is None
    # Excluded: its jobs go elsewhere.
    for seed in range(4):
        answer = (await net.http.post("/txt2img", json=sdcn(seed=seed))).json()
        assert answer["info"]["provider"] == str(net.nodes[1].peer_id)


async def finished(net: Net, job_id: str) -> dict[str, Any]:
    """The state of async job `job_id` once it has ended."""
    feed = await net.gateway.jobs.events(job_id)
    try:
        async for event in feed:
            if event is not None and event.terminal:
                break
    finally:
        feed.close()
    response = await net.http.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text
    return response.json()


async def test_an_async_job_with_verify_says_who_verified_it(net: Net) -> None:
    for node in net.nodes:  # both ran jobs for this gateway before
        net.gateway.directory.succeeded(node.peer_id)
    job = {**sdcn(verify=True), "kind": "txt2img"}
    accepted = await net.http.post("/v1/jobs", json=job)
    assert accepted.status_code == 202, accepted.text
    state = await finished(net, accepted.json()["id"])
    assert state["status"] == "done" and state["verify"] is True
    info = state["info"]
    assert info["verified"] is True and info["spot_check"] == "passed"
    ids = {str(node.peer_id) for node in net.nodes}
    assert info["verified_by"] == list(ids - {info["provider"]})
    assert sum(p.jobs_done for p in net.providers) == 2
    bad = await net.http.post("/v1/jobs", json={**job, "verify": "yes"})
    assert bad.status_code == 400 and bad.json()["msg"].startswith("verify: must be a boolean")


async def test_an_async_jobs_background_check_shows_on_its_status_when_it_ends() -> None:
    background = TrustConfig(verify_first=0)  # checked after the answer, not before
    async with gateway_network(trust=background) as net:
        accepted = await net.http.post("/v1/jobs", json={**sdcn(), "kind": "txt2img"})
        job_id = accepted.json()["id"]
        state = await finished(net, job_id)
        assert state["verify"] is False and "verified" not in state["info"]
        assert state["info"]["spot_check"] in ("scheduled", "passed")  # newcomers: all checked
        checker = net.gateway.checker
        assert checker is not None
        await checker.wait_idle()
        info = (await net.http.get(f"/v1/jobs/{job_id}")).json()["info"]
        assert info["spot_check"] == "passed"
        assert "drew the same picture" in info["spot_check_detail"]
