"""The ComfyUI backend against the fake ComfyUI, over real HTTP and WebSocket on loopback."""

import hashlib
import io
import json
import struct
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio
from PIL import Image

from sdcn_p2p.backends import Capabilities
from sdcn_p2p.backends.comfyui import (
    ComfyuiBackend,
    ComfyuiConfig,
    Plan,
    build_workflow,
    open_comfyui_backend,
)
from sdcn_p2p.errors import BackendUnavailable, ConfigError, JobError
from sdcn_p2p.identity import Identity
from sdcn_p2p.jobs import JobRequest
from sdcn_p2p.records import Advert, LoraInfo, ModelInfo
from sdcn_p2p.testing.fakecomfyui import OUT_OF_MEMORY, FakeComfyui, open_fake_comfyui

FAST = ComfyuiConfig(timeout=5.0, poll_interval=0.05, interrupt_timeout=5.0)
A1111_SAMPLERS = (
    "Euler a",
    "Euler",
    "LMS",
    "Heun",
    "DPM2",
    "DPM2 a",
    "DPM++ 2S a",
    "DPM++ 2M",
    "DPM++ SDE",
    "DPM++ 2M SDE",
    "DPM++ 2M SDE Heun",
    "DPM++ 3M SDE",
    "DPM fast",
    "DPM adaptive",
    "DDIM",
    "UniPC",
    "LCM",
)


def make_fake(**kwargs) -> FakeComfyui:
    options = {
        "checkpoints": ("sd-v1-5.safetensors", "SDXL/sdxl-base.safetensors"),
        "loras": ("pixel-art.safetensors", "styles/add-detail.safetensors"),
    }
    return FakeComfyui(**{**options, **kwargs})


@asynccontextmanager
async def serving(
    fake: FakeComfyui | None = None,
    *,
    auth: tuple[str, str] | str | None = None,
    config: ComfyuiConfig = FAST,
) -> AsyncIterator[tuple[FakeComfyui, ComfyuiBackend]]:
    fake = fake or make_fake()
    async with (
        open_fake_comfyui(fake) as url,
        open_comfyui_backend(url, auth, config=config) as backend,
    ):
        yield fake, backend


def job(**fields) -> JobRequest:
    defaults = {"kind": "txt2img", "model": "sd-v1-5", "prompt": "a dog", "seed": 42, "steps": 4}
    return JobRequest(**{**defaults, "width": 64, "height": 64, **fields})


def ignore(step: int, total: int) -> None:
    pass


def prompts(fake: FakeComfyui) -> list[dict]:
    """The workflows posted to /prompt, oldest first."""
    return [body["prompt"] for path, body in fake.requests if path == "POST /prompt"]


def png(size: tuple[int, int] = (80, 48), colour: tuple[int, int, int] = (10, 200, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "PNG")
    return out.getvalue()


async def expect_failure(backend: ComfyuiBackend, request: JobRequest, code: str) -> JobError:
    with pytest.raises(JobError) as caught:
        await backend.generate(request, ignore)
    assert caught.value.code == code
    return caught.value


async def nothing_left(fake: FakeComfyui) -> None:
    """ComfyUI runs and holds nothing (a cancelled prompt stops at its next step)."""
    with trio.fail_after(5):
        await fake.wait_idle()
    assert fake.running is None and fake.pending == []


# --- capabilities ------------------------------------------------------------------------------


async def test_capabilities_are_what_comfyui_offers_in_a1111_names() -> None:
    async with serving(make_fake(vram_mb=(24576, 20000))) as (_, backend):
        caps = await backend.capabilities()
    assert caps == Capabilities(
        backend="comfyui",
        models=(
            ModelInfo("sd-v1-5", "sd-v1-5.safetensors"),
            ModelInfo("sdxl-base", "SDXL/sdxl-base.safetensors"),
        ),
        loras=(LoraInfo("pixel-art"), LoraInfo("add-detail")),
        samplers=A1111_SAMPLERS,
        schedulers=(
            "karras",
            "exponential",
            "sgm_uniform",
            "simple",
            "normal",
            "ddim",
            "beta",
            "kl_optimal",
        ),
        vram_total_mb=24576,
        vram_free_mb=20000,
    )
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


async def test_only_what_this_comfyui_has_is_advertised() -> None:
    fake = make_fake(
        checkpoints=("a/x.safetensors", "b/x.ckpt", "y.safetensors"),
        loras=(),
        samplers=("euler", "euler_ancestral", "ddim", "restart"),
        schedulers=("normal", "karras"),
        vram_mb=None,  # a CPU-only ComfyUI
    )
    async with serving(fake) as (_, backend):
        caps = await backend.capabilities()
    assert [m.title for m in caps.models] == ["a/x.safetensors", "y.safetensors"]
    assert [m.name for m in caps.models] == ["x", "y"]
    assert caps.loras == ()
    assert caps.samplers == ("Euler a", "Euler", "DDIM")
    assert caps.schedulers == ("karras", "normal")
    assert (caps.vram_total_mb, caps.vram_free_mb) == (0, 0)


async def test_the_newer_combo_shape_of_object_info_is_read() -> None:
    combo = {
        "CheckpointLoaderSimple": {
            "input": {"required": {"ckpt_name": ["COMBO", {"options": ["new.safetensors"]}]}}
        }
    }
    async with serving() as (fake, backend):
        fake.inject("/object_info/CheckpointLoaderSimple", 200, combo)
        caps = await backend.capabilities()
    assert caps.models == (ModelInfo("new", "new.safetensors"),)


def write_safetensors(path: Path, keys: tuple[str, ...]) -> bytes:
    """A safetensors header naming `keys` (enough to tell the architecture) and some bytes."""
    header = json.dumps({k: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]} for k in keys})
    data = struct.pack("<Q", len(header)) + header.encode() + bytes(4)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


async def test_files_the_node_can_read_are_advertised_with_hash_and_architecture(
    tmp_path: Path,
) -> None:
    models = tmp_path / "models"
    sdxl = write_safetensors(
        models / "checkpoints/SDXL/sdxl-base.safetensors",
        ("model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.1.model.x"),
    )
    lora = write_safetensors(models / "loras/pixel-art.safetensors", ("lora_unet_x.alpha",))
    config = ComfyuiConfig(timeout=5.0, models_dir=models, hash_cache=tmp_path / "hashes.json")
    async with serving(config=config) as (_, backend):
        caps = await backend.capabilities()
        again = await backend.capabilities()  # from the hash cache
    digest = hashlib.sha256(sdxl).hexdigest()[:10]
    assert caps.models == (
        ModelInfo("sd-v1-5", "sd-v1-5.safetensors"),  # not on this machine: no hash
        ModelInfo("sdxl-base", f"SDXL/sdxl-base.safetensors [{digest}]", digest, "sdxl"),
    )
    assert caps.loras == (
        LoraInfo("pixel-art", hashlib.sha256(lora).hexdigest()[:10]),
        LoraInfo("add-detail"),
    )
    assert again == caps
    assert json.loads((tmp_path / "hashes.json").read_text())  # kept for the next start


async def test_a_model_added_to_comfyui_is_found() -> None:
    async with serving() as (fake, backend):
        assert len((await backend.capabilities()).models) == 2
        fake.checkpoints.append("new-model.safetensors")
        output = await backend.generate(job(model="new-model"), ignore)
        assert len(output.images) == 1
        assert prompts(fake)[-1]["1"]["inputs"]["ckpt_name"] == "new-model.safetensors"


@pytest.mark.parametrize(
    ("path", "status", "body", "message"),
    [
        ("/object_info/KSampler", 200, b"nonsense", "/object_info/KSampler answered something"),
        ("/object_info/KSampler", 200, {}, "no CheckpointLoaderSimple or KSampler: not ComfyUI?"),
        ("/object_info/LoraLoader", 200, {"LoraLoader": {"input": {}}}, "no list of lora_name"),
        ("/system_stats", 500, b"Internal Server Error", "/system_stats failed: HTTP 500"),
        ("/object_info/CheckpointLoaderSimple", 401, b"<html>no</html>", "check --comfyui-auth"),
    ],
)
async def test_garbled_capabilities_make_the_backend_unavailable(
    path: str, status: int, body: object, message: str
) -> None:
    async with serving() as (fake, backend):
        fake.inject(path, status, body)
        with pytest.raises(BackendUnavailable, match=message.replace("?", r"\?")):
            await backend.capabilities()
        assert len((await backend.capabilities()).models) == 2


# --- jobs --------------------------------------------------------------------------------------


async def test_txt2img_is_one_workflow_through_comfyuis_api() -> None:
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
    )
    async with serving() as (fake, backend):
        output = await backend.generate(request, ignore)
    [workflow] = prompts(fake)
    assert workflow == {
        "1": {
            "class_type": "CheckpointLoaderSimple",
            "inputs": {"ckpt_name": "SDXL/sdxl-base.safetensors"},
        },
        "10": {
            "class_type": "LoraLoader",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "lora_name": "pixel-art.safetensors",
                "strength_model": 0.6,
                "strength_clip": 0.6,
            },
        },
        "11": {
            "class_type": "LoraLoader",
            "inputs": {
                "model": ["10", 0],
                "clip": ["10", 1],
                "lora_name": "styles/add-detail.safetensors",
                "strength_model": 1.0,
                "strength_clip": 1.0,
            },
        },
        "2": {
            "class_type": "CLIPTextEncode",
            "inputs": {"text": "a lighthouse", "clip": ["11", 1]},
        },
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "fog", "clip": ["11", 1]}},
        "4": {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": 128, "height": 96, "batch_size": 1},
        },
        "7": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["11", 0],
                "seed": 1234,
                "steps": 6,
                "cfg": 5.5,
                "sampler_name": "dpmpp_2m",
                "scheduler": "karras",
                "positive": ["2", 0],
                "negative": ["3", 0],
                "latent_image": ["4", 0],
                "denoise": 1.0,
            },
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }
    [post] = [body for path, body in fake.requests if path == "POST /prompt"]
    assert len(post["client_id"]) == 32  # the job's own, so events come to its websocket only
    assert Image.open(io.BytesIO(output.images[0])).size == (128, 96)
    assert output.info == {
        "seeds": [1234],
        "comfyui_sampler": "dpmpp_2m",
        "comfyui_scheduler": "karras",
    }
    assert not [key for key in fake.files if key[0] == "output"]  # nothing left in output/


async def test_same_seed_same_picture_and_what_changes_it() -> None:
    async with serving() as (fake, backend):

        async def picture(**fields) -> bytes:
            return (await backend.generate(job(**fields), ignore)).images[0]

        first = await picture()
        again = await picture()
        assert fake.last_executed == []  # ComfyUI answered the identical prompt from its cache
        assert again == first
        variants = [
            await picture(seed=43),
            await picture(loras=(("pixel-art", 0.8),)),
            await picture(loras=(("pixel-art", 0.5),)),
            await picture(model="sdxl-base"),
            await picture(prompt="a cat"),
            await picture(steps=5),
            await picture(sampler_name="Euler"),
        ]
    assert len({first, *variants}) == 1 + len(variants)


async def test_batch_image_i_is_the_picture_of_seed_plus_i() -> None:
    async with serving() as (fake, backend):
        batch = await backend.generate(job(seed=10, batch_size=3), ignore)
        workflows = prompts(fake)
        singles = [(await backend.generate(job(seed=s), ignore)).images[0] for s in (10, 11, 12)]
        # Why one prompt per image: a ComfyUI batch draws all its noise from the one seed.
        async with httpx.AsyncClient(base_url=backend.url) as client:
            comfy_batch = await comfyui_batch(client, fake, workflows[0], size=2)
    assert batch.images == singles
    assert batch.info["seeds"] == [10, 11, 12]
    assert [w["7"]["inputs"]["seed"] for w in workflows] == [10, 11, 12]
    assert all(w["4"]["inputs"]["batch_size"] == 1 for w in workflows)
    assert comfy_batch[0] == singles[0] and comfy_batch[1] != singles[1]


async def comfyui_batch(
    client: httpx.AsyncClient, fake: FakeComfyui, workflow: dict, size: int
) -> list[bytes]:
    """The images of `workflow` run as one ComfyUI batch of `size`."""
    workflow = json.loads(json.dumps(workflow))
    workflow["4"]["inputs"]["batch_size"] = size
    prompt_id = (await client.post("/prompt", json={"prompt": workflow})).json()["prompt_id"]
    await fake.wait_idle()
    entry = (await client.get(f"/history/{prompt_id}")).json()[prompt_id]
    files = entry["outputs"]["9"]["images"]
    return [(await client.get("/view", params=f)).content for f in files]


async def test_img2img_uploads_the_init_image_to_the_temp_folder() -> None:
    init = png((80, 48))
    request = job(kind="img2img", init_image=init, denoising_strength=0.35, width=64, height=96)
    async with serving() as (fake, backend):
        output = await backend.generate(request, ignore)
        other = await backend.generate(
            job(kind="img2img", init_image=png(colour=(200, 0, 0)), denoising_strength=0.35),
            ignore,
        )
    [upload, _] = [key for key in fake.files if key[2].startswith("sdcn-")]
    assert upload[0] == "temp" and fake.files[upload] == init  # not left in input/
    workflow = prompts(fake)[0]
    assert workflow["5"] == {"class_type": "LoadImage", "inputs": {"image": f"{upload[2]} [temp]"}}
    assert workflow["6"]["inputs"] == {
        "image": ["5", 0],
        "upscale_method": "lanczos",
        "width": 64,
        "height": 96,
        "crop": "disabled",
    }
    assert workflow["4"] == {
        "class_type": "VAEEncode",
        "inputs": {"pixels": ["6", 0], "vae": ["1", 2]},
    }
    assert workflow["7"]["inputs"]["denoise"] == 0.35
    assert Image.open(io.BytesIO(output.images[0])).size == (64, 96)
    assert other.images[0] != output.images[0]


@pytest.mark.parametrize(
    ("a1111", "sampler", "scheduler"),
    [
        ("Euler a", "euler_ancestral", "normal"),
        ("euler A", "euler_ancestral", "normal"),
        ("DPM++ 2M", "dpmpp_2m", "karras"),  # A1111's "Automatic" for it
        ("DPM++ 2M SDE", "dpmpp_2m_sde", "exponential"),
        ("DPM++ 2M Karras", "dpmpp_2m", "karras"),
        ("DPM++ 2M SGM Uniform", "dpmpp_2m", "sgm_uniform"),
        ("Euler a Simple", "euler_ancestral", "simple"),
        ("DDIM", "ddim", "ddim_uniform"),
        ("UniPC Beta", "uni_pc", "beta"),
        ("LCM", "lcm", "normal"),
    ],
)
async def test_a1111_sampler_names_become_comfyuis(
    a1111: str, sampler: str, scheduler: str
) -> None:
    async with serving() as (fake, backend):
        await backend.generate(job(sampler_name=a1111), ignore)
    inputs = prompts(fake)[0]["7"]["inputs"]
    assert (inputs["sampler_name"], inputs["scheduler"]) == (sampler, scheduler)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"model": "sd-v1"}, "model 'sd-v1'"),
        ({"loras": (("pixel-art", 1.0), ("anime", 0.5))}, "LoRA 'anime'"),
        ({"sampler_name": "PLMS"}, "sampler 'PLMS'"),
        ({"sampler_name": "Restart"}, "sampler 'Restart'"),
        ({"sampler_name": "DPM++ 2M Uniform"}, "sampler 'DPM++ 2M Uniform'"),
        ({"sampler_name": "DPM++ 2M Align Your Steps"}, "sampler 'DPM++ 2M Align Your Steps'"),
        ({"sampler_name": "DPM++ 2M SDE Heun"}, "sampler 'DPM++ 2M SDE Heun'"),  # not here
    ],
)
async def test_what_comfyui_lacks_is_refused_before_anything_is_queued(
    fields: dict, named: str
) -> None:
    fake = make_fake(samplers=[s for s in make_fake().samplers if "heun" not in s])
    async with serving(fake) as (fake, backend):
        await backend.capabilities()
        error = await expect_failure(backend, job(**fields), "unsupported")
    assert named in error.message
    assert not prompts(fake)


async def test_progress_runs_over_the_whole_batch() -> None:
    send, receive = trio.open_memory_channel[tuple[int, int]](100)
    async with (
        serving(make_fake(step_time=None)) as (fake, backend),
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(
            backend.generate, job(steps=3, batch_size=2), lambda *step: send.send_nowait(step)
        )
        for expected in range(1, 7):
            await fake.wait_running()
            fake.advance()
            assert await receive.receive() == (expected, 6)
    assert receive.statistics().current_buffer_used == 0


# --- cancelling --------------------------------------------------------------------------------


async def test_cancelling_a_running_job_interrupts_it_and_drops_its_queued_images() -> None:
    async with serving(make_fake(step_time=None)) as (fake, backend):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(backend.generate, job(batch_size=3), ignore)
            running, _ = await fake.wait_running()
            await fake.wait_pending(2)
            nursery.cancel_scope.cancel()
        assert (fake.interrupts, backend.interrupts) == (1, 1)
        await nothing_left(fake)
        messages = fake.history(running)["status"]["messages"]
        assert [kind for kind, _ in messages][-1] == "execution_interrupted"
        assert fake.prompts_done == 1  # the two queued images never ran
        fake.step_time = 0.0
        assert len((await backend.generate(job(), ignore)).images) == 1


async def test_cancelling_a_queued_job_never_interrupts_someone_elses_prompt() -> None:
    async with (
        serving(make_fake(step_time=None)) as (fake, backend),
        httpx.AsyncClient(base_url=backend.url) as other,
    ):
        posted = await other.post("/prompt", json={"prompt": workflow_of(job()), "client_id": "x"})
        theirs = posted.json()["prompt_id"]
        await fake.wait_running()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(backend.generate, job(seed=7), ignore)
            await fake.wait_pending(1)
            nursery.cancel_scope.cancel()
        assert fake.pending == []  # ours was deleted from the queue
        assert fake.running == (theirs, "x")  # theirs runs on
        assert (fake.interrupts, backend.interrupts) == (0, 0)
        fake.advance(4)
        await nothing_left(fake)
        assert fake.history(theirs)["status"]["status_str"] == "success"


def workflow_of(request: JobRequest) -> dict:
    """Another client's workflow for `request`."""
    plan = Plan("sd-v1-5.safetensors", (), "euler", "normal")
    return build_workflow(request, plan, request.seed, None)


async def test_a_job_past_its_timeout_fails_and_leaves_nothing_running() -> None:
    config = ComfyuiConfig(timeout=5.0, job_timeout=0.3, poll_interval=0.05)
    async with serving(make_fake(step_time=None), config=config) as (fake, backend):
        error = await expect_failure(backend, job(), "backend_failed")
        assert "did not finish within 0.3 s" in error.message
        assert fake.interrupts == 1
        await nothing_left(fake)


async def test_a_prompt_deleted_in_comfyui_fails_the_job() -> None:
    config = ComfyuiConfig(timeout=5.0, poll_interval=0.05, quiet_poll_interval=0.05)
    fake = make_fake(step_time=None)

    async def delete_ours() -> None:
        await fake.wait_pending(1)
        fake.post_queue({"delete": [fake.pending[0][0]]})  # the queue's delete button

    async with (
        serving(fake, config=config) as (fake, backend),
        httpx.AsyncClient(base_url=backend.url) as other,
        trio.open_nursery() as nursery,
    ):
        await other.post("/prompt", json={"prompt": workflow_of(job()), "client_id": "x"})
        await fake.wait_running()
        nursery.start_soon(delete_ours)
        error = await expect_failure(backend, job(seed=7), "backend_failed")
        fake.advance(4)
    assert "left its queue without a result" in error.message


async def test_an_interrupt_from_someone_else_fails_the_job() -> None:
    fake = make_fake(step_time=None)

    async def interrupt() -> None:
        await fake.wait_running()
        fake.post_interrupt({})  # the Cancel button in ComfyUI's page

    async with serving(fake) as (fake, backend), trio.open_nursery() as nursery:
        nursery.start_soon(interrupt)
        error = await expect_failure(backend, job(), "backend_failed")
    assert "interrupted in ComfyUI (at KSampler)" in error.message


# --- failures ------------------------------------------------------------------------------------


async def test_an_execution_error_is_a_backend_failure_with_comfyuis_message() -> None:
    async with serving(make_fake(step_time=None)) as (fake, backend):
        fake.fail_next("KSampler", "RuntimeError", "mat1 and mat2 shapes cannot be multiplied")
        error = await expect_failure(backend, job(batch_size=2), "backend_failed")
        assert error.message == (
            f"ComfyUI at {backend.url}: KSampler failed: RuntimeError: "
            "mat1 and mat2 shapes cannot be multiplied"
        )
        await nothing_left(fake)  # the second image was taken back, queued or running
        assert "success" not in fake.statuses
        fake.step_time = 0.0
        assert len((await backend.generate(job(), ignore)).images) == 1  # and it works again


async def test_out_of_memory_says_so() -> None:
    async with serving() as (fake, backend):
        fake.fail_next("KSampler", *OUT_OF_MEMORY)
        error = await expect_failure(backend, job(), "backend_failed")
    assert "out of GPU memory in KSampler: Allocation on device" in error.message


async def test_a_checkpoint_gone_from_comfyui_is_unsupported_naming_the_field() -> None:
    async with serving() as (fake, backend):
        await backend.capabilities()
        fake.checkpoints.remove("SDXL/sdxl-base.safetensors")  # our list is stale
        error = await expect_failure(backend, job(model="sdxl-base"), "unsupported")
        assert "model (CheckpointLoaderSimple.ckpt_name): Value not in list: ckpt_name: " in (
            error.message
        )
        # Read again at once: the next job is refused before anything is queued.
        await expect_failure(backend, job(model="sdxl-base"), "unsupported")
        assert len(prompts(fake)) == 1


NODE_ERRORS = {
    "error": {
        "type": "prompt_outputs_failed_validation",
        "message": "Prompt outputs failed validation",
        "details": "",
        "extra_info": {},
    },
    "node_errors": {
        "7": {
            "errors": [
                {
                    "type": "value_bigger_than_max",
                    "message": "Value 4 bigger than max of 3",
                    "details": "steps",
                    "extra_info": {"input_name": "steps", "received_value": 4},
                }
            ],
            "dependent_outputs": ["9"],
            "class_type": "KSampler",
        }
    },
}
MISSING_NODE = {
    "error": {
        "type": "missing_node_type",
        "message": "Node 'PreviewImage' not found. The custom node may not be installed.",
        "details": "Node ID '#9'",
        "extra_info": {},
    },
    "node_errors": {},
}


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (400, NODE_ERRORS, "steps (KSampler.steps): Value 4 bigger than max of 3: steps"),
        (400, MISSING_NODE, "Node 'PreviewImage' not found. The custom node may not be installed"),
        (400, b"<html>Bad Request</html>", "refused the workflow: <html>Bad Request</html>"),
        (500, b"Internal Server Error", "/prompt failed: HTTP 500: Internal Server Error"),
        (200, {"number": 1}, "/prompt answered without a prompt_id"),
    ],
)
async def test_a_refused_prompt_is_a_backend_failure(
    status: int, body: object, message: str
) -> None:
    async with serving() as (fake, backend):
        fake.inject("/prompt", status, body)
        error = await expect_failure(backend, job(), "backend_failed")
        assert message in error.message
        assert len((await backend.generate(job(), ignore)).images) == 1


@pytest.mark.parametrize(
    ("path", "status", "body", "message"),
    [
        ("/view", 200, b"not a png", "/view answered something that is not a PNG"),
        ("/view", 200, png()[:-20], "/view answered a PNG that cannot be decoded"),
        ("/view", 404, b"", "/view failed: HTTP 404"),
        ("/history/*", 200, b"[]", "/history is not a JSON object"),
        ("/history/*", 500, b"oops", "failed: HTTP 500: oops"),
    ],
)
async def test_a_garbled_result_is_a_backend_failure(
    path: str, status: int, body: object, message: str
) -> None:
    async with serving() as (fake, backend):
        fake.inject(path, status, body)
        error = await expect_failure(backend, job(), "backend_failed")
        assert message in error.message
        assert len((await backend.generate(job(), ignore)).images) == 1


async def test_a_comfyui_that_goes_away_and_comes_back() -> None:
    fake = make_fake()
    async with AsyncExitStack() as first_run:
        url = await first_run.enter_async_context(open_fake_comfyui(fake))
        async with open_comfyui_backend(url, config=FAST) as backend:
            assert len((await backend.capabilities()).models) == 2
            assert len((await backend.generate(job(), ignore)).images) == 1
            await first_run.aclose()  # ComfyUI stops

            with pytest.raises(BackendUnavailable, match="cannot reach it"):
                await backend.capabilities()
            error = await expect_failure(backend, job(), "backend_failed")
            assert "cannot reach it" in error.message

            fake.forget()  # a restarted ComfyUI
            async with open_fake_comfyui(fake, url.removeprefix("http://")) as again:
                assert again == url
                assert len((await backend.capabilities()).models) == 2
                assert len((await backend.generate(job(), ignore)).images) == 1


async def test_comfyui_going_away_mid_job_fails_it() -> None:
    fake = make_fake(step_time=None)
    stop = trio.Event()

    async def serve(*, task_status=trio.TASK_STATUS_IGNORED) -> None:  # type: ignore[no-untyped-def]
        async with open_fake_comfyui(fake) as url:
            task_status.started(url)
            await stop.wait()

    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve)
        async with open_comfyui_backend(url, config=FAST) as backend:

            async def stop_when_running() -> None:
                await fake.wait_running()
                stop.set()  # ComfyUI stops

            nursery.start_soon(stop_when_running)
            error = await expect_failure(backend, job(), "backend_failed")
    assert "cannot reach it" in error.message


async def test_without_a_websocket_the_job_follows_the_history() -> None:
    fake = make_fake()
    fake.accept_websockets = False  # a proxy that does not pass websockets on
    steps: list[tuple[int, int]] = []
    async with serving(fake) as (fake, backend):
        output = await backend.generate(job(batch_size=2), lambda *step: steps.append(step))
    assert len(output.images) == 2
    assert steps == [(4, 8), (8, 8)]  # image by image


@pytest.mark.parametrize("auth", [("alice", "s3cret"), "token-123"], ids=["basic", "bearer"])
async def test_credentials_go_with_every_request_and_the_websocket(
    auth: tuple[str, str] | str,
) -> None:
    async with serving(make_fake(auth=auth), auth=auth) as (_, backend):
        assert len((await backend.capabilities()).models) == 2
        steps: list[tuple[int, int]] = []
        output = await backend.generate(job(), lambda *step: steps.append(step))
    assert len(output.images) == 1
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]  # progress came over the websocket


@pytest.mark.parametrize("auth", [None, ("alice", "wrong"), "wrong-token"])
async def test_missing_or_wrong_credentials_are_reported(
    auth: tuple[str, str] | str | None,
) -> None:
    async with serving(make_fake(auth=("alice", "s3cret")), auth=auth) as (fake, backend):
        with pytest.raises(BackendUnavailable, match=r"HTTP 401.*check --comfyui-auth"):
            await backend.capabilities()
        error = await expect_failure(backend, job(), "backend_failed")
        assert "HTTP 401" in error.message
        assert not fake.requests  # nothing got past auth


@pytest.mark.parametrize("url", ["ftp://127.0.0.1:8188", "127.0.0.1:8188", "http://"])
async def test_a_bad_url_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError):
        async with open_comfyui_backend(url):
            pass
