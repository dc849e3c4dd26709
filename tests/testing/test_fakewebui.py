"""The fake webui speaks the AUTOMATIC1111 API, quirks included."""

import base64
import io
import json

import httpx
import pytest
import trio
from PIL import Image

from sdcn_p2p.testing.fakewebui import FakeWebui, noise_png, open_fake_webui

API = "/sdapi/v1"


def fake_webui(**kwargs) -> FakeWebui:
    return FakeWebui(**{"models": ("sd-v1-5", "sdxl-base"), "loras": ("pixel-art",), **kwargs})


async def txt2img(client: httpx.AsyncClient, **payload) -> tuple[list[bytes], dict]:
    response = await client.post(f"{API}/txt2img", json={"steps": 2, "seed": 7, **payload})
    assert response.status_code == 200
    body = response.json()
    assert isinstance(body["info"], str)  # a JSON string, not an object
    return [base64.b64decode(image) for image in body["images"]], json.loads(body["info"])


async def test_it_runs_the_checkpoint_sampler_and_loras_it_knows() -> None:
    fake = fake_webui()
    async with open_fake_webui(fake) as url, httpx.AsyncClient(base_url=url) as client:
        title = (await client.get(f"{API}/sd-models")).json()[1]["title"]
        images, info = await txt2img(
            client,
            prompt="a cat <lora:pixel-art:0.5>",
            sampler_name="DPM++ 2M Karras",
            override_settings={"sd_model_checkpoint": title},
            batch_size=2,
            width=96,
            height=64,
        )
    assert (info["sd_model_name"], info["sampler_name"], info["scheduler"]) == (
        "sdxl-base",
        "DPM++ 2M",
        "Karras",
    )
    assert info["all_seeds"] == [7, 8]
    assert [Image.open(io.BytesIO(image)).size for image in images] == [(96, 64), (96, 64)]
    assert fake.jobs_done == 1


async def test_it_silently_substitutes_what_it_does_not_know() -> None:
    async with (
        open_fake_webui(fake_webui()) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        known, _ = await txt2img(client, prompt="a cat")
        images, info = await txt2img(
            client,
            prompt="a cat <lora:unknown:1.0>",
            sampler_name="No Such Sampler",
            override_settings={"sd_model_checkpoint": "no-such-model"},
        )
    assert (info["sd_model_name"], info["sampler_name"]) == ("sd-v1-5", "DPM++ 2M")
    assert images == known  # the unknown LoRA tag changed nothing


async def test_progress_advances_while_a_job_runs_and_interrupt_ends_it() -> None:
    fake = fake_webui(step_time=None, interrupt_no_content=True)
    async with open_fake_webui(fake) as url, httpx.AsyncClient(base_url=url) as client:

        async def state() -> dict:
            return (await client.get(f"{API}/progress")).json()["state"]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(txt2img, client)
            await fake.wait_job_started()
            fake.advance()
            while (await state())["sampling_step"] != 1:
                await trio.lowlevel.checkpoint()
            assert (await state())["job_count"] == 1
            response = await client.post(f"{API}/interrupt")
            assert (response.status_code, response.content) == (204, b"")
        idle = await state()
    assert (idle["job_count"], idle["sampling_step"], idle["sampling_steps"]) == (0, 1, 2)
    assert (fake.interrupts, fake.jobs_done) == (1, 1)


async def test_img2img_needs_an_init_image() -> None:
    async with open_fake_webui(fake_webui()) as url, httpx.AsyncClient(base_url=url) as client:
        missing = await client.post(f"{API}/img2img", json={"prompt": "x"})
        out = io.BytesIO()
        Image.new("RGB", (32, 32)).save(out, "PNG")
        init = "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()
        ok = await client.post(f"{API}/img2img", json={"init_images": [init], "steps": 1})
    assert missing.status_code == 404
    assert set(missing.json()) == {"error", "detail", "body", "errors"}
    assert ok.status_code == 200


async def test_basic_auth_and_an_old_webui() -> None:
    fake = fake_webui(auth=("user", "pass"), schedulers=None, vram_mb=None)
    async with open_fake_webui(fake) as url:
        async with httpx.AsyncClient(base_url=url) as anonymous:
            refused = await anonymous.get(f"{API}/sd-models")
        async with httpx.AsyncClient(base_url=url, auth=("user", "pass")) as client:
            schedulers = await client.get(f"{API}/schedulers")
            memory = (await client.get(f"{API}/memory")).json()
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"] == "Basic"
    assert schedulers.status_code == 404
    assert "error" in memory["cuda"]


@pytest.mark.parametrize("body", [b"<html>", {"detail": "boom"}])
async def test_an_injected_answer_is_served_once(body: object) -> None:
    fake = fake_webui()
    async with open_fake_webui(fake) as url, httpx.AsyncClient(base_url=url) as client:
        fake.inject(f"{API}/samplers", 503, body)
        first = await client.get(f"{API}/samplers")
        second = await client.get(f"{API}/samplers")
    assert first.status_code == 503
    assert (first.content if isinstance(body, bytes) else first.json()) == body
    assert second.status_code == 200


async def test_with_a_fixed_png_every_image_is_that_png() -> None:
    png = noise_png(64, 48, seed=3)
    assert noise_png(64, 48, seed=3) == png != noise_png(64, 48, seed=4)
    with Image.open(io.BytesIO(png)) as image:
        assert (image.format, image.size, image.mode) == ("PNG", (64, 48), "RGB")
    fake = fake_webui(png=png)
    async with open_fake_webui(fake) as url, httpx.AsyncClient(base_url=url) as client:
        images, info = await txt2img(client, prompt="a cat", batch_size=2)
    assert images == [png, png]
    assert info["all_seeds"] == [7, 8] and fake.jobs_done == 1


def test_a_noise_png_of_512x512_is_about_as_large_as_a_generated_one() -> None:
    assert 350_000 < len(noise_png()) < 450_000
