"""End to end: the devnet over real WebSockets on loopback and the real HTTP server."""

from __future__ import annotations

import base64
import io
import json
from functools import partial

import httpx
import pytest
import trio
import trio.testing
from PIL import Image

from sdcn_p2p.cli import main
from sdcn_p2p.devnet import Devnet, demo_params, open_devnet


def png_size(b64: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(b64))).size


def init_png() -> str:
    out = io.BytesIO()
    Image.new("RGB", (96, 64), (10, 200, 10)).save(out, "PNG")
    return base64.b64encode(out.getvalue()).decode()


def sdcn(**fields: object) -> dict[str, object]:
    body: dict[str, object] = {
        "prompt": "a lighthouse",
        "model": "sd-v1-5",
        "seed": 11,
        "sampler_name": "Euler a",
        "steps": 5,
        "width": 128,
        "height": 96,
    }
    body.update(fields)
    return body


def provider_of(devnet: Devnet, model: str) -> str:
    [provider] = [p for p in devnet.providers if model in [m.name for m in p.capabilities.models]]
    return str(provider.peer.peer_id)


@pytest.fixture
async def devnet():
    async with open_devnet(providers=3, http="127.0.0.1:0") as net:
        yield net


@pytest.fixture
async def client(devnet: Devnet):
    async with httpx.AsyncClient(base_url=devnet.url, timeout=60) as http:
        yield http


async def test_sdcn_txt2img_and_img2img(client: httpx.AsyncClient) -> None:
    response = await client.post("/txt2img", json=sdcn(batch_size=2))
    body = response.json()
    assert response.status_code == 200 and "msg" not in body
    assert [png_size(image) for image in body["images"]] == [(128, 96), (128, 96)]
    assert body["info"]["seed"] == 11 and body["info"]["attempts"] == 1
    response = await client.post(
        "/img2img", json=sdcn(init_image=init_png(), denoising_strength=0.4)
    )
    assert response.status_code == 200
    assert png_size(response.json()["images"][0]) == (128, 96)


async def test_a1111_txt2img_and_img2img(client: httpx.AsyncClient) -> None:
    payload = {
        "prompt": "a lighthouse <lora:pixel-art:0.7>",
        "negative_prompt": "",
        "seed": 5,
        "steps": 4,
        "width": 64,
        "height": 64,
        "batch_size": 2,
        "sampler_name": "Euler a",
        "override_settings": {"sd_model_checkpoint": "sd-v1-5"},
        "send_images": True,
        "save_images": False,
    }
    response = await client.post("/sdapi/v1/txt2img", json=payload)
    body = response.json()
    assert response.status_code == 200
    assert [png_size(image) for image in body["images"]] == [(64, 64), (64, 64)]
    info = json.loads(body["info"])
    assert info["all_seeds"] == [5, 6] and info["sd_model_name"] == "sd-v1-5"
    payload["init_images"] = [init_png()]
    payload["denoising_strength"] = 0.5
    response = await client.post("/sdapi/v1/img2img", json=payload)
    assert response.status_code == 200
    assert png_size(response.json()["images"][0]) == (64, 64)
    models = (await client.get("/sdapi/v1/sd-models")).json()
    assert {m["model_name"] for m in models} >= {"sd-v1-5", "sdxl-base", "dreamshaper-8"}


async def test_a_model_only_one_provider_has_goes_to_it(
    devnet: Devnet, client: httpx.AsyncClient
) -> None:
    for model in ("sdxl-base", "dreamshaper-8"):
        response = await client.post("/txt2img", json=sdcn(model=model))
        assert response.status_code == 200
        assert response.json()["info"]["provider"] == provider_of(devnet, model)


async def test_a_lora_nobody_has_is_404(client: httpx.AsyncClient) -> None:
    response = await client.post("/txt2img", json=sdcn(loras=[["no-such-lora", 0.5]]))
    assert response.status_code == 404
    body = response.json()
    assert set(body) == {"msg"} and "no-such-lora" in body["msg"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("steps", 0),
        ("width", 100),
        ("height", 4096),
        ("cfg_scale", "high"),
        ("seed", 2**40),
        ("sampler_name", ""),
        ("loras", [["x", 9.0]]),
        ("prompt", "p" * 9000),
        ("model", None),
    ],
)
async def test_invalid_parameters_are_400_naming_the_field(
    client: httpx.AsyncClient, field: str, value: object
) -> None:
    response = await client.post("/txt2img", json=sdcn(**{field: value}))
    assert response.status_code == 400
    body = response.json()
    assert set(body) == {"msg"} and field in body["msg"]


class Body(httpx.AsyncByteStream):
    """A request body the server may stop reading halfway (httpx's own would warn then)."""

    def __init__(self, data: bytes, chunk: int = 1024 * 1024) -> None:
        self._chunks = iter([data[i : i + chunk] for i in range(0, len(data), chunk)])

    def __aiter__(self) -> Body:
        return self

    async def __anext__(self) -> bytes:
        await trio.lowlevel.checkpoint()
        try:
            return next(self._chunks)
        except StopIteration:
            raise StopAsyncIteration from None


async def test_a_body_over_the_limit_is_refused_not_a_crash(client: httpx.AsyncClient) -> None:
    huge = b'{"prompt": "' + b"a" * (51 * 1024 * 1024) + b'"}'
    request = client.build_request(
        "POST",
        "/txt2img",
        headers={"Content-Type": "application/json", "Content-Length": str(len(huge))},
    )
    request.stream = Body(huge)
    response = await client.send(request)
    assert response.status_code in (400, 413) and set(response.json()) == {"msg"}
    assert (await client.get("/healthz")).status_code == 200


async def test_a_client_that_disconnects_cancels_its_job(devnet: Devnet) -> None:
    [provider] = [
        p for p in devnet.providers if "dreamshaper-8" in [m.name for m in p.capabilities.models]
    ]
    slow = sdcn(model="dreamshaper-8", steps=150, width=512, height=512)  # ~50 s on it
    running = trio.Event()

    def on_advert(_advert: object) -> None:  # the provider advertises each change of its load
        if provider.running:
            running.set()

    async with (
        httpx.AsyncClient(base_url=devnet.url, timeout=60) as http,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(partial(http.post, "/txt2img", json=slow))
        with devnet.gateway.peer.adverts.subscribe(on_advert), trio.fail_after(30):
            await running.wait()
        nursery.cancel_scope.cancel()  # the client goes away mid-job
    with trio.fail_after(10):  # far sooner than the job would take
        await provider.wait_idle()
    await trio.testing.wait_all_tasks_blocked()  # the job handler finishes its bookkeeping
    assert provider.jobs_done == 0 and provider.jobs_cancelled == 1


def test_devnet_demo_writes_the_example_image(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # demo_params falls back to the source checkout's examples/
    out = tmp_path / "out.png"
    assert main(["devnet", "--http", "127.0.0.1:0", "--demo", str(out)]) == 0
    params = demo_params()
    with Image.open(out) as image:
        assert image.size == (params["width"], params["height"])
