"""A provider driving a fake AUTOMATIC1111 webui over real HTTP on loopback (real time)."""

from __future__ import annotations

from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio

from sdcn_p2p.backends.webui import WebuiConfig, open_webui_backend
from sdcn_p2p.errors import JobError
from sdcn_p2p.jobs import JobRequest
from sdcn_p2p.jobs.protocol import request_job
from sdcn_p2p.provider import ProviderConfig, open_provider
from sdcn_p2p.testing import open_memory_peers, wait_advert
from sdcn_p2p.testing.fakewebui import FakeWebui, open_fake_webui

FAST = WebuiConfig(timeout=5.0, progress_interval=0.02)
PROVIDER = ProviderConfig(capability_interval=0.2, min_advert_gap=0.05)


def job(**fields: object) -> JobRequest:
    values: dict[str, object] = {"kind": "txt2img", "model": "sd-v1-5", "prompt": "a fox"}
    values.update(seed=3, steps=10, width=64, height=64, **fields)
    return JobRequest(**values)  # type: ignore[arg-type]


@asynccontextmanager
async def webui_network(fake: FakeWebui, bind: str = "127.0.0.1:0"):
    async with (
        open_fake_webui(fake, bind) as url,
        open_memory_peers(2) as (client, node),
        open_webui_backend(url, config=FAST) as backend,
        open_provider(node, backend, PROVIDER) as provider,
    ):
        await wait_advert(client, node, lambda a: a.state == "online")
        yield client, node, provider, url


async def test_provider_advertises_exactly_what_the_webui_offers() -> None:
    fake = FakeWebui(
        models=("sd-v1-5", "sdxl-base"),
        loras=("pixel-art", "ink"),
        samplers=("Euler a", "DPM++ 2M"),
        vram_mb=(24576, 20000),
    )
    async with webui_network(fake) as (client, node, _, _):
        advert = client.adverts.get(node.peer_id)
        assert [m.name for m in advert.models] == ["sd-v1-5", "sdxl-base"]
        assert advert.models[0].title.startswith("sd-v1-5.safetensors [")
        assert [lo.name for lo in advert.loras] == ["pixel-art", "ink"]
        assert set(advert.samplers) == {"Euler a", "DPM++ 2M"}
        assert (advert.vram_total_mb, advert.vram_free_mb) == (24576, 20000)
        assert advert.backend == "webui"


async def test_a_job_reaches_the_webui_with_checkpoint_override_and_lora_tags() -> None:
    fake = FakeWebui(models=("sd-v1-5", "other"), loras=("pixel-art",), step_time=0.02)
    async with webui_network(fake) as (client, node, _, _):
        steps: list[int] = []
        result = await request_job(
            client.host,
            node.peer_id,
            job(model="other", loras=(("pixel-art", 0.5),), sampler_name="DPM++ 2M Karras"),
            deadline=30,
            on_progress=lambda step, total: steps.append(step),
        )
        payload = fake.last_payload
        assert payload["override_settings"]["sd_model_checkpoint"].startswith("other.safetensors")
        assert "<lora:pixel-art:0.5>" in payload["prompt"]
        assert payload["sampler_name"] == "DPM++ 2M" and payload["scheduler"] == "karras"
        assert result.info["seed"] == 3 and len(result.images) == 1
        assert steps and steps == sorted(steps)


async def test_cancelling_a_job_interrupts_the_webui() -> None:
    fake = FakeWebui(step_time=None)  # steps wait for advance()
    async with webui_network(fake) as (client, node, provider, _):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(request_job, client.host, node.peer_id, job(), deadline=30))
            await wait_advert(client, node, lambda a: a.queue == 1)
            await fake.wait_job_started()
            nursery.cancel_scope.cancel()
        await wait_advert(client, node, lambda a: a.queue == 0)
        assert fake.interrupts == 1 and provider.load == 0 and provider.jobs_done == 0


async def test_webui_errors_give_backend_failed_and_the_provider_stays_up() -> None:
    fake = FakeWebui()
    async with webui_network(fake) as (client, node, provider, _):
        fake.inject("/sdapi/v1/txt2img", 500, {"error": "OutOfMemoryError", "detail": "CUDA OOM"})
        with pytest.raises(JobError) as info:
            await request_job(client.host, node.peer_id, job(), deadline=30)
        assert info.value.code == "backend_failed" and "CUDA OOM" in info.value.message
        result = await request_job(client.host, node.peer_id, job(), deadline=30)
        assert result.images and provider.state == "online"


async def test_a_webui_that_disappears_and_returns() -> None:
    fake = FakeWebui()
    async with (
        open_memory_peers(2) as (client, node),
        trio.open_nursery() as nursery,
    ):
        stop = trio.Event()
        urls: list[str] = []

        async def serve(bind: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:  # type: ignore[no-untyped-def]
            async with open_fake_webui(fake, bind) as url:
                urls.append(url)
                task_status.started()
                await stop.wait()

        await nursery.start(serve, "127.0.0.1:0")
        bind = urls[0].removeprefix("http://")
        async with (
            open_webui_backend(urls[0], config=FAST) as backend,
            open_provider(node, backend, PROVIDER),
        ):
            await wait_advert(client, node, lambda a: a.state == "online")
            stop.set()  # the webui goes away
            await wait_advert(client, node, lambda a: a.state == "unavailable")
            with pytest.raises(JobError) as info:
                await request_job(client.host, node.peer_id, job(), deadline=30)
            assert info.value.code in ("busy", "backend_failed")
            stop = trio.Event()
            await nursery.start(serve, bind)  # back on the same port
            await wait_advert(client, node, lambda a: a.state == "online")
            result = await request_job(client.host, node.peer_id, job(), deadline=30)
            assert result.images
            stop.set()


async def test_a_model_added_in_the_webui_is_advertised() -> None:
    fake = FakeWebui(models=("sd-v1-5",))
    async with webui_network(fake) as (client, node, _, _):
        fake.models.append("new-model")
        advert = await wait_advert(
            client, node, lambda a: "new-model" in [m.name for m in a.models]
        )
        assert advert.state == "online"
        result = await request_job(client.host, node.peer_id, job(model="new-model"), deadline=30)
        assert result.images
