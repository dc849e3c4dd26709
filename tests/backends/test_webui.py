"""The webui backend against the fake AUTOMATIC1111 server, over real HTTP on loopback."""

import base64
import io
import json
import re
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio
from PIL import Image

from sdcn_p2p.backends import Capabilities
from sdcn_p2p.backends.webui import WebuiBackend, WebuiConfig, open_webui_backend
from sdcn_p2p.errors import BackendUnavailable, ConfigError, JobError
from sdcn_p2p.identity import Identity
from sdcn_p2p.jobs import JobRequest
from sdcn_p2p.records import Advert, LoraInfo, ModelInfo
from sdcn_p2p.testing.fakewebui import FakeWebui, open_fake_webui

FAST = WebuiConfig(timeout=5.0, progress_interval=0.005, interrupt_timeout=5.0)
TXT2IMG = "/sdapi/v1/txt2img"


def make_fake(**kwargs) -> FakeWebui:
    options = {
        "models": ("sd-v1-5", "sdxl-base"),
        "loras": ("pixel-art", "add-detail"),
        "samplers": ("Euler a", "Euler", "DPM++ 2M"),
    }
    return FakeWebui(**{**options, **kwargs})


@asynccontextmanager
async def serving(
    fake: FakeWebui | None = None,
    *,
    auth: tuple[str, str] | None = None,
    config: WebuiConfig = FAST,
) -> AsyncIterator[tuple[FakeWebui, WebuiBackend]]:
    fake = fake or make_fake()
    async with (
        open_fake_webui(fake) as url,
        open_webui_backend(url, auth, config=config) as backend,
    ):
        yield fake, backend


def job(**fields) -> JobRequest:
    defaults = {"kind": "txt2img", "model": "sd-v1-5", "prompt": "a dog", "seed": 42, "steps": 4}
    return JobRequest(**{**defaults, "width": 64, "height": 64, **fields})


def ignore(step: int, total: int) -> None:
    pass


def paths(fake: FakeWebui) -> list[str]:
    return [path for path, _ in fake.requests]


def png(size: tuple[int, int] = (64, 64), colour: tuple[int, int, int] = (10, 200, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "PNG")
    return out.getvalue()


async def expect_failure(backend: WebuiBackend, request: JobRequest, code: str) -> JobError:
    with pytest.raises(JobError) as caught:
        await backend.generate(request, ignore)
    assert caught.value.code == code
    return caught.value


# --- capabilities ------------------------------------------------------------------------------


async def test_capabilities_are_exactly_what_the_webui_offers() -> None:
    async with serving(make_fake(vram_mb=(24576, 20000))) as (fake, backend):
        caps = await backend.capabilities()
        entries = fake.sd_models()
    assert caps == Capabilities(
        backend="webui",
        models=tuple(ModelInfo(e["model_name"], e["title"], e["hash"]) for e in entries),
        loras=(LoraInfo("pixel-art"), LoraInfo("add-detail")),
        samplers=("Euler a", "Euler", "DPM++ 2M"),
        vram_total_mb=24576,
        vram_free_mb=20000,
        schedulers=(
            "automatic",
            "uniform",
            "karras",
            "exponential",
            "polyexponential",
            "sgm_uniform",
            "kl_optimal",
            "align_your_steps",
            "simple",
            "normal",
            "ddim",
            "beta",
        ),
    )
    assert [m.name for m in caps.models] == ["sd-v1-5", "sdxl-base"]
    assert caps.models[0].title.startswith("sd-v1-5.safetensors [")
    Advert(  # fits in an advert
        Identity.from_seed(bytes(32)).peer_id,
        seq=1,
        issued_at=1.0,
        ttl=60,
        backend=caps.backend,
        models=caps.models,
        loras=caps.loras,
        samplers=caps.samplers,
        vram_total_mb=caps.vram_total_mb,
        vram_free_mb=caps.vram_free_mb,
    )


async def test_an_old_webui_without_schedulers_or_cuda() -> None:
    fake = make_fake(
        samplers=("Euler a", "DPM++ 2M", "DPM++ 2M Karras"), schedulers=None, vram_mb=None
    )
    async with serving(fake) as (fake, backend):
        caps = await backend.capabilities()
        assert (caps.schedulers, caps.vram_total_mb, caps.vram_free_mb) == ((), 0, 0)
        output = await backend.generate(job(sampler_name="DPM++ 2M Karras"), ignore)
        payload = fake.last_payload
    assert payload is not None
    assert payload["sampler_name"] == "DPM++ 2M Karras"
    assert "scheduler" not in payload
    assert len(output.images) == 1


async def test_a_model_added_to_the_webui_is_found() -> None:
    async with serving() as (fake, backend):
        assert len((await backend.capabilities()).models) == 2
        fake.models.append("new-model")
        output = await backend.generate(job(model="new-model"), ignore)
        assert output.info["model_hash"] == fake.sd_models()[2]["hash"]
        assert [m.name for m in (await backend.capabilities()).models][-1] == "new-model"


# --- jobs --------------------------------------------------------------------------------------


async def test_txt2img_reaches_the_webui_with_checkpoint_loras_and_scheduler() -> None:
    request = job(
        model="SDXL-Base",
        prompt="a lighthouse",
        negative_prompt="fog",
        loras=(("pixel-art", 0.6), ("add-detail", 1.0)),
        sampler_name="DPM++ 2M Karras",
        seed=1234,
        steps=6,
        cfg_scale=5.5,
        width=128,
        height=96,
        batch_size=2,
    )
    async with serving() as (fake, backend):
        output = await backend.generate(request, ignore)
        sdxl = fake.sd_models()[1]
    payload = fake.last_payload
    assert payload == {
        "prompt": "a lighthouse <lora:pixel-art:0.6> <lora:add-detail:1.0>",
        "negative_prompt": "fog",
        "seed": 1234,
        "sampler_name": "DPM++ 2M",
        "scheduler": "karras",
        "steps": 6,
        "cfg_scale": 5.5,
        "width": 128,
        "height": 96,
        "batch_size": 2,
        "n_iter": 1,
        "override_settings": {"sd_model_checkpoint": sdxl["title"]},
        "override_settings_restore_afterwards": False,
        "send_images": True,
        "save_images": False,
    }
    assert len(output.images) == 2 and output.images[0] != output.images[1]
    for image in output.images:
        assert Image.open(io.BytesIO(image)).size == (128, 96)
    assert output.info == {
        "seeds": [1234, 1235],
        "model_hash": sdxl["hash"],
        "webui_version": "v1.10.1-fake",
    }


async def test_img2img_sends_the_init_image_and_denoising_strength() -> None:
    init = png((80, 48))
    request = job(kind="img2img", init_image=init, denoising_strength=0.35)
    async with serving() as (fake, backend):
        output = await backend.generate(request, ignore)
    payload = fake.last_payload
    assert payload is not None
    assert paths(fake)[-1] == "/sdapi/v1/img2img"
    assert base64.b64decode(payload["init_images"][0]) == init
    assert payload["denoising_strength"] == 0.35
    assert Image.open(io.BytesIO(output.images[0])).size == (64, 64)


async def test_the_seed_comes_from_the_info_json_string() -> None:
    info = json.dumps({"seed": 99, "all_seeds": [99], "sd_model_hash": None})
    async with serving() as (fake, backend):
        fake.inject(TXT2IMG, 200, {"images": [base64.b64encode(png()).decode()], "info": info})
        output = await backend.generate(job(seed=5), ignore)
    assert output.info == {"seeds": [99]}
    assert output.images == [png()]


async def test_a_jpeg_from_the_webui_becomes_a_png() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buffer, "JPEG")
    answer = {"images": [base64.b64encode(buffer.getvalue()).decode()], "info": '{"seed": 1}'}
    async with serving() as (fake, backend):
        fake.inject(TXT2IMG, 200, answer)
        output = await backend.generate(job(), ignore)
    assert output.images[0].startswith(b"\x89PNG\r\n\x1a\n")
    assert Image.open(io.BytesIO(output.images[0])).size == (64, 64)


async def test_progress_is_reported_with_increasing_steps() -> None:
    send, receive = trio.open_memory_channel[tuple[int, int]](100)
    async with (
        serving(make_fake(step_time=None)) as (fake, backend),
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(backend.generate, job(steps=3), lambda *step: send.send_nowait(step))
        await fake.wait_job_started()
        for step in (1, 2):
            fake.advance()
            assert await receive.receive() == (step, 3)
        fake.advance()
    # The job ends as its last step does; the backend reports it done when the images arrive.
    assert await receive.receive() == (3, 3)
    assert receive.statistics().current_buffer_used == 0


@pytest.mark.parametrize("no_content", [False, True], ids=["a1111", "sdnext-204"])
async def test_cancelling_a_job_interrupts_the_webui(no_content: bool) -> None:
    fake = make_fake(step_time=None, interrupt_no_content=no_content)
    async with serving(fake) as (fake, backend):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(backend.generate, job(), ignore)
            await fake.wait_job_started()
            assert fake.interrupts == 0
            nursery.cancel_scope.cancel()
        assert fake.interrupts == 1
        assert paths(fake)[-1] == "/sdapi/v1/interrupt"
        fake.step_time = 0.0
        assert len((await backend.generate(job(), ignore)).images) == 1


async def test_a_job_that_outlasts_its_timeout_fails_and_is_interrupted() -> None:
    config = WebuiConfig(timeout=5.0, job_timeout=0.2, progress_interval=0.05)
    async with serving(make_fake(step_time=None), config=config) as (fake, backend):
        error = await expect_failure(backend, job(), "backend_failed")
        assert "did not answer in time" in error.message
        assert fake.interrupts == 1


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"model": "sd-v1"}, "model 'sd-v1'"),
        ({"loras": (("pixel-art", 1.0), ("anime", 0.5))}, "LoRA 'anime'"),
        ({"sampler_name": "DDIM"}, "sampler 'DDIM'"),
        ({"sampler_name": "DPM++ 2M Turbo"}, "sampler 'DPM++ 2M Turbo'"),
    ],
)
async def test_what_the_webui_lacks_is_refused_before_it_is_asked(fields: dict, named: str) -> None:
    async with serving() as (fake, backend):
        await backend.capabilities()
        error = await expect_failure(backend, job(**fields), "unsupported")
    assert named in error.message
    assert TXT2IMG not in paths(fake)


async def test_a_checkpoint_the_webui_swapped_is_refused() -> None:
    async with serving() as (fake, backend):
        await backend.capabilities()
        fake.models.remove("sdxl-base")  # our list is stale: the webui runs its default instead
        error = await expect_failure(backend, job(model="sdxl-base"), "backend_failed")
    assert "ran checkpoint 'sd-v1-5' instead of 'sdxl-base'" in error.message


# --- failures ------------------------------------------------------------------------------------

WEBUI_ERROR = {
    "error": "OutOfMemoryError",
    "detail": "CUDA out of memory. Tried to allocate 2.00 GiB",
    "body": "",
    "errors": "",
}
GOOD_IMAGE = base64.b64encode(png()).decode()


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (500, WEBUI_ERROR, "HTTP 500: CUDA out of memory. Tried to allocate 2.00 GiB"),
        (502, b"<html>Bad Gateway</html>", "HTTP 502: <html>Bad Gateway</html>"),
        (200, b"<html>hello</html>", "not JSON"),
        (200, {"info": '{"seed": 1}'}, "no images"),
        (200, {"images": [], "info": '{"seed": 1}'}, "0 images for a batch of 1"),
        (200, {"images": ["@@@"], "info": '{"seed": 1}'}, "not base64"),
        (200, {"images": [12], "info": '{"seed": 1}'}, "not a string"),
        (200, {"images": ["bm90IGFuIGltYWdl"], "info": '{"seed": 1}'}, "cannot be decoded"),
        (200, {"images": [GOOD_IMAGE[:-40]], "info": '{"seed": 1}'}, "cannot be decoded"),
        (200, {"images": [GOOD_IMAGE], "info": "{not json"}, "no info with a seed"),
        (200, {"images": [GOOD_IMAGE]}, "no info with a seed"),
        (200, {"images": [GOOD_IMAGE], "info": '{"seed": "1"}'}, "no info with a seed"),
    ],
)
async def test_a_failing_or_garbled_job_is_a_backend_failure(
    status: int, body: object, message: str
) -> None:
    async with serving() as (fake, backend):
        fake.inject(TXT2IMG, status, body)
        error = await expect_failure(backend, job(), "backend_failed")
        assert message in error.message
        assert error.message.startswith(f"webui at {backend.url}: ")
        assert len((await backend.generate(job(), ignore)).images) == 1  # and it works again


@pytest.mark.parametrize(
    ("path", "status", "body", "message"),
    [
        ("sd-models", 200, b"nonsense", "/sdapi/v1/sd-models answered something that is not JSON"),
        ("sd-models", 200, [{"title": "x"}], "/sdapi/v1/sd-models has an entry without"),
        ("loras", 200, {"loras": []}, "/sdapi/v1/loras is not a list of objects"),
        ("samplers", 500, WEBUI_ERROR, "/sdapi/v1/samplers failed: HTTP 500: CUDA out of memory"),
        ("memory", 500, WEBUI_ERROR, "/sdapi/v1/memory failed"),
    ],
)
async def test_garbled_capabilities_make_the_backend_unavailable(
    path: str, status: int, body: object, message: str
) -> None:
    async with serving() as (fake, backend):
        fake.inject(f"/sdapi/v1/{path}", status, body)
        with pytest.raises(BackendUnavailable, match="^" + re.escape(message)):
            await backend.capabilities()
        assert len((await backend.capabilities()).models) == 2


async def test_garbled_memory_only_hides_the_vram() -> None:
    async with serving() as (fake, backend):
        fake.inject("/sdapi/v1/memory", 200, {"cuda": {"system": {"total": "lots"}}})
        caps = await backend.capabilities()
    assert (caps.vram_total_mb, caps.vram_free_mb, len(caps.models)) == (0, 0, 2)


async def test_a_webui_that_goes_away_and_comes_back() -> None:
    fake = make_fake()
    async with AsyncExitStack() as first_run:
        url = await first_run.enter_async_context(open_fake_webui(fake))
        async with open_webui_backend(url, config=FAST) as backend:
            assert len((await backend.capabilities()).models) == 2
            assert len((await backend.generate(job(), ignore)).images) == 1
            await first_run.aclose()  # the webui stops

            with pytest.raises(BackendUnavailable, match="cannot reach it"):
                await backend.capabilities()
            error = await expect_failure(backend, job(), "backend_failed")
            assert "cannot reach it" in error.message

            async with open_fake_webui(fake, url.removeprefix("http://")) as again:
                assert again == url
                assert len((await backend.capabilities()).models) == 2
                assert len((await backend.generate(job(), ignore)).images) == 1


async def test_basic_auth_is_sent() -> None:
    fake = make_fake(auth=("alice", "s3cret"))
    async with serving(fake, auth=("alice", "s3cret")) as (fake, backend):
        assert len((await backend.capabilities()).models) == 2
        assert len((await backend.generate(job(), ignore)).images) == 1


@pytest.mark.parametrize("auth", [None, ("alice", "wrong")])
async def test_missing_or_wrong_credentials_are_reported(auth: tuple[str, str] | None) -> None:
    async with serving(make_fake(auth=("alice", "s3cret")), auth=auth) as (fake, backend):
        with pytest.raises(
            BackendUnavailable, match=r"HTTP 401.*check the webui user and password"
        ):
            await backend.capabilities()
        error = await expect_failure(backend, job(), "backend_failed")
        assert "HTTP 401" in error.message
        assert not fake.requests  # nothing got past auth


@pytest.mark.parametrize("url", ["ftp://127.0.0.1:7860", "127.0.0.1:7860", "http://"])
async def test_a_bad_url_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError):
        async with open_webui_backend(url):
            pass
