"""The diffusers backend on a CUDA GPU: half precision, VRAM in the advert, a real out-of-memory.

Skipped without the extra or without a CUDA device (CI has none); run on a GPU provider with
`python -m pytest tests/backends/test_diffusers_cuda.py`.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from sdcn_p2p.backends.diffusers import DiffusersConfig, open_diffusers_backend
from sdcn_p2p.errors import JobError
from sdcn_p2p.jobs import JobRequest
from sdcn_p2p.testing import small_job
from sdcn_p2p.testing.tinysd import write_tiny_models

torch = pytest.importorskip("torch")
for _name in ("diffusers", "transformers", "safetensors", "peft", "torchsde"):
    pytest.importorskip(_name)
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cuda")
    write_tiny_models(root / "models", name="tiny-sd", loras_dir=root / "loras")
    return root


@pytest.fixture
def config(models: Path, tmp_path: Path) -> DiffusersConfig:
    return DiffusersConfig(
        models / "models", models / "loras", device="auto", hash_cache=tmp_path / "hashes.json"
    )


@pytest.fixture
def memory_cap() -> Iterator[None]:
    """Lets the test cap this process's share of the GPU; lifts the cap after."""
    yield
    torch.cuda.set_per_process_memory_fraction(1.0)
    torch.cuda.empty_cache()


job = partial(small_job, model="tiny-sd", prompt="a lighthouse at dusk", steps=6)


async def run(backend, request: JobRequest) -> list[bytes]:
    return (await backend.generate(request, lambda step, total: None)).images


async def test_auto_picks_cuda_in_half_precision_and_advertises_its_memory(
    config: DiffusersConfig,
) -> None:
    async with open_diffusers_backend(config) as backend:
        caps = await backend.capabilities()
        assert (backend.device, backend.dtype) == ("cuda", "float16")
        total = torch.cuda.mem_get_info()[1]
        assert caps.vram_total_mb == total // 2**20
        assert 0 < caps.vram_free_mb <= caps.vram_total_mb


async def test_the_same_seed_gives_the_same_pixels_on_the_gpu(config: DiffusersConfig) -> None:
    async with open_diffusers_backend(config) as backend:
        first = await run(backend, job(batch_size=2))
        assert await run(backend, job(batch_size=2)) == first
        assert await run(backend, job(seed=8)) != first[:1]
        lora = await run(backend, job(loras=(("tiny-lora", 1.0),)))
        assert lora != first[:1]
        assert await run(backend, job()) == first[:1]  # the LoRA is gone again


async def test_running_out_of_gpu_memory_fails_the_job_and_the_backend_goes_on(
    config: DiffusersConfig, memory_cap: None
) -> None:
    async with open_diffusers_backend(config) as backend:
        assert len(await run(backend, job(steps=1))) == 1
        # Leave this process 64 MiB beyond what it holds: a 2048x2048 batch cannot fit.
        allowed = torch.cuda.memory_reserved() + 64 * 2**20
        torch.cuda.set_per_process_memory_fraction(allowed / torch.cuda.mem_get_info()[1])
        with pytest.raises(JobError) as caught:
            await run(backend, job(steps=2, width=2048, height=2048, batch_size=4))
        assert caught.value.code == "backend_failed"
        assert "out of GPU memory" in caught.value.message
        assert backend.cached_models == []  # freed what it could
        torch.cuda.set_per_process_memory_fraction(1.0)
        assert len(await run(backend, job(steps=2))) == 1
