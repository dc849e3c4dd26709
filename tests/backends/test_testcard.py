import io

import pytest
import trio
from PIL import Image, ImageChops, ImageStat

from sdcn_p2p.backends import Capabilities
from sdcn_p2p.backends.testcard import (
    TestcardBackend,
    TestcardConfig,
    open_testcard_backend,
    render_card,
)
from sdcn_p2p.errors import ConfigError, JobError
from sdcn_p2p.identity import Identity
from sdcn_p2p.jobs import JobRequest
from sdcn_p2p.records import Advert

CONFIG = TestcardConfig(models=("testcard-v1", "testcard-xl"), loras=("pixel-art", "detail"))
JOB = JobRequest(
    kind="txt2img",
    model="testcard-v1",
    prompt="a lighthouse at dusk",
    loras=(("pixel-art", 0.5),),
    seed=1234,
    width=256,
    height=256,
)


def ignore(step: int, total: int) -> None:
    pass


def pixels(png: bytes) -> Image.Image:
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    return Image.open(io.BytesIO(png)).convert("RGB")


def difference(a: bytes, b: bytes) -> float:
    """Mean absolute difference of two same-sized PNGs, 0 to 255."""
    return sum(ImageStat.Stat(ImageChops.difference(pixels(a), pixels(b))).mean) / 3


async def generate(job: JobRequest, config: TestcardConfig = CONFIG) -> list[bytes]:
    return (await TestcardBackend(config).generate(job, ignore)).images


async def test_the_same_job_gives_the_same_bytes() -> None:
    first = await generate(JOB)
    assert await generate(JOB) == first
    async with open_testcard_backend(CONFIG) as backend:
        output = await backend.generate(JOB, ignore)
    assert output.images == first
    assert output.info == {"testcard": True, "seeds": [1234]}
    assert pixels(first[0]).size == (256, 256)


@pytest.mark.parametrize(
    "change",
    [
        {"prompt": "a lighthouse at dawn"},
        {"negative_prompt": "fog"},
        {"seed": 1235},
        {"model": "testcard-xl"},
        {"sampler_name": "Euler"},
        {"sampler_name": "DPM++ 2M Karras"},
        {"steps": 21},
        {"cfg_scale": 7.5},
        {"loras": (("detail", 0.5),)},
        {"loras": (("pixel-art", 0.6),)},
        {"loras": (("pixel-art", 0.5), ("detail", 1.0))},
        {"loras": ()},
    ],
)
async def test_any_change_changes_the_picture_visibly(change: dict) -> None:
    base, changed = await generate(JOB), await generate(JobRequest(**{**_fields(JOB), **change}))
    assert difference(base[0], changed[0]) > 20


def _fields(job: JobRequest) -> dict:
    return {name: getattr(job, name) for name in job.__dataclass_fields__}


async def test_model_names_match_like_adverts_do() -> None:
    renamed = JobRequest(**{**_fields(JOB), "model": "TESTCARD-V1", "loras": (("Pixel-Art", 0.5),)})
    assert await generate(renamed) == await generate(JOB)


async def test_a_batch_uses_consecutive_seeds() -> None:
    batch = JobRequest(**{**_fields(JOB), "batch_size": 3})
    output = await TestcardBackend(CONFIG).generate(batch, ignore)
    assert output.info["seeds"] == [1234, 1235, 1236]
    singles = [(await generate(JOB.with_seed(1234 + i)))[0] for i in range(3)]
    assert output.images == singles
    assert len(set(output.images)) == 3


async def test_img2img_blends_the_init_image_by_denoising_strength() -> None:
    source = Image.new("RGB", (100, 60), (200, 30, 90))
    buffer = io.BytesIO()
    source.save(buffer, "JPEG")
    card = (await generate(JOB))[0]
    images = {}
    for strength in (0.0, 0.5, 1.0):
        job = JobRequest(
            **{
                **_fields(JOB),
                "kind": "img2img",
                "init_image": buffer.getvalue(),
                "denoising_strength": strength,
            }
        )
        images[strength] = (await generate(job))[0]
    resized = source.resize((256, 256))
    assert max(ImageStat.Stat(ImageChops.difference(pixels(images[0.0]), resized)).extrema)[1] <= 3
    assert pixels(images[1.0]).tobytes() == pixels(card).tobytes()
    assert difference(images[0.5], images[0.0]) > 10
    assert difference(images[0.5], card) > 10


async def test_an_undecodable_init_image_is_a_backend_failure() -> None:
    job = JobRequest(**{**_fields(JOB), "kind": "img2img", "init_image": b"\x89PNG broken"})
    with pytest.raises(JobError) as caught:
        await generate(job)
    assert caught.value.code == "backend_failed"


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"model": "sd-v1-5"}, "model 'sd-v1-5'"),
        ({"loras": (("anime", 1.0),)}, "LoRA 'anime'"),
        ({"sampler_name": "Euler z"}, "sampler 'Euler z'"),
        ({"sampler_name": "DPM++ 2M Turbo"}, "sampler 'DPM++ 2M Turbo'"),
        ({"width": 2048, "height": 2056}, "2048x2056"),
    ],
)
async def test_what_is_not_offered_is_unsupported(change: dict, named: str) -> None:
    with pytest.raises(JobError) as caught:
        await generate(JobRequest(**{**_fields(JOB), **change}))
    assert caught.value.code == "unsupported"
    assert named in caught.value.message


async def test_capabilities_say_test_card_and_fit_an_advert() -> None:
    caps = await TestcardBackend(CONFIG).capabilities()
    assert isinstance(caps, Capabilities)
    assert caps.backend == "testcard"
    assert [m.name for m in caps.models] == ["testcard-v1", "testcard-xl"]
    assert all("test card" in m.title for m in caps.models)
    assert [lo.name for lo in caps.loras] == ["pixel-art", "detail"]
    assert "Euler a" in caps.samplers and "DPM++ 2M" in caps.samplers
    assert "karras" in caps.schedulers
    identity = Identity.from_seed(bytes(32))
    advert = Advert(
        identity.peer_id,
        seq=1,
        issued_at=1.0,
        ttl=60,
        backend=caps.backend,
        models=caps.models,
        loras=caps.loras,
        samplers=caps.samplers,
        max_pixels=caps.max_pixels,
        max_steps=caps.max_steps,
    )
    assert advert.has_model("TestCard-XL")


async def test_speed_paces_the_job_and_reports_every_step(autojump_clock) -> None:
    config = TestcardConfig(speed=4.0)
    job = JobRequest(kind="txt2img", model="testcard-v1", prompt="x", seed=7, steps=8)
    job = JobRequest(**{**_fields(job), "width": 1024, "batch_size": 2})  # cost: 8 * 2 * 2 = 32
    seen = []

    def progress(step: int, total: int) -> None:
        seen.append((step, total, trio.current_time()))

    start = trio.current_time()
    output = await TestcardBackend(config).generate(job, progress)
    assert [(s, t) for s, t, _ in seen] == [(i, 8) for i in range(1, 9)]
    assert [when - start for _, _, when in seen] == pytest.approx([i for i in range(1, 9)])
    assert len(output.images) == 2
    assert pixels(output.images[0]).size == (1024, 512)


async def test_without_speed_it_draws_at_once_and_reports_the_end(autojump_clock) -> None:
    seen = []
    start = trio.current_time()
    await TestcardBackend(CONFIG).generate(JOB, lambda step, total: seen.append((step, total)))
    assert trio.current_time() == start
    assert seen == [(20, 20)]


async def test_cancelling_stops_a_paced_job(autojump_clock) -> None:
    backend = TestcardBackend(TestcardConfig(loras=CONFIG.loras, speed=0.5))  # 0.5 s a step
    seen = []
    with trio.move_on_after(2.6):
        await backend.generate(JOB, lambda step, total: seen.append(step))
        pytest.fail("the job was not cancelled")
    assert seen == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"models": ()},
        {"models": ("",)},
        {"loras": ("x" * 257,)},
        {"samplers": ()},
        {"samplers": ("x" * 65,)},
        {"speed": 0.0},
    ],
)
def test_bad_configuration_is_refused(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        TestcardConfig(**kwargs)


def test_render_card_is_deterministic_and_sized() -> None:
    params = {"model": "m", "seed": 1}
    png = render_card(params, 64, 128)
    assert render_card(params, 64, 128) == png
    assert pixels(png).size == (64, 128)
    assert render_card(params, 64, 128, title="FAKE WEBUI") != png
