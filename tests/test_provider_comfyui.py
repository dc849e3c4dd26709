"""A provider driving a fake ComfyUI over real HTTP and WebSocket on loopback (real time)."""

from __future__ import annotations

from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio

from sdcn_p2p.backends.comfyui import ComfyuiConfig, open_comfyui_backend
from sdcn_p2p.errors import JobError
from sdcn_p2p.jobs import JobRequest
from sdcn_p2p.jobs.protocol import request_job
from sdcn_p2p.provider import ProviderConfig, open_provider
from sdcn_p2p.records import AdvertState
from sdcn_p2p.testing import open_memory_peers, wait_advert
from sdcn_p2p.testing.fakecomfyui import OUT_OF_MEMORY, FakeComfyui, open_fake_comfyui

FAST = ComfyuiConfig(timeout=5.0, poll_interval=0.05)
PROVIDER = ProviderConfig(capability_interval=0.2, min_advert_gap=0.05)


def job(**fields: object) -> JobRequest:
    values: dict[str, object] = {"kind": "txt2img", "model": "sd-v1-5", "prompt": "a fox"}
    values.update(seed=3, steps=10, width=64, height=64)
    return JobRequest(**{**values, **fields})  # type: ignore[arg-type]


@asynccontextmanager
async def comfyui_network(fake: FakeComfyui):
    async with (
        open_fake_comfyui(fake) as url,
        open_memory_peers(2) as (client, node),
        open_comfyui_backend(url, config=FAST) as backend,
        open_provider(node, backend, PROVIDER) as provider,
    ):
        await wait_advert(client, node, lambda a: a.state is AdvertState.ONLINE)
        yield client, node, provider


async def test_provider_advertises_what_comfyui_offers() -> None:
    fake = FakeComfyui(
        checkpoints=("sd-v1-5.safetensors", "SDXL/sdxl-base.safetensors"),
        loras=("pixel-art.safetensors",),
        samplers=("euler_ancestral", "dpmpp_2m"),
        vram_mb=(24576, 20000),
    )
    async with comfyui_network(fake) as (client, node, _):
        advert = client.adverts.get(node.peer_id)
        assert [m.name for m in advert.models] == ["sd-v1-5", "sdxl-base"]
        assert [lo.name for lo in advert.loras] == ["pixel-art"]
        assert advert.samplers == ("Euler a", "DPM++ 2M")
        assert (advert.vram_total_mb, advert.vram_free_mb) == (24576, 20000)
        assert advert.backend == "comfyui" and advert.slots == 1


async def test_a_batch_comes_back_with_progress_and_seed_plus_i() -> None:
    fake = FakeComfyui(loras=("pixel-art.safetensors",), step_time=0.002)
    async with comfyui_network(fake) as (client, node, _):
        steps: list[tuple[int, int]] = []
        request = job(loras=(("pixel-art", 0.5),), sampler_name="DPM++ 2M Karras", batch_size=2)
        result = await request_job(
            client.host,
            node.peer_id,
            request,
            deadline=30,
            on_progress=lambda step, total: steps.append((step, total)),
        )
        single = await request_job(
            client.host, node.peer_id, job(seed=4, **_same(request)), deadline=30
        )
    assert result.info["seed"] == 3 and result.info["seeds"] == [3, 4]
    assert result.info["backend"] == "comfyui"
    assert len(result.images) == 2 and result.images[1] == single.images[0]
    assert steps and steps == sorted(steps) and steps[-1] == (20, 20)


def _same(request: JobRequest) -> dict[str, object]:
    return {"loras": request.loras, "sampler_name": request.sampler_name}


async def test_cancelling_a_job_leaves_nothing_running_in_comfyui() -> None:
    fake = FakeComfyui(step_time=None)  # steps wait for advance()
    async with comfyui_network(fake) as (client, node, provider):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(request_job, client.host, node.peer_id, job(batch_size=3), deadline=30)
            )
            await wait_advert(client, node, lambda a: a.queue == 1)
            await fake.wait_running()
            await fake.wait_pending(2)
            nursery.cancel_scope.cancel()
        await wait_advert(client, node, lambda a: a.queue == 0)
        with trio.fail_after(5):
            await fake.wait_idle()
        assert fake.running is None and fake.pending == []
        assert fake.interrupts == 1 and provider.load == 0 and provider.jobs_done == 0


async def test_an_out_of_memory_fails_the_job_and_the_provider_stays_up() -> None:
    fake = FakeComfyui()
    async with comfyui_network(fake) as (client, node, provider):
        fake.fail_next("KSampler", *OUT_OF_MEMORY)
        with pytest.raises(JobError) as info:
            await request_job(client.host, node.peer_id, job(), deadline=30)
        assert info.value.code == "backend_failed"
        assert "out of GPU memory in KSampler" in info.value.message
        result = await request_job(client.host, node.peer_id, job(), deadline=30)
        assert result.images and provider.state is AdvertState.ONLINE


async def test_a_comfyui_that_disappears_and_returns() -> None:
    fake = FakeComfyui()
    async with (
        open_memory_peers(2) as (client, node),
        trio.open_nursery() as nursery,
    ):
        stop = trio.Event()
        urls: list[str] = []

        async def serve(bind: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:  # type: ignore[no-untyped-def]
            async with open_fake_comfyui(fake, bind) as url:
                urls.append(url)
                task_status.started()
                await stop.wait()

        await nursery.start(serve, "127.0.0.1:0")
        bind = urls[0].removeprefix("http://")
        async with (
            open_comfyui_backend(urls[0], config=FAST) as backend,
            open_provider(node, backend, PROVIDER),
        ):
            await wait_advert(client, node, lambda a: a.state is AdvertState.ONLINE)
            stop.set()  # ComfyUI goes away
            await wait_advert(client, node, lambda a: a.state == "unavailable")
            with pytest.raises(JobError) as info:
                await request_job(client.host, node.peer_id, job(), deadline=30)
            assert info.value.code in ("busy", "backend_failed")
            stop = trio.Event()
            fake.forget()  # restarted
            await nursery.start(serve, bind)  # back on the same port
            await wait_advert(client, node, lambda a: a.state is AdvertState.ONLINE)
            result = await request_job(client.host, node.peer_id, job(), deadline=30)
            assert result.images
            stop.set()


async def test_a_checkpoint_added_in_comfyui_is_advertised() -> None:
    fake = FakeComfyui(checkpoints=("sd-v1-5.safetensors",))
    async with comfyui_network(fake) as (client, node, _):
        fake.checkpoints.append("new-model.safetensors")
        advert = await wait_advert(
            client, node, lambda a: "new-model" in [m.name for m in a.models]
        )
        assert advert.state == "online"
        result = await request_job(client.host, node.peer_id, job(model="new-model"), deadline=30)
        assert result.images
