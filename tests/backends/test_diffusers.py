"""The diffusers backend on a tiny random SD 1.x pipeline built offline (needs the extra)."""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from PIL import Image

from sdcn_p2p.backends.diffusers import (
    SAMPLERS,
    DiffusersBackend,
    DiffusersConfig,
    open_diffusers_backend,
)
from sdcn_p2p.backends.diffusers import scan as scan_module
from sdcn_p2p.errors import JobError
from sdcn_p2p.jobs import JobRequest
from sdcn_p2p.jobs.protocol import request_job
from sdcn_p2p.provider import ProviderConfig, open_provider
from sdcn_p2p.testing import open_memory_peers, small_job, wait_advert
from sdcn_p2p.testing.tinysd import write_tiny_models

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")
for _name in ("diffusers", "transformers", "safetensors", "peft", "torchsde"):
    pytest.importorskip(_name)

pytestmark = [
    # numpy 2 warns about torch tensors handed to np.array inside diffusers' schedulers.
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    # torchsde's Brownian tree (DPM++ SDE) on float rounding at the end of the interval.
    pytest.mark.filterwarnings("ignore:Should have tb<=t1:UserWarning"),
]

#: What an A1111 user asks for: all of these must be offered.
A1111_SAMPLERS = (
    "Euler",
    "Euler a",
    "DDIM",
    "DPM++ 2M",
    "DPM++ 2M Karras",
    "DPM++ SDE Karras",
    "LMS",
    "Heun",
    "UniPC",
)


@dataclass(frozen=True)
class TinyModels:
    models: Path
    loras: Path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    """A models dir with the tiny SD 1.x pipeline as a folder and as a single file, and a tiny
    SDXL folder; a LoRA dir with one LoRA in two layouts."""
    # Pixels depend on the thread count: keep it fixed (and small: the tiny model gains nothing).
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("diffusers")
    write_tiny_models(root / "models", name="tiny-sd", loras_dir=root / "loras", xl=True)
    return TinyModels(root / "models", root / "loras")


@pytest.fixture
def config(tiny: TinyModels, tmp_path: Path) -> DiffusersConfig:
    return DiffusersConfig(
        tiny.models, tiny.loras, device="cpu", hash_cache=tmp_path / "hashes.json"
    )


job = partial(small_job, model="tiny-sd", prompt="a lighthouse at dusk", steps=6)


def pixels(png: bytes) -> Any:
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"), dtype=np.float64)


async def run(backend: DiffusersBackend, request: JobRequest) -> list[bytes]:
    return (await backend.generate(request, lambda step, total: None)).images


async def test_advertises_models_loras_and_samplers(config: DiffusersConfig) -> None:
    async with open_diffusers_backend(config) as backend:
        caps = await backend.capabilities()
    assert caps.backend == "diffusers"
    by_name = {m.name: m for m in caps.models}
    assert sorted(by_name) == ["tiny-sd", "tiny-sd-single", "tiny-sd-xl"]
    assert [by_name[n].architecture for n in sorted(by_name)] == ["sd1", "sd1", "sdxl"]
    single = (config.models_dir / "tiny-sd-single.safetensors").read_bytes()
    assert by_name["tiny-sd-single"].hash == hashlib.sha256(single).hexdigest()[:10]
    assert (
        len(by_name["tiny-sd"].hash) == 10
        and by_name["tiny-sd"].hash != by_name["tiny-sd-single"].hash
    )
    loras = {lo.name: lo for lo in caps.loras}
    assert sorted(loras) == ["tiny-lora", "tiny-lora-kohya"]
    lora = loras["tiny-lora"]
    lora_bytes = (config.loras_dir / "tiny-lora.safetensors").read_bytes()
    assert lora.hash == hashlib.sha256(lora_bytes).hexdigest()[:10]
    assert caps.samplers == tuple(SAMPLERS)
    for name in A1111_SAMPLERS:
        caps.resolve(job(sampler_name=name))  # offered: no JobError
    assert "karras" in caps.schedulers
    assert (caps.vram_total_mb, caps.vram_free_mb) == (0, 0)  # CPU: no VRAM to report


async def test_hashes_are_cached_between_opens(config: DiffusersConfig, monkeypatch) -> None:
    async with open_diffusers_backend(config) as backend:
        first = await backend.capabilities()
        assert backend.hashes_computed == 5  # 2 folders, a single file, 2 LoRAs

    def no_hashing(path: Path) -> str:
        raise AssertionError(f"hashed {path} again")

    monkeypatch.setattr(scan_module, "_sha256_file", no_hashing)
    async with open_diffusers_backend(config) as backend:
        assert await backend.capabilities() == first
        assert backend.hashes_computed == 0
    monkeypatch.undo()

    # A changed file (mtime) is hashed again; the others are not.
    lora = config.loras_dir / "tiny-lora.safetensors"
    status = lora.stat()
    os.utime(lora, ns=(status.st_atime_ns, status.st_mtime_ns + 1))
    async with open_diffusers_backend(config) as backend:
        assert await backend.capabilities() == first
        assert backend.hashes_computed == 1


async def test_txt2img_is_deterministic_by_seed(config: DiffusersConfig) -> None:
    async with open_diffusers_backend(config) as backend:
        output = await backend.generate(job(batch_size=2), lambda step, total: None)
        again = await run(backend, job(batch_size=2))
        other_seed = await run(backend, job(seed=8))
        assert output.info["seeds"] == [7, 8]
    assert [pixels(png).shape for png in output.images] == [(64, 64, 3)] * 2
    assert again == output.images
    assert output.images[0] != output.images[1]
    # Image i of a batch has seed + i, as in A1111 (batched maths may round differently).
    assert np.abs(pixels(other_seed[0]) - pixels(output.images[1])).max() <= 2


async def test_bfloat16_runs_and_rounds_differently(config: DiffusersConfig) -> None:
    from dataclasses import replace

    async with open_diffusers_backend(config) as backend:
        [float32] = await run(backend, job(steps=3))
    async with open_diffusers_backend(replace(config, dtype="bfloat16")) as backend:
        assert (backend.device, backend.dtype) == ("cpu", "bfloat16")
        [bfloat16] = await run(backend, job(steps=3))
        assert await run(backend, job(steps=3)) == [bfloat16]
    assert pixels(bfloat16).shape == (64, 64, 3) and bfloat16 != float32


async def test_single_file_checkpoint_gives_the_folders_pixels(config: DiffusersConfig) -> None:
    async with open_diffusers_backend(config) as backend:
        folder = await run(backend, job())
        single = await run(backend, job(model="tiny-sd-single"))
        assert backend.cached_models == ["tiny-sd", "tiny-sd-single"]
    assert np.abs(pixels(folder[0]) - pixels(single[0])).max() <= 1


async def test_img2img_follows_the_init_image_by_denoising_strength(
    config: DiffusersConfig,
) -> None:
    inits = []
    for mode in ("L", "RGB"):
        image = Image.linear_gradient("L").convert(mode).resize((96, 80))  # resized to 64x64
        if mode == "RGB":
            image = image.transpose(Image.Transpose.ROTATE_90)
        out = io.BytesIO()
        image.save(out, "PNG")
        inits.append(out.getvalue())

    async with open_diffusers_backend(config) as backend:
        # How far apart the results of two init images are: far at a low strength, where
        # the init image shapes the result, near at 1.0, where noise replaces it.
        spread = {}
        for strength in (0.3, 1.0):
            results = []
            for init in inits:
                request = job(
                    kind="img2img", init_image=init, denoising_strength=strength, steps=10
                )
                [png] = await run(backend, request)
                assert pixels(png).shape == (64, 64, 3)
                assert await run(backend, request) == [png]
                results.append(pixels(png))
            spread[strength] = np.abs(results[0] - results[1]).mean()
    assert spread[0.3] > 3 * spread[1.0], spread


async def test_samplers_run_deterministically_and_differ(config: DiffusersConfig) -> None:
    async with open_diffusers_backend(config) as backend:
        images = {}
        for name in A1111_SAMPLERS:
            [images[name]] = await run(backend, job(sampler_name=name, steps=4))
        assert await run(backend, job(sampler_name="DPM++ SDE Karras", steps=4)) == [
            images["DPM++ SDE Karras"]
        ]
    assert len(set(images.values())) == len(images)


async def test_a_jobs_scheduler_settings_do_not_leak_into_the_next(
    config: DiffusersConfig,
) -> None:
    async with open_diffusers_backend(config) as backend:
        plain = await run(backend, job(sampler_name="DPM++ 2M", steps=4))
        await run(backend, job(sampler_name="DPM++ 2M Karras", steps=4))
        await run(backend, job(sampler_name="DPM++ 2M SDE", steps=4))
        assert await run(backend, job(sampler_name="DPM++ 2M", steps=4)) == plain


@pytest.mark.parametrize("sampler", ["Restart", "Euler a Karras", "DDIM Exponential"])
async def test_unknown_sampler_is_unsupported(config: DiffusersConfig, sampler: str) -> None:
    async with open_diffusers_backend(config) as backend:
        with pytest.raises(JobError) as caught:
            await run(backend, job(sampler_name=sampler))
        assert caught.value.code == "unsupported"
        assert backend.cached_models == []  # refused before loading anything


async def test_lora_changes_the_output_and_is_removed_after(config: DiffusersConfig) -> None:
    async with open_diffusers_backend(config) as backend:
        plain = await run(backend, job())
        full = await run(backend, job(loras=(("tiny-lora", 1.0),)))
        half = await run(backend, job(loras=(("TINY-LORA", 0.5),)))
        after = await run(backend, job())
    assert len({plain[0], full[0], half[0]}) == 3
    assert after == plain


async def test_a_kohya_layout_lora_gives_the_same_picture(config: DiffusersConfig) -> None:
    async with open_diffusers_backend(config) as backend:
        diffusers_layout = await run(backend, job(loras=(("tiny-lora", 0.7),)))
        kohya_layout = await run(backend, job(loras=(("tiny-lora-kohya", 0.7),)))
    assert np.abs(pixels(diffusers_layout[0]) - pixels(kohya_layout[0])).max() <= 1


async def test_sdxl_txt2img_and_img2img(config: DiffusersConfig) -> None:
    async with open_diffusers_backend(config) as backend:
        [first] = await run(backend, job(model="tiny-sd-xl"))
        assert await run(backend, job(model="tiny-sd-xl")) == [first]
        [changed] = await run(
            backend, job(model="tiny-sd-xl", kind="img2img", init_image=first, steps=4)
        )
    assert pixels(first).shape == pixels(changed).shape == (64, 64, 3)
    assert changed != first


async def test_progress_is_reported_per_step(config: DiffusersConfig) -> None:
    async with open_diffusers_backend(config) as backend:
        steps: list[tuple[int, int]] = []
        await backend.generate(job(steps=5), lambda step, total: steps.append((step, total)))
    assert steps == [(i, 5) for i in range(1, 6)]


async def test_cancelling_stops_the_job_between_steps(config: DiffusersConfig) -> None:
    async with open_diffusers_backend(config) as backend:
        await run(backend, job(steps=1))  # load the pipeline first
        steps: list[int] = []
        second_step = trio.Event()

        def progress(step: int, total: int) -> None:
            steps.append(step)
            if step == 2:
                second_step.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(backend.generate, job(steps=150), progress)
            await second_step.wait()
            nursery.cancel_scope.cancel()
        # It stopped within a step or so of the cancellation, and frees the device at once.
        assert 2 <= len(steps) < 10
        assert len(await run(backend, job(steps=2))) == 1


async def test_out_of_memory_fails_the_job_and_frees_pipelines(
    config: DiffusersConfig, monkeypatch
) -> None:
    async with open_diffusers_backend(config) as backend:
        await run(backend, job(steps=1))
        assert backend.cached_models == ["tiny-sd"]

        def out_of_memory(*args: object) -> list[bytes]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

        monkeypatch.setattr(backend, "_run_on_device", out_of_memory)
        with pytest.raises(JobError) as caught:
            await run(backend, job())
        assert caught.value.code == "backend_failed"
        assert "out of GPU memory" in caught.value.message
        assert backend.cached_models == []
        monkeypatch.undo()
        assert len(await run(backend, job(steps=1))) == 1  # it goes on


async def test_pipelines_are_evicted_least_recently_used_within_the_budget(
    config: DiffusersConfig,
) -> None:
    from dataclasses import replace

    # One tiny pipeline is ~7 MiB in float32: a 10 MiB budget holds one.
    async with open_diffusers_backend(replace(config, vram_budget_mb=10)) as backend:
        await run(backend, job(steps=1))
        await run(backend, job(model="tiny-sd-single", steps=1))
        assert backend.cached_models == ["tiny-sd-single"]
    async with open_diffusers_backend(config) as backend:
        for model in ("tiny-sd", "tiny-sd-single", "tiny-sd"):
            await run(backend, job(model=model, steps=1))
        assert backend.cached_models == ["tiny-sd-single", "tiny-sd"]


async def test_jobs_through_the_provider_and_the_job_protocol(config: DiffusersConfig) -> None:
    async with (
        open_memory_peers(2) as (client, node),
        open_diffusers_backend(config) as backend,
        open_provider(node, backend, ProviderConfig()) as provider,
    ):
        advert = await wait_advert(client, node, lambda a: a.state == "online")
        assert advert.backend == "diffusers"
        assert {m.name for m in advert.models} == {"tiny-sd", "tiny-sd-single", "tiny-sd-xl"}
        assert "DPM++ 2M" in advert.samplers

        steps: list[tuple[int, int]] = []
        result = await request_job(
            client.host,
            node.peer_id,
            job(batch_size=2, loras=(("tiny-lora", 0.8),), sampler_name="DPM++ 2M Karras"),
            deadline=60,
            on_progress=lambda step, total: steps.append((step, total)),
        )
        assert len(result.images) == 2 and result.info["backend"] == "diffusers"
        assert result.info["seeds"] == [7, 8] and result.info["model_hash"]
        # Progress came over the network while the worker thread ran.
        assert steps and steps[-1] == (6, 6)

        with pytest.raises(JobError) as caught:
            await request_job(client.host, node.peer_id, job(sampler_name="Restart"), deadline=60)
        assert caught.value.code == "unsupported"

        # A client that goes away cancels its job on the provider, within a step or so.
        long_steps: list[int] = []
        started = trio.Event()

        def on_progress(step: int, total: int) -> None:
            long_steps.append(step)
            started.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(
                    request_job,
                    client.host,
                    node.peer_id,
                    job(steps=150),
                    deadline=60,
                    on_progress=on_progress,
                )
            )
            await started.wait()
            # The peer answers while the worker thread generates: the job is still running.
            await client.host.ping(node.peer_id)
            assert provider.running == 1
            nursery.cancel_scope.cancel()
        with trio.fail_after(30):
            await provider.wait_idle()
        await trio.testing.wait_all_tasks_blocked()  # the job handler finishes its bookkeeping
        assert provider.jobs_cancelled == 1 and provider.jobs_done == 1
        assert max(long_steps) < 20
